"""Single-device benchmark: orthogonalization and full optimizer steps.

On the hidden matrices of a GPT-2-shaped model (per layer ``attn/c_attn``
768x2304, ``attn/c_proj`` 768x768, ``mlp/c_fc`` 768x3072, ``mlp/c_proj``
3072x768; ``--layers`` of them, 4 by default on CPU) this measures, in one
run:

1. the tree's orthogonalization time, ours (grouped, Gram where it saves work)
   against ``optax.contrib``'s ``orthogonalize_via_newton_schulz`` leaf by
   leaf (as ``optax.contrib.muon`` does), and the polar error
   ``||NS(X) - U V^T||_F / ||U V^T||_F`` of each on the same inputs;
2. the achieved FLOP/s of each path (FLOPs counted exactly by
   ``optax_orth._src.orthogonalizers.newton_schulz_flops``; XLA's
   ``cost_analysis()`` as a cross-check) as a fraction of the rate that its
   products can reach, from three large products timed in the same rounds:
   float32, bfloat16 x bfloat16 -> bfloat16, and bfloat16 x bfloat16 with
   float32 accumulation (the product the bfloat16 path runs);
3. the full jitted update step of ``optax_orth.muon`` (float32 and
   ``ns_dtype=jnp.bfloat16``), ``namo``, ``namo_d``, ``normuon``,
   ``optax.contrib.muon`` and ``optax.adamw`` (ratios to ours);
4. the optimizer state bytes of each.

Inputs: each matrix is ``U diag(s) V^T`` with random orthonormal ``U, V`` and
a power-law spectrum ``s_i = (i + 1)^-1`` (condition number ``r``), like the
heavy-tailed spectra of gradients and momenta; its polar factor is ``U V^T``
exactly.

Timing: every candidate is compiled and run once, then the candidates are run
in interleaved rounds (so that load from other processes hits all of them
alike); each call is synchronized with ``block_until_ready``. The median and
the minimum over rounds are reported, and the load average before and after.

Usage::

  python benchmarks/bench_orthogonalize.py                 # CPU, float32, 4 layers
  python benchmarks/bench_orthogonalize.py --layers 12 --repeats 7
  python benchmarks/bench_orthogonalize.py --device gpu    # bfloat16 on a GPU

Writes ``benchmarks/results/orthogonalize_<device>.json`` and replaces the
table between the ``single-device`` markers of ``docs/benchmarks.md``
(``--no-doc`` to skip).
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
from gpt_shapes import gpt2_shapes
from optax.contrib import _muon as optax_muon

import optax_orth
from optax_orth._src import orthogonalizers as orth
from optax_orth._src.transforms import orthogonalize_grouped

ROOT = Path(__file__).resolve().parent.parent


def markers(label: str = "") -> tuple[str, str]:
  """The doc markers of a run's block (``--label`` selects another block)."""
  name = "single-device" + (f"-{label}" if label else "")
  return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


STANDARD = (3.4445, -4.7750, 2.0315)


def nest(flat: dict[str, jax.Array]) -> dict:
  tree: dict = {}
  for name, x in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return tree


def make_inputs(shapes, seed: int = 0):
  """Matrices with a power-law spectrum and their exact polar factors."""
  rng = np.random.default_rng(seed)
  xs, polars = {}, {}
  for name, (m, n) in shapes.items():
    r, c = min(m, n), max(m, n)
    u = np.linalg.qr(rng.standard_normal((r, r)).astype(np.float32))[0]
    v = np.linalg.qr(rng.standard_normal((c, r)).astype(np.float32))[0]
    s = 1.0 / np.arange(1, r + 1, dtype=np.float32)
    x, p = (u * s) @ v.T, u @ v.T
    if m > n:
      x, p = x.T, p.T
    xs[name], polars[name] = np.ascontiguousarray(x), np.ascontiguousarray(p)
  return xs, polars


def polar_errors(out: dict, polars: dict) -> list[float]:
  errs = []
  for name, p in polars.items():
    y = np.asarray(jax.device_get(out[name]), np.float32)
    errs.append(float(np.linalg.norm(y - p) / np.linalg.norm(p)))
  return errs


