"""Per-layer heat maps of :mod:`optax_orth.diagnostics`, and a small demo.

The helper :func:`heatmaps` turns per-step metric dicts (the output of
``optax_orth.diagnostics.to_dict``, one per logged step) into a PNG of
layer x step heat maps, one row per metric and one column per run, with one
colour scale per metric so that runs compare directly. Other scripts can
import it::

  sys.path.insert(0, "examples")  # or the path of this directory
  from plot_diagnostics import heatmaps
  heatmaps({"muon": history_a, "normuon": history_b}, "diag.png")

Run as a script, it trains a small MLP regression on CPU with Muon and with
NorMuon, logs the diagnostics of every step, and writes the comparison::

  python examples/plot_diagnostics.py --steps 300 --out docs/img/diagnostics_mlp.png

``--overhead`` instead times the jitted step with and without
``with_diagnostics`` on the same MLP.

``--logs`` draws runs of ``benchmarks/gpt2/harness.py --diagnostics EVERY`` side
by side, from their ``diagnostics.jsonl``::

  python examples/plot_diagnostics.py --logs muon=runs/diag/muon \
    normuon=runs/diag/normuon --metrics neuron_norm_cv,neuron_norm_max_min \
    --out docs/img/gpt2_diag_imbalance.png

``--overhead-gpt2 PRESET`` times the whole jitted GPT-2 train step (forward,
backward, update) of ``benchmarks/gpt2/harness.py`` with and without the
diagnostics.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_orth
from optax_orth import diagnostics

History = Sequence[Mapping[str, Mapping[str, float]]]

#: Metrics drawn by default, in order.
DEFAULT_METRICS = (
  "neuron_norm_cv",
  "neuron_norm_max_min",
  "orthogonality_error",
  "update_rms",
)


def _matrix(history: History, metric: str, rows: Sequence[str]) -> np.ndarray:
  out = np.full((len(rows), len(history)), np.nan)
  for t, record in enumerate(history):
    values = record.get(metric, {})
    for i, row in enumerate(rows):
      if row in values:
        out[i, t] = values[row]
  return out


def heatmaps(
  runs: Mapping[str, History] | History,
  path: str,
  metrics: Sequence[str] = DEFAULT_METRICS,
  *,
  steps: Sequence[int] | None = None,
  log_scale: Sequence[str] = ("neuron_norm_max_min", "step_size_max_min"),
  title: str | None = None,
):
  """Writes layer x step heat maps of diagnostics to a PNG.

  Args:
    runs: ``{run name: history}`` or a single history; a history is a list
      of ``diagnostics.to_dict(metrics)``, one per logged step.
    path: the output file (PNG).
    metrics: metric names, one row of panels each; a metric absent from every
      run is skipped.
    steps: the step number of each history entry (default ``0, 1, ...``).
    log_scale: metrics drawn on a log colour scale.
    title: figure title.

  Returns:
    The matplotlib figure (already saved and closed).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LogNorm, Normalize

  if not isinstance(runs, Mapping):
    runs = {"": runs}
  if not runs or any(len(h) == 0 for h in runs.values()):
    raise ValueError("heatmaps needs at least one non-empty history per run.")
  metrics = [m for m in metrics if any(m in h[0] for h in runs.values())]
  if not metrics:
    raise ValueError("none of the requested metrics is in the histories.")
  names = list(runs)
  n_rows = max(len(h[0][m]) for h in runs.values() for m in metrics if m in h[0])
  fig, axes = plt.subplots(
    len(metrics),
    len(names),
    # One panel row per metric, at most 8 inches high however many layers.
    figsize=(4.2 * len(names) + 1.2, (min(0.32 * n_rows, 6.8) + 1.2) * len(metrics)),
    squeeze=False,
    constrained_layout=True,
  )
  for r, metric in enumerate(metrics):
    data = {}
    for name in names:
      history = runs[name]
      rows = list(history[0].get(metric, {}))
      data[name] = (rows, _matrix(history, metric, rows))
    finite = np.concatenate(
      [m[np.isfinite(m)].ravel() for _, m in data.values()] + [np.zeros(0)]
    )
    if metric in log_scale:
      positive = finite[finite > 0]
      lo, hi = (positive.min(), positive.max()) if positive.size else (1.0, 10.0)
      norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001))
    else:
      lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
      norm = Normalize(vmin=lo, vmax=max(hi, lo + 1e-12))
    cmap = plt.get_cmap("viridis").with_extremes(bad="red")  # inf or missing
    image = None
    # A run without this metric (say Muon for NorMuon's state) gets an empty
    # panel with the other runs' layer names, so that the columns line up.
    any_rows = next((rows for rows, _ in data.values() if rows), [])
    for c, name in enumerate(names):
      ax = axes[r][c]
      rows, mat = data[name]
      step_axis = list(steps) if steps is not None else list(range(mat.shape[1]))
      if rows:
        image = ax.imshow(
          np.ma.masked_invalid(mat),
          aspect="auto",
          interpolation="nearest",
          cmap=cmap,
          norm=norm,
          extent=(step_axis[0] - 0.5, step_axis[-1] + 0.5, len(rows) - 0.5, -0.5),
        )
      else:
        rows = any_rows
        ax.set_xlim(step_axis[0] - 0.5, step_axis[-1] + 0.5)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.text(
          0.5, 0.5, "not applicable", ha="center", va="center", transform=ax.transAxes
        )
      ax.set_yticks(range(len(rows)))
      fontsize = 7 if len(rows) <= 24 else max(3, int(170 / len(rows)))
      ax.set_yticklabels(rows if c == 0 else [""] * len(rows), fontsize=fontsize)
      ax.set_title(f"{name}: {metric}" if name else metric, fontsize=9)
      if r == len(metrics) - 1:
        ax.set_xlabel("step")
    if image is not None:
      fig.colorbar(image, ax=list(axes[r]), shrink=0.9)
  if title:
    fig.suptitle(title)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return fig


