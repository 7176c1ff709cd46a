"""The main job: AdamW, Muon, NAMO, NAMO-D and NorMuon on GPT-2, paired seeds.

Run from a fresh clone (both corpora are bundled under ``examples/data/``)::

  pip install -e ".[examples]" && python benchmarks/gpt2/compare.py
  python benchmarks/gpt2/compare.py --data moby-dick

Protocol (``docs/results.md``):

1. ``--sweep`` picks each optimizer's peak learning rate, and NAMO-D's clamp,
   from a grid (``--lr-grid``, ``--clamp-grid``), by the final validation loss
   on the sweep seed(s) (``--sweep-seed``, distinct from the seeds of step 2);
   it writes ``sweep.json`` and ``sweep.md``, and warns when a chosen value
   sits at the edge of its grid. The sweeps of the measured runs are committed
   as ``benchmarks/gpt2/sweeps/<corpus>-<preset>.json``.
2. The default run trains every optimizer at those settings on ``--seeds``
   seeds. A seed fixes the initialisation and the order of the batches, the
   same for every optimizer, so the runs are paired: the table ranks the
   optimizers by mean final validation loss and gives, for each pair of
   neighbours in the ranking, the mean paired difference over the seeds with a
   95 % t-interval, and says which orderings are resolved (interval excludes
   zero).

Settings of step 2, first found first: ``--settings FILE``; ``<out>/sweep.json``
(a sweep with the same ``--out``); the committed sweep of the corpus and
preset. A grid of one value (``--lr-grid muon=0.03``) overrides it.

Speed: the runs of an optimizer train in lockstep, three at a time (the seeds,
or three points of a sweep grid), in one compiled call per ``eval_every``
steps (``jax.vmap`` over runs, ``jax.lax.scan`` over steps; no host sync in
between); each optimizer compiles once for its sweep and its final runs. The
job reports tokens/s and the training step's FLOP/s against the matrix-product
FLOP/s measured on the same machine at the start.

Outputs, in ``--out`` (default ``runs/compare-<corpus>-<preset>``):
``results.jsonl`` (one line per run, with its validation curve; ``--resume``
skips runs already there, and the tables always cover every run it holds),
``table.md`` (also printed), ``loss_curves.png``, and for ``--sweep``
``sweep.json`` and ``sweep.md``.

Presets: ``cpu`` (default; 2 layers of width 64, 2,621,440 tokens per run, 5
seeds; the default run took 11.8 to 20 minutes on 2 idle CPU cores, a
``--sweep`` about half an hour per corpus), ``smoke`` (CI, seconds) and
``gpu`` (GPT-2 small shape, BPE tokens, for one accelerator; not run yet).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# This folder (the harness) and examples/gpt2 (the model and data code).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "gpt2"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as data_lib
import harness as train_lib

HERE = Path(__file__).resolve().parent
SWEEPS_DIR = HERE / "sweeps"

#: Learning-rate grids of the ``cpu`` preset's sweep, a factor 2 apart. They
#: began around the optima of the previous ``cpu`` model (d_model 128, 655k
#: tokens) and moved where the SOTU sweep at this budget found the optimum at
#: an edge (docs/results.md).
LR_GRIDS: dict[str, tuple[float, ...]] = {
  "adamw": (1e-3, 2e-3, 4e-3, 8e-3),
  "muon": (0.01, 0.02, 0.04),
  "namo": (0.08, 0.16, 0.32),
  "namo_d": (0.08, 0.16, 0.32),
  "normuon": (0.01, 0.02, 0.04),
}

#: NAMO-D's clamp grid: the values of the NAMO paper's sweeps.
CLAMP_GRID: tuple[float, ...] = (0.12, 0.4, 0.75, 0.9)

#: compare.py presets: a harness.py preset plus seeds, grids and lockstep width.
PRESETS: dict[str, dict[str, Any]] = {
  "smoke": dict(
    train_lib.PRESETS["smoke"], steps=8, eval_every=4, seeds=3, sweep_seeds=1,
    final_eval_batches=2, lockstep=3,
    lr_grids={k: (train_lib.DEFAULT_LR[k] / 2, train_lib.DEFAULT_LR[k],
                  2 * train_lib.DEFAULT_LR[k]) for k in LR_GRIDS},
    clamp_grid=(0.12, 0.75, 0.9),
  ),
  "cpu": dict(
    train_lib.PRESETS["cpu"], seeds=5, sweep_seeds=2, lockstep=3,
    lr_grids=LR_GRIDS, clamp_grid=CLAMP_GRID,
  ),
  "gpu": dict(
    train_lib.PRESETS["gpu"], seeds=3, sweep_seeds=1, lockstep=1,
    lr_grids={
      "adamw": (3e-4, 6e-4, 1.2e-3), "muon": (0.01, 0.02, 0.04),
      "namo": (5e-3, 1e-2, 2e-2), "namo_d": (5e-3, 1e-2, 2e-2),
      "normuon": (0.01, 0.02, 0.04),
    },
    clamp_grid=CLAMP_GRID,
  ),
}  # fmt: skip

LABELS = {
  "adamw": "AdamW",
  "muon": "Muon",
  "namo": "NAMO",
  "namo_d": "NAMO-D",
  "normuon": "NorMuon",
}

#: Config fields that compare.py sets per run, so they are not flags here.
PER_RUN_FIELDS = ("optimizer", "lr", "clamp")

#: Two-sided 95 % quantiles of Student's t, by degrees of freedom.
_T975 = {
  1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365,
  8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145,
  15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060,
  30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t975(df: int) -> float:
  """The 97.5 % quantile of Student's t with ``df`` degrees of freedom."""
  if df < 1:
    return float("nan")
  known = [k for k in sorted(_T975) if k <= df]
  return _T975[known[-1]] if df <= 120 else 1.960


def paired_interval(a, b) -> dict[str, float]:
  """Mean of ``b - a`` over paired seeds, with its 95 % t-interval."""
  d = np.asarray(b, float) - np.asarray(a, float)
  n = len(d)
  mean = float(d.mean()) if n else float("nan")
  if n < 2 or not np.all(np.isfinite(d)):
    return {"n": n, "mean": mean, "lo": float("nan"), "hi": float("nan")}
  half = t975(n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
  return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half}


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
  """Refuses prefixes of flags (``--optim``) as well as unknown flags."""

  def __init__(self, **kw):
    super().__init__(allow_abbrev=False, **kw)