def xla_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled function (``{}`` where unsupported)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return {}
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  return {k: float(v) for k, v in (cost or {}).items() if isinstance(v, int | float)}


def xla_flops(compiled) -> float | None:
  return xla_cost(compiled).get("flops")


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


class Timer:
  """Compiles candidates, then times them in interleaved rounds."""

  def __init__(self):
    self.fns, self.args, self.times, self.compile_s = {}, {}, {}, {}

  def add(self, name, fn, *args):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    self.compile_s[name] = time.perf_counter() - t
    self.fns[name], self.args[name], self.times[name] = fn, args, []

  def run(self, repeats: int):
    for _ in range(repeats):
      for name, fn in self.fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(*self.args[name]))
        self.times[name].append(time.perf_counter() - t)

  def stats(self, name):
    ts = self.times[name]
    return {"median_s": statistics.median(ts), "min_s": min(ts), "all_s": ts}


def loadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  ap.add_argument("--layers", type=int, default=None, help="4 on CPU, 12 on GPU")
  ap.add_argument("--width", type=int, default=768, help="model width d")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--step-repeats", type=int, default=None)
  ap.add_argument("--matmul", type=int, default=None, help="2048 CPU, 8192 GPU")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
  ap.add_argument("--no-doc", action="store_true")
  ap.add_argument("--skip-steps", action="store_true")
  ap.add_argument(
    "--label",
    default="",
    help="names the results file (orthogonalize_<device>_<label>.json) and the "
    "doc block (markers single-device-<label>) so that runs of other trees "
    "keep their own record",
  )
  args = ap.parse_args(argv)

  gpu = args.device == "gpu"
  device = jax.devices("gpu" if gpu else "cpu")[0]
  jax.config.update("jax_default_device", device)
  layers = args.layers or (12 if gpu else 4)
  step_repeats = args.step_repeats or args.repeats
  dtype = jnp.bfloat16 if gpu else jnp.float32
  mm_n = args.matmul or (8192 if gpu else 2048)
  load_before = loadavg()
  print(
    f"device={device} dtype={jnp.dtype(dtype).name} layers={layers} load={load_before}"
  )

  shapes = gpt2_shapes(layers, args.width)
  xs_np, polars = make_inputs(shapes)
  xs = {k: jax.device_put(jnp.asarray(v, dtype), device) for k, v in xs_np.items()}
  # polar_svd agrees with the constructed U V^T (checked on one matrix).
  first = next(iter(shapes))
  svd_check = float(
    np.abs(np.asarray(orth.polar_svd(jnp.asarray(xs_np[first]))) - polars[first]).max()
  )

  # --- 1. Orthogonalization of the tree ------------------------------------
  names = list(shapes)

  def ours(method="auto", coeffs=STANDARD, symmetric=False, unroll=True, ns=dtype):
    ns = orth.make_newton_schulz(
      coeffs,
      5,
      eps=1e-8,
      dtype=ns,
      method=method,
      symmetric=symmetric,
      unroll=unroll,
    )

    def f(tree):
      ys = orthogonalize_grouped([tree[k][None] for k in names], ns)
      return {k: y[0] for k, y in zip(names, ys, strict=True)}

    return jax.jit(f)

  def optax_tree(tree):
    coeffs = jnp.asarray(STANDARD)
    return {
      k: optax_muon.orthogonalize_via_newton_schulz(x, coeffs, 5, eps=1e-8)
      for k, x in tree.items()
    }

  bf16 = jnp.bfloat16
  # name: (function, FLOP-counter options or None for optax's plain per leaf)
  candidates = {
    "optax.contrib (per leaf, plain)": (jax.jit(optax_tree), None),
    "ours plain (grouped)": (ours("plain"), dict(method="plain")),
    "ours auto (grouped, Gram where it saves FLOPs)": (ours("auto"), {}),
    "ours auto, symmetric products": (
      ours("auto", symmetric=True),
      dict(symmetric=True),
    ),
    "ours auto, lax.scan loop": (ours("auto", unroll=False), {}),
    "ours auto, polar_express": (ours("auto", "polar_express"), {}),
    "ours auto, bfloat16 (f32 accumulation)": (
      ours("auto", symmetric=None, ns=bf16),
      dict(dtype=bf16, symmetric=None),
    ),
    "ours plain, bfloat16 (f32 accumulation)": (
      ours("plain", symmetric=None, ns=bf16),
      dict(method="plain", dtype=bf16, symmetric=None),
    ),
  }
  timer = Timer()
  xla = {}
  compiled = {}
  for name, (fn, _) in candidates.items():
    t = time.perf_counter()
    compiled[name] = fn.lower(xs).compile()  # timed with the first run below
    xla[name] = xla_flops(compiled[name])
    timer.add(name, compiled[name], xs)
    timer.compile_s[name] += time.perf_counter() - t
  a32 = jax.random.normal(jax.random.PRNGKey(0), (mm_n, mm_n), jnp.float32)
  products = {
    "float32": (lambda a: a @ a, a32),
    "bfloat16 -> bfloat16": (lambda a: a @ a, a32.astype(bf16)),
    "bfloat16, float32 accumulation": (
      lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32),
      a32.astype(bf16),
    ),
  }
  for name, (fn, arg) in products.items():
    timer.add("matmul " + name, jax.jit(fn), arg)
  print("compiled; timing orthogonalization", flush=True)
  timer.run(args.repeats)

  def exact_flops(spec):
    total = 0
    for m, n in shapes.values():
      if spec is None:  # optax: plain, leaf by leaf, in the input dtype
        total += orth.newton_schulz_flops((m, n), 5, method="plain").total
      else:
        kw = {"method": "auto", "symmetric": False, "dtype": dtype, **spec}
        total += orth.newton_schulz_flops((m, n), 5, **kw).total
    return total

  mm_flops = 2 * mm_n**3
  rates = {}
  for name in products:
    st = timer.stats("matmul " + name)
    rates[name] = {
      "median_s": st["median_s"],
      "min_s": st["min_s"],
      "gflops_per_s_median": mm_flops / st["median_s"] / 1e9,
      "gflops_per_s_best": mm_flops / st["min_s"] / 1e9,
    }
  # The rate each path's products can reach: float32 products for float32
  # compute; bfloat16 products with float32 accumulation for bfloat16.
  low = jnp.dtype(dtype).itemsize == 2
  default_rate = "bfloat16 -> bfloat16" if low else "float32"
  rows = []
  base = timer.stats("optax.contrib (per leaf, plain)")
  for name, (_, spec) in candidates.items():
    st = timer.stats(name)
    flops = exact_flops(spec)
    bf16_path = spec is not None and jnp.dtype(spec.get("dtype", dtype)) == bf16
    rate_name = "bfloat16, float32 accumulation" if bf16_path else default_rate
    rate = rates[rate_name]
    errs = polar_errors(compiled[name](xs), polars)
    rows.append(
      {
        "name": name,
        "median_s": st["median_s"],
        "min_s": st["min_s"],
        "all_s": st["all_s"],
        "compile_s": timer.compile_s[name],
        "ratio_median": st["median_s"] / base["median_s"],
        "ratio_min": st["min_s"] / base["min_s"],
        "flops_exact": flops,
        "flops_xla": xla[name],
        "gflops_per_s_median": flops / st["median_s"] / 1e9,
        "gflops_per_s_best": flops / st["min_s"] / 1e9,
        "rate": rate_name,
        "fraction_of_rate_median": (flops / st["median_s"])
        / (rate["gflops_per_s_median"] * 1e9),
        "fraction_of_rate_best": (flops / st["min_s"])
        / (rate["gflops_per_s_best"] * 1e9),
        "polar_error_mean": float(np.mean(errs)),
        "polar_error_max": float(np.max(errs)),
      }
    )
    row = rows[-1]
    print(
      f"{name:48s} median {st['median_s'] * 1e3:8.1f} ms"
      f"  min {st['min_s'] * 1e3:8.1f} ms  x{row['ratio_median']:.3f}"
      f"  err {row['polar_error_mean']:.4f}  {row['gflops_per_s_median']:.1f} GF/s",
      flush=True,
    )
  matmul_row = {"n": mm_n, "rates": rates}
  for name, r in rates.items():
    print(
      f"matmul {mm_n}^3 {name}: {r['gflops_per_s_median']:.1f} GF/s (median), "
      f"{r['gflops_per_s_best']:.1f} (best)"
    )

  # --- 3./4. Full update steps and state bytes -----------------------------
  steps = []
  if not args.skip_steps:
    params = nest({k: jnp.asarray(v, jnp.float32) for k, v in xs_np.items()})
    grads = jax.tree.map(lambda x: 0.01 * x, params)
    lr = 1e-3
    ns_dtype = jnp.bfloat16 if gpu else None
    optimizers = {
      "optax_orth.muon": optax_orth.muon(lr, ns_dtype=ns_dtype),
      "optax_orth.muon (ns_dtype=bfloat16)": optax_orth.muon(lr, ns_dtype=bf16),
      "optax_orth.namo": optax_orth.namo(lr, ns_dtype=ns_dtype),
      "optax_orth.namo_d": optax_orth.namo_d(lr, ns_dtype=ns_dtype),
      "optax_orth.normuon": optax_orth.normuon(lr, ns_dtype=ns_dtype),
      "optax.contrib.muon": optax.contrib.muon(lr),
      "optax.adamw": optax.adamw(lr),
    }
    step_timer = Timer()
    state_bytes, step_cost = {}, {}
    for name, opt in optimizers.items():
      state = opt.init(params)
      state_bytes[name] = tree_bytes(state)

      def step(g, s, p, opt=opt):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

      t = time.perf_counter()
      compiled_step = jax.jit(step).lower(grads, state, params).compile()
      step_cost[name] = xla_cost(compiled_step)
      step_timer.add(name, compiled_step, grads, state, params)
      step_timer.compile_s[name] += time.perf_counter() - t
    print("compiled; timing full steps", flush=True)
    step_timer.run(step_repeats)
    ref = step_timer.stats("optax_orth.muon")
    for name in optimizers:
      st = step_timer.stats(name)
      steps.append(
        {
          "name": name,
          "median_s": st["median_s"],
          "min_s": st["min_s"],
          "all_s": st["all_s"],
          "compile_s": step_timer.compile_s[name],
          "ratio_median": st["median_s"] / ref["median_s"],
          "ratio_min": st["min_s"] / ref["min_s"],
          "state_bytes": state_bytes[name],
          "state_ratio": state_bytes[name] / state_bytes["optax_orth.muon"],
          "xla_flops": step_cost[name].get("flops"),
          "xla_bytes_accessed": step_cost[name].get("bytes accessed"),
        }
      )
      print(
        f"{name:36s} median {st['median_s'] * 1e3:8.1f} ms"
        f"  x{steps[-1]['ratio_median']:.3f}"
        f"  state {state_bytes[name] / 2**20:.2f} MiB",
        flush=True,
      )

  result = {
    "device": str(device),
    "device_kind": device.device_kind,
    "cpu_model": cpu_model(),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "dtype": jnp.dtype(dtype).name,
    "layers": layers,
    "width": args.width,
    "shapes": {k: list(v) for k, v in shapes.items()},
    "spectrum": "s_i = 1/(i+1)",
    "polar_svd_vs_constructed_max_abs": svd_check,
    "repeats": args.repeats,
    "step_repeats": step_repeats,
    "load_before": load_before,
    "load_after": loadavg(),
    "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    "gram_restart": orth.default_restart(dtype),
    "orthogonalize": rows,
    "matmul": matmul_row,
    "steps": steps,
  }
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  suffix = f"_{args.label}" if args.label else ""
  path = out / f"orthogonalize_{args.device}{suffix}.json"
  path.write_text(json.dumps(result, indent=1))
  print(f"wrote {path}")
  if not args.no_doc:
    write_doc(Path(args.doc), result, args.label)
    print(f"updated {args.doc}")


