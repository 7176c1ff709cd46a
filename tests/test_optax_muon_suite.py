"""optax's own Muon tests, run against ``optax_orth.muon``: a peer suite.

The optax wheel ships its test module as ``optax/contrib/_muon_test.py``. This
shim imports it from the installed package (nothing is copied into this
repository) and runs each of its test classes with ``optax.contrib._muon.muon``
replaced by :func:`optax_orth.muon` for the duration of each test. Every test
of the module runs. Those that exercise optax's internals rather than the
optimizer (``_compute_muon_reshape``, ``orthogonalize_via_newton_schulz``) are
unaffected by the shim and pass as they do for optax; all the others build the
optimizer through ``_muon.muon`` and so test this package.
"""

from unittest import mock

import pytest

import optax_orth

suite = pytest.importorskip("optax.contrib._muon_test")


def _against_optax_orth(cls):
  """A subclass of an optax test class whose tests build ``optax_orth.muon``."""

  def setUp(self):
    cls.setUp(self)
    patcher = mock.patch.object(suite._muon, "muon", optax_orth.muon)
    patcher.start()
    self.addCleanup(patcher.stop)

  return type(f"OptaxOrth{cls.__name__}", (cls,), {"setUp": setUp})


_CLASSES = [
  obj
  for name, obj in vars(suite).items()
  if isinstance(obj, type)
  and name.endswith("Test")
  and obj.__module__ == suite.__name__
]
for _cls in _CLASSES:
  globals()[f"OptaxOrth{_cls.__name__}"] = _against_optax_orth(_cls)
del _cls  # so that pytest does not also collect optax's own class


def test_the_suite_was_found():
  assert _CLASSES, "optax.contrib._muon_test defines no test class"


def test_the_shim_replaces_the_optimizer():
  (cls,) = [globals()[f"OptaxOrth{c.__name__}"] for c in _CLASSES[:1]]
  case = cls(methodName=next(m for m in dir(cls) if m.startswith("test")))
  case.setUp()
  try:
    assert suite._muon.muon is optax_orth.muon
  finally:
    case.doCleanups()
  assert suite._muon.muon is not optax_orth.muon
