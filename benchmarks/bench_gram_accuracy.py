"""Accuracy of Gram Newton–Schulz against the plain iteration, per restart.

How the default restart periods (``optax_orth._src.orthogonalizers.GRAM_RESTART``)
were chosen. For matrices ``U diag(s) V^T`` with a geometric spectrum from 1
down to ``s_min``, this reports, per compute dtype, preset and restart period:

* ``dev``: the largest relative Frobenius deviation
  ``||Y - Y64||_F / ||Y64||_F`` from the plain iteration run in float64
  (rounding error of the method itself; the plain float32 iteration is the
  yardstick);
* ``err``: the mean polar error ``||Y - U V^T||_F / ||U V^T||_F``.

Usage: ``python benchmarks/bench_gram_accuracy.py`` (about a minute on 2 CPU
cores); writes ``benchmarks/results/gram_accuracy.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from optax_orth._src import orthogonalizers as orth  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def matrices(seed, batch, r, c, s_min):
  rng = np.random.default_rng(seed)
  u = np.linalg.qr(rng.standard_normal((batch, r, r)))[0]
  v = np.linalg.qr(rng.standard_normal((batch, c, r)))[0]
  s = np.geomspace(1.0, s_min, r)
  return (u * s) @ np.swapaxes(v, 1, 2), u @ np.swapaxes(v, 1, 2)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b, axis=(1, 2)) / np.linalg.norm(b, axis=(1, 2))


def main():
  ns = jax.jit(
    orth.newton_schulz, static_argnames=("coeffs", "dtype", "method", "restart")
  )
  rows = []
  cases = [((64, 256), 1e-3), ((256, 1024), 1e-2), ((256, 1024), 1e-4)]
  for (r, c), s_min in cases:
    x64, polar = matrices(0, 2, r, c, s_min)
    x32 = jnp.asarray(x64, jnp.float32)
    for preset in ("standard", "polar_express"):
      ref = ns(jnp.asarray(x64), preset, method="plain")
      for dtype in ("float32", "bfloat16"):
        variants = [("plain", None)] + [("gram", k) for k in (1, 2, 3, 5)]
        for method, restart in variants:
          y = ns(x32, preset, dtype=dtype, method=method, restart=restart)
          row = {
            "shape": [r, c],
            "s_min": s_min,
            "preset": preset,
            "dtype": dtype,
            "method": method,
            "restart": restart,
            "dev": float(rel(y, ref).max()),
            "err": float(rel(y, polar).mean()),
          }
          rows.append(row)
          print(
            f"{r}x{c} s_min={s_min:g} {preset:13s} {dtype:8s} "
            f"{method}{'' if restart is None else restart:<3} "
            f"dev {row['dev']:.1e}  err {row['err']:.4f}",
            flush=True,
          )
  out = ROOT / "benchmarks" / "results"
  out.mkdir(parents=True, exist_ok=True)
  (out / "gram_accuracy.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
