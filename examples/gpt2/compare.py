"""The main job: AdamW, Muon, NAMO, NAMO-D and NorMuon on GPT-2 at one budget.

Run from a fresh clone (the corpus is bundled under ``examples/data/``)::

  pip install -e ".[examples]" && python examples/gpt2/compare.py

Protocol, for every optimizer at the same token budget and schedule (linear
warmup, cosine decay to 10 %, clipping at global norm 1):

1. sweep the peak learning rate of the optimizer over its grid (values a
   factor 2 apart that bracket its optimum), on the first ``sweep_seeds``
   seeds;
2. pick the learning rate with the lowest mean best validation loss;
3. train at that learning rate on the remaining seeds, up to ``seeds``.

The four orthogonal optimizers send embeddings and norm scales to AdamW at a
common ``adam_lr``; only the learning rate of the matrices is swept. Each
optimizer's step is compiled once (the peak learning rate is an argument of
the compiled step); compile time is reported apart from the run time.

Outputs, in ``--out`` (default ``runs/compare-<preset>``): ``results.jsonl``
(one line per run with its validation curve; ``--resume`` skips runs already
there), ``table.md`` (the markdown table, also printed) and
``loss_curves.png``.

Presets: ``cpu`` (default; 11 minutes measured on a shared 2-core CPU
machine, docs/results.md), ``smoke`` (CI, about 30 seconds) and ``gpu``
(GPT-2 small shape, BPE tokens, for one accelerator).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  import data as data_lib
  import train as train_lib
else:
  from . import data as data_lib
  from . import train as train_lib

#: Learning-rate grids of the ``cpu`` preset, a factor 2 apart. A wider sweep
#: (AdamW 1e-3..8e-3, Muon and NorMuon 0.01..0.16, NAMO and NAMO-D
#: 5e-3..0.32, docs/results.md) located each optimum; these grids bracket it.
LR_GRIDS: dict[str, tuple[float, ...]] = {
  "adamw": (1e-3, 2e-3, 4e-3),
  "muon": (0.02, 0.04, 0.08),
  "namo": (0.04, 0.08, 0.16, 0.32),
  "namo_d": (0.04, 0.08, 0.16, 0.32),
  "normuon": (0.02, 0.04, 0.08),
}

#: compare.py presets: a train.py preset plus the sweep.
PRESETS: dict[str, dict[str, Any]] = {
  "smoke": dict(
    train_lib.PRESETS["smoke"], steps=8, eval_every=4, seeds=2, sweep_seeds=1,
    lr_grids={k: (train_lib.DEFAULT_LR[k],) for k in LR_GRIDS},
  ),
  "cpu": dict(
    train_lib.PRESETS["cpu"], seeds=2, sweep_seeds=1, lr_grids=LR_GRIDS,
  ),
  "gpu": dict(
    train_lib.PRESETS["gpu"], seeds=2, sweep_seeds=1,
    lr_grids={
      "adamw": (3e-4, 6e-4, 1.2e-3), "muon": (0.01, 0.02, 0.04),
      "namo": (5e-3, 1e-2, 2e-2), "namo_d": (5e-3, 1e-2, 2e-2),
      "normuon": (0.01, 0.02, 0.04),
    },
  ),
}  # fmt: skip

LABELS = {
  "adamw": "AdamW",
  "muon": "Muon",
  "namo": "NAMO",
  "namo_d": "NAMO-D",
  "normuon": "NorMuon",
}


def _key(r: dict[str, Any]) -> tuple[str, float, int]:
  return (r["optimizer"], round(float(r["lr"]), 12), int(r["seed"]))


def _in(lr: float, grid) -> bool:
  return any(math.isclose(lr, g, rel_tol=1e-9) for g in grid)


def run_one(cfg: train_lib.TrainConfig, fns, splits) -> dict[str, Any]:
  """One training run; a diverging run gets ``inf`` instead of raising."""
  try:
    res = train_lib.train(
      cfg, None, progress=False, splits=splits, steps_fns=fns, verbose=False
    )
    best, final = res["best_val_loss"], res["final_val_loss"]
    if not math.isfinite(best):
      best = final = float("inf")
    history, wall, diverged = res["history"], res["wall_time"], False
  except FloatingPointError as e:
    print(f"  diverged: {e}", flush=True)
    best = final = float("inf")
    history, wall, diverged = [], float("nan"), True
  return {
    "optimizer": cfg.optimizer,
    "lr": cfg.peak_lr,
    "seed": cfg.seed,
    "best_val_loss": best,
    "final_val_loss": final,
    "tokens": cfg.steps * cfg.tokens_per_step,
    "wall_time": wall,
    "diverged": diverged,
    "history": history,
  }


def compile_steps(cfg: train_lib.TrainConfig, splits) -> tuple[train_lib.Steps, float]:
  """Builds and compiles one optimizer's steps; returns them and the seconds."""
  t0 = time.perf_counter()
  graphdef, params = train_lib.init_params(train_lib.model_config(cfg, splits[2]), 0)
  fns = train_lib.Steps(graphdef, cfg)
  opt_state = fns.init_opt_state(params)
  x, y = data_lib.sample_batch(splits[0], cfg.batch_size, cfg.seq_len, 0, 0)
  lr = np.float32(cfg.peak_lr)
  fns.train_step = fns.train_step.lower(params, opt_state, x, y, lr, lr).compile()
  fns.eval_step = fns.eval_step.lower(params, x, y).compile()
  return fns, time.perf_counter() - t0


