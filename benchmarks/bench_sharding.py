"""Owner scheme vs replicate vs automatic partitioning, read from compiled HLO.

Compiles one optimizer update on 8 simulated CPU devices for a scan-stacked
transformer-like tree whose matrices are FSDP-sharded on their fan-in axis,
and reads, from the compiled (SPMD-partitioned, per-device) module:

* per-device FLOPs (``compiled.cost_analysis()``) against the single-device
  FLOPs of the same update divided by ``N``;
* the collectives (all-to-all, all-gather, all-reduce, reduce-scatter,
  collective-permute): count, operand bytes and estimated bytes sent per
  device (:func:`optax_orth.hlo_collective_bytes`).

Schemes: ``owner`` (``sharding=OwnerSharding(mesh)``, all four optimizers),
``replicate`` (every device gathers every matrix and orthogonalizes all of
them: an orthogonalizer whose input and output are constrained to be
replicated),
``auto`` (``optax_orth.muon`` without ``sharding``) and
``optax.contrib.muon`` under automatic partitioning. Nothing is timed: CPU
devices simulated on one host say nothing about a network.

Usage: ``python benchmarks/bench_sharding.py [--layers 16 --width 256]
[--write docs/benchmarks.md]``. The ``## Distributed`` section of the file is
replaced (or appended; the file is created if missing); the rest is kept.
"""

from __future__ import annotations

import os

N = 8
_flags = os.environ.get("XLA_FLAGS", "")
if "host_platform_device_count" not in _flags:  # before jax is imported
  os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={N}"

import argparse  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_orth  # noqa: E402
from optax_orth import MuonDimensionNumbers as DimNums  # noqa: E402


def tree(layers: int, d: int):
  shapes = {
    "qkv": (layers, d, 3 * d),
    "attn_out": (layers, d, d),
    "mlp_up": (layers, d, 4 * d),
    "mlp_down": (layers, 4 * d, d),
  }
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


def _cost(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def compile_update(tx, params, mesh=None):
  state = jax.eval_shape(tx.init, params)
  if mesh is None:
    fn = jax.jit(tx.update)
  else:
    p_sh = {k: NamedSharding(mesh, P(None, "fsdp", None)) for k in params}
    s_sh = optax_orth.state_shardings(state, params, p_sh)
    fn = jax.jit(tx.update, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
  return fn.lower(params, state, params).compile()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--write", default="docs/benchmarks.md")
  args = parser.parse_args()
  assert jax.device_count() == N, jax.devices()
  mesh = jax.make_mesh((N,), ("fsdp",), axis_types=(AxisType.Auto,))
  params = tree(args.layers, args.width)
  dims = DimNums(1, 2)
  owner = optax_orth.OwnerSharding(mesh, "fsdp")
  replicated = NamedSharding(mesh, P())
  ns = optax_orth.make_newton_schulz("standard", 5, 1e-8, None)

  def replicate_ns(x):
    y = ns(jax.lax.with_sharding_constraint(x, replicated))
    return jax.lax.with_sharding_constraint(y, replicated)

  kw = {"weight_dimension_numbers": dims}
  schemes = {
    "muon, owner": optax_orth.muon(
      0.02, muon_weight_dimension_numbers=dims, sharding=owner
    ),
    "namo, owner": optax_orth.namo(sharding=owner, **kw),
    "namo_d, owner": optax_orth.namo_d(sharding=owner, **kw),
    "normuon, owner": optax_orth.normuon(sharding=owner, **kw),
    "muon, replicate": optax_orth.muon(
      0.02, muon_weight_dimension_numbers=dims, orthogonalizer=replicate_ns
    ),
    "muon, automatic": optax_orth.muon(0.02, muon_weight_dimension_numbers=dims),
    "optax.contrib.muon, automatic": optax.contrib.muon(
      0.02, muon_weight_dimension_numbers=dims
    ),
  }
  single = {
    "muon": optax_orth.muon(0.02, muon_weight_dimension_numbers=dims),
    "namo": optax_orth.namo(**kw),
    "namo_d": optax_orth.namo_d(**kw),
    "normuon": optax_orth.normuon(**kw),
  }
  total = {k: _cost(compile_update(tx, params)) for k, tx in single.items()}
  total["optax.contrib.muon"] = _cost(
    compile_update(schemes[list(schemes)[-1]], params)
  )

  # Owner-scheme ideal: two all-to-alls of 4 r c (N - 1) / N^2 bytes per matrix.
  ideal = sum(
    2 * 4 * s.shape[0] * s.shape[1] * s.shape[2] * (N - 1) / N**2
    for s in params.values()
  )
  rows = []
  for name, tx in schemes.items():
    compiled = compile_update(tx, params, mesh)
    flops = _cost(compiled)
    base = total[name.split(",")[0]]
    coll = optax_orth.hlo_collective_bytes(compiled.as_text(), N)
    rows.append((name, flops, flops / (base / N), coll))
    print(f"{name}: {flops / 1e9:.3f} GFLOP/device, {flops / (base / N):.2f}x total/N")

  mib = lambda b: f"{b / 2**20:.2f}"
  n_mat = args.layers * len(params)
  lines = [
    "## Distributed",
    "",
    f"One optimizer update of {n_mat} matrices ({args.layers} scan-stacked "
    f"layers of `qkv {args.width}x{3 * args.width}`, `attn_out "
    f"{args.width}x{args.width}`, `mlp_up {args.width}x{4 * args.width}`, "
    f"`mlp_down {4 * args.width}x{args.width}`, float32), parameters and "
    f"state FSDP-sharded on the fan-in axis over N = {N} simulated CPU "
    "devices, compiled with `jax.jit` and `NamedSharding` in/out shardings. "
    "Figures are read from the compiled per-device HLO module: FLOPs from "
    "`cost_analysis()`; collectives parsed with "
    "`optax_orth.hlo_collective_bytes` (operand bytes per device, and bytes "
    "sent per device estimated as all-to-all `(g-1)/g`, all-gather `g-1`, "
    "all-reduce `2(g-1)/g` times the operand). `total/N` is the FLOPs of the "
    "same update compiled for one device, divided by N.",
    "",
    "| scheme | GFLOP / device | x total/N | all-to-all | all-gather | "
    "all-reduce | reduce-scatter | coll.-permute | operand MiB / device | "
    "sent MiB / device |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, flops, ratio, coll in rows:
    counts = " | ".join(
      str(coll[k]["count"])
      for k in (
        "all-to-all",
        "all-gather",
        "all-reduce",
        "reduce-scatter",
        "collective-permute",
      )
    )
    lines.append(
      f"| {name} | {flops / 1e9:.3f} | {ratio:.2f} | {counts} | "
      f"{mib(coll['total']['operand_bytes'])} | "
      f"{mib(coll['total']['moved_bytes'])} |"
    )
  lines += [
    "",
    f"The owner scheme's ideal traffic, two all-to-alls of `4 r c (N-1)/N^2` "
    f"bytes per matrix, is {mib(ideal)} MiB sent per device for this tree.",
    "",
    f"Reproduce: `python benchmarks/bench_sharding.py --layers {args.layers} "
    f"--width {args.width}` on a {os.cpu_count()}-core CPU machine "
    f"({platform.machine()}), JAX {jax.__version__}, optax {optax.__version__}.",
    "",
  ]
  section = "\n".join(lines)
  if args.write:
    path = Path(args.write)
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(r"^## Distributed\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
      text = pattern.sub(lambda _: section, text, count=1)
    else:
      text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote the Distributed section of {path}")
  print(section)


if __name__ == "__main__":
  main()
