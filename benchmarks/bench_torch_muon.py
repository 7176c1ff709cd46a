"""Optional benchmark: ``optax_orth.muon`` against ``torch.optim.Muon``.

PyTorch is not a dependency of this package or of its CI; this script runs
only where it is importable (a CPU wheel is enough: ``pip install torch``)
and exits with a message otherwise.

On a GPT-shaped tree (``--layers`` layers of width ``d``: per layer ``qkv``
d x 3d, ``proj`` d x d, ``fc`` d x 4d, ``out`` 4d x d; by default 2 layers of
d = 512), it times in one process, in interleaved rounds (each call
synchronized), the full update step of

* ``optax.contrib.muon`` (float32),
* ``optax_orth.muon`` (float32, the default),
* ``optax_orth.muon(ns_dtype=jnp.bfloat16)``,
* ``torch.optim.Muon`` (its Newton–Schulz runs in bfloat16, as it ships),

all with the standard coefficients, 5 steps, Nesterov momentum 0.95 and no
weight decay, and the ``n x n @ n x n`` product rates (``--matmul``, 2048):
float32, bfloat16 x bfloat16 -> bfloat16, and (JAX) bfloat16 with float32
accumulation. Best and median of ``--repeats`` rounds (default 5); the load
average before and after. Writes ``benchmarks/results/torch_muon_<device>.json``.

Usage::

  python benchmarks/bench_torch_muon.py
  python benchmarks/bench_torch_muon.py --layers 2 --width 512 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_orth

ROOT = Path(__file__).resolve().parent.parent


def tree_shapes(layers: int, width: int) -> dict[str, tuple[int, int]]:
  shapes = {}
  for i in range(layers):
    shapes[f"h{i}_qkv"] = (width, 3 * width)
    shapes[f"h{i}_proj"] = (width, width)
    shapes[f"h{i}_fc"] = (width, 4 * width)
    shapes[f"h{i}_out"] = (4 * width, width)
  return shapes


def loadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        flags = line.split(":", 1)[1].split()
        return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx")))
  except OSError:
    pass
  return []


def jax_step(opt, grads, params):
  state = opt.init(params)

  def step(g, s, p):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step).lower(grads, state, params).compile()
  return lambda: jax.block_until_ready(compiled(grads, state, params))


def torch_step(torch, params_np, grads_np, lr):
  params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params_np]
  for p, g in zip(params, grads_np, strict=True):
    p.grad = torch.from_numpy(g.copy())
  opt = torch.optim.Muon(params, lr=lr, weight_decay=0.0, momentum=0.95)

  def run():
    with torch.no_grad():
      opt.step()

  return run


def matmul_fns(torch, n: int):
  rng = np.random.default_rng(0)
  a32 = rng.standard_normal((n, n), dtype=np.float32)
  ja = jnp.asarray(a32)
  jb = ja.astype(jnp.bfloat16)
  f32 = jax.jit(lambda a: a @ a)
  bf16 = jax.jit(lambda a: a @ a)
  acc = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
  fns = {
    "jax f32": lambda: jax.block_until_ready(f32(ja)),
    "jax bf16 -> bf16": lambda: jax.block_until_ready(bf16(jb)),
    "jax bf16, f32 accumulation": lambda: jax.block_until_ready(acc(jb)),
  }
  ta = torch.from_numpy(a32)
  tb = ta.bfloat16()
  fns["torch f32"] = lambda: ta @ ta
  fns["torch bf16 -> bf16"] = lambda: tb @ tb
  return fns


def time_interleaved(fns: dict, repeats: int) -> dict:
  for fn in fns.values():  # compile / warm up
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {
    name: {"min_s": min(ts), "median_s": statistics.median(ts), "all_s": ts}
    for name, ts in times.items()
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--width", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--matmul", type=int, default=2048)
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = ap.parse_args(argv)
  try:
    import torch
  except ImportError:
    print("PyTorch is not installed; this optional benchmark is skipped.")
    return None
  if not hasattr(torch.optim, "Muon"):
    print(f"torch {torch.__version__} has no torch.optim.Muon; skipped.")
    return None

  load_before = loadavg()
  shapes = tree_shapes(args.layers, args.width)
  rng = np.random.default_rng(0)
  params_np = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
  grads_np = {
    k: 0.01 * rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()
  }
  params = {k: jnp.asarray(v) for k, v in params_np.items()}
  grads = {k: jnp.asarray(v) for k, v in grads_np.items()}
  lr = 1e-3
  steps = {
    "optax.contrib.muon": jax_step(optax.contrib.muon(lr), grads, params),
    "optax_orth.muon": jax_step(optax_orth.muon(lr), grads, params),
    "optax_orth.muon(ns_dtype=bfloat16)": jax_step(
      optax_orth.muon(lr, ns_dtype=jnp.bfloat16), grads, params
    ),
    "torch.optim.Muon": torch_step(
      torch, list(params_np.values()), list(grads_np.values()), lr
    ),
  }
  print(f"timing {len(shapes)} matrices, torch {torch.__version__}", flush=True)
  step_times = time_interleaved(steps, args.repeats)
  mm_times = time_interleaved(matmul_fns(torch, args.matmul), args.repeats)
  mm_flops = 2 * args.matmul**3
  rates = {
    k: {"gflops_per_s_best": mm_flops / v["min_s"] / 1e9} for k, v in mm_times.items()
  }
  torch_best = step_times["torch.optim.Muon"]["min_s"]
  f32_best = step_times["optax_orth.muon"]["min_s"]
  for name, st in step_times.items():
    st["x_torch_best"] = st["min_s"] / torch_best
    st["x_optax_orth_f32_best"] = st["min_s"] / f32_best
    print(
      f"{name:36s} best {st['min_s'] * 1e3:7.1f} ms  median "
      f"{st['median_s'] * 1e3:7.1f} ms  x torch {st['x_torch_best']:.3f}  "
      f"x ours f32 {st['x_optax_orth_f32_best']:.3f}"
    )
  for name, r in rates.items():
    print(f"{name:28s} {r['gflops_per_s_best']:7.1f} GFLOP/s (best)")
  result = {
    "cpu": cpu_model(),
    "cpu_flags": cpu_flags(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "shapes": {k: list(v) for k, v in shapes.items()},
    "repeats": args.repeats,
    "load_before": load_before,
    "load_after": loadavg(),
    "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    "steps": step_times,
    "matmul_n": args.matmul,
    "matmul": {k: {**mm_times[k], **rates[k]} for k in mm_times},
  }
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"torch_muon_{jax.devices()[0].platform}.json"
  path.write_text(json.dumps(result, indent=1))
  print(f"wrote {path}; load before/after {load_before} / {result['load_after']}")
  return result


if __name__ == "__main__":
  main()
