"""The optimizer update at LLM scale, compiled ahead of time on simulated devices.

Each cell is one model, one mesh and one optimizer. The update
``jax.jit(tx.update, out_shardings=...)`` (updates in the parameters'
shardings, the state in ``optax_orth.state_shardings``) is lowered under
``jax.set_mesh`` with abstract bfloat16 inputs (``jax.ShapeDtypeStruct``
with their shardings, so nothing is allocated) and compiled for ``N`` CPU
devices
(``--xla_force_host_platform_device_count=N``). From the compiled
per-device program:

* FLOPs per device (``compiled.cost_analysis()``) over the ideal: the total
  Newton–Schulz FLOPs of the model (``optax_orth.measure.newton_schulz_flops``
  of every matrix, bfloat16, the method ``newton_schulz`` picks; for
  ``optax.contrib.muon`` its own plain float iteration) divided by ``N``;
* collective bytes sent per device (``optax_orth.measure.hlo_collective_bytes``),
  and the owner scheme's minimum (see ``owner_minimum_bytes``);
* temporary memory per device (``compiled.memory_analysis()``) against the
  per-device size of AdamW's state (two moments in the parameters' dtype);
* the time to lower and to compile.

Models: GPT-2 1.5B, Llama-3-8B, Llama-3-70B and a Mixtral-8x7B-style MoE, with
scan-stacked ``(L, in, out)`` (and ``(L, E, in, out)``) leaves; embeddings,
the LM head, norms and the MoE router go to Adam. Meshes: ``N`` devices on one
``fsdp`` axis, or ``(N / 8, 8)`` on ``("fsdp", "model")`` (FSDP x
tensor-parallel). Matrices are sharded on their fan-in axis over ``fsdp`` (and
on the fan-out axis over ``model``); where a dimension does not divide, the
other matrix axis or a stacking axis is used, else the axis is left
unsharded (reported per cell).

Each cell runs in a subprocess with a time limit; a cell that does not
finish is reported as such. The roofline estimate of each optimizer step on
an H100 and a TPU v5p uses the constants in ``HARDWARE`` (with sources).

Usage::

  python benchmarks/bench_scale.py --models llama3-8b --devices 8 64 \\
      --layouts fsdp --optimizers muon optax_muon adamw --limit 600 \\
      --results benchmarks/results/scale.json
  python benchmarks/bench_scale.py --report --results benchmarks/results/scale.json \\
      --write docs/scale.md

Results are merged into the JSON file cell by cell, so runs can be split up
and resumed; ``--report`` writes the page and ``docs/img/scale.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
  "gpt2-1.5b": dict(layers=48, d=1600, ffn=6400, vocab=50257, ctx=1024, kind="gpt2"),
  "llama3-8b": dict(layers=32, d=4096, ffn=14336, kv=1024, vocab=128256, kind="llama"),
  "llama3-70b": dict(layers=80, d=8192, ffn=28672, kv=1024, vocab=128256, kind="llama"),
  "mixtral-8x7b": dict(
    layers=32, d=4096, ffn=14336, kv=1024, vocab=32000, experts=8, kind="moe"
  ),
}
OPTIMIZERS = ("muon", "namo_d", "normuon", "muon_whole", "optax_muon", "adamw")
LAYOUTS = ("fsdp", "fsdp_tp")
TP = 8

#: Peak rates for the roofline, per chip.
HARDWARE = {
  "H100 SXM": dict(
    flops=989e12,  # bf16 dense Tensor Core, NVIDIA H100 datasheet
    hbm=3.35e12,  # HBM3, NVIDIA H100 datasheet
    link_in_node=450e9,  # NVLink 4: 900 GB/s bidirectional, per direction
    link_across=50e9,  # one 400 Gb/s InfiniBand NDR port per GPU (DGX H100)
    node=8,
  ),
  "TPU v5p": dict(
    flops=459e12,  # bf16, Google Cloud TPU v5p documentation
    hbm=2.765e12,  # HBM2e, same source
    link_in_node=600e9,  # ICI 4,800 Gbps per chip, same source
    link_across=600e9,
    node=1 << 30,  # one ICI domain (a pod slice)
  ),
}
#: The training step the optimizer step is compared with: 6 P T FLOPs over N
#: chips at this model FLOPs utilization, for T tokens per step.
TOKENS_PER_STEP = 4 * 1024 * 1024
MFU = 0.4


# ---------------------------------------------------------------------------
# Parameter trees: name -> (shape, matrix axes or None for Adam).


def leaves(model: str) -> dict[str, tuple[tuple[int, ...], tuple[int, int] | None]]:
  """The model's leaves; ``"name:L"`` is the model ``name`` with ``L`` layers."""
  name, _, layers = model.partition(":")
  cfg = dict(MODELS[name], **({"layers": int(layers)} if layers else {}))
  L, d, f, V = cfg["layers"], cfg["d"], cfg["ffn"], cfg["vocab"]
  out: dict = {"embed": ((V, d), None), "final_norm": ((d,), None)}
  if cfg["kind"] == "gpt2":
    out["pos_embed"] = ((cfg["ctx"], d), None)
    out["attn_qkv"] = ((L, d, 3 * d), (1, 2))
    out["attn_out"] = ((L, d, d), (1, 2))
    out["mlp_in"] = ((L, d, f), (1, 2))
    out["mlp_out"] = ((L, f, d), (1, 2))
    out["norms"] = ((L, 4, d), None)
    return out  # the head is tied to the embedding
  kv = cfg["kv"]
  out["lm_head"] = ((d, V), None)
  out["q"] = ((L, d, d), (1, 2))
  out["k"] = ((L, d, kv), (1, 2))
  out["v"] = ((L, d, kv), (1, 2))
  out["o"] = ((L, d, d), (1, 2))
  out["norms"] = ((L, 2, d), None)
  if cfg["kind"] == "llama":
    out["gate"] = ((L, d, f), (1, 2))
    out["up"] = ((L, d, f), (1, 2))
    out["down"] = ((L, f, d), (1, 2))
  else:
    E = cfg["experts"]
    out["router"] = ((L, d, E), None)
    out["w1"] = ((L, E, d, f), (2, 3))
    out["w3"] = ((L, E, d, f), (2, 3))
    out["w2"] = ((L, E, f, d), (2, 3))
  return out


