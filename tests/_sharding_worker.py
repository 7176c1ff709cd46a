"""Subprocess worker for tests/test_sharding.py (needs its own XLA flags).

Usage:
  python -m tests._sharding_worker compare OUT.json      # 8 simulated devices
  python -m tests._sharding_worker default gpt|moe OUT.json  # 8 devices
  python -m tests._sharding_worker reference OUT.npz     # one device
  python -m tests._sharding_worker process ID PORT OUT.npz  # 1 of 2 processes

``compare`` and ``default`` set ``--xla_force_host_platform_device_count=8``
themselves. ``compare`` writes, for every optimizer and mesh, the largest
difference between the sharded updates (``sharding=OwnerSharding(...)``,
``out_shardings`` from ``state_shardings``) and the single-device updates.
``default`` measures the default path (no ``sharding=``, plain ``jax.jit``
under ``jax.set_mesh``, no in/out shardings): a GPT-shaped tree against
``optax.contrib.muon``, MoE expert weights and tensor-parallel kernels on a
2-D mesh (see :func:`default`). ``process`` runs one of two processes of 4 CPU
devices each (gloo collectives on 127.0.0.1), the default path, and process 0
writes the sharded updates; ``reference`` writes the same on one device.
"""

from __future__ import annotations

import json
import os
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else "compare"
if MODE in ("compare", "default"):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
elif MODE == "process":
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_orth  # noqa: E402
from optax_orth import MuonDimensionNumbers as DimNums  # noqa: E402
from optax_orth._src.sharding import _type_bytes  # noqa: E402
from optax_orth.measure import hlo_collective_bytes  # noqa: E402

STEPS = 3
SHAPES = {
  "w_in": (32, 48),  # 2-D, sharded on fan_in
  "w_out": (48, 32),  # 2-D and tall, sharded on fan_out
  "stack": (8, 16, 24),  # stacked, sharded on the batch axis
  "stack_m": (4, 24, 16),  # stacked and tall, sharded on a matrix axis
  "odd": (3, 20, 12),  # odd count, replicated
  "rep": (24, 40),  # 2-D, replicated
  "bias": (48,),  # Adam
}
DIMS = {
  "w_in": DimNums(0, 1),
  "w_out": DimNums(0, 1),
  "stack": DimNums(1, 2),
  "stack_m": DimNums(1, 2),
  "odd": DimNums(1, 2),
  "rep": DimNums(0, 1),
  "bias": None,
}
# Parameter specs on a 1-D ("fsdp",) mesh and on a ("fsdp", "model") mesh.
SPECS_1D = {
  "w_in": P("fsdp", None),
  "w_out": P(None, "fsdp"),
  "stack": P("fsdp", None, None),
  "stack_m": P(None, "fsdp", None),
  "odd": P(),
  "rep": P(),
  "bias": P("fsdp"),
}
SPECS_2D = {
  "w_in": P("fsdp", "model"),
  "w_out": P("model", "fsdp"),
  "stack": P("fsdp", None, "model"),
  "stack_m": P(None, "fsdp", "model"),
  "odd": P(),
  "rep": P(None, "model"),
  "bias": P("model"),
}


def optimizers(sharding):
  return {
    "muon": optax_orth.muon(
      0.02, weight_decay=0.1, muon_weight_dimension_numbers=DIMS, sharding=sharding
    ),
    "namo": optax_orth.namo(0.02, weight_dimension_numbers=DIMS, sharding=sharding),
    "namo_d": optax_orth.namo_d(0.02, weight_dimension_numbers=DIMS, sharding=sharding),
    "normuon": optax_orth.normuon(
      0.02, weight_decay=0.1, weight_dimension_numbers=DIMS, sharding=sharding
    ),
  }


