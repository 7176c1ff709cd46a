"""The PyTorch side of ``bench_torch_muon.py``, run as a child process.

It imports NumPy and PyTorch only (no JAX), builds the same GPT-shaped tree
as the parent from the same seed, and answers each line on stdin (the name of
one of :func:`torch_fns`'s calls) with the seconds that call took, measured
here. The first line it writes is a JSON object: the torch version, its
thread count and the names of the calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from gpt_shapes import gpt2_shapes


def tree_arrays(shapes):
  rng = np.random.default_rng(0)
  params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
  grads = {
    k: 0.01 * rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()
  }
  return params, grads


def torch_fns(torch, shapes, lr: float, n: int) -> dict:
  """PyTorch's timed calls: the ``torch.optim.Muon`` step and two products."""
  params_np, grads_np = tree_arrays(shapes)
  params = [torch.nn.Parameter(torch.from_numpy(p)) for p in params_np.values()]
  for p, g in zip(params, grads_np.values(), strict=True):
    p.grad = torch.from_numpy(g)
  opt = torch.optim.Muon(params, lr=lr, weight_decay=0.0, momentum=0.95)

  def step():
    with torch.no_grad():
      opt.step()

  ta = torch.from_numpy(np.random.default_rng(0).standard_normal((n, n), np.float32))
  tb = ta.bfloat16()
  return {
    "torch.optim.Muon": step,
    "torch f32": lambda: ta @ ta,
    "torch bf16 -> bf16": lambda: tb @ tb,
  }


def main() -> None:
  """Serves one timed call per line read from stdin (the name of the call)."""
  import torch

  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, required=True)
  ap.add_argument("--width", type=int, required=True)
  ap.add_argument("--matmul", type=int, required=True)
  args = ap.parse_args()
  fns = torch_fns(torch, gpt2_shapes(args.layers, args.width), 1e-3, args.matmul)
  info = {
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "calls": list(fns),
  }
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    fn = fns[line.strip()]
    t = time.perf_counter()
    fn()
    print(time.perf_counter() - t, flush=True)


if __name__ == "__main__":
  main()