def parse_grid_args(values: list[str] | None, optimizers) -> dict[str, list[float]]:
  """``["muon=0.01,0.02", ...]`` -> ``{"muon": [0.01, 0.02]}``; ValueError if bad."""
  grids: dict[str, list[float]] = {}
  for item in values or []:
    name, sep, rest = item.partition("=")
    name = name.strip()
    if not sep or not rest.strip():
      raise ValueError(f"--lr-grid takes NAME=V1,V2,...; got {item!r}.")
    if name not in train_lib.OPTIMIZERS:
      raise ValueError(
        f"--lr-grid: unknown optimizer {name!r}; choose from {train_lib.OPTIMIZERS}."
      )
    if name not in optimizers:
      raise ValueError(f"--lr-grid {name}=...: {name} is not in --optimizers.")
    grids[name] = _floats(rest, "--lr-grid", positive=True)
  return grids


def _floats(text: str, flag: str, positive: bool = False) -> list[float]:
  try:
    out = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(
      f"{flag}: {text!r} is not a comma-separated list of numbers."
    ) from None
  if not out or not all(math.isfinite(v) for v in out):
    raise ValueError(f"{flag}: {text!r} holds no finite number.")
  if positive and min(out) <= 0:
    raise ValueError(f"{flag}: values must be > 0; got {text!r}.")
  if len(set(out)) != len(out):
    raise ValueError(f"{flag}: {text!r} repeats a value.")
  return sorted(out)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
    description=__doc__.split("\n")[0],
    formatter_class=train_lib.HelpFormatter,
  )
  parser.add_argument(
    "--preset",
    choices=sorted(PRESETS),
    default="cpu",
    help="model shape, budget, seeds and grids (the flags below override it)",
  )
  for f in dataclasses.fields(train_lib.TrainConfig):
    if f.name in PER_RUN_FIELDS:
      continue
    kind = {"weight_decay": float, "data": str, "val_from_year": int}.get(
      f.name, type(f.default)
    )
    help_text = train_lib.FIELD_HELP[f.name]
    if f.name == "seed":
      help_text = "first seed of the final runs (seeds SEED, SEED+1, ...)"
    parser.add_argument(
      "--" + f.name.replace("_", "-"),
      dest=f.name,
      type=kind,
      default=None,
      help=help_text + train_lib.preset_default(f.name, PRESETS),
    )
  parser.add_argument(
    "--optimizers",
    default=",".join(train_lib.OPTIMIZERS),
    help="comma-separated optimizers to train",
  )
  parser.add_argument(
    "--seeds",
    type=int,
    default=None,
    help="final runs per optimizer, on seeds SEED..SEED+N-1"
    + train_lib.preset_default("seeds", PRESETS),
  )
  parser.add_argument(
    "--sweep",
    action="store_true",
    help="run the hyperparameter sweep (writes sweep.json and sweep.md) instead of "
    "the final runs",
  )
  parser.add_argument(
    "--full-clamp-grid",
    action="store_true",
    help="sweep NAMO-D over every (lr, clamp) pair; default: its lr grid at clamp "
    "0.75, then every clamp of the grid at the lr chosen there",
  )
  parser.add_argument(
    "--and-final",
    action="store_true",
    help="with --sweep: then train the final runs at the sweep's choices, in the "
    "same job (one compile per optimizer for both)",
  )
  parser.add_argument(
    "--sweep-seeds",
    type=int,
    default=None,
    help="seeds per sweep point" + train_lib.preset_default("sweep_seeds", PRESETS),
  )
  parser.add_argument(
    "--sweep-seed",
    type=int,
    default=100,
    help="first seed of the sweep (distinct from the final seeds, so that the "
    "final runs are not the ones the settings were picked on)",
  )
  parser.add_argument(
    "--lr-grid",
    action="append",
    default=None,
    metavar="NAME=V1,V2,...",
    help="learning-rate grid of one optimizer for --sweep (repeat the flag for "
    "others); in the default run, a single value sets that optimizer's learning rate",
  )
  parser.add_argument(
    "--clamp-grid",
    default=None,
    metavar="V1,V2,...",
    help="NAMO-D's clamp grid for --sweep (default: the preset's, "
    f"{','.join(map(str, CLAMP_GRID))} for cpu); a single value sets the clamp in "
    "the default run",
  )
  parser.add_argument(
    "--settings",
    default=None,
    metavar="FILE",
    help="sweep.json to take the learning rates and clamp from (default: "
    "<out>/sweep.json, else the committed sweep of the corpus and preset)",
  )
  parser.add_argument(
    "--out", default=None, help="output folder (default runs/compare-<corpus>-<preset>)"
  )
  parser.add_argument(
    "--resume",
    action="store_true",
    help="keep results.jsonl and skip the runs it already holds (the model, budget "
    "and corpus must be those it was made with)",
  )
  parser.add_argument(
    "--report",
    action="store_true",
    help="train nothing: rebuild table.md and the plot from <out>/results.jsonl "
    "(implies --resume)",
  )
  parser.add_argument(
    "--lockstep",
    type=int,
    default=None,
    help="runs trained together by one compiled call"
    + train_lib.preset_default("lockstep", PRESETS),
  )
  parser.add_argument(
    "--no-progress", action="store_true", help="plain lines instead of a progress bar"
  )
  return parser


_INHERITED_HINT = {
  "--optimizer": "compare.py trains every optimizer of --optimizers; "
  "to train one, use harness.py --optimizer or --optimizers NAME",
  "--lr": "compare.py takes learning rates from its sweep; set one with "
  "--lr-grid NAME=VALUE",
  "--clamp": "compare.py takes NAMO-D's clamp from its sweep; set it with "
  "--clamp-grid VALUE",
}


@dataclasses.dataclass
class Job:
  """The parsed command line."""

  args: argparse.Namespace
  preset: dict[str, Any]
  optimizers: list[str]
  lr_grids: dict[str, list[float]]
  clamp_grid: list[float]
  seeds: list[int]
  sweep_seeds: list[int]
  base: train_lib.TrainConfig
  corpus: str
  out: Path
  lockstep: int