def data(seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [
    {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    for _ in range(STEPS)
  ]
  return params, grads


def run_single(tx, params, grads):
  """Updates of every step on one device, without sharding."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    out.append(jax.tree.map(np.asarray, u))
  return out


def put(tree, shardings):
  """Global arrays from host values (works with several processes)."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
    tree,
    shardings,
  )


def run_sharded(tx, params, grads, mesh, specs):
  """Updates of every step under jit with sharded params, grads and state."""
  p_sh = {k: NamedSharding(mesh, specs[k]) for k in params}
  s_sh = optax_orth.state_shardings(tx, params, p_sh)
  replicated = NamedSharding(mesh, P())
  params_d = put(params, p_sh)
  state = jax.jit(tx.init, out_shardings=s_sh)(params_d)
  update = jax.jit(tx.update, out_shardings=(p_sh, s_sh))
  gather = jax.jit(lambda t: t, out_shardings=replicated)
  out, hlo = [], None
  for g in grads:
    g = put(g, p_sh)
    if hlo is None:
      hlo = update.lower(g, state, params_d).compile().as_text()
    u, state = update(g, state, params_d)
    for k, x in u.items():
      assert x.sharding.is_equivalent_to(p_sh[k], x.ndim), (k, x.sharding)
    out.append(jax.tree.map(np.asarray, gather(u)))
  return out, hlo


def max_diff(a, b):
  return max(
    float(np.max(np.abs(x - y)))
    for sa, sb in zip(a, b, strict=True)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True)
  )


def flops_ratio(n):
  """Per-device FLOPs of the owner scheme over (single-device FLOPs / n)."""
  shape = (2 * n, 32, 64)
  mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,))
  params = {"w": jnp.zeros(shape)}
  sh = {"w": NamedSharding(mesh, P(None, "fsdp", None))}
  flops = []
  for sharding, shardings in ((None, None), (optax_orth.OwnerSharding(mesh), sh)):
    tx = optax_orth.muon(
      0.02, muon_weight_dimension_numbers=DimNums(1, 2), sharding=sharding
    )
    state = jax.eval_shape(tx.init, params)
    if shardings is None:
      fn = jax.jit(tx.update)
    else:
      s_sh = optax_orth.state_shardings(state, params, shardings)
      fn = jax.jit(tx.update, in_shardings=(sh, s_sh, sh), out_shardings=(sh, s_sh))
    compiled = fn.lower(params, state, params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops.append(cost["flops"])
  return flops[1] / (flops[0] / n)


def compare(out_path):
  params, grads = data()
  mesh_1d = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  mesh_2d = jax.make_mesh((4, 2), ("fsdp", "model"), axis_types=(AxisType.Auto,) * 2)
  configs = {
    "fsdp8": (mesh_1d, SPECS_1D, optax_orth.OwnerSharding(mesh_1d, "fsdp")),
    "fsdp4_model2": (mesh_2d, SPECS_2D, optax_orth.OwnerSharding(mesh_2d, "fsdp")),
    "fsdp4_model2_all": (mesh_2d, SPECS_2D, optax_orth.OwnerSharding(mesh_2d)),
  }
  txs = optimizers(None)
  reference = {
    k: run_single(txs[k], params, grads) for k in ("muon", "namo_d", "normuon")
  }
  result = {"diff": {}, "collectives": {}}
  for cname, (mesh, specs, sharding) in configs.items():
    names = {
      "fsdp8": ["muon", "normuon"],
      "fsdp4_model2": ["namo_d"],
      "fsdp4_model2_all": ["muon"],
    }[cname]
    for name in names:
      tx = optimizers(sharding)[name]
      got, hlo = run_sharded(tx, params, grads, mesh, specs)
      result["diff"][f"{cname}/{name}"] = max_diff(got, reference[name])
      coll = hlo_collective_bytes(hlo, 8)
      result["collectives"][f"{cname}/{name}"] = {
        k: v["count"] for k, v in coll.items()
      }
  # The ambient mesh (jax.set_mesh) on Explicit axes, with OwnerSharding().
  mesh_e = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh_e):
    tx = optimizers(optax_orth.OwnerSharding())["normuon"]
    got, _ = run_sharded(tx, params, grads, mesh_e, SPECS_1D)
  result["diff"]["explicit_ambient/normuon"] = max_diff(got, reference["normuon"])
  result["flops_ratio"] = flops_ratio(8)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)


