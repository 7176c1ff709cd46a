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

By default PyTorch runs in a second process of its own (``--torch-process
separate``): the rounds stay interleaved (each round times every JAX step,
then asks the PyTorch process to time its step), but neither framework's
libraries and thread pools are loaded into the other's process. With
``--torch-process same`` both run in one process, as issue 17 measured; on
this project's CPU that slowed XLA's bfloat16 path by about 14 % (importing
``torch`` alone did it, see ``docs/benchmarks.md``), so the separate process
is the fair comparison.

Usage::

  python benchmarks/bench_torch_muon.py
  python benchmarks/bench_torch_muon.py --torch-process same
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
from bench_orthogonalize import cpu_model
from gpt_shapes import gpt2_shapes
from torch_muon_worker import torch_fns, tree_arrays

import optax_orth

ROOT = Path(__file__).resolve().parent.parent


def loadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


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


def jax_matmul_fns(n: int) -> dict:
  ja = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  jb = ja.astype(jnp.bfloat16)
  f32 = jax.jit(lambda a: a @ a)
  bf16 = jax.jit(lambda a: a @ a)
  acc = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
  return {
    "jax f32": lambda: jax.block_until_ready(f32(ja)),
    "jax bf16 -> bf16": lambda: jax.block_until_ready(bf16(jb)),
    "jax bf16, f32 accumulation": lambda: jax.block_until_ready(acc(jb)),
  }


class RemoteCall:
  """One of the worker's calls; it reports the time the worker measured."""

  def __init__(self, proc: TorchProcess, name: str):
    self.proc, self.name, self.last_s = proc, name, None

  def __call__(self):
    self.last_s = self.proc.call(self.name)


class TorchProcess:
  """PyTorch's calls in a child process of their own (``torch_muon_worker.py``,
  which imports NumPy and PyTorch only), timed there."""

  def __init__(self, args):
    import subprocess

    worker = Path(__file__).with_name("torch_muon_worker.py")
    cmd = [sys.executable, str(worker), "--layers", str(args.layers)]
    cmd += ["--width", str(args.width), "--matmul", str(args.matmul)]
    self.proc = subprocess.Popen(
      cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    self.info = json.loads(self._read())

  def _read(self) -> str:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("the PyTorch worker process exited early")
    return line

  def call(self, name: str) -> float:
    self.proc.stdin.write(name + "\n")
    return float(self._read())

  def fns(self) -> dict:
    return {name: RemoteCall(self, name) for name in self.info["calls"]}

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def time_interleaved(fns: dict, repeats: int) -> dict:
  for fn in fns.values():  # compile / warm up
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      elapsed = time.perf_counter() - t
      # A step timed in another process reports its own time.
      times[name].append(getattr(fn, "last_s", None) or elapsed)
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
  ap.add_argument(
    "--torch-process",
    choices=("separate", "same"),
    default="separate",
    help="run PyTorch in a child process (default) or in this one",
  )
  ap.add_argument("--label", default="", help="suffix of the results file name")
  args = ap.parse_args(argv)
  import importlib.util

  if importlib.util.find_spec("torch") is None:
    print("PyTorch is not installed; this optional benchmark is skipped.")
    return None
  separate = args.torch_process == "separate"

  load_before = loadavg()
  shapes = gpt2_shapes(args.layers, args.width)
  params_np, grads_np = tree_arrays(shapes)
  params = {k: jnp.asarray(v) for k, v in params_np.items()}
  grads = {k: jnp.asarray(v) for k, v in grads_np.items()}
  lr = 1e-3
  steps = {
    "optax.contrib.muon": jax_step(optax.contrib.muon(lr), grads, params),
    "optax_orth.muon": jax_step(optax_orth.muon(lr), grads, params),
    "optax_orth.muon(ns_dtype=bfloat16)": jax_step(
      optax_orth.muon(lr, ns_dtype=jnp.bfloat16), grads, params
    ),
  }
  if separate:
    remote = TorchProcess(args)
    info, torch_calls = remote.info, remote.fns()
  else:
    torch = importlib.import_module("torch")
    torch_calls = torch_fns(torch, shapes, lr, args.matmul)
    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
  steps["torch.optim.Muon"] = torch_calls.pop("torch.optim.Muon")
  print(
    f"timing {len(shapes)} matrices, torch {info['torch']} "
    f"({args.torch_process} process)",
    flush=True,
  )
  step_times = time_interleaved(steps, args.repeats)
  mm_times = time_interleaved(
    {**jax_matmul_fns(args.matmul), **torch_calls}, args.repeats
  )
  if separate:
    remote.close()
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
    "torch": info["torch"],
    "torch_threads": info["torch_threads"],
    "torch_process": args.torch_process,
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
  label = f"_{args.label}" if args.label else ""
  path = out / f"torch_muon_{jax.devices()[0].platform}{label}.json"
  path.write_text(json.dumps(result, indent=1))
  print(f"wrote {path}; load before/after {load_before} / {result['load_after']}")
  return result


if __name__ == "__main__":
  main()