def select(results: list[dict[str, Any]], name: str, seeds: list[int]) -> float | None:
  """The learning rate with the lowest mean best-val-loss over ``seeds``."""
  by_lr: dict[float, list[float]] = {}
  for r in results:
    if r["optimizer"] == name and r["seed"] in seeds and math.isfinite(r["lr"]):
      by_lr.setdefault(r["lr"], []).append(r["best_val_loss"])
  if not by_lr:
    return None
  return min(by_lr, key=lambda lr: (float(np.mean(by_lr[lr])), lr))


def summarize(results: list[dict[str, Any]], optimizers, sweep_seeds: list[int]):
  """One row per optimizer at its selected learning rate."""
  rows = []
  for name in optimizers:
    lr = select(results, name, sweep_seeds)
    if lr is None:
      continue
    runs = [r for r in results if r["optimizer"] == name and r["lr"] == lr]
    vals = np.array([r["best_val_loss"] for r in runs])
    sweep = {
      r["lr"]: r["best_val_loss"]
      for r in results
      if r["optimizer"] == name and r["seed"] == sweep_seeds[0]
    }
    rows.append(
      {
        "optimizer": name,
        "lr": lr,
        "mean": float(vals.mean()),
        "std": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"),
        "min": float(vals.min()),
        "max": float(vals.max()),
        "n": len(vals),
        "tokens": runs[0]["tokens"],
        "wall_time": float(np.nanmean([r["wall_time"] for r in runs])),
        "sweep": dict(sorted(sweep.items())),
      }
    )
  return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
  lines = [
    "| optimizer | best lr | best val loss (mean ± std) | min / max | seeds "
    "| tokens | wall time / run (s) | sweep (lr: best val loss, seed 0) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in sorted(rows, key=lambda r: r["mean"]):
    sweep = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in r["sweep"].items())
    lines.append(
      f"| {LABELS[r['optimizer']]} | {r['lr']:g} | {r['mean']:.4f} ± {r['std']:.4f} "
      f"| {r['min']:.4f} / {r['max']:.4f} | {r['n']} | {r['tokens']:,} "
      f"| {r['wall_time']:.1f} | {sweep} |"
    )
  return "\n".join(lines)