# ---------------------------------------------------------------------------
# Demo: a small MLP regression, Muon versus NorMuon.

WIDTHS = (16, 128, 256, 256, 4)  # wide, wide, square, tall


def init_mlp(key, widths=WIDTHS):
  params = {}
  for i, (a, b) in enumerate(itertools.pairwise(widths)):
    key, sub = jax.random.split(key)
    params[f"layer{i}"] = {
      "kernel": jax.random.normal(sub, (a, b)) / math.sqrt(a),
      "bias": jnp.zeros(b),
    }
  return params


def mlp(params, x):
  n = len(params)
  for i in range(n):
    x = x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
    if i < n - 1:
      x = jnp.tanh(x)
  return x


def make_task(seed=0, batch=256):
  teacher = init_mlp(jax.random.PRNGKey(seed + 1), (16, 64, 4))

  def sample(step):
    x = jax.random.normal(
      jax.random.fold_in(jax.random.PRNGKey(seed), step), (batch, 16)
    )
    return x, 3.0 * mlp(teacher, x)

  def loss(params, x, y):
    return jnp.mean((mlp(params, x) - y) ** 2)

  return sample, loss


def optimizers(lr=0.02, adam_lr=3e-3):
  return {
    "muon": optax_orth.muon(lr, adam_learning_rate=adam_lr),
    "normuon": optax_orth.normuon(lr, adam_learning_rate=adam_lr),
  }


def train(tx, steps, seed=0, log=True):
  sample, loss = make_task(seed)
  params = init_mlp(jax.random.PRNGKey(seed))
  state = tx.init(params)

  @jax.jit
  def step(params, state, t):
    x, y = sample(t)
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  history, losses = [], []
  for t in range(steps):
    params, state, value = step(params, state, t)
    losses.append(float(value))
    if log:
      history.append(diagnostics.to_dict(state.metrics))
  return history, losses