# ---------------------------------------------------------------------------
# The default path: no sharding=, plain jax.jit under jax.set_mesh.

DIMS_2D = DimNums(0, 1)


def gpt_tree(layers=16, d=64, seed=0):
  """``layers`` x (qkv, attn_out, mlp_up, mlp_down): separate 2-D kernels."""
  rng = np.random.default_rng(seed)
  shapes = {"qkv": (d, 3 * d), "attn_out": (d, d), "mlp_up": (d, 4 * d)}
  shapes["mlp_down"] = (4 * d, d)
  return {
    f"layer{i}": {
      k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()
    }
    for i in range(layers)
  }


def default_optimizers(dims):
  return {
    "muon": optax_orth.muon(0.02, weight_decay=0.1, muon_weight_dimension_numbers=dims),
    "namo": optax_orth.namo(0.02, weight_dimension_numbers=dims),
    "namo_d": optax_orth.namo_d(0.02, weight_dimension_numbers=dims),
    "normuon": optax_orth.normuon(0.02, weight_dimension_numbers=dims),
  }


def _flops(compiled):
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def measure_default(tx, params, grads, mesh, specs):
  """One update on one device and under ``jax.set_mesh(mesh)``, both plain jit.

  ``specs``: a tree like ``params`` of ``PartitionSpec``. Returns the largest
  difference, per-device FLOPs over (one-device FLOPs / N), the collectives,
  and whether every update and state leaf came back in its input's sharding.
  """
  state = tx.init(params)
  single = jax.jit(tx.update)
  want, _ = single(grads, state, params)
  flops_1 = _flops(single.lower(grads, state, params).compile())
  with jax.set_mesh(mesh):
    sh = jax.tree.map(lambda p: NamedSharding(mesh, p), specs)
    p_d, g_d = jax.device_put(params, sh), jax.device_put(grads, sh)
    s_d = tx.init(p_d)  # eagerly, as nnx.Optimizer does: like the params
    update = jax.jit(tx.update)
    compiled = update.lower(g_d, s_d, p_d).compile()
    got, s_new = update(g_d, s_d, p_d)
  diff = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  )
  # Every update, and every state leaf that came in sharded (the momentum),
  # goes out in the sharding its input had.
  same = lambda xs, ys: all(
    x.sharding.is_equivalent_to(y.sharding, x.ndim)
    for x, y in zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True)
    if not y.sharding.is_fully_replicated
  )
  return {
    "diff": diff,
    "flops_ratio": _flops(compiled) / (flops_1 / mesh.size),
    "collectives": hlo_collective_bytes(compiled.as_text(), mesh.size),
    "layout_kept": same(got, g_d) and same(s_new, s_d),
    "largest_all_gather": largest_all_gather(compiled.as_text()),
  }


def largest_all_gather(hlo: str) -> int:
  """Bytes of the largest all-gather result in ``hlo`` (0 if none)."""
  sizes = [0]
  for line in hlo.splitlines():
    if " all-gather(" in line or " all-gather-start(" in line:
      result_type = line.split("=", 1)[1].split(" all-gather")[0]
      sizes.append(_type_bytes(result_type))
  return max(sizes)


def default_gpt(result):
  """The issue's configuration: 64 kernels FSDP-sharded on axis 0."""
  params = gpt_tree()
  grads = jax.tree.map(lambda x: 0.5 * x + 0.1, gpt_tree(seed=1))
  specs = jax.tree.map(lambda _: P("fsdp", None), params)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  for name, tx in default_optimizers(DIMS_2D).items():
    result[f"gpt/{name}"] = measure_default(tx, params, grads, mesh, specs)
  tx = optax.contrib.muon(0.02, muon_weight_dimension_numbers=DIMS_2D)
  result["gpt/optax.contrib.muon"] = measure_default(tx, params, grads, mesh, specs)
  mesh_e = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
  tx = default_optimizers(DIMS_2D)["namo_d"]
  result["gpt_explicit/namo_d"] = measure_default(tx, params, grads, mesh_e, specs)


