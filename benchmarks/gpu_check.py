"""A short check of the optimizers on one accelerator (about 2 minutes on a GPU).

Measures, in one run on the default device:

* the bfloat16 matrix-product rate (an ``n x n`` product, timed), and the rate
  of bfloat16 Newton–Schulz (``optax_orth.newton_schulz``, ``dtype=bfloat16``)
  on a stack of ``r x c`` matrices, counted with
  ``optax_orth.measure.newton_schulz_flops``, as a fraction of it;
* the update step of ``muon``, ``namo_d`` and ``normuon`` (``ns_dtype``
  bfloat16) on a GPT-2-small-shaped tree (12 layers, ``d = 768``, scan-stacked
  ``(L, in, out)`` kernels, float32 parameters), each against
  ``optax.contrib.muon`` on the same tree;
* the device's peak memory (``memory_stats()["peak_bytes_in_use"]``, where
  the backend reports it).

Times are medians of repeated calls after a warm-up, each call waited for with
``block_until_ready``. ``--tiny`` runs the same code at toy sizes (the tests
run it on CPU); its figures mean nothing.

Usage::

  python benchmarks/gpu_check.py [--tiny] [--json OUT.json] [--write docs/benchmarks.md]

``--write`` replaces the ``## GPU check`` section of the page with the
results and the device's name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_orth
from optax_orth.measure import newton_schulz_flops

FULL = dict(
  matmul=8192, ns=(16, 4096, 4096), ns_wide=(16, 1024, 4096), layers=12, d=768
)
TINY = dict(matmul=128, ns=(2, 64, 64), ns_wide=(2, 32, 128), layers=2, d=32)


def _median_time(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_rate(n: int, reps: int) -> float:
  """bfloat16 ``n x n`` products per second, in FLOP/s (float32 accumulation)."""
  key = jax.random.key(0)
  a = jax.random.normal(key, (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  return 2 * n**3 / _median_time(f, a, b, reps=reps)


def newton_schulz_rate(shape: tuple[int, int, int], reps: int) -> float:
  """FLOP/s of bfloat16 Newton–Schulz on a ``(batch, r, c)`` stack."""
  x = jax.random.normal(jax.random.key(2), shape, jnp.float32)
  f = jax.jit(lambda x: optax_orth.newton_schulz(x, dtype=jnp.bfloat16))
  flops = newton_schulz_flops(shape, dtype=jnp.bfloat16).total
  return flops / _median_time(f, x, reps=reps)


def gpt2_small_tree(layers: int, d: int):
  """Parameters and dimension numbers of a GPT-2-small-shaped tree."""
  vocab, ctx = (50257, 1024) if d >= 768 else (512, 64)
  shapes = {
    "wte": ((vocab, d), None),
    "wpe": ((ctx, d), None),
    "attn_qkv": ((layers, d, 3 * d), (1, 2)),
    "attn_out": ((layers, d, d), (1, 2)),
    "mlp_in": ((layers, d, 4 * d), (1, 2)),
    "mlp_out": ((layers, 4 * d, d), (1, 2)),
    "norms": ((layers, 4, d), None),
  }
  rng = np.random.default_rng(0)
  params = {
    k: jnp.asarray(0.02 * rng.standard_normal(s), jnp.float32)
    for k, (s, _) in shapes.items()
  }
  return params, {k: a for k, (_, a) in shapes.items()}


def step_times(layers: int, d: int, reps: int) -> dict[str, float]:
  """Seconds per update step of each optimizer on the GPT-2-small tree."""
  params, axes = gpt2_small_tree(layers, d)
  ours = {
    k: None if a is None else optax_orth.MuonDimensionNumbers(*a)
    for k, a in axes.items()
  }
  theirs = {
    k: None if a is None else optax.contrib.MuonDimensionNumbers(*a)
    for k, a in axes.items()
  }
  bf16 = jnp.bfloat16
  txs = {
    "muon": optax_orth.muon(0.02, ns_dtype=bf16, muon_weight_dimension_numbers=ours),
    "namo_d": optax_orth.namo_d(0.02, ns_dtype=bf16, weight_dimension_numbers=ours),
    "normuon": optax_orth.normuon(0.02, ns_dtype=bf16, weight_dimension_numbers=ours),
    "optax.contrib.muon": optax.contrib.muon(
      0.02, muon_weight_dimension_numbers=theirs
    ),
  }
  grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
  out = {}
  for name, tx in txs.items():
    state = tx.init(params)
    update = jax.jit(tx.update)
    step = lambda g, s, update=update: update(g, s, params)[0]
    out[name] = _median_time(step, grads, state, reps=reps)
  return out


def peak_memory() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else int(peak)


def run(tiny: bool = False) -> dict:
  cfg = TINY if tiny else FULL
  reps = 3 if tiny else 20
  t0 = time.perf_counter()
  mm = matmul_rate(cfg["matmul"], reps)
  ns = newton_schulz_rate(cfg["ns"], reps)
  ns_wide = newton_schulz_rate(cfg["ns_wide"], reps)
  steps = step_times(cfg["layers"], cfg["d"], reps)
  base = steps["optax.contrib.muon"]
  return {
    "device": jax.devices()[0].device_kind,
    "platform": jax.devices()[0].platform,
    "jax": jax.__version__,
    "tiny": tiny,
    "matmul_flops_per_s": mm,
    "newton_schulz": {
      str(cfg["ns"]): {"flops_per_s": ns, "of_matmul": ns / mm},
      str(cfg["ns_wide"]): {"flops_per_s": ns_wide, "of_matmul": ns_wide / mm},
    },
    "step_s": steps,
    "step_over_optax": {k: v / base for k, v in steps.items()},
    "peak_bytes": peak_memory(),
    "wall_s": time.perf_counter() - t0,
  }


def markdown(r: dict) -> str:
  lines = [
    "## GPU check",
    "",
    f"`python benchmarks/gpu_check.py` on **{r['device']}** ({r['platform']}, "
    f"jax {r['jax']}), {r['wall_s']:.0f} s.",
    "",
    f"bfloat16 matrix product: {r['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s.",
    "",
    "| Newton–Schulz stack (bfloat16) | TFLOP/s | of the matmul rate |",
    "|---|---|---|",
  ]
  for shape, v in r["newton_schulz"].items():
    lines.append(f"| {shape} | {v['flops_per_s'] / 1e12:.1f} | {v['of_matmul']:.2f} |")
  lines += [
    "",
    "| GPT-2-small update step | ms | ÷ optax.contrib.muon |",
    "|---|---|---|",
  ]
  for name, s in r["step_s"].items():
    lines.append(f"| {name} | {1e3 * s:.2f} | {r['step_over_optax'][name]:.2f} |")
  peak = r["peak_bytes"]
  lines += [
    "",
    "Peak device memory: "
    + ("not reported." if peak is None else f"{peak / 2**30:.2f} GiB."),
    "",
  ]
  return "\n".join(lines)


def write_section(page: Path, text: str) -> None:
  body = page.read_text() if page.exists() else ""
  start = body.find("## GPU check")
  if start < 0:
    body = body.rstrip() + "\n\n" + text
  else:
    end = body.find("\n## ", start + 1)
    body = body[:start] + text + ("" if end < 0 else body[end:])
  page.write_text(body)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="toy sizes (tests, CPU)")
  parser.add_argument("--json", default=None, help="write the results here")
  parser.add_argument("--write", default=None, help="page whose GPU section to replace")
  args = parser.parse_args()
  result = run(args.tiny)
  print(json.dumps(result, indent=1))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))
  if args.write:
    write_section(Path(args.write), markdown(result))


if __name__ == "__main__":
  main()
