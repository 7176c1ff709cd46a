"""Speed of the GPT-2 training step: one step per host call vs runs in lockstep.

  python benchmarks/gpt2/bench_step.py --optimizer muon --steps 64

Times, at the ``cpu`` preset's shape, (a) ``train.Steps``: one jitted step per
host call, one run (as ``harness.py`` trains); (b) ``harness.RunGroup`` with one
run and ``eval_every`` steps per call (``jax.lax.scan``); (c) the same with
three runs in lockstep (``jax.vmap``), as ``compare.py`` trains. Prints
tokens/s, XLA's FLOP count of one step and the FLOP/s reached, against the
FLOP/s of a 1024 x 1024 float32 matrix product measured between the variants.
Evaluation is left out of all three.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# This folder (the harness) and examples/gpt2 (the model and data code).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "gpt2"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare
import data as data_lib
import harness as train_lib


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], allow_abbrev=False
  )
  parser.add_argument(
    "--optimizer", default="muon", choices=train_lib.OPTIMIZERS, help="optimizer"
  )
  parser.add_argument(
    "--preset", default="cpu", choices=sorted(train_lib.PRESETS), help="model shape"
  )
  parser.add_argument("--steps", type=int, default=64, help="timed steps per variant")
  args = parser.parse_args(argv)
  cfg = train_lib.TrainConfig(
    **{**train_lib.PRESETS[args.preset], "optimizer": args.optimizer}
  )
  chunk = cfg.eval_every
  steps = max(chunk, args.steps // chunk * chunk)
  splits = train_lib.load_config_splits(cfg)
  mcfg = train_lib.model_config(cfg, splits[2])
  graphdef, params = train_lib.init_params(mcfg, 0)
  routing = train_lib.model_routing(graphdef, params)
  print(f"{compare.machine()}; load average {os.getloadavg()[0]:.1f}")
  print(
    f"{args.optimizer}, preset {args.preset}: {cfg.n_layer} layers x d_model "
    f"{cfg.d_model}, batch {cfg.batch_size} x {cfg.seq_len} tokens, {steps} steps"
  )
  rows = []

  # (a) one step per host call.
  fns = train_lib.Steps(graphdef, cfg, routing=routing)
  state = fns.init_opt_state(params)
  lr, alr = jnp.float32(cfg.peak_lr), jnp.float32(cfg.adam_lr)
  x, y = data_lib.sample_batch(splits[0], cfg.batch_size, cfg.seq_len, 0, 0)
  p = jax.tree.map(jnp.array, params)
  p, state, loss, _ = fns.train_step(p, state, x, y, lr, alr)
  jax.block_until_ready(loss)
  peak = compare.matmul_flops()
  t0 = time.perf_counter()
  for step in range(steps):
    x, y = data_lib.sample_batch(splits[0], cfg.batch_size, cfg.seq_len, 0, step)
    p, state, loss, _ = fns.train_step(p, state, x, y, lr, alr)
  jax.block_until_ready(loss)
  rows.append(("one step per call, 1 run", 1, time.perf_counter() - t0, peak))

  # (b), (c): runs in lockstep, chunk steps per call.
  flops = None
  for n_runs in (1, 3):
    c = train_lib.dataclasses.replace(cfg, steps=steps, warmup_steps=min(8, steps - 1))
    group = train_lib.RunGroup(graphdef, c, n_runs, chunk, routing=routing)
    hp = jnp.asarray(np.tile([c.peak_lr, c.adam_lr, c.clamp], (n_runs, 1)), jnp.float32)
    stacked = group.init(mcfg, list(range(n_runs)))
    group.compile(stacked, hp, splits)
    if flops is None:
      flops = group.step_flops(stacked, hp, splits)
    st = group.init_opt_state(stacked, hp)
    peak = compare.matmul_flops()
    t0 = time.perf_counter()
    for k in range(steps // chunk):
      xs, ys = group._batches(splits[0], list(range(n_runs)), k * chunk, chunk)
      stacked, st, losses = group.train_chunk(stacked, st, xs, ys, hp)
    jax.block_until_ready(losses)
    rows.append(
      (
        f"{chunk} steps per call, {n_runs} run(s)",
        n_runs,
        time.perf_counter() - t0,
        peak,
      )
    )
  print(
    f"XLA FLOPs of one training step of one run: {flops / 1e9:.2f} GFLOP "
    f"({flops / cfg.tokens_per_step / 1e6:.2f} MFLOP per token)"
  )
  print("| variant | tokens/s | GFLOP/s | matmul GFLOP/s (just before) | share |")
  print("|---|---|---|---|---|")
  for label, n_runs, seconds, peak in rows:
    tps = n_runs * steps * cfg.tokens_per_step / seconds
    fps = n_runs * steps * flops / seconds
    print(
      f"| {label} | {tps:,.0f} | {fps / 1e9:.1f} | {peak / 1e9:.1f} | "
      f"{100 * fps / peak:.0f} % |"
    )
  print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