def default_moe(result):
  """MoE experts ``(layers, experts, in, out)``, the expert axis sharded."""
  rng = np.random.default_rng(2)
  shape = (2, 8, 32, 48)
  params = {"experts": rng.standard_normal(shape).astype(np.float32)}
  grads = {"experts": rng.standard_normal(shape).astype(np.float32)}
  specs = {"experts": P(None, "expert", None, None)}
  dims = {"experts": DimNums(2, 3)}
  # On Explicit axes only muon: the per-matrix statistics of the other blocks
  # reshape (layers, experts@expert) to one batch axis, which JAX rejects there.
  for kind, names in (
    (AxisType.Auto, ("muon", "normuon")),
    (AxisType.Explicit, ("muon",)),
  ):
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(kind,))
    for name in names:
      tx = default_optimizers(dims)[name]
      key = f"moe_{str(kind).split('.')[-1].lower()}/{name}"
      result[key] = measure_default(tx, params, grads, mesh, specs)


def default_tensor_parallel(result):
  """A ("data", "model") mesh; kernels sharded over both (FSDP x TP)."""
  params = gpt_tree(layers=8)
  grads = jax.tree.map(lambda x: 0.5 * x + 0.1, gpt_tree(layers=8, seed=1))
  spec = {"qkv": P("data", "model"), "attn_out": P("model", "data")}
  spec |= {"mlp_up": P("data", "model"), "mlp_down": P("model", "data")}
  specs = {k: dict(spec) for k in params}
  for kind in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
    tx = default_optimizers(DIMS_2D)["namo_d"]
    key = f"tp_{str(kind).split('.')[-1].lower()}/namo_d"
    result[key] = measure_default(tx, params, grads, mesh, specs)
  result["tp_param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))


def default(part, out_path):
  """``part``: ``gpt`` (the issue's tree), or ``moe`` (MoE and the 2-D mesh)."""
  result = {}
  if part == "gpt":
    default_gpt(result)
  else:
    default_moe(result)
    default_tensor_parallel(result)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)


def run_default(tx, params, grads, mesh, specs):
  """Updates of every step: plain jit under jax.set_mesh, no sharding=."""
  p_sh = {k: NamedSharding(mesh, specs[k]) for k in params}
  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh):
    params_d = put(params, p_sh)
    state = tx.init(params_d)
    update = jax.jit(tx.update)
    gather = jax.jit(lambda t: t, out_shardings=replicated)
    out = []
    for g in grads:
      u, state = update(put(g, p_sh), state, params_d)
      for k, x in u.items():
        assert x.sharding.is_equivalent_to(p_sh[k], x.ndim), (k, x.sharding)
      out.append(jax.tree.map(np.asarray, gather(u)))
  return out


def updates_for_processes(tx, mesh, prefix=""):
  params, grads = data(1)
  got = run_default(tx, params, grads, mesh, SPECS_1D)
  return {f"{prefix}{i}/{k}": v for i, u in enumerate(got) for k, v in u.items()}


def process(pid, port, out_path):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=pid,
    initialization_timeout=120,
  )
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  tx = optimizers("auto")["namo_d"]  # the default
  out = updates_for_processes(tx, mesh)
  # Every matrix split over device groups that span both processes.
  split = optimizers(optax_orth.OwnerSharding(split_min_flops=0))["namo_d"]
  out |= updates_for_processes(split, mesh, "split/")
  if pid == 0:
    np.savez(out_path, **out)
  jax.distributed.shutdown()


def reference_single(out_path):
  params, grads = data(1)
  got = run_single(optimizers(None)["namo_d"], params, grads)
  out = {f"{i}/{k}": v for i, u in enumerate(got) for k, v in u.items()}
  np.savez(out_path, **out, **{f"split/{k}": v for k, v in out.items()})


if __name__ == "__main__":
  if MODE == "compare":
    compare(sys.argv[2])
  elif MODE == "default":
    default(sys.argv[2], sys.argv[3])
  elif MODE == "process":
    process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  elif MODE == "reference":
    reference_single(sys.argv[2])
  else:
    raise SystemExit(f"unknown mode {MODE!r}")
