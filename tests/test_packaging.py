"""What a project that depends on optax_orth relies on: the floors it states
are the ones CI tests, and the core does not pull in flax."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
  tomllib = pytest.importorskip("tomllib")
  return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floors() -> dict[str, str]:
  pins = re.findall(
    r"^([\w-]+)==([\w.]+)$", (ROOT / ".ci/floors.txt").read_text(), re.M
  )
  return dict(pins)


def test_stated_floors_are_the_tested_floors():
  project = _pyproject()["project"]
  stated = project["dependencies"] + project["optional-dependencies"]["flax"]
  stated = dict(re.fullmatch(r"([\w-]+)>=([\w.]+)", s).groups() for s in stated)
  tested = _floors()
  assert {k: v for k, v in tested.items() if k != "jaxlib"} == stated
  assert tested["jaxlib"] == tested["jax"]


def test_flax_is_an_extra_not_a_dependency():
  project = _pyproject()["project"]
  assert not any(d.startswith("flax") for d in project["dependencies"])
  assert project["optional-dependencies"]["flax"] == ["flax>=0.12.0"]


def test_import_loads_no_flax_module():
  code = (
    "import sys, optax_orth; "
    "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax'))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
  )
  assert out.stdout.strip() == "[]", out.stdout
