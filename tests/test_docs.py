"""The documentation's code runs, and its API reference names every public name.

Every ```python fenced block of ``docs/*.md`` and ``README.md`` is executed.
The blocks of one page run in order in one namespace (a page may build on its
earlier blocks), in a temporary working directory. A block right after the
line ``<!-- docs-test: skip -->`` is not run (for code that needs several
processes, a GPU or a data set); use it sparingly. A ``text`` block right
after a python block and the line ``<!-- docs-test: output -->`` is what that
python block prints, and must stay so.

The Sphinx build itself (``python -m sphinx -W``) runs in CI (``.ci/run``).
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import sys
import textwrap
import types

import pytest

import optax_orth
from tests import helpers as h

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- docs-test: skip -->"
# Before a ``text`` block right after a python block: what that block prints.
OUTPUT_MARK = "<!-- docs-test: output -->"

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*(.*?)[ \t]*$")


def _pages() -> list[pathlib.Path]:
  pages = sorted(p for p in DOCS.glob("*.md") if "_build" not in p.parts)
  return [*pages, ROOT / "README.md"]


def _closes(line: str, fence: str) -> bool:
  stripped = line.strip()
  return stripped.startswith(fence) and not stripped.strip(fence[0])


def extract_blocks(text: str) -> list[tuple[int, str, str, bool]]:
  """``(first line, info string, code, skipped)`` of every fenced block."""
  lines = text.splitlines()
  blocks = []
  i = 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    fence, info = m.group(1), m.group(2)
    j = i - 1
    while j >= 0 and not lines[j].strip():
      j -= 1
    skipped = j >= 0 and lines[j].strip() == SKIP_MARK
    k = i + 1
    while k < len(lines) and not _closes(lines[k], fence):
      k += 1
    code = textwrap.dedent("\n".join(lines[i + 1 : k]))
    blocks.append((i + 1, info, code, skipped))
    i = k + 1
  return blocks


def _python_blocks(page: pathlib.Path) -> list[tuple[int, str, str | None]]:
  """``(line, code, expected)``: ``expected`` is the printed output that the
  page shows for the block (a ``text`` block marked ``OUTPUT_MARK``), or None."""
  text = page.read_text()
  lines = text.splitlines()
  blocks = extract_blocks(text)
  out = []
  for i, (line, info, code, skipped) in enumerate(blocks):
    if info != "python" or skipped:
      continue
    expected = None
    if i + 1 < len(blocks) and blocks[i + 1][1] == "text":
      before = [x.strip() for x in lines[: blocks[i + 1][0] - 1] if x.strip()]
      if before and before[-1] == OUTPUT_MARK:
        expected = blocks[i + 1][2]
    out.append((line, code, expected))
  return out


def test_extract_blocks():
  text = "\n".join(
    [
      "# t",
      "```python",
      "x = 1",
      "```",
      "",
      SKIP_MARK,
      "",
      "```python",
      "raise RuntimeError",
      "```",
      "````md",
      "```python",
      "nested = True",
      "```",
      "````",
      "- item",
      "",
      "  ```python",
      "  y = 2",
      "  ```",
      "```bash",
      "ls",
      "```",
    ]
  )
  blocks = extract_blocks(text)
  assert [(b[0], b[1], b[3]) for b in blocks] == [
    (2, "python", False),
    (8, "python", True),
    (11, "md", False),
    (18, "python", False),
    (21, "bash", False),
  ]
  assert blocks[0][2] == "x = 1"
  assert blocks[2][2] == "```python\nnested = True\n```"
  assert blocks[3][2] == "y = 2"


_PAGES = [p for p in _pages() if p.exists()]


@pytest.mark.parametrize("page", _PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(page, tmp_path, monkeypatch):
  blocks = _python_blocks(page)
  if not blocks:
    pytest.skip(f"{page.name} has no python examples")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # A real module, so that dataclasses (Linen modules) defined in it resolve.
  module = types.ModuleType(f"docs_example_{page.stem}")
  monkeypatch.setitem(sys.modules, module.__name__, module)
  for line, code, expected in blocks:
    name = f"{page.relative_to(ROOT)}:{line}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      exec(compile(code, name, "exec"), module.__dict__)
    if expected is not None:  # the page shows what the code prints
      assert printed.getvalue().strip() == expected.strip(), name


@pytest.mark.parametrize("page", _PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_are_fenced_as_python(page):
  """Python code fenced as ``py`` or in a code-block directive would not run."""
  bad = [
    line
    for line, info, _, skipped in extract_blocks(page.read_text())
    if not skipped
    and re.fullmatch(r"(py|python3|\{code-block\}\s*python|\{code\}\s*python)", info)
  ]
  assert not bad, f"{page.name}: fence these as ```python (lines {bad})"


_DIRECTIVE = re.compile(
  r"^\.\. (?:auto)?(?:function|class|data|exception|attribute)::\s+([\w.]+)", re.M
)


def documented_names() -> set[str]:
  return set(_DIRECTIVE.findall((DOCS / "api.rst").read_text()))


def public_names() -> set[str]:
  """The public names as the API reference spells them."""
  return {n if "." not in n else f"optax_orth.{n}" for n in h.public_objects()}


def test_api_reference_covers_all_public_names():
  # The diagnostics namespace has its own reference, at the end of its page.
  documented = documented_names() | {
    m for m in _DIRECTIVE.findall((DOCS / "diagnostics.md").read_text())
  }
  missing = sorted(public_names() - documented)
  assert not missing, f"public names missing from the API reference: {missing}"


def test_private_modules_stay_private():
  """What users import is __all__ and the namespaces; nothing else is public."""
  leaked = sorted(
    n
    for n, v in vars(optax_orth).items()
    if not n.startswith("_") and n not in optax_orth.__all__
  )
  assert not leaked, f"optax_orth exposes names outside __all__: {leaked}"


def _resolves(name: str) -> bool:
  """``name`` (``namo`` or ``routing_lib.HEAD_PATTERNS``) exists."""
  parts = name.split(".")
  obj = optax_orth
  for part in parts[1:] if parts[0] == "optax_orth" else parts:
    if not hasattr(obj, part):
      return False
    obj = getattr(obj, part)
  return True


def test_api_reference_names_exist():
  stale = sorted(n for n in documented_names() if not _resolves(n))
  assert not stale, f"docs/api.rst documents names optax_orth lacks: {stale}"


@pytest.mark.parametrize("name", h.NAMES)
def test_alias_examples_run_as_doctests(name):
  """Each alias's ``Examples:`` section runs, and prints what it says."""
  import doctest

  fn = getattr(optax_orth, name)
  assert "\n  Examples:\n" in (fn.__doc__ or ""), f"{name} has no Examples section"
  runner = doctest.DocTestRunner()
  for test in doctest.DocTestFinder().find(fn, name, globs={}):
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.attempted >= 5 and result.failed == 0, result