def spec_for(shape, axes, layout, n):
  """A PartitionSpec tuple: fan-in over ``fsdp`` (fan-out over ``model``)."""
  spec = [None] * len(shape)
  if axes is None:  # Adam leaves: the largest axis that divides
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
  else:
    i, o = axes
    order = [i, o] + [k for k in range(len(shape)) if k not in (i, o)]
  if layout == "fsdp_tp":
    fs = n // TP
    model_axis = next((k for k in order[1:] + order[:1] if shape[k] % TP == 0), None)
    if model_axis is not None:
      spec[model_axis] = "model"
    fsdp_axis = next((k for k in order if spec[k] is None and shape[k] % fs == 0), None)
    if fsdp_axis is not None and fs > 1:
      spec[fsdp_axis] = "fsdp"
  else:
    fsdp_axis = next((k for k in order if shape[k] % n == 0), None)
    if fsdp_axis is not None:
      spec[fsdp_axis] = "fsdp"
  return tuple(spec)


def ideal_flops(model: str, n: int, optimizer: str) -> float:
  """Total Newton–Schulz FLOPs of the model's matrices, over ``n``."""
  import jax.numpy as jnp

  from optax_orth.measure import newton_schulz_flops

  total = 0.0
  for shape, axes in leaves(model).values():
    if axes is None or optimizer == "adamw":
      continue
    if optimizer == "optax_muon":  # optax: plain quintic, full products
      f = newton_schulz_flops(shape, 5, method="plain", symmetric=False)
    else:
      f = newton_schulz_flops(shape, 5, dtype=jnp.bfloat16)
    total += f.total
  return total / n


