"""Cost-balanced owners: matrices split over groups of devices (issue 24).

The 8-device comparisons run tests/_balance_worker.py in a subprocess (the
number of simulated CPU devices is fixed when JAX starts), on hand-made trees,
a Flax NNX scan-over-layers model trained through nnx.Optimizer and, where
transformers is installed, its Flax Llama; the planning and byte formulas are
checked here on one device.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optax_orth
from optax_orth._src import orthogonalizers as orth_lib
from optax_orth._src import sharding as sharding_lib
from optax_orth._src import split_newton_schulz as split_lib

ROOT = Path(__file__).resolve().parents[1]
BF16 = split_lib.split_options(orth_lib.make_newton_schulz(dtype=jnp.bfloat16))


@pytest.fixture(scope="module")
def balanced():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  out = ROOT / ".pytest_cache" / f"balance_{os.getpid()}.json"
  out.parent.mkdir(exist_ok=True)
  proc = subprocess.run(
    [sys.executable, "-m", "tests._balance_worker", str(out)],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())
  out.unlink()
  return result


def test_split_paths_equal_one_device(balanced):
  """Every case and optimizer: 4 steps on 8 devices equal 4 steps on one."""
  hugging_face = importlib.util.find_spec("transformers") is not None
  flax = importlib.util.find_spec("flax") is not None
  assert len(balanced) == 21 + 3 * hugging_face + 3 * flax
  for key, r in balanced.items():
    assert r["diff"] <= 1e-5, (key, r["diff"])


def test_split_paths_keep_every_layout(balanced):
  """Without out_shardings, the updates come back in their parameters'
  layouts and the state in its own, whatever layout the split path assumed
  (replicated and fan-out-sharded leaves included)."""
  for key, r in balanced.items():
    if "moved" in r:
      assert r["moved"] == [], (key, r["moved"])


def test_split_paths_balance_the_flops(balanced):
  """Per-device FLOPs within 1.1x of the single-device FLOPs over the owners."""
  for key, r in balanced.items():
    if r["flops_ratio"] is None:  # a whole train step (nnx_scan)
      continue
    owners = 4 if "owner_data" in key else 8  # the model axis is not an owner
    assert r["flops_ratio"] * owners / 8 <= 1.1, (key, r["flops_ratio"])


def test_split_paths_are_taken(balanced):
  """Uneven counts, one matrix, MoE stacks: Gram reduce-scatters in the HLO."""
  for key, r in balanced.items():
    assert r["collectives"]["reduce-scatter"] >= 1, (key, r["collectives"])


def test_fsdp_layouts_have_no_collective_permute(balanced):
  """Kernels sharded on their fan-in axis come back without permutes."""
  for key, r in balanced.items():
    if not key.startswith("odd/"):
      assert r["collectives"]["collective-permute"] == 0, (key, r["collectives"])


def test_split_groups_are_leading_factors():
  assert [g for g, _, _ in sharding_lib.split_groups([8])] == [2, 4, 8]
  groups = sharding_lib.split_groups([4, 2])
  assert groups == [(2, 0, 2), (4, 0, 4), (8, 1, 2)]


@pytest.mark.parametrize(
  ("m", "sizes", "g"),
  [
    (64, [64], None),  # one matrix per device: whole
    (48, [64], 4),  # 192 pieces, 3 per device
    (32, [64], 2),
    (1, [8], 8),  # one matrix, split over every device
    (3, [8], 8),
    (12, [2, 4], 2),  # 24 pieces on 8 devices
  ],
)
def test_plan_picks_the_cheapest_group(m, sizes, g):
  plan = sharding_lib.plan_group(BF16, m, 1024, 4096, jnp.float32, sizes)
  assert (None if plan is None else plan.g) == g
  n = math.prod(sizes)
  whole = split_lib.split_flops(BF16, 1024, 4096, 1, jnp.float32)
  ideal = m * whole / n
  chosen = sharding_lib.device_flops(
    m, n, g or 1, split_lib.split_flops(BF16, 1024, 4096, g or 1, jnp.float32)
  )
  assert chosen <= 1.1 * ideal or g is None


def test_plan_leaves_small_tall_and_custom_whole():
  assert sharding_lib.plan_group(BF16, 3, 64, 96, jnp.float32, [8]) is None  # < 1e9
  assert sharding_lib.plan_group(BF16, 3, 64, 96, jnp.float32, [8], 0) is not None
  assert sharding_lib.plan_group(BF16, 3, 96, 64, jnp.float32, [8], 0) is None
  assert split_lib.split_options(lambda x: x) is None
  spectral = orth_lib.make_newton_schulz(preconditioning="spectral")
  assert split_lib.split_options(spectral) is None
  off = optax_orth.OwnerSharding(split_min_flops=None)
  assert off.split_min_flops is None


def test_split_bytes_formula():
  """Plain: per step RS (carry) + 2 AG (operand); Gram: per segment RS + (3m-2) AG."""
  r, c, g = 1024, 1536, 4  # method "plain" in bfloat16 at c <= 1.5 r
  method, restart = split_lib.resolved_method(BF16, r, c, jnp.float32)
  assert method == "plain"
  unit = (g - 1) / g * r * r
  assert split_lib.split_bytes(BF16, r, c, g, jnp.float32) == 5 * unit * (4 + 2 * 2)
  method, restart = split_lib.resolved_method(BF16, r, 4 * r, jnp.float32)
  assert (method, restart) == ("gram", 2)  # segments of 2, 2, 1 steps
  got = split_lib.split_bytes(BF16, r, 4 * r, g, jnp.float32)
  assert got == unit * (2 * (4 + 4 * 2) + (4 + 2 * 2))
  assert split_lib.split_bytes(BF16, r, c, 1, jnp.float32) == 0


@pytest.mark.parametrize("method", ["plain", "gram"])
def test_split_iteration_on_one_device_equals_newton_schulz(method):
  """A group of one: the split iteration is the whole-matrix iteration."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("g",))
  x = jax.random.normal(jax.random.key(0), (3, 16, 40), jnp.float32)
  opts = split_lib.split_options(orth_lib.make_newton_schulz(method=method))
  assert opts is not None
  run = jax.shard_map(
    lambda x: split_lib.split_newton_schulz(x, opts, method, 3, "g", jnp.int32(0)),
    mesh=mesh, in_specs=P("g"), out_specs=P("g"),
  )  # fmt: skip
  want = orth_lib.newton_schulz(x, method=method)
  np.testing.assert_allclose(jax.jit(run)(x), want, rtol=1e-5, atol=1e-6)