def parse(argv: list[str] | None) -> Job:
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  for arg in argv:
    flag = arg.split("=", 1)[0]
    if flag in _INHERITED_HINT:
      parser.error(f"unrecognized argument {flag}: {_INHERITED_HINT[flag]}.")
  args = parser.parse_args(argv)
  if args.report:
    args.resume = True
  preset = PRESETS[args.preset]
  optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
  for o in optimizers:
    if o not in train_lib.OPTIMIZERS:
      parser.error(f"unknown optimizer {o!r}; choose from {train_lib.OPTIMIZERS}")
  if len(set(optimizers)) != len(optimizers) or not optimizers:
    parser.error(f"--optimizers {args.optimizers!r}: empty or repeated.")
  try:
    given = parse_grid_args(args.lr_grid, optimizers)
    clamps = (
      _floats(args.clamp_grid, "--clamp-grid")
      if args.clamp_grid is not None
      else list(preset["clamp_grid"])
    )
  except ValueError as e:
    parser.error(str(e))
  if args.clamp_grid is not None and "namo_d" not in optimizers:
    parser.error("--clamp-grid is NAMO-D's; namo_d is not in --optimizers.")
  if min(clamps) < 0:
    parser.error(f"--clamp-grid: values must be >= 0; got {args.clamp_grid!r}.")
  if args.and_final and not args.sweep:
    parser.error("--and-final goes with --sweep.")
  if not args.sweep:
    for name, grid in given.items():
      if len(grid) > 1:
        parser.error(
          f"--lr-grid {name}=...: a grid of {len(grid)} values is for --sweep; "
          "the default run takes one value (or the sweep's choice)."
        )
    if args.clamp_grid is not None and len(clamps) > 1:
      parser.error("--clamp-grid: a grid is for --sweep; the default run takes one.")
  lr_grids = {
    name: given.get(name, list(preset["lr_grids"][name])) for name in optimizers
  }
  n_seeds = args.seeds if args.seeds is not None else preset["seeds"]
  n_sweep = args.sweep_seeds if args.sweep_seeds is not None else preset["sweep_seeds"]
  if n_seeds < 1 or n_sweep < 1:
    parser.error("--seeds and --sweep-seeds must be >= 1.")
  first = args.seed if args.seed is not None else 0
  seeds = list(range(first, first + n_seeds))
  sweep_seeds = list(range(args.sweep_seed, args.sweep_seed + n_sweep))
  if args.sweep and set(sweep_seeds) & set(seeds):
    print(
      f"warning: sweep seeds {sweep_seeds} overlap the final seeds {seeds}.",
      file=sys.stderr,
    )
  try:
    base = train_lib.config_from_args(args, PRESETS, optimizer=optimizers[0])
  except (TypeError, ValueError) as e:
    parser.error(str(e))
  lockstep = args.lockstep or preset["lockstep"]
  if lockstep < 1:
    parser.error("--lockstep must be >= 1.")
  if base.steps % base.eval_every:
    parser.error(
      f"--steps {base.steps} must be a multiple of --eval-every {base.eval_every} "
      "(the runs are compiled in chunks of eval_every steps)."
    )
  data = base.data or "sotu"
  corpus = data if data in data_lib.CORPORA else Path(data).stem.split(".")[0]
  out = Path(args.out or f"runs/compare-{corpus}-{args.preset}")
  return Job(
    args, preset, optimizers, lr_grids, clamps, seeds, sweep_seeds, base, corpus,
    out, lockstep,
  )  # fmt: skip


# ------------------------------------------------------------------- the runs

#: Config fields that results in one results.jsonl must share.
SHARED_FIELDS = tuple(
  f.name for f in dataclasses.fields(train_lib.TrainConfig) if f.name not in
  (*PER_RUN_FIELDS, "seed")
)  # fmt: skip


def shared_config(cfg: train_lib.TrainConfig) -> dict[str, Any]:
  out = {k: getattr(cfg, k) for k in SHARED_FIELDS}
  out["data"] = cfg.data or "sotu"  # the default corpus, by name
  return out


def _key(r: dict[str, Any]) -> tuple:
  return (
    r["phase"],
    r["optimizer"],
    round(float(r["lr"]), 12),
    round(float(r["clamp"]), 12),
    int(r["seed"]),
  )


def load_results(job: Job) -> list[dict[str, Any]]:
  """``results.jsonl`` (with ``--resume``), after checking it fits this job."""
  job.out.mkdir(parents=True, exist_ok=True)
  results_f = job.out / "results.jsonl"
  config_f = job.out / "run_config.json"
  mine = shared_config(job.base)
  if not job.args.resume:
    for f in (results_f, config_f):
      if f.exists():
        f.unlink()
    config_f.write_text(json.dumps(mine, indent=2))
    return []
  if config_f.exists():
    old = json.loads(config_f.read_text())
    changed = sorted(k for k in mine if old.get(k) != mine[k])
    if changed:
      detail = ", ".join(f"{k}: {old.get(k)!r} -> {mine[k]!r}" for k in changed)
      raise SystemExit(
        f"--resume: {job.out} holds runs of another configuration ({detail}); "
        "use another --out, or the same flags."
      )
  config_f.write_text(json.dumps(mine, indent=2))
  if not results_f.exists():
    return []
  return [json.loads(line) for line in results_f.read_text().splitlines() if line]


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  dev = jax.devices()[0]
  return (
    f"{dev.platform} ({dev.device_kind}), {os.cpu_count()} cores, {cpu}; "
    f"JAX {jax.__version__}"
  )