def demo(steps, out, seed):
  runs, final = {}, {}
  for name, tx in optimizers().items():
    history, losses = train(diagnostics.with_diagnostics(tx), steps, seed)
    runs[name] = history
    final[name] = float(np.mean(losses[-20:]))
    print(f"{name}: loss first {losses[0]:.4f}, mean of last 20 {final[name]:.4f}")
    last = history[-1]
    for metric in ("neuron_norm_cv", "orthogonality_error"):
      cells = ", ".join(f"{k} {v:.3f}" for k, v in last[metric].items())
      print(f"  final {metric}: {cells}")
  heatmaps(
    runs,
    out,
    title=f"MLP {'-'.join(map(str, WIDTHS))}, {steps} steps, lr 0.02 "
    f"(final loss: muon {final['muon']:.3f}, normuon {final['normuon']:.3f})",
  )
  print(f"wrote {out}")


def overhead(steps, repeats, every_values):
  """Time of the jitted ``tx.update`` alone, with and without diagnostics.

  The variants are timed in turn, ``repeats`` rounds of ``steps`` steps each,
  so that load from other processes hits them alike; the report gives the
  minimum over rounds of the wall time per step (the least disturbed round)
  and of the process CPU time per step.
  """
  sample, loss = make_task(0)
  params = init_mlp(jax.random.PRNGKey(0))
  grads = jax.grad(loss)(params, *sample(0))
  print(f"devices: {jax.devices()}, load average: {os.getloadavg()}")
  for name, tx in optimizers().items():
    variants = {"plain": tx}
    for every in every_values:
      variants[f"with_diagnostics(every={every})"] = diagnostics.with_diagnostics(
        tx, every=every
      )
    runners = {}
    for label, t in variants.items():
      update = jax.jit(t.update)
      state = t.init(params)
      u, state = update(grads, state, params)  # compile
      jax.block_until_ready((u, state))
      runners[label] = [update, state]
    wall = {label: [] for label in variants}
    cpu = {label: [] for label in variants}
    for _ in range(repeats):
      for label, (update, state) in runners.items():
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
          u, state = update(grads, state, params)
        jax.block_until_ready((u, state))
        wall[label].append((time.perf_counter() - start) / steps)
        cpu[label].append((time.process_time() - start_cpu) / steps)
        runners[label][1] = state
    base_wall, base_cpu = min(wall["plain"]), min(cpu["plain"])
    for label in variants:
      w, c = min(wall[label]), min(cpu[label])
      print(
        f"{name:8s} {label:28s} wall {w * 1e3:7.2f} ms/step (x{w / base_wall:.2f})"
        f"  cpu {c * 1e3:7.2f} ms/step (x{c / base_cpu:.2f})"
      )
  print(f"load average after: {os.getloadavg()}")


def _gpt2_train():
  """The GPT-2 harness, ``benchmarks/gpt2/harness.py``."""
  harness = str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpt2")
  if harness not in sys.path:
    sys.path.insert(0, harness)
  import harness as train_lib

  return train_lib


def from_logs(specs: Sequence[str], out: str, metrics: Sequence[str], title=None):
  """Heat maps of GPT-2 runs side by side: ``specs`` are ``NAME=DIR`` (or a
  ``diagnostics.jsonl`` path); the runs must log the same steps."""
  train_lib = _gpt2_train()
  runs, steps = {}, None
  for spec in specs:
    name, sep, where = spec.partition("=")
    if not sep:
      raise ValueError(f"--logs entries are NAME=PATH; got {spec!r}.")
    path = Path(where)
    if path.is_dir():
      path = path / "diagnostics.jsonl"
    records = train_lib.read_diagnostics(path)
    if not records:
      raise ValueError(f"{path} has no diagnostics records.")
    these = [r["step"] for r in records]
    if steps is not None and these != steps:
      raise ValueError(f"{path} logs steps {these}, not {steps} as the others.")
    steps = these
    runs[name] = [{k: v for k, v in r.items() if k != "step"} for r in records]
  heatmaps(runs, out, metrics, steps=steps, title=title)
  print(f"wrote {out}")
  for name, history in runs.items():
    last = history[-1]
    for metric in metrics:
      if last.get(metric):
        cells = ", ".join(f"{k} {v:.3g}" for k, v in last[metric].items())
        print(f"{name} step {steps[-1]} {metric}: {cells}")


