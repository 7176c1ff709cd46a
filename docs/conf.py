"""Sphinx configuration of the optax_orth documentation.

Build (warnings are errors, as in CI)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST) or reST; the API reference is generated from the
docstrings by autodoc + napoleon (Google-style ``Args:``/``Returns:``
sections), with the math rendered by MathJax.
"""

from __future__ import annotations

import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # Import the package from the checkout.

import optax_orth  # noqa: E402

project = "optax_orth"
author = "The optax_orth authors"
copyright = "2026, The optax_orth authors"
version = release = optax_orth.__version__

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ / $$...$$ math, ::: fences, heading anchors for [text](#anchor).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc + napoleon: Google-style docstrings, as in optax.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# The annotations are postponed (``from __future__ import annotations``), so
# these aliases keep the signatures readable instead of expanding the unions.
autodoc_type_aliases = {
  "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
  "jax.typing.DTypeLike": "jax.typing.DTypeLike",
  "jax.typing.ArrayLike": "jax.typing.ArrayLike",
  "DimensionNumbersSpec": "optax_orth._src.routing.DimensionNumbersSpec",
  "orth_lib.CoeffsLike": "optax_orth._src.orthogonalizers.CoeffsLike",
  "orth_lib.Orthogonalizer": "optax_orth._src.orthogonalizers.Orthogonalizer",
  "orth_lib.Preconditioning": "optax_orth._src.orthogonalizers.Preconditioning",
  "optax.Updates": "optax.Updates",
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as a field list (no duplicate objects).
napoleon_use_rtype = False

# MathJax 3 (Sphinx's default) with textmacros, so that ``\text{fan\_in}`` in
# the docstrings renders as "fan_in" rather than with a literal backslash.
mathjax3_config = {
  "loader": {"load": ["[tex]/textmacros"]},
  "tex": {"packages": {"[+]": ["textmacros"]}},
}

html_theme = "furo"
html_title = f"optax_orth {release}"
html_static_path: list[str] = []

# ---------------------------------------------------------------------------
# A toctree that tolerates pages not written yet, and picks up new ones.
#
# index.md lists the pages in reading order. Pages in OPTIONAL_PAGES that do
# not exist (yet) are dropped from that list before Sphinx reads it, and any
# page in docs/ that the list does not name is inserted before the API
# reference, in alphabetical order. A typo in a page that is not optional
# still fails the build (Sphinx: "nonexisting document").

OPTIONAL_PAGES = {
  "design",
  "distributed",
  "diagnostics",
  "reliability",
  "benchmarks",
  "results",
}
_TOCTREE = re.compile(r"(```\{toctree\}\n(?:\:[^\n]*\n)*\n?)(.*?)(\n```)", re.DOTALL)


def _pages() -> set[str]:
  return {
    str(p.relative_to(DOCS).with_suffix(""))
    for p in DOCS.glob("*")
    if p.suffix in (".md", ".rst") and p.stem != root_doc
  }


def _filter_toctree(app, docname, source):
  del app
  if docname != root_doc:
    return
  pages = _pages()

  def fix(match):
    listed = [line.strip() for line in match.group(2).splitlines() if line.strip()]
    kept = [p for p in listed if p in pages or p not in OPTIONAL_PAGES]
    extra = sorted(pages - set(listed))
    at = kept.index("api") if "api" in kept else len(kept)
    kept[at:at] = extra
    return match.group(1) + "\n".join(kept) + match.group(3)

  source[0] = _TOCTREE.sub(fix, source[0], count=1)


_ALIAS_REPR = re.compile(r"TypeAliasForwardRef\('([^']+)'\)")


def _tidy_signature(app, what, name, obj, options, signature, return_annotation):
  """Prints ``alias | None`` as such, not as ``TypeAliasForwardRef('alias')``."""
  del app, what, name, obj, options
  tidy = lambda s: _ALIAS_REPR.sub(r"\1", s) if s else s
  return tidy(signature), tidy(return_annotation)


def setup(app):
  app.connect("source-read", _filter_toctree)
  app.connect("autodoc-process-signature", _tidy_signature)