def plot(results, rows, path: Path, title: str) -> None:
  """Validation loss vs tokens at each best lr (band: min–max over seeds),
  and the learning-rate sweep."""
  import matplotlib
  import matplotlib.ticker

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, row in enumerate(sorted(rows, key=lambda r: r["optimizer"])):
    color = f"C{i}"
    runs = [
      r for r in results
      if r["optimizer"] == row["optimizer"] and r["lr"] == row["lr"] and r["history"]
    ]  # fmt: skip
    if runs:
      n = min(len(r["history"]) for r in runs)
      tokens = np.array([h["tokens"] for h in runs[0]["history"][:n]])
      curves = np.array([[h["val_loss"] for h in r["history"][:n]] for r in runs])
      label = f"{LABELS[row['optimizer']]} (lr {row['lr']:g})"
      ax.plot(tokens, curves.mean(0), color=color, label=label)
      ax.fill_between(tokens, curves.min(0), curves.max(0), color=color, alpha=0.2)
    lrs = list(row["sweep"])
    vals = [min(v, 10.0) for v in row["sweep"].values()]
    ax2.plot(lrs, vals, "o-", color=color, label=LABELS[row["optimizer"]])
  ax.set_xlabel("training tokens")
  ax.set_ylabel("validation loss (nats / token)")
  ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  if rows:
    best = min(r["min"] for r in rows)
    ax.set_ylim(best - 0.05, best + 1.0)
  ax2.set_xscale("log")
  ticks = sorted({lr for r in rows for lr in r["sweep"]})
  ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax2.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=45)
  ax2.set_xlabel("peak learning rate (the matrices'; all of AdamW's)")
  ax2.set_ylabel("best validation loss, seed 0")
  ax2.set_title("learning-rate sweep")
  ax2.grid(alpha=0.3)
  ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  train_lib.add_config_args(parser, PRESETS)
  parser.add_argument("--optimizers", default=",".join(train_lib.OPTIMIZERS))
  parser.add_argument("--seeds", type=int, default=None, help="seeds at the best lr")
  parser.add_argument(
    "--sweep-seeds", type=int, default=None, help="seeds in the sweep"
  )
  parser.add_argument("--out", default=None, help="default runs/compare-<preset>")
  parser.add_argument("--resume", action="store_true", help="skip runs already done")
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset]
  optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
  for o in optimizers:
    if o not in train_lib.OPTIMIZERS:
      parser.error(f"unknown optimizer {o!r}; choose from {train_lib.OPTIMIZERS}")
  n_seeds = args.seeds or preset["seeds"]
  n_sweep = min(args.sweep_seeds or preset["sweep_seeds"], n_seeds)
  base_seed = args.seed if args.seed is not None else 0
  seeds = list(range(base_seed, base_seed + n_seeds))
  sweep_seeds = seeds[:n_sweep]
  out = Path(args.out or f"runs/compare-{args.preset}")
  out.mkdir(parents=True, exist_ok=True)
  results_f = out / "results.jsonl"
  results: list[dict[str, Any]] = []
  if args.resume and results_f.exists():
    results = [json.loads(line) for line in results_f.read_text().splitlines() if line]
  elif results_f.exists():
    results_f.unlink()
  done = {_key(r) for r in results}

  base = train_lib.config_from_args(args, PRESETS, optimizer=optimizers[0])
  t_load = time.perf_counter()
  splits = data_lib.load_splits(base.data, base.tokenizer, base.val_from_year)
  header = (
    f"compare.py --preset {args.preset}: {base.n_layer} layers, d_model "
    f"{base.d_model}, {base.n_head} heads, seq {base.seq_len}, batch "
    f"{base.batch_size}, {base.steps} steps = {base.steps * base.tokens_per_step:,} "
    f"{base.tokenizer} tokens per run; corpus {len(splits[0]):,} train / "
    f"{len(splits[1]):,} val tokens (loaded in {time.perf_counter() - t_load:.1f} s); "
    f"seeds {seeds} (sweep on {sweep_seeds}); {jax.devices()[0].platform}, "
    f"{platform.processor() or platform.machine()}"
  )
  print(header, flush=True)
  t_start = time.perf_counter()
  compile_times: dict[str, float] = {}

  def record(r):
    results.append(r)
    done.add(_key(r))
    with open(results_f, "a") as f:
      f.write(json.dumps(r) + "\n")
    print(
      f"  {r['optimizer']:>8s} lr {r['lr']:<8g} seed {r['seed']}: best val "
      f"{r['best_val_loss']:.4f}  ({r['wall_time']:.1f} s, "
      f"{time.perf_counter() - t_start:.0f} s elapsed)",
      flush=True,
    )

  grids = {
    name: (args.lr,) if args.lr is not None else tuple(preset["lr_grids"].get(name, ()))
    for name in optimizers
  }
  for name in optimizers:
    grid = grids[name]
    if not grid:
      parser.error(f"no learning-rate grid for {name!r}; pass --lr")
    cfg0 = train_lib.config_from_args(args, PRESETS, optimizer=name, lr=grid[0])
    fns = None
    plan = [(lr, s) for s in sweep_seeds for lr in grid]
    for phase in ("sweep", "seeds"):
      if phase == "seeds":
        best = select([r for r in results if _in(r["lr"], grid)], name, sweep_seeds)
        plan = [(best, s) for s in seeds if s not in sweep_seeds]
      for lr, seed in plan:
        cfg = train_lib.config_from_args(
          args, PRESETS, optimizer=name, lr=lr, seed=seed
        )
        cfg.lr, cfg.seed = lr, seed
        if _key({"optimizer": name, "lr": cfg.peak_lr, "seed": seed}) in done:
          continue
        if fns is None:
          fns, compile_times[name] = compile_steps(cfg0, splits)
          print(f"{name}: compiled in {compile_times[name]:.1f} s", flush=True)
        record(run_one(cfg, fns, splits))

  # The table and plot cover the grid of this invocation (results.jsonl may
  # hold more learning rates from earlier, wider sweeps).
  in_grid = [
    r
    for r in results
    if r["optimizer"] in grids and _in(r["lr"], grids[r["optimizer"]])
  ]
  rows = summarize(in_grid, optimizers, sweep_seeds)
  table = markdown_table(rows)
  total = time.perf_counter() - t_start
  run_time = sum(r["wall_time"] for r in in_grid if math.isfinite(r["wall_time"]))
  footer = (
    f"\nThis invocation: {total:.0f} s. The {len(in_grid)} runs of the table: "
    f"{run_time:.0f} s of training and evaluation. Compile (this invocation): "
    + ", ".join(f"{LABELS[k]} {v:.0f} s" for k, v in compile_times.items())
  )
  print("\n" + table + footer, flush=True)
  (out / "table.md").write_text(header + "\n\n" + table + "\n" + footer + "\n")
  plot(
    in_grid,
    rows,
    out / "loss_curves.png",
    f"GPT-2 ({base.n_layer}x{base.d_model}, {base.tokenizer}), "
    f"{base.steps * base.tokens_per_step:,} tokens",
  )
  print(f"wrote {out / 'table.md'} and {out / 'loss_curves.png'}", flush=True)
  return rows


if __name__ == "__main__":
  main()