def owner_minimum_bytes(model: str, n: int, layout: str, itemsize: int = 2) -> dict:
  """The owner scheme's collective bytes per device, by formula.

  Each device's shard of every orthogonalized matrix goes to its owner and
  back: ``2 (N - 1) / N * B / N`` for ``B`` bytes of such matrices (in the
  parameters' dtype, ``itemsize`` bytes an element),
  the ideal all-to-all. A matrix split over a group of ``g`` devices adds, per
  device and per piece, the ``r x r`` collectives of
  ``split_newton_schulz.split_bytes``; a device holds
  ``ceil(m g / N)`` pieces of a group of ``m`` matrices.
  """
  import jax.numpy as jnp

  from optax_orth._src import sharding as sharding_lib
  from optax_orth._src import split_newton_schulz as split_lib
  from optax_orth._src.orthogonalizers import make_newton_schulz

  opts = split_lib.split_options(make_newton_schulz("standard", dtype=jnp.bfloat16))
  assert opts is not None
  sizes = [n] if layout == "fsdp" else [n // TP, TP]
  sizes = [s for s in sizes if s > 1]
  groups: dict[tuple[int, int], int] = {}
  ns_bytes = 0
  for shape, axes in leaves(model).values():
    if axes is None:
      continue
    count = math.prod(shape[: axes[0]])
    key = (shape[axes[0]], shape[axes[1]])
    groups[key] = groups.get(key, 0) + count
    ns_bytes += itemsize * math.prod(shape)
  split = 0.0
  plans = {}
  for (a, b), m in groups.items():
    r, c = min(a, b), max(a, b)
    plan = sharding_lib.plan_group(opts, m, r, c, jnp.bfloat16, sizes)
    g = 1 if plan is None else plan.g
    plans[f"{a}x{b}"] = {"matrices": m, "g": g}
    if g > 1:
      pieces = math.ceil(m * g / n)
      split += pieces * split_lib.split_bytes(opts, r, c, g, jnp.bfloat16)
  moves = 2 * (n - 1) / n * ns_bytes / n
  return {"owner": moves, "split": split, "total": moves + split, "plans": plans}


# ---------------------------------------------------------------------------
# One cell (in its own process: the device count is fixed when JAX starts).


def make_tx(name, dims):
  import jax.numpy as jnp
  import optax

  import optax_orth

  if name == "muon":
    return optax_orth.muon(
      0.02, ns_dtype=jnp.bfloat16, muon_weight_dimension_numbers=dims
    )
  if name == "namo_d":
    return optax_orth.namo_d(0.02, ns_dtype=jnp.bfloat16, weight_dimension_numbers=dims)
  if name == "normuon":
    return optax_orth.normuon(
      0.02, ns_dtype=jnp.bfloat16, weight_dimension_numbers=dims
    )
  if name == "muon_whole":  # the owner scheme with whole matrices only
    return optax_orth.muon(
      0.02, ns_dtype=jnp.bfloat16, muon_weight_dimension_numbers=dims,
      sharding=optax_orth.OwnerSharding(split_min_flops=None),
    )  # fmt: skip
  if name == "optax_muon":
    return optax.contrib.muon(0.02, muon_weight_dimension_numbers=dims)
  if name == "adamw":
    return optax.adamw(1e-3, weight_decay=0.1)
  raise ValueError(name)


def run_cell(model: str, n: int, layout: str, name: str) -> dict:
  """One cell; ``name`` is an optimizer, ``@f32`` appended for float32 params."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import optax_orth
  from optax_orth.measure import hlo_collective_bytes

  assert jax.device_count() == n, jax.device_count()
  optimizer, _, suffix = name.partition("@")
  dtype = jnp.float32 if suffix == "f32" else jnp.bfloat16
  itemsize = jnp.dtype(dtype).itemsize
  if layout == "fsdp":
    mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,))
  else:
    mesh = jax.make_mesh(
      (n // TP, TP), ("fsdp", "model"), axis_types=(AxisType.Auto,) * 2
    )
  tree = leaves(model)
  specs = {k: spec_for(s, a, layout, n) for k, (s, a) in tree.items()}
  unsharded = sorted(k for k, (s, a) in tree.items() if a and not any(specs[k]))
  shardings = {k: NamedSharding(mesh, P(*specs[k])) for k in tree}
  params = {
    k: jax.ShapeDtypeStruct(s, dtype, sharding=shardings[k])
    for k, (s, _) in tree.items()
  }
  dims = {
    k: None if a is None else optax.contrib.MuonDimensionNumbers(a[0], a[1])
    for k, (s, a) in tree.items()
  }
  if optimizer in ("muon", "namo_d", "normuon", "muon_whole"):
    dims = {
      k: None if a is None else optax_orth.MuonDimensionNumbers(a[0], a[1])
      for k, (s, a) in tree.items()
    }
  tx = make_tx(optimizer, dims)
  with jax.set_mesh(mesh):
    state_sh = optax_orth.state_shardings(tx, params, shardings, mesh=mesh)
    state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(tx.init, params),
      state_sh,
    )
    t0 = time.perf_counter()
    # The trainer's layout: updates like the parameters, the state as
    # state_shardings gives it (the compiler adds what moving there costs).
    update = jax.jit(tx.update, out_shardings=(shardings, state_sh))
    lowered = update.lower(params, state, params)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  mem = compiled.memory_analysis()
  final_hlo = compiled.as_text()
  coll_cpu = hlo_collective_bytes(final_hlo, n)
  # The CPU backend widens bfloat16 collectives to float32 after partitioning;
  # the module right after SPMD partitioning has them in their own dtype, as a
  # GPU or TPU runs them.
  dumped = sorted(
    Path(os.environ["BENCH_SCALE_DUMP"]).glob("*after_spmd-partitioning*")
  )
  partitioned = dumped[-1].read_text()
  coll = hlo_collective_bytes(partitioned, n)
  param_bytes = sum(itemsize * math.prod(s) for s, _ in tree.values())
  return {
    "model": model,
    "devices": n,
    "layout": layout,
    "optimizer": name,
    "flops": float(cost.get("flops", 0.0)),
    "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    "ideal_flops": ideal_flops(model, n, optimizer),
    "moved_bytes": coll["total"]["moved_bytes"],
    "moved_bytes_cpu": coll_cpu["total"]["moved_bytes"],
    "collectives": {k: v["count"] for k, v in coll.items()},
    "moved_by_kind": {k: v["moved_bytes"] for k, v in coll.items()},
    "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)),
    "adamw_state_bytes": 2 * param_bytes / n,
    "param_bytes": param_bytes,
    "hlo_lines": len(final_hlo.splitlines()),
    "partitioned_hlo_lines": len(partitioned.splitlines()),
    "lower_s": t1 - t0,
    "compile_s": t2 - t1,
    "unsharded_matrix_leaves": unsharded,
    "minimum": owner_minimum_bytes(model, n, layout, itemsize)
    if optimizer in ("muon", "namo_d", "normuon", "muon_whole")
    else None,
  }


# ---------------------------------------------------------------------------
# Driver and report.


def cell_key(model, n, layout, optimizer):
  return f"{model}/{n}/{layout}/{optimizer}"


def drive(args) -> None:
  path = Path(args.results)
  results = json.loads(path.read_text()) if path.exists() else {}
  for model in args.models:
    for n in args.devices:
      for layout in args.layouts:
        if layout == "fsdp_tp" and n < 2 * TP:
          continue
        for opt in args.optimizers:
          key = cell_key(model, n, layout, opt)
          if key in results and not args.redo:
            continue
          env = dict(os.environ)
          dump = tempfile.mkdtemp(prefix="bench_scale_")
          env["BENCH_SCALE_DUMP"] = dump
          env["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={n} --xla_dump_to={dump} "
            "--xla_dump_hlo_pass_re=spmd-partitioning"
          )
          env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
          cmd = [sys.executable, __file__, "--one", model, str(n), layout, opt]
          t0 = time.perf_counter()
          try:
            proc = subprocess.run(
              cmd, env=env, capture_output=True, text=True, timeout=args.limit
            )
            if proc.returncode == 0:
              results[key] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
              results[key] = {"error": proc.stderr.strip().splitlines()[-1][:300]}
          except subprocess.TimeoutExpired:
            results[key] = {"timeout": args.limit}
          shutil.rmtree(dump, ignore_errors=True)
          results[key]["wall_s"] = time.perf_counter() - t0
          results[key]["machine"] = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
          )
          print(key, _summary(results[key]), flush=True)
          path.parent.mkdir(parents=True, exist_ok=True)
          path.write_text(json.dumps(results, indent=1, sort_keys=True))


def _summary(r: dict) -> str:
  if "timeout" in r:
    return f"timeout after {r['timeout']} s"
  if "error" in r:
    return "error: " + r["error"]
  ratio = r["flops"] / r["ideal_flops"] if r["ideal_flops"] else float("nan")
  return (
    f"flops/ideal {ratio:.3f}  moved {r['moved_bytes'] / 1e9:.3f} GB  "
    f"temp {r['temp_bytes'] / 2**30:.2f} GiB  compile {r['compile_s']:.0f} s"
  )


def roofline(r: dict, hw: dict) -> float:
  """Seconds of one optimizer step on ``hw``, per device."""
  link = hw["link_in_node"] if r["devices"] <= hw["node"] else hw["link_across"]
  compute = max(r["flops"] / hw["flops"], r["bytes_accessed"] / hw["hbm"])
  return compute + r["moved_bytes"] / link


def train_step_s(r: dict, hw: dict) -> float:
  params = r["param_bytes"] / 2
  return 6 * params * TOKENS_PER_STEP / r["devices"] / (MFU * hw["flops"])


BEGIN, END = "<!-- bench_scale:begin -->", "<!-- bench_scale:end -->"
OURS = ("muon", "namo_d", "normuon")


def _get(results, model, n, layout, opt):
  r = results.get(cell_key(model, n, layout, opt))
  return r if r and "flops" in r else None


def _fmt(x, spec=".2f", missing="—"):
  return missing if x is None else format(x, spec)


def _grid():
  """(model, N, layout, mesh label) of every cell of the report, in order."""
  for model in MODELS:
    for n in (8, 64, 256, 1024):
      for layout in LAYOUTS:
        if layout == "fsdp_tp" and n < 2 * TP:
          continue
        yield model, n, layout, f"{n}" if layout == "fsdp" else f"{n // TP}x{TP}"


def _status(results, model, n, layout, opt):
  r = results.get(cell_key(model, n, layout, opt))
  if r is None:
    return "not run"
  if "timeout" in r:
    return f"> {r['timeout']:.0f} s"
  if "error" in r:
    return "error"
  return None


def report(results: dict) -> str:
  """The markdown tables of ``docs/scale.md`` (between its markers)."""
  machines = sorted({r.get("machine", "?") for r in results.values()})
  lines = [
    BEGIN,
    "",
    f"Measured on: {'; '.join(machines)}; JAX compiled for simulated CPU "
    "devices. Figures per device.",
    "",
    "### Targets, `muon` (bfloat16 Newton–Schulz)",
    "",
    "FLOPs ÷ ideal: per-device FLOPs of the compiled update over the model's "
    "Newton–Schulz FLOPs ÷ N (target 1.1); *whole*: the same scheme with whole "
    "matrices only (`OwnerSharding(split_min_flops=None)`). Bytes ÷ min: "
    "collective bytes sent over the owner scheme's minimum (target 1.25). Temp "
    "÷ AdamW: temporary memory over the per-device size of AdamW's state "
    "(target 1). Compile: seconds to compile, and over `optax.contrib.muon`'s "
    "(target 3).",
    "",
    "| model | N | mesh | FLOPs ÷ ideal | *whole* | bytes (GB) | ÷ min | "
    "permutes | temp (GiB) | ÷ AdamW | compile (s) | ÷ optax |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for model, n, layout, mesh in _grid():
    r = _get(results, model, n, layout, "muon")
    if r is None:
      why = _status(results, model, n, layout, "muon")
      lines.append(f"| {model} | {n} | {mesh} | {why} |||||||||")
      continue
    whole = _get(results, model, n, layout, "muon_whole")
    opt = _get(results, model, n, layout, "optax_muon")
    minimum = r["minimum"]["total"]
    compile_ratio = opt and r["compile_s"] / max(opt["compile_s"], 1e-9)
    optax_status = _status(results, model, n, layout, "optax_muon") or "—"
    lines.append(
      f"| {model} | {n} | {mesh} | {r['flops'] / r['ideal_flops']:.3f} | "
      f"{_fmt(whole and whole['flops'] / whole['ideal_flops'], '.2f')} | "
      f"{r['moved_bytes'] / 1e9:.3f} | {r['moved_bytes'] / minimum:.2f} | "
      f"{r['collectives']['collective-permute']} | "
      f"{r['temp_bytes'] / 2**30:.2f} | "
      f"{r['temp_bytes'] / r['adamw_state_bytes']:.2f} | "
      f"{r['compile_s']:.0f} | "
      f"{_fmt(compile_ratio, '.1f', optax_status)} |"
    )
  lines += [
    "",
    "### Beside the baselines",
    "",
    "`optax.contrib.muon` (FLOPs over its own ideal, its plain float32 "
    "iteration ÷ N); NAMO-D and NorMuon with the balanced owner scheme.",
    "",
    "| model | N | mesh | optax muon FLOPs ÷ its ideal | optax bytes (GB) | "
    "optax temp (GiB) | namo_d FLOPs ÷ ideal | namo_d bytes ÷ min "
    "| normuon FLOPs ÷ ideal | normuon bytes ÷ min |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for model, n, layout, mesh in _grid():
    cells = [f"| {model} | {n} | {mesh} |"]
    opt = _get(results, model, n, layout, "optax_muon")
    if opt is None:
      why = _status(results, model, n, layout, "optax_muon")
      cells.append(f" {why} | | |")
    else:
      cells.append(
        f" {opt['flops'] / opt['ideal_flops']:.2f} | "
        f"{opt['moved_bytes'] / 1e9:.1f} | {opt['temp_bytes'] / 2**30:.2f} |"
      )
    for name in ("namo_d", "normuon"):
      r = _get(results, model, n, layout, name)
      if r is None:
        cells.append(f" {_status(results, model, n, layout, name)} | |")
      else:
        cells.append(
          f" {r['flops'] / r['ideal_flops']:.3f} | "
          f"{r['moved_bytes'] / r['minimum']['total']:.2f} |"
        )
    lines.append("".join(cells))
  f32 = [cell for cell in _grid() if _get(results, *cell[:3], "muon@f32")]
  if f32:
    lines += [
      "",
      "### Temporary memory with float32 parameters",
      "",
      "The same cells with float32 parameters and moments, where the CPU "
      "backend widens no collective: temporary memory of `muon` over the size "
      "of AdamW's state per device.",
      "",
      "| model | N | mesh | muon temp (GiB) | ÷ AdamW state | bytes ÷ min |",
      "|---|---|---|---|---|---|",
    ]
    for model, n, layout, mesh in f32:
      r = _get(results, model, n, layout, "muon@f32")
      assert r is not None
      lines.append(
        f"| {model} | {n} | {mesh} | {r['temp_bytes'] / 2**30:.2f} | "
        f"{r['temp_bytes'] / r['adamw_state_bytes']:.2f} | "
        f"{r['moved_bytes'] / r['minimum']['total']:.2f} |"
      )
  lines += _compile_section(results)
  lines += [
    "",
    "### Roofline: one optimizer step",
    "",
    f"Per device: max(FLOPs ÷ peak, bytes accessed ÷ HBM bandwidth) + "
    f"collective bytes ÷ link bandwidth (NVLink within 8 GPUs, one InfiniBand "
    f"port per GPU beyond; ICI on TPU v5p), as a fraction of a training step of "
    f"6 P T FLOPs at {MFU:.0%} MFU with T = {TOKENS_PER_STEP:,} tokens, for "
    f"`muon` and `optax.contrib.muon`. Peak rates: "
    + "; ".join(
      f"{name}: {hw['flops'] / 1e12:.0f} TFLOP/s, HBM {hw['hbm'] / 1e12:.2f} TB/s, "
      f"links {hw['link_in_node'] / 1e9:.0f}/{hw['link_across'] / 1e9:.0f} GB/s"
      for name, hw in HARDWARE.items()
    )
    + " (sources in `HARDWARE` of `benchmarks/bench_scale.py`).",
    "",
    "| model | N | mesh | H100: muon ms | of step | *whole* ms | optax ms | "
    "TPU v5p: muon ms | of step | *whole* ms | optax ms |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for model, n, layout, mesh in _grid():
    r = _get(results, model, n, layout, "muon")
    if r is None:
      continue
    opt = _get(results, model, n, layout, "optax_muon")
    whole = _get(results, model, n, layout, "muon_whole")
    row = f"| {model} | {n} | {mesh} |"
    for hw in HARDWARE.values():
      t = roofline(r, hw)
      row += (
        f" {1e3 * t:.1f} | {t / train_step_s(r, hw):.1%} | "
        f"{_fmt(whole and 1e3 * roofline(whole, hw), '.1f')} | "
        f"{_fmt(opt and 1e3 * roofline(opt, hw), '.0f')} |"
      )
    lines.append(row)
  lines += ["", END]
  return "\n".join(lines)


def _compile_section(results: dict) -> list[str]:
  """Compile time and module sizes against layers and against devices."""
  model = "llama3-8b"
  layer_counts = sorted(
    {int(k.split("/")[0].split(":")[1]) for k in results if k.startswith(model + ":")}
    | {MODELS[model]["layers"]}
  )
  rows = [(f"{model}:{L}" if L != MODELS[model]["layers"] else model, L, 64)
          for L in layer_counts]  # fmt: skip
  rows += [(model, MODELS[model]["layers"], n) for n in (8, 256, 1024)]
  lines = [
    "",
    "### Where compile time goes",
    "",
    f"`{model}` shapes on the FSDP mesh: compile time and the size of the module "
    "right after SPMD partitioning (what every backend receives) and of the "
    "final CPU module, in lines, for `muon` and `optax.contrib.muon`. The "
    "rows at 64 devices vary the number of layers.",
    "",
    "| layers | N | muon compile (s) | partitioned lines | final lines | "
    "optax compile (s) | partitioned lines | final lines |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, layers, n in sorted(rows, key=lambda t: (t[2], t[1])):
    cells = [f"| {layers} | {n} |"]
    for opt in ("muon", "optax_muon"):
      r = _get(results, name, n, "fsdp", opt)
      if r is None:
        cells.append(f" {_status(results, name, n, 'fsdp', opt)} | | |")
      else:
        cells.append(
          f" {r['compile_s']:.1f} | {_fmt(r.get('partitioned_hlo_lines'), ',')} | "
          f"{_fmt(r.get('hlo_lines'), ',')} |"
        )
    lines.append("".join(cells))
  return lines


def write_section(page: Path, text: str) -> None:
  body = page.read_text() if page.exists() else ""
  if BEGIN in body and END in body:
    body = body[: body.index(BEGIN)] + text + body[body.index(END) + len(END) :]
  else:
    body = body.rstrip() + "\n\n" + text + "\n"
  page.write_text(body)


def plot(results: dict, path: Path) -> None:
  """FLOPs ÷ ideal and bytes per device against devices, for ``muon``."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for i, model in enumerate(MODELS):
    color = f"C{i}"
    for layout, style in (("fsdp", "-"), ("fsdp_tp", ":")):
      ns, ratio, whole, moved, minimum = [], [], [], [], []
      for n in (8, 64, 256, 1024):
        r = _get(results, model, n, layout, "muon")
        if r is None:
          continue
        w = _get(results, model, n, layout, "muon_whole")
        ns.append(n)
        ratio.append(r["flops"] / r["ideal_flops"])
        whole.append(w["flops"] / w["ideal_flops"] if w else float("nan"))
        moved.append(r["moved_bytes"] / 1e9)
        minimum.append(r["minimum"]["total"] / 1e9)
      if not ns:
        continue
      label = f"{model} ({'FSDP' if layout == 'fsdp' else 'FSDP x TP'})"
      ax1.plot(ns, ratio, style, color=color, marker="o", label=label)
      if layout == "fsdp":
        ax1.plot(ns, whole, "--", color=color, alpha=0.5, marker="x")
      ax2.plot(ns, moved, style, color=color, marker="o", label=label)
      if layout == "fsdp":
        ax2.plot(ns, minimum, "--", color=color, alpha=0.5)
  ax1.axhline(1.1, color="gray", lw=0.8)
  ax1.set(
    xscale="log", yscale="log", xlabel="devices", ylabel="FLOPs per device ÷ ideal"
  )
  ax1.set_title("muon: balanced (o) and whole-matrix owners (x, dashed)", fontsize=9)
  ax2.set(
    xscale="log", yscale="log", xlabel="devices", ylabel="collective GB per device"
  )
  ax2.set_title("muon: sent (o) and the owner minimum (dashed)", fontsize=9)
  ax1.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--one", nargs=4, metavar=("MODEL", "N", "LAYOUT", "OPT"))
  parser.add_argument("--models", nargs="+", default=list(MODELS))
  parser.add_argument("--devices", nargs="+", type=int, default=[8, 64, 256, 1024])
  parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
  parser.add_argument("--limit", type=float, default=600.0, help="seconds per cell")
  parser.add_argument("--results", default=str(ROOT / "benchmarks/results/scale.json"))
  parser.add_argument("--redo", action="store_true")
  parser.add_argument("--report", action="store_true")
  parser.add_argument("--write", default=None)
  args = parser.parse_args()
  if args.one:
    model, n, layout, opt = args.one
    print(json.dumps(run_cell(model, int(n), layout, opt)))
    return
  if args.report:
    results = json.loads(Path(args.results).read_text())
    text = report(results)
    if args.write:
      write_section(Path(args.write), text)
      plot(results, Path(args.write).parent / "img" / "scale.png")
    else:
      print(text)
    return
  drive(args)


if __name__ == "__main__":
  main()