def matmul_flops(n: int = 1024, seconds: float = 1.0) -> float:
  """FLOP/s of an ``n x n`` float32 matrix product on the default device."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  reps, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    f(a, a).block_until_ready()
    reps += 1
  return 2.0 * n**3 * reps / (time.perf_counter() - t0)


class Progress:
  """One bar over every run-step of the job: run k of n, rate and ETA."""

  def __init__(self, total_runs: int, steps: int, enabled: bool):
    self.total_runs, self.steps = total_runs, steps
    self.done_steps = 0
    self.t0 = time.perf_counter()
    self.bar = None
    self._last_print = 0.0
    if enabled and total_runs:
      try:
        from tqdm.auto import tqdm

        self.bar = tqdm(
          total=total_runs * steps, unit="step", dynamic_ncols=True, smoothing=0.05
        )
      except ImportError:
        self.bar = None
    self.desc = ""
    self.next_run = 1

  def write(self, msg: str) -> None:
    if self.bar is not None:
      self.bar.write(msg)
    else:
      print(msg, flush=True)

  def start_group(self, n: int, what: str) -> None:
    first, self.next_run = self.next_run, self.next_run + n
    runs = f"run {first}" if n == 1 else f"runs {first}-{first + n - 1}"
    self.desc = f"{runs} of {self.total_runs} ({what})"
    if self.bar is not None:
      self.bar.set_description_str(self.desc)
    else:
      print(f"{self.desc} ...", flush=True)

  def advance(self, run_steps: int) -> None:
    self.done_steps += run_steps
    if self.bar is not None:
      self.bar.update(run_steps)
      return
    now = time.perf_counter()
    if now - self._last_print > 30 or self.done_steps == self.total_runs * self.steps:
      self._last_print = now
      total = self.total_runs * self.steps
      rate = self.done_steps / max(now - self.t0, 1e-9)
      eta = (total - self.done_steps) / max(rate, 1e-9)
      print(
        f"  {self.desc}: {self.done_steps}/{total} run-steps, ETA {eta / 60:.1f} min",
        flush=True,
      )

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def first_clamp(job: Job) -> float:
  """NAMO-D's clamp of the first stage of its sweep: the reference 0.75 when
  the grid holds it, else the grid's middle value."""
  grid = job.clamp_grid
  ref = [c for c in grid if math.isclose(c, job.base.clamp)]
  return ref[0] if ref else grid[len(grid) // 2]


def plan_runs(
  job: Job, settings: dict[str, dict[str, float]] | None, stage: int = 1, results=()
):
  """``[(optimizer, phase, [(lr, clamp, seed), ...])]``, grouped by lockstep.

  ``settings=None``: the sweep. Stage 1 is every optimizer's learning-rate
  grid (NAMO-D's at :func:`first_clamp`, or at every clamp with
  ``--full-clamp-grid``); stage 2 is NAMO-D's other clamps at the learning
  rate that stage 1 chose (from ``results``). Else: the final runs.
  """
  plan = []
  for name in job.optimizers:
    if settings is None:
      phase = "sweep"
      clamps = [job.base.clamp]
      if name == "namo_d":
        clamps = job.clamp_grid if job.args.full_clamp_grid else [first_clamp(job)]
      if stage == 1:
        grid = job.lr_grids[name]
        points = [(lr, c, s) for c in clamps for lr in grid for s in job.sweep_seeds]
      elif name == "namo_d" and not job.args.full_clamp_grid:
        c0 = clamps[0]
        at_c0 = [
          r for r in results
          if r["phase"] == "sweep" and r["optimizer"] == name
          and math.isclose(r["clamp"], c0)
          and any(math.isclose(r["lr"], g) for g in job.lr_grids[name])
        ]  # fmt: skip
        if not at_c0:
          continue
        lr = summarize_sweep(at_c0)[name]["chosen"]["lr"]
        points = [
          (lr, c, s)
          for c in job.clamp_grid
          if not math.isclose(c, c0)
          for s in job.sweep_seeds
        ]
      else:
        continue
    else:
      st = settings[name]
      points = [(st["lr"], st["clamp"], s) for s in job.seeds]
      phase = "final"
    for i in range(0, len(points), job.lockstep):
      plan.append((name, phase, points[i : i + job.lockstep]))
  return plan


def todo_groups(plan, results) -> list:
  """The groups of ``plan`` with a run that ``results`` does not hold."""
  done = {_key(r) for r in results}
  todo = []
  for name, phase, points in plan:
    keys = [_key(dict(phase=phase, optimizer=name, lr=lr, clamp=c, seed=s))
            for lr, c, s in points]  # fmt: skip
    if not all(k in done for k in keys):
      todo.append((name, phase, points))
  return todo


def run_plan(
  job: Job,
  plan,
  results,
  results_f: Path,
  splits,
  groups,
  speed,
  progress,
  settings_source: str | None = None,
) -> None:
  """Trains every group of ``plan`` not in ``results``, appending the runs to
  ``results`` and ``results_f``; final runs record ``settings_source``, the
  file their settings came from.

  ``groups`` caches the compiled :class:`train.RunGroup` of each optimizer and
  group size across calls; ``speed`` accumulates the speed figures;
  ``progress`` is the job's :class:`Progress`.
  """
  done = {_key(r) for r in results}
  todo = todo_groups(plan, results)
  mcfg = train_lib.model_config(job.base, splits[2])
  graphdef, params0 = train_lib.init_params(mcfg, 0)
  routing = train_lib.model_routing(graphdef, params0)
  for name, phase, points in todo:
    cfg = dataclasses.replace(job.base, optimizer=name)
    gkey = (name, len(points))
    hparams = [(lr, cfg.adam_lr, c) for lr, c, _ in points]
    seeds = [s for _, _, s in points]
    if gkey not in groups:
      group = train_lib.RunGroup(
        graphdef, cfg, len(points), cfg.eval_every, routing=routing
      )
      hp = jnp.asarray(np.asarray(hparams, np.float32))
      params = group.init(mcfg, seeds)
      seconds = group.compile(params, hp, splits)
      group.flops = group.step_flops(params, hp, splits)
      groups[gkey] = group
      sp = speed.setdefault(name, {"compile_s": 0.0, "tokens": 0, "run_s": 0.0})
      sp["compile_s"] += seconds
    group = groups[gkey]
    speed.setdefault(name, {"compile_s": 0.0, "tokens": 0, "run_s": 0.0})
    speed[name]["step_flops"] = group.flops
    what = f"{LABELS[name]} {phase}"
    # The machine's matrix-product rate now, for the ratio of speed_markdown.
    speed[name].setdefault("peaks", []).append(matmul_flops(seconds=0.5))
    progress.start_group(len(points), what)
    n_group = len(points)
    out = group.run(
      seeds, hparams, splits, on_chunk=lambda n, r=n_group: progress.advance(n * r)
    )
    sp = speed[name]
    sp["tokens"] += sum(r["tokens"] for r in out)
    sp["run_s"] += out[0]["wall_time"]
    sp["runs"] = sp.get("runs", 0) + len(out)
    with open(results_f, "a") as f:
      for r in out:
        r.update(phase=phase, optimizer=name)
        if phase == "final":
          r["settings"] = settings_source
        if _key(r) in done:
          continue
        done.add(_key(r))
        results.append(r)
        f.write(json.dumps(r) + "\n")
    line = ", ".join(
      f"lr {r['lr']:g}" + (f" c {r['clamp']:g}" if name == "namo_d" else "")
      + f" seed {r['seed']}: {r['final_val_loss']:.4f}"
      for r in out
    )  # fmt: skip
    progress.write(f"  {what}: {line} ({out[0]['wall_time']:.0f} s)")


# ---------------------------------------------------------------- the sweep


def edge_warnings(name: str, chosen: dict[str, float], grid: dict[str, list]) -> list:
  out = []
  for what, values in grid.items():
    v = chosen[what]
    if len(values) > 1 and (
      math.isclose(v, min(values)) or math.isclose(v, max(values))
    ):
      side = "lowest" if math.isclose(v, min(values)) else "highest"
      out.append(
        f"{LABELS[name]}: the chosen {what} {v:g} is the {side} value of its grid "
        f"{', '.join(f'{x:g}' for x in values)}; the optimum may lie beyond it "
        "(widen the grid with --lr-grid / --clamp-grid)."
      )
  return out


def summarize_sweep(results: list[dict[str, Any]]) -> dict[str, Any]:
  """Per optimizer: every (lr, clamp) swept, its mean final loss, the choice."""
  out: dict[str, Any] = {}
  for name in train_lib.OPTIMIZERS:
    runs = [r for r in results if r["phase"] == "sweep" and r["optimizer"] == name]
    if not runs:
      continue
    points: dict[tuple[float, float], list[float]] = {}
    for r in runs:
      points.setdefault((r["lr"], r["clamp"]), []).append(r["final_val_loss"])
    table = [
      {"lr": lr, "clamp": c, "final_val_loss": float(np.mean(v)), "n": len(v)}
      for (lr, c), v in sorted(points.items())
    ]
    best = min(table, key=lambda p: (p["final_val_loss"], p["lr"]))
    grid = {"lr": sorted({p["lr"] for p in table})}
    if name == "namo_d":
      grid["clamp"] = sorted({p["clamp"] for p in table})
    chosen = {"lr": best["lr"], "clamp": best["clamp"]}
    out[name] = {
      "chosen": chosen,
      "final_val_loss": best["final_val_loss"],
      "grid": grid,
      "points": table,
      "warnings": edge_warnings(name, chosen, grid),
    }
  return out


def sweep_markdown(sweep: dict[str, Any]) -> str:
  lines = [
    "| optimizer | chosen lr | chosen clamp | final val loss "
    "| sweep (lr: final val loss) |",
    "|---|---|---|---|---|",
  ]
  for name, s in sweep.items():
    by_clamp: dict[float, list] = {}
    for p in s["points"]:
      by_clamp.setdefault(p["clamp"], []).append(p)
    cells = []
    for c, pts in sorted(by_clamp.items()):
      inner = ", ".join(
        f"**{p['lr']:g}: {p['final_val_loss']:.4f}**"
        if (p["lr"], p["clamp"]) == (s["chosen"]["lr"], s["chosen"]["clamp"])
        else f"{p['lr']:g}: {p['final_val_loss']:.4f}"
        for p in pts
      )
      cells.append(f"c {c:g}: {inner}" if name == "namo_d" else inner)
    clamp = f"{s['chosen']['clamp']:g}" if name == "namo_d" else "–"
    lines.append(
      f"| {LABELS[name]} | {s['chosen']['lr']:g} | {clamp} | "
      f"{s['final_val_loss']:.4f} | {'; '.join(cells)} |"
    )
  warnings = [w for s in sweep.values() for w in s["warnings"]]
  if warnings:
    lines += ["", *[f"**Warning:** {w}" for w in warnings]]
  return "\n".join(lines)


def mine_config(job: Job) -> dict[str, Any]:
  return shared_config(job.base)


def resolve_settings(job: Job) -> tuple[dict[str, dict[str, float]], str, list[str]]:
  """Each optimizer's ``{"lr", "clamp"}`` for the final runs, where from, warnings."""
  candidates = []
  if job.args.settings:
    candidates.append(Path(job.args.settings))
  candidates.append(job.out / "sweep.json")
  candidates.append(SWEEPS_DIR / f"{job.corpus}-{job.args.preset}.json")
  # Last: the bundled sotu corpus's sweep, transferred to another corpus.
  transfer = SWEEPS_DIR / f"sotu-{job.args.preset}.json"
  candidates.append(transfer)
  source, chosen, warnings, skipped = None, {}, [], {}
  for f in candidates:
    if f.exists():
      blob = json.loads(f.read_text())
      old, mine = blob.get("config") or mine_config(job), mine_config(job)
      changed = sorted(k for k in mine if old.get(k) != mine[k])
      if changed:
        if job.args.settings and f == candidates[0]:
          print(f"warning: {f} was swept with other {changed}.", file=sys.stderr)
        elif f == transfer and changed == ["data"]:
          print(
            f"note: no sweep of corpus {job.corpus!r} found; using the settings "
            f"of the sotu sweep, {f} (transferred, not tuned on this corpus).",
            file=sys.stderr,
          )
        else:
          skipped[str(f)] = changed
          continue
      source = str(f)
      for name, s in blob["sweep"].items():
        chosen[name] = dict(s["chosen"])
        warnings += s.get("warnings", [])
      break
  settings = {}
  for name in job.optimizers:
    st = dict(chosen.get(name, {}))
    given = parse_grid_args(job.args.lr_grid, job.optimizers)
    if name in given:
      st["lr"] = given[name][0]
    if name == "namo_d" and job.args.clamp_grid is not None:
      st["clamp"] = job.clamp_grid[0]
    if "lr" not in st and job.args.preset == "smoke":
      st["lr"] = train_lib.DEFAULT_LR[name]
    if "lr" not in st:
      looked = ", ".join(dict.fromkeys(map(str, candidates)))
      other = "".join(
        f" {f} was swept with other {', '.join(c)}." for f, c in skipped.items()
      )
      raise SystemExit(
        f"no learning rate for {name}: no sweep of this configuration found "
        f"(looked for {looked}).{other} Run the sweep first, with the same flags "
        "and --out: compare.py --sweep ..., or give --lr-grid NAME=VALUE."
      )
    st.setdefault("clamp", job.base.clamp)
    settings[name] = {"lr": float(st["lr"]), "clamp": float(st["clamp"])}
  warnings = [w for w in warnings if any(LABELS[n] + ":" in w for n in job.optimizers)]
  return settings, source or "defaults / --lr-grid", warnings


def sweep_of(source: str | None) -> dict[str, Any]:
  """The sweep summary stored in a settings file (``{}`` for none)."""
  if source is None or not Path(source).is_file():
    return {}
  return json.loads(Path(source).read_text()).get("sweep") or {}


# ---------------------------------------------------------------- the table


def final_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (optimizer, lr, clamp) with final runs, best mean first."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in results:
    if r["phase"] == "final":
      groups.setdefault((r["optimizer"], r["lr"], r["clamp"]), []).append(r)
  rows = []
  for (name, lr, clamp), runs in groups.items():
    runs = sorted(runs, key=lambda r: r["seed"])
    vals = np.array([r["final_val_loss"] for r in runs])
    flat = [late_drop(r["history"]) for r in runs]
    rows.append(
      {
        "optimizer": name,
        "lr": lr,
        "clamp": clamp,
        "by_seed": {int(r["seed"]): float(r["final_val_loss"]) for r in runs},
        "mean": float(vals.mean()),
        "std": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"),
        "n": len(vals),
        "tokens": runs[0]["tokens"],
        "wall_time": float(np.mean([r["wall_time"] for r in runs])),
        "late_drop": float(np.nanmean([f[0] for f in flat])),
        "late_share": float(np.nanmean([f[1] for f in flat])),
        "runs": runs,
      }
    )
  return sorted(rows, key=lambda r: (r["mean"], r["optimizer"]))


def late_drop(history: list[dict[str, Any]], frac: float = 0.2) -> tuple[float, float]:
  """Decrease of the validation loss over the last ``frac`` of training, and
  its share of the decrease since the first evaluation."""
  if len(history) < 2:
    return float("nan"), float("nan")
  steps = np.array([h["step"] for h in history])
  vals = np.array([h["val_loss"] for h in history])
  mark = steps[-1] * (1 - frac)
  i = int(np.argmin(np.abs(steps - mark)))
  drop = float(vals[i] - vals[-1])
  total = float(vals[0] - vals[-1])
  return drop, drop / total if total > 0 else float("nan")


def neighbours(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Paired differences of each row with the next (worse) one, common seeds."""
  out = []
  for a, b in itertools.pairwise(rows):
    common = sorted(set(a["by_seed"]) & set(b["by_seed"]))
    iv = paired_interval(
      [a["by_seed"][s] for s in common], [b["by_seed"][s] for s in common]
    )
    resolved = iv["n"] >= 2 and math.isfinite(iv["lo"]) and iv["lo"] > 0
    out.append({"better": a, "worse": b, **iv, "resolved": resolved})
  return out


def _label(row) -> str:
  if row["optimizer"] == "namo_d":
    return f"{LABELS[row['optimizer']]} (lr {row['lr']:g}, c {row['clamp']:g})"
  return f"{LABELS[row['optimizer']]} (lr {row['lr']:g})"


def _names(rows) -> dict[int, str]:
  """Each row's label; an optimizer with several rows gets its lr too."""
  count: dict[str, int] = {}
  for r in rows:
    count[r["optimizer"]] = count.get(r["optimizer"], 0) + 1
  return {
    id(r): LABELS[r["optimizer"]]
    + (f" (lr {r['lr']:g})" if count[r["optimizer"]] > 1 else "")
    for r in rows
  }


#: Below these, a table is a check of the pipeline, not evidence.
MIN_SEEDS, MIN_TOKENS = 3, 100_000


def is_evidence(rows) -> bool:
  """Every row has at least :data:`MIN_SEEDS` seeds of :data:`MIN_TOKENS` tokens."""
  return bool(rows) and all(
    r["n"] >= MIN_SEEDS and r["tokens"] >= MIN_TOKENS for r in rows
  )


def not_evidence_note(rows) -> str:
  seeds = min(r["n"] for r in rows)
  tokens = min(r["tokens"] for r in rows)
  return (
    f"**Not evidence**: {seeds} seed(s) of {tokens:,} tokens per run, below the "
    f"{MIN_SEEDS} seeds of {MIN_TOKENS:,} tokens that a comparison needs; this "
    "table checks that the pipeline runs, and resolves nothing."
  )


def seeds_present(rows) -> list[int]:
  return sorted({s for r in rows for s in r["by_seed"]})


def final_markdown(rows, pairs) -> str:
  nm = _names(rows)
  evidence = is_evidence(rows)
  lines = [] if evidence else [not_evidence_note(rows), ""]
  lines += [
    "| rank | optimizer | lr | clamp | final val loss (mean ± std) | per seed "
    "| seeds | tokens / run | drop over the last 20 % (share of total) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for i, r in enumerate(rows, 1):
    seeds = ", ".join(f"{v:.4f}" for _, v in sorted(r["by_seed"].items()))
    clamp = f"{r['clamp']:g}" if r["optimizer"] == "namo_d" else "–"
    lines.append(
      f"| {i} | {LABELS[r['optimizer']]} | {r['lr']:g} | {clamp} | "
      f"{r['mean']:.4f} ± {r['std']:.4f} | {seeds} | {r['n']} | {r['tokens']:,} | "
      f"{r['late_drop']:.4f} ({100 * r['late_share']:.0f} %) |"
    )
  if pairs:
    lines += [
      "",
      "| ordering | mean paired difference | 95 % interval | seeds | resolved? |",
      "|---|---|---|---|---|",
    ]
    for p in pairs:
      verdict = "**yes**" if p["resolved"] else "no"
      if not evidence:
        verdict = "not evidence"
      lines.append(
        f"| {nm[id(p['better'])]} < {nm[id(p['worse'])]} "
        f"| {p['mean']:+.4f} | [{p['lo']:+.4f}, {p['hi']:+.4f}] | {p['n']} | "
        f"{verdict} |"
      )
    resolved = [p for p in pairs if p["resolved"] and evidence]
    open_ = [p for p in pairs if not p["resolved"] and evidence]
    say = []
    if resolved:
      say.append(
        "Resolved (the 95 % interval of the paired difference excludes 0): "
        + "; ".join(f"{nm[id(p['better'])]} < {nm[id(p['worse'])]}" for p in resolved)
        + "."
      )
    if open_:
      say.append(
        "Not resolved (the interval includes 0, or too few seeds): "
        + "; ".join(f"{nm[id(p['better'])]} vs {nm[id(p['worse'])]}" for p in open_)
        + "."
      )
    lines += ["", *say]
  if len(rows) > 2:
    names = [nm[id(r)] for r in rows]
    lines += [
      "",
      "All pairs: mean paired difference (column minus row, same seed); * marks "
      "a 95 % interval that excludes 0.",
      "",
      "| | " + " | ".join(names[1:]) + " |",
      "|---|" + "---|" * (len(rows) - 1),
    ]
    for i, a in enumerate(rows[:-1]):
      cells = []
      for j, b in enumerate(rows[1:], 1):
        if j <= i:
          cells.append("")
          continue
        common = sorted(set(a["by_seed"]) & set(b["by_seed"]))
        iv = paired_interval(
          [a["by_seed"][s] for s in common], [b["by_seed"][s] for s in common]
        )
        star = "*" if math.isfinite(iv["lo"]) and (iv["lo"] > 0 or iv["hi"] < 0) else ""
        cells.append(f"{iv['mean']:+.4f}{star}")
      lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def speed_markdown(speed: dict[str, dict[str, float]], peak: float) -> str:
  lines = [
    "| optimizer | runs timed | tokens/s (all runs in lockstep) | step GFLOP / run "
    "| achieved GFLOP/s | matmul GFLOP/s (same moments) | share | compile (s) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, s in speed.items():
    if not s.get("runs"):
      continue
    tps = s["tokens"] / s["run_s"]
    steps = s["tokens"] / s["tokens_per_step"] if "tokens_per_step" in s else None
    achieved = s["step_flops"] * steps / s["run_s"] if steps else float("nan")
    here = float(np.mean(s["peaks"])) if s.get("peaks") else peak
    lines.append(
      f"| {LABELS[name]} | {s['runs']} | {tps:,.0f} | {s['step_flops'] / 1e9:.2f} "
      f"| {achieved / 1e9:.1f} | {here / 1e9:.1f} | {100 * achieved / here:.0f} % "
      f"| {s['compile_s']:.1f} |"
    )
  lines.append(
    "\nStep FLOPs are XLA's count of one training step of one run (forward, "
    "backward, optimizer); the wall time includes evaluation, which the FLOPs do "
    "not. The matrix-product rate (1024 x 1024, float32) is measured just before "
    f"each group of runs (at the start of the job: {peak / 1e9:.1f} GFLOP/s); on a "
    "shared machine both rates move with the load."
  )
  return "\n".join(lines)


def plot(
  rows, sweep, path: Path, title: str, sweep_source: str | None = None
) -> list[bool]:
  """Validation curves (mean over seeds, band min–max), the paired final
  losses per seed, and the sweep the settings came from (``sweep_source``);
  without a sweep the figure has two panels and its title says so. Returns,
  per panel, whether it shows any data."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(17 if sweep else 11.5, 4.8))
  ax, ax2 = axes[:2]
  ax3 = axes[2] if sweep else None
  if not sweep:
    title += "\n(no sweep panel: the settings did not come from a sweep)"
  colors = {n: f"C{i}" for i, n in enumerate(train_lib.OPTIMIZERS)}
  for r in rows:
    runs = [x for x in r["runs"] if x["history"]]
    if not runs:
      continue
    n = min(len(x["history"]) for x in runs)
    tokens = np.array([h["tokens"] for h in runs[0]["history"][:n]])
    curves = np.array([[h["val_loss"] for h in x["history"][:n]] for x in runs])
    c = colors[r["optimizer"]]
    ax.plot(tokens, curves.mean(0), color=c, label=_label(r))
    ax.fill_between(tokens, curves.min(0), curves.max(0), color=c, alpha=0.2)
  if rows:
    best = min(r["mean"] for r in rows if math.isfinite(r["mean"]))
    ax.set_ylim(best - 0.05, best + 0.6)
    ax.axvspan(0.8 * rows[0]["tokens"], rows[0]["tokens"], color="0.9", zorder=0)
  ax.set_xlabel("training tokens")
  ax.set_ylabel("validation loss (nats / token)")
  ax.set_title(title, fontsize=9)
  if rows:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  # Paired differences with the best optimizer, per seed, with 95 % intervals.
  if rows:
    best = rows[0]
    diffs = []
    for r in rows:
      common = sorted(set(r["by_seed"]) & set(best["by_seed"]))
      d = [r["by_seed"][s] - best["by_seed"][s] for s in common]
      a = [best["by_seed"][s] for s in common]
      diffs.append((d, paired_interval(a, [r["by_seed"][s] for s in common])))
    shown = [
      iv["hi"] for _, iv in diffs if math.isfinite(iv["hi"]) and iv["mean"] < 0.15
    ]
    top = max([0.02, *shown]) * 1.25
    for i, (r, (d, iv)) in enumerate(zip(rows, diffs, strict=True)):
      c = colors[r["optimizer"]]
      if iv["mean"] > top:
        ax2.annotate(
          f"{LABELS[r['optimizer']]}: +{iv['mean']:.3f}\n(off scale)",
          (i, top * 0.93), ha="center", va="top", fontsize=8, color=c,
        )  # fmt: skip
        continue
      ax2.plot([i] * len(d), d, "o", color=c, alpha=0.5)
      if math.isfinite(iv["lo"]):
        err = [[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]]
        ax2.errorbar(i, iv["mean"], yerr=err, fmt="s", color="k", capsize=4)
    ax2.axhline(0.0, color="0.4", lw=1)
    ax2.set_ylim(min(-0.005, *[min(d, default=0) for d, _ in diffs]) - 0.005, top)
    ax2.set_xticks(range(len(rows)), [LABELS[r["optimizer"]] for r in rows])
    ax2.set_ylabel(f"final val loss minus {LABELS[best['optimizer']]}'s, same seed")
  ax2.set_title(
    "paired differences (dots: seeds; bars: mean, 95 % t-interval)", fontsize=9
  )
  ax2.grid(alpha=0.3)
  for name, s in (sweep or {}).items():
    assert ax3 is not None
    by_clamp: dict[float, list] = {}
    for p in s["points"]:
      by_clamp.setdefault(p["clamp"], []).append(p)
    styles = ["o-", "s--", "^:", "d-."]
    for j, (c, pts) in enumerate(sorted(by_clamp.items())):
      label = LABELS[name] + (f" c {c:g}" if name == "namo_d" else "")
      ax3.plot(
        [p["lr"] for p in pts],
        [min(p["final_val_loss"], 10.0) for p in pts],
        styles[j % 4],
        color=colors[name],
        label=label,
        alpha=1.0 if name != "namo_d" else 0.5 + 0.5 * (c == s["chosen"]["clamp"]),
      )
  if sweep:
    import matplotlib.ticker

    assert ax3 is not None
    ax3.set_xscale("log")
    ticks = sorted({p["lr"] for s in sweep.values() for p in s["points"]})
    ax3.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax3.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=45, fontsize=7)
    lo = min(s["final_val_loss"] for s in sweep.values())
    ax3.set_ylim(lo - 0.05, lo + 0.5)
    ax3.set_xlabel("peak learning rate (the matrices'; all of AdamW's)")
    ax3.set_ylabel("final validation loss, sweep seed")
    where = f" ({Path(sweep_source).name})" if sweep_source else ""
    ax3.set_title(f"the sweep the settings came from{where}", fontsize=9)
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return [bool(a.lines or a.collections) for a in fig.axes]


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
  t_start = time.perf_counter()
  job = parse(argv)
  command = "python benchmarks/gpt2/compare.py " + shlex.join(
    list(sys.argv[1:] if argv is None else argv)
  )
  results = load_results(job)
  results_f = job.out / "results.jsonl"
  base = job.base
  t_load = time.perf_counter()
  splits = train_lib.load_config_splits(base)
  settings, source, warnings = (None, None, [])
  if job.args.report:
    source = f"{results_f} (--report: nothing trained)"
  elif not job.args.sweep:
    settings, source, warnings = resolve_settings(job)
  peak = float("nan") if job.args.report else matmul_flops()
  load0 = os.getloadavg()
  what = (
    f"sweep seeds {job.sweep_seeds}"
    + (f", then final seeds {job.seeds}" if job.args.and_final else "")
    if job.args.sweep
    else f"seeds {job.seeds}, settings from {source}"
  )
  header = (
    f"`{command}`\n\n"
    f"compare.py --preset {job.args.preset}, corpus {job.corpus}: {base.n_layer} "
    f"layers, d_model {base.d_model}, {base.n_head} heads, seq {base.seq_len}, batch "
    f"{base.batch_size}, {base.steps} steps = {base.steps * base.tokens_per_step:,} "
    f"{base.tokenizer} tokens per run; {len(splits[0]):,} training / "
    f"{len(splits[1]):,} validation tokens (loaded in "
    f"{time.perf_counter() - t_load:.1f} s); final validation loss on "
    f"{base.n_final_eval * base.batch_size * base.seq_len:,} tokens; {what}."
    f"\n\nMachine: {machine()}; load average at the start {load0[0]:.1f}."
  )
  if not job.args.report:  # a report prints it once, with its tables
    print(header, flush=True)
  for w in warnings:
    print(f"warning (from the sweep): {w}", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  groups: dict = {}
  speed: dict = {}
  sweep_md = None
  n_runs = 0
  if job.args.sweep:
    n_runs += sum(len(p) for _, _, p in todo_groups(plan_runs(job, None), results))
    if "namo_d" in job.optimizers and not job.args.full_clamp_grid:
      n_runs += (len(job.clamp_grid) - 1) * len(job.sweep_seeds)  # stage 2, at most
    if job.args.and_final:
      n_runs += len(job.optimizers) * len(job.seeds)
  else:
    n_runs += sum(len(p) for _, _, p in todo_groups(plan_runs(job, settings), results))
  if job.args.report:
    n_runs = 0
  progress = Progress(n_runs, base.steps, not job.args.no_progress)
  job_args = (results, results_f, splits, groups, speed, progress)
  if job.args.sweep and not job.args.report:
    for stage in (1, 2):
      run_plan(job, plan_runs(job, None, stage, results), *job_args)
    sweep = summarize_sweep(results)
    sweep_md = sweep_markdown(sweep) if sweep else "(no sweep runs)"
    sweep_s = time.perf_counter() - t0
    blob = {
      "command": command,
      "machine": machine(),
      "wall_time_s": sweep_s,
      "config": shared_config(base),
      "seeds": job.sweep_seeds,
      "sweep": sweep,
    }
    (job.out / "sweep.json").write_text(json.dumps(blob, indent=2) + "\n")
    (job.out / "sweep.md").write_text(
      f"{header}\n\n{sweep_md}\n\nThe sweep: {sweep_s:.0f} s of wall time.\n"
    )
    for s in sweep.values():
      for w in s["warnings"]:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    if job.args.and_final:
      settings, source, _ = resolve_settings(job)
  if settings is not None and not job.args.report:
    run_plan(job, plan_runs(job, settings), *job_args, settings_source=source)
  progress.close()
  for s in speed.values():
    s["tokens_per_step"] = base.tokens_per_step
  sweep = summarize_sweep(results)
  rows = final_rows(results)
  pairs = neighbours(rows)
  # The sweep panel: this folder's sweep, else the one the settings came from.
  plot_sweep, plot_source = sweep, str(results_f)
  recorded = [r.get("settings") for r in results if r["phase"] == "final"]
  if not plot_sweep:
    plot_source = next((x for x in recorded if x), source)
    plot_sweep = sweep_of(plot_source)
  n_seeds = len(seeds_present(rows))
  panels = plot(
    rows,
    plot_sweep,
    job.out / "loss_curves.png",
    f"GPT-2 {base.n_layer}x{base.d_model} on {job.corpus} ({base.tokenizer}), "
    f"{base.steps * base.tokens_per_step:,} tokens, {n_seeds} paired seed"
    + ("s" if n_seeds != 1 else "")
    + ("" if is_evidence(rows) else " (not evidence)"),
    plot_source,
  )
  total = time.perf_counter() - t_start
  load1 = os.getloadavg()
  footer = (
    f"This invocation: {total:.1f} s of wall time ({total / 60:.1f} min) from "
    f"parsing its flags to writing its plot, {len(results)} runs in "
    f"{results_f.name}; load average at the end {load1[0]:.1f} (1 min), "
    f"{load1[2]:.1f} (15 min)."
  )
  parts = [header]
  if job.args.report and sweep:
    sweep_md = sweep_markdown(sweep)
  if sweep_md is not None:
    parts.append("## Sweep\n\n" + sweep_md)
  if rows:
    seeds = seeds_present(rows)
    heading = f"## Final runs ({len(seeds)} seeds present; settings from {source})"
    if not is_evidence(rows):
      heading += ": not evidence"
    parts.append(heading + "\n\n" + final_markdown(rows, pairs))
  if speed:
    parts.append("## Speed (this invocation)\n\n" + speed_markdown(speed, peak))
  parts.append(footer)
  text = "\n\n".join(parts) + "\n"
  print("\n" + text, flush=True)
  (job.out / "table.md").write_text(text)
  print(f"wrote {job.out / 'table.md'} and {job.out / 'loss_curves.png'}", flush=True)
  return {
    "rows": rows,
    "pairs": pairs,
    "sweep": sweep,
    "speed": speed,
    "out": job.out,
    "panels": panels,
  }


if __name__ == "__main__":
  main()
