"""Subprocess worker for tests/test_split_leaves.py: split leaves on 8 devices.

Usage: ``python -m tests._split_sharding_worker OUT.json``. Sets
``--xla_force_host_platform_device_count=8`` before JAX starts and writes, for
each optimizer, the largest difference between the updates under the owner
scheme on an ``("fsdp",)`` mesh and on one device, whether every update kept
its parameter's sharding, and the number of all-to-alls in the compiled step.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_orth
from optax_orth import SplitDimensionNumbers as SplitDN

STEPS = 3
SHAPES = {
  "qkv": (16, 16 + 8 + 8),  # GQA fused, sharded on fan_in
  "stack": (8, 16, 24 + 8),  # stacked fused, sharded on the layer axis
  "heads": (16, 8 * 4),  # per head, sharded on the heads' axis
  "out": (4 * 8, 16),  # per head on the reduction axis, replicated
}
DIMS = {
  "qkv": SplitDN(0, 1, split_sizes=(16, 8, 8)),
  "stack": SplitDN(1, 2, split_sizes=(24, 8)),
  "heads": SplitDN(0, 1, heads=8),
  "out": SplitDN(0, 1, heads=4, split_axis=0),
}
SPECS = {
  "qkv": P("fsdp", None),
  "stack": P("fsdp", None, None),
  "heads": P(None, "fsdp"),
  "out": P(),
}


def optimizers(sharding):
  kw = {"weight_dimension_numbers": DIMS, "sharding": sharding}
  return {
    "muon": optax_orth.muon(
      0.02, muon_weight_dimension_numbers=DIMS, sharding=sharding
    ),
    "namo_d": optax_orth.namo_d(0.02, **kw),
    "normuon": optax_orth.normuon(0.02, weight_decay=0.1, **kw),
  }


def run(tx, params, grads, shardings=None):
  if shardings is None:
    update, state = jax.jit(tx.update), tx.init(params)
  else:
    s_sh = optax_orth.state_shardings(tx, params, shardings)
    params = jax.device_put(params, shardings)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)
    update = jax.jit(tx.update, out_shardings=(shardings, s_sh))
  out, kept, a2a = [], True, 0
  for g in grads:
    if shardings is not None:
      g = jax.device_put(g, shardings)
      if not out:
        hlo = update.lower(g, state, params).compile().as_text()
        a2a = optax_orth.measure.hlo_collective_bytes(hlo, 8)["all-to-all"]["count"]
    u, state = update(g, state, params)
    if shardings is not None:
      kept &= all(u[k].sharding.is_equivalent_to(shardings[k], u[k].ndim) for k in u)
    out.append(jax.tree.map(np.asarray, u))
  return out, kept, a2a


def main(out_path):
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  draw = lambda: {
    k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()
  }
  params, grads = draw(), [draw() for _ in range(STEPS)]
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  shardings = {k: NamedSharding(mesh, SPECS[k]) for k in SHAPES}
  result = {}
  single = optimizers(None)
  for name, tx in optimizers(optax_orth.OwnerSharding(mesh, "fsdp")).items():
    want, _, _ = run(single[name], params, grads)
    got, kept, a2a = run(tx, params, grads, shardings)
    diff = max(
      float(np.max(np.abs(a[k] - b[k])))
      for a, b in zip(got, want, strict=True)
      for k in a
    )
    result[name] = {"diff": diff, "kept_sharding": bool(kept), "all_to_all": a2a}
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1])
