"""Gram segment schedules in bfloat16: accuracy against the exact iteration.

The bfloat16 Gram form re-forms ``X X^T`` at the start of every segment; the
default schedule (restart every 2 steps) is segments ``2, 2, 1`` for 5 steps.
Fewer segments cost fewer FLOPs (``3, 2`` and ``4, 1`` both save one
``X X^T`` and one ``Q X``), so this script measures whether they keep the
accuracy: the deviation ``||NS(X) - NS_exact(X)||_F / ||NS_exact(X)||_F`` as a
multiple of the reference bfloat16 iteration's (``bench_bf16_accuracy.py``),
on Gaussian matrices and on ill-conditioned ``U diag(s) V^T`` (geometric
spectra to ``s_min``, ``s_i = 1/i``, and low rank with a floor).

It drives the Gram form segment by segment through the private helpers of
``optax_orth.orthogonalizers`` (a study of an internal choice, not API).

Usage::

  python benchmarks/bench_bf16_schedules.py
  python benchmarks/bench_bf16_schedules.py --shapes 64x256 256x1024 512x2048
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from bench_bf16_accuracy import PRESETS, deviation, exact, reference_bf16

from optax_orth._src import orthogonalizers as orth

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = ((2, 2, 1), (3, 2), (4, 1))


def gram_schedule(x, preset: str, schedule) -> np.ndarray:
  """``newton_schulz(x, preset, dtype=bfloat16, method="gram")`` with the
  given segment lengths (their sum must be the preset's number of steps)."""
  rows, safety = orth.resolve_coeffs(preset)
  rows = [tuple(float(v) for v in row) for row in rows]
  assert sum(schedule) == len(rows), (schedule, len(rows))
  arith = orth._arith(jnp.float32, jnp.bfloat16)
  sym = orth._resolve_symmetric(None, arith.low_precision)
  x, _ = orth._normalize(jnp.asarray(x)[None], "frobenius", 1e-7, safety, arith, sym)
  start = 0
  for m in schedule:
    if start:
      x = x.astype(arith.operand)
    r = orth._gram(x, arith, sym.gram)
    x = orth._gram_segment(x, r, rows[start : start + m], arith, True, sym)
    start += m
  return np.asarray(x[0], np.float32)


def matrices(r: int, c: int, seed: int):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((r, r)))
  v, _ = np.linalg.qr(rng.standard_normal((c, r)))
  spectra = {
    "gaussian": None,
    "geometric to 1e-2": np.geomspace(1, 1e-2, r),
    "geometric to 1e-4": np.geomspace(1, 1e-4, r),
    "s_i = 1/i": 1 / (np.arange(r) + 1),
    "low rank, floor 1e-3": np.where(np.arange(r) < r // 8, 1.0, 1e-3),
  }
  for name, s in spectra.items():
    if s is None:
      yield name, rng.standard_normal((r, c)).astype(np.float32)
    else:
      yield name, ((u * s) @ v.T).astype(np.float32)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", nargs="+", default=["64x256", "256x1024"])
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = ap.parse_args(argv)
  # The default schedule driven here is the library's own Gram form.
  x0 = np.random.default_rng(1).standard_normal((32, 128)).astype(np.float32)
  lib = orth.newton_schulz(jnp.asarray(x0), dtype=jnp.bfloat16, method="gram")
  assert np.array_equal(gram_schedule(x0, "standard", (2, 2, 1)), np.asarray(lib))
  heads = " | ".join("+".join(map(str, s)) for s in SCHEDULES)
  print(f"| matrix | input | preset | reference | {heads} |")
  print("|---|---|---|---|" + "---|" * len(SCHEDULES))
  out = []
  for spec in args.shapes:
    r, c = (int(v) for v in spec.split("x"))
    for name, x in matrices(r, c, args.seed):
      for preset in PRESETS:
        rows, safety = orth.resolve_coeffs(preset)
        rows = [tuple(float(v) for v in row) for row in rows]
        e = exact(x, rows, safety)
        ref = deviation(reference_bf16(x, rows, safety), e)
        ratios = [deviation(gram_schedule(x, preset, s), e) / ref for s in SCHEDULES]
        out.append(
          {"shape": [r, c], "input": name, "preset": preset, "reference": ref}
          | {"+".join(map(str, s)): v for s, v in zip(SCHEDULES, ratios, strict=True)}
        )
        cells = " | ".join(f"{v:.3g}" for v in ratios)
        print(f"| {r}x{c} | {name} | {preset} | {ref:.4f} | {cells} |", flush=True)
  for s in SCHEDULES:
    key = "+".join(map(str, s))
    print(f"{key}: max {max(o[key] for o in out):.3g} x reference")
  result = {
    "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    "rows": out,
  }
  path = Path(args.out)
  path.mkdir(parents=True, exist_ok=True)
  (path / "bf16_schedules.json").write_text(json.dumps(result, indent=1))
  print(f"wrote {path / 'bf16_schedules.json'}")


if __name__ == "__main__":
  main()