def overhead_gpt2(preset, optimizer, steps, repeats, every_values):
  """Time of the whole jitted GPT-2 train step, with and without diagnostics.

  As :func:`overhead`: the variants run in turn, ``repeats`` rounds of
  ``steps`` steps on the same batch each, and the minimum over rounds of the
  wall and the process CPU time per step is reported. The diagnostics are
  only computed on device here (no ``to_dict``; ``harness.py`` fetches them once
  per logged step).
  """
  train_lib = _gpt2_train()
  data_lib = train_lib.data_lib
  cfg = train_lib.TrainConfig(**train_lib.PRESETS[preset], optimizer=optimizer)
  splits = data_lib.load_splits(cfg.data, cfg.tokenizer, cfg.val_from_year)
  graphdef, params0 = train_lib.init_params(
    train_lib.model_config(cfg, splits[2]), cfg.seed
  )
  x, y = data_lib.sample_batch(splits[0], cfg.batch_size, cfg.seq_len, 0, 0)
  lr, adam_lr = jnp.float32(cfg.peak_lr), jnp.float32(cfg.adam_lr)
  print(f"devices: {jax.devices()}, load average: {os.getloadavg()}")
  print(f"{optimizer}, preset {preset}: batch {cfg.batch_size} x {cfg.seq_len}")
  runners = {}
  routing = train_lib.model_routing(graphdef, params0)
  for every in (0, *every_values):
    label = "plain" if every == 0 else f"diagnostics every {every}"
    fns = train_lib.Steps(graphdef, cfg, every, routing=routing)
    params = jax.tree.map(jnp.array, params0)
    state = fns.init_opt_state(params)
    params, state, loss, _ = fns.train_step(params, state, x, y, lr, adam_lr)
    jax.block_until_ready(loss)  # compiled
    runners[label] = [fns.train_step, params, state]
  wall = {label: [] for label in runners}
  cpu = {label: [] for label in runners}
  for _ in range(repeats):
    for label, (step, params, state) in runners.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      for _ in range(steps):
        params, state, loss, _ = step(params, state, x, y, lr, adam_lr)
      jax.block_until_ready((params, state, loss))
      wall[label].append((time.perf_counter() - start) / steps)
      cpu[label].append((time.process_time() - start_cpu) / steps)
      runners[label][1:] = [params, state]
  base_wall, base_cpu = min(wall["plain"]), min(cpu["plain"])
  for label in runners:
    w, c = min(wall[label]), min(cpu[label])
    print(
      f"{optimizer:8s} {label:24s} wall {w * 1e3:7.2f} ms/step (x{w / base_wall:.2f})"
      f"  cpu {c * 1e3:7.2f} ms/step (x{c / base_cpu:.2f})"
    )
  print(f"load average after: {os.getloadavg()}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="docs/img/diagnostics_mlp.png")
  parser.add_argument("--overhead", action="store_true")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument(
    "--logs",
    nargs="+",
    default=None,
    metavar="NAME=PATH",
    help="draw GPT-2 diagnostics.jsonl logs side by side instead of the demo",
  )
  parser.add_argument(
    "--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated, for --logs"
  )
  parser.add_argument("--title", default=None, help="figure title, for --logs")
  parser.add_argument(
    "--overhead-gpt2",
    default=None,
    metavar="PRESET",
    help="time the GPT-2 train step of benchmarks/gpt2/harness.py with this preset",
  )
  parser.add_argument("--optimizer", default="muon", help="for --overhead-gpt2")
  args = parser.parse_args()
  if args.logs:
    from_logs(args.logs, args.out, args.metrics.split(","), args.title)
  elif args.overhead_gpt2:
    overhead_gpt2(args.overhead_gpt2, args.optimizer, args.steps, args.repeats, (1, 10))
  elif args.overhead:
    overhead(args.steps, args.repeats, (1, 10))
  else:
    demo(args.steps, args.out, args.seed)


if __name__ == "__main__":
  main()