def markdown(res) -> str:
  lines = [
    f"Measured on `{res['device_kind']}` ({res['cpu_count']} CPUs visible), "
    f"JAX {res['jax']}, optax {res['optax']}, {res['dtype']}, "
    f"{res['layers']} GPT-2 layers (d={res['width']}: {4 * res['layers']} matrices), "
    f"CPU model `{res.get('cpu_model', 'n/a')}`, "
    f"Gram restart every {res['gram_restart']} steps. Load average "
    f"before/after: {_fmt_load(res['load_before'])} / {_fmt_load(res['load_after'])}.",
    "",
    f"Orthogonalization of the tree (5 steps; median and best of {res['repeats']} "
    "interleaved rounds; error: mean and max over matrices of "
    "`||NS(X) - UV^T||_F / ||UV^T||_F`):",
    "",
    "| method | median ms | best ms | x optax (median) | x optax (best) | "
    "polar error mean / max | exact GFLOP | XLA GFLOP | GFLOP/s (median) | "
    "of its product rate (median / best) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in res["orthogonalize"]:
    xla = f"{r['flops_xla'] / 1e9:.1f}" if r["flops_xla"] else "n/a"
    lines.append(
      f"| {r['name']} | {r['median_s'] * 1e3:.0f} | {r['min_s'] * 1e3:.0f} | "
      f"{r['ratio_median']:.3f} | {r['ratio_min']:.3f} | "
      f"{r['polar_error_mean']:.4f} / {r['polar_error_max']:.4f} | "
      f"{r['flops_exact'] / 1e9:.1f} | {xla} | {r['gflops_per_s_median']:.1f} | "
      f"{r['fraction_of_rate_median']:.2f} / {r['fraction_of_rate_best']:.2f} |"
    )
  mm = res["matmul"]
  n = mm["n"]
  lines += [
    "",
    f"Product rates, one `{n}x{n} @ {n}x{n}` product timed in the same rounds "
    "(GFLOP/s, median / best): "
    + "; ".join(
      f"{k} {v['gflops_per_s_median']:.1f} / {v['gflops_per_s_best']:.1f}"
      for k, v in mm["rates"].items()
    )
    + ". A bfloat16 path is measured against the rate of bfloat16 products "
    "with float32 accumulation, a float32 path against the float32 rate.",
  ]
  if res["steps"]:
    lines += [
      "",
      f"Full jitted update step on the same tree (median and best of "
      f"{res['step_repeats']} rounds) and optimizer state:",
      "",
      "| optimizer | median ms | best ms | x muon (median) | x muon (best) | "
      "state MiB | state x muon | XLA GFLOP | XLA GB accessed |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in res["steps"]:
      lines.append(
        f"| {s['name']} | {s['median_s'] * 1e3:.0f} | {s['min_s'] * 1e3:.0f} | "
        f"{s['ratio_median']:.3f} | {s['ratio_min']:.3f} | "
        f"{s['state_bytes'] / 2**20:.3f} | {s['state_ratio']:.4f} | "
        f"{_fmt_scaled(s.get('xla_flops'))} | "
        f"{_fmt_scaled(s.get('xla_bytes_accessed'))} |"
      )
  lines += ["", f"Reproduce: `{res['command']}`"]
  return "\n".join(lines)


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _fmt_scaled(v, scale=1e9):
  return "n/a" if v is None else f"{v / scale:.2f}"


def _fmt_load(load):
  return "n/a" if load is None else ", ".join(f"{v:.2f}" for v in load)


def write_doc(path: Path, res, label: str = "") -> None:
  """Replaces the block between the single-device markers (or adds it)."""
  begin, end = markers(label)
  block = f"{begin}\n{markdown(res)}\n{end}"
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + block + rest.split(end, 1)[1]
  else:
    section = f"## Single device\n\n{block}\n"
    marker = "## Distributed"
    if marker in text:
      head, tail = text.split(marker, 1)
      text = head + section + "\n" + marker + tail
    else:
      text = text.rstrip("\n") + "\n\n" + section
  path.write_text(text)


if __name__ == "__main__":
  main()
