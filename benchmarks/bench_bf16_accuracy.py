"""Accuracy of bfloat16 Newton–Schulz against the exact iteration.

For each preset and method (plain, Gram) this measures the deviation

  ||NS_bf16(X) - NS_exact(X)||_F / ||NS_exact(X)||_F,

where ``NS_exact`` is the same iteration (same coefficients, same
normalization) in NumPy float64, on Gaussian matrices (by default one 256x1024
matrix, seed 0, as in issue 14; ``--shapes`` and ``--seeds`` add more). Three
bfloat16 iterations are compared:

* ``ours``: ``optax_orth.newton_schulz(x, preset, dtype=jnp.bfloat16)``;
* ``reference``: bfloat16 ``X``, exact coefficients, float32 axpy and float32
  accumulation of every product (issue 14's reference);
* ``all-bf16``: every operation in bfloat16, coefficients rounded to bfloat16
  (what ``newton_schulz(dtype=bfloat16)`` computed before issue 17).

Writes ``benchmarks/results/bf16_accuracy.json`` and prints a markdown table.

Usage::

  python benchmarks/bench_bf16_accuracy.py
  python benchmarks/bench_bf16_accuracy.py --shapes 64x256 128x512 256x1024 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from optax_orth._src import orthogonalizers as orth

ROOT = Path(__file__).resolve().parent.parent
BF16 = jnp.bfloat16
PRESETS = ("standard", "dion", "polar_express")


def exact(x, rows, safety, eps=1e-7):
  x = np.asarray(x, np.float64)
  x = x / (np.linalg.norm(x) * safety + eps)
  for a, b, c in rows:
    g = x @ x.T
    x = a * x + (b * g + c * g @ g) @ x
  return x


def reference_bf16(x, rows, safety, eps=1e-7):
  """bfloat16 ``X``; exact coefficients, float32 axpy and accumulation."""

  def mm(a, b):
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)

  x = jnp.asarray(x, jnp.float32)
  x = (x / (jnp.linalg.norm(x) * safety + eps)).astype(BF16)
  for a, b, c in rows:
    g = mm(x, x.T)
    gb = g.astype(BF16)
    bmat = (b * g + c * mm(gb, gb)).astype(BF16)
    x = (a * x.astype(jnp.float32) + mm(bmat, x)).astype(BF16)
  return x


def all_bf16(x, rows, safety, eps=1e-7):
  """Every operation in bfloat16, coefficients rounded to bfloat16."""
  x = jnp.asarray(x, jnp.float32)
  x = (x / (jnp.linalg.norm(x) * safety + eps)).astype(BF16)
  for row in rows:
    a, b, c = (jnp.asarray(v, BF16) for v in row)
    g = x @ x.T
    x = a * x + (b * g + c * (g @ g)) @ x
  return x


def deviation(y, ref) -> float:
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def measure(shape, seed):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  out = []
  for preset in PRESETS:
    rows, safety = orth.resolve_coeffs(preset)
    rows = [tuple(float(v) for v in row) for row in rows]
    e = exact(x, rows, safety)
    ref = deviation(reference_bf16(x, rows, safety), e)
    old = deviation(all_bf16(x, rows, safety), e)
    for method in ("plain", "gram"):
      y = orth.newton_schulz(jnp.asarray(x), preset, dtype=BF16, method=method)
      dev = deviation(y, e)
      out.append(
        {
          "shape": list(shape),
          "seed": seed,
          "preset": preset,
          "method": method,
          "ours": dev,
          "reference": ref,
          "all_bf16": old,
          "ours_x_reference": dev / ref,
        }
      )
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", nargs="+", default=["256x1024"])
  ap.add_argument("--seeds", nargs="+", type=int, default=[0])
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = ap.parse_args(argv)
  rows = []
  for spec in args.shapes:
    shape = tuple(int(v) for v in spec.split("x"))
    for seed in args.seeds:
      rows += measure(shape, seed)
  print(
    "| matrix | seed | preset | method | ours | reference | ours x reference "
    "| all-bf16 |\n|---|---|---|---|---|---|---|---|"
  )
  for r in rows:
    print(
      f"| {r['shape'][0]}x{r['shape'][1]} | {r['seed']} | {r['preset']} | "
      f"{r['method']} | {r['ours']:.4f} | {r['reference']:.4f} | "
      f"{r['ours_x_reference']:.3f} | {r['all_bf16']:.4f} |"
    )
  result = {
    "jax": jax.__version__,
    "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    "rows": rows,
  }
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "bf16_accuracy.json").write_text(json.dumps(result, indent=1))
  print(f"wrote {out / 'bf16_accuracy.json'}")


if __name__ == "__main__":
  main()
