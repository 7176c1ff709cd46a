"""Trains the compact GPT-2 of ``model.py`` with one optimizer.

Example (the bundled State of the Union corpus, bytes as tokens)::

  python benchmarks/gpt2/harness.py --optimizer namo_d --steps 300 --out runs/namo_d
  python benchmarks/gpt2/harness.py --optimizer namo_d --out runs/namo_d --resume

What it does:

* learning rate: linear warmup over ``warmup_steps`` then cosine decay to
  ``final_lr_frac`` of the peak at ``steps``;
* gradient clipping by global norm (``clip_norm``) before the optimizer;
* routing read from what the model computes (:func:`model_routing`,
  :func:`optax_orth.route_by_model`): the hidden matrices (the attention and
  MLP kernels, the fused QKV kernel as three matrices) go to the orthogonal
  optimizer, the tied token embedding, the position embedding and the
  LayerNorm scales to AdamW at ``adam_lr``;
* evaluation on the validation split every ``eval_every`` steps;
* a progress bar (``tqdm`` if installed, plain lines otherwise), a JSONL log
  (``<out>/log.jsonl``), an Orbax checkpoint (``<out>/ckpt``) every
  ``ckpt_every`` steps and at the end, and ``--resume`` from the latest one;
* with ``--diagnostics EVERY``: the optimizer is wrapped in
  :func:`optax_orth.diagnostics.with_diagnostics`, which computes the
  per-layer diagnostics inside the jitted step (no second forward or backward
  pass) every ``EVERY`` steps; they go to ``<out>/diagnostics.jsonl`` and, at
  the end, to layer x step heat maps in ``<out>/diagnostics.png``.

Batches depend only on ``(seed, step)``, so a resumed run follows the same
trajectory as an uninterrupted one, and runs of different optimizers on the
same seed see the same batches from the same initialisation (paired runs).

:class:`RunGroup` trains several runs of one optimizer in lockstep, as
``compare.py`` does: one compiled call per ``chunk`` steps, ``jax.vmap`` over
the runs and ``jax.lax.scan`` over the steps, with the learning rates and
NAMO-D's clamp as arguments, so that one compile serves a whole sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# The model and data code of the research script, examples/gpt2/ (not a copy).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "gpt2"))
import data as data_lib
import model as model_lib

import optax_orth
from optax_orth import diagnostics as diag_lib

OPTIMIZERS = ("adamw", "muon", "namo", "namo_d", "normuon")

#: Peak learning rates used when ``--lr`` is not given: each reference's
#: default for the orthogonal optimizers, a common GPT value for AdamW.
DEFAULT_LR = {
  "adamw": 3e-3,
  "muon": 0.02,
  "namo": 1e-2,
  "namo_d": 1e-2,
  "normuon": 0.02,
}


@dataclasses.dataclass
class TrainConfig:
  """Everything a run depends on (model shape, data, optimizer, schedule)."""

  optimizer: str = "namo_d"
  lr: float | None = None
  adam_lr: float = 3e-3
  clamp: float = 0.75
  weight_decay: float | None = None
  steps: int = 300
  warmup_steps: int = 30
  final_lr_frac: float = 0.1
  clip_norm: float = 1.0
  batch_size: int = 16
  seq_len: int = 128
  n_layer: int = 4
  n_head: int = 4
  d_model: int = 128
  eval_every: int = 50
  eval_batches: int = 8
  final_eval_batches: int = 0
  seed: int = 0
  data: str | None = None
  tokenizer: str = "byte"
  val_fraction: float = 0.1
  val_from_year: int | None = None

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}.")
    if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
      raise ValueError("steps, batch_size and eval_every must be >= 1.")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(
        f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})."
      )
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction}.")
    if self.eval_batches < 1 or self.final_eval_batches < 0:
      raise ValueError("eval_batches must be >= 1 and final_eval_batches >= 0.")

  @property
  def peak_lr(self) -> float:
    return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len

  @property
  def n_final_eval(self) -> int:
    return self.final_eval_batches or self.eval_batches


#: ``--help`` text of every :class:`TrainConfig` field (harness.py and compare.py).
FIELD_HELP: dict[str, str] = {
  "optimizer": f"the optimizer, one of {', '.join(OPTIMIZERS)}",
  "lr": "peak learning rate of the matrices (of every parameter for AdamW); "
  "default: the optimizer's reference value",
  "adam_lr": "peak learning rate of the AdamW branch of the orthogonal optimizers "
  "(embeddings, LayerNorm scales)",
  "clamp": "NAMO-D's clamp c of the per-feature step sizes toward their mean "
  "(ignored by the other optimizers)",
  "weight_decay": "weight decay; default: each optimizer's reference value",
  "steps": "training steps (the schedule spans them)",
  "warmup_steps": "linear warmup steps before the cosine decay",
  "final_lr_frac": "the cosine decay ends at this fraction of the peak",
  "clip_norm": "clip gradients to this global norm (0: no clipping)",
  "batch_size": "sequences per step",
  "seq_len": "tokens per sequence (the model's context)",
  "n_layer": "transformer blocks",
  "n_head": "attention heads per block",
  "d_model": "width of the residual stream",
  "eval_every": "evaluate on the validation split every this many steps",
  "eval_batches": "validation batches per evaluation during training",
  "final_eval_batches": "validation batches of the evaluation after the last step "
  "(0: eval_batches)",
  "seed": "seed of the initialisation and of the batch order",
  "data": "corpus: a bundled one by name (sotu, moby-dick; default sotu), or a text "
  "file, a folder of .txt/.md files, or a .tar/.tar.gz/.tar.xz archive of them",
  "tokenizer": "byte (UTF-8 bytes, vocabulary 256) or gpt2 (GPT-2 BPE)",
  "val_fraction": "the last this fraction of the text is the validation split "
  "(unless split by year)",
  "val_from_year": "split by the year that starts each file name instead: files "
  "from this year on are the validation split (the sotu corpus does so from 2000 "
  "by default; other paths only when this is given)",
}


#: Model and run sizes shared with ``compare.py``.
PRESETS: dict[str, dict[str, Any]] = {
  # CI: seconds.
  "smoke": dict(
    n_layer=1, n_head=2, d_model=32, seq_len=32, batch_size=4, steps=12,
    warmup_steps=2, eval_every=6, eval_batches=2,
  ),
  # 2 CPU cores: 0.10M matrix parameters, bytes as tokens, 2,621,440 tokens
  # per run (the preset of compare.py's measured runs, docs/results.md).
  "cpu": dict(
    n_layer=2, n_head=4, d_model=64, seq_len=64, batch_size=32, steps=1280,
    warmup_steps=32, eval_every=32, eval_batches=4, final_eval_batches=32,
    adam_lr=4e-3,
  ),
  # One accelerator: the GPT-2 small shape (124M parameters) with GPT-2's BPE.
  # 600 steps of 16 x 1024 tokens are about 5 passes over the SOTU training
  # split (1.9M tokens); pass --data with a larger corpus for more steps.
  "gpu": dict(
    n_layer=12, n_head=12, d_model=768, seq_len=1024, batch_size=16, steps=600,
    warmup_steps=60, eval_every=50, eval_batches=8, tokenizer="gpt2",
    adam_lr=6e-4,
  ),
}  # fmt: skip


def lr_schedule(
  peak: Any, steps: int, warmup_steps: int, final_frac: float
) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup to ``peak`` then cosine decay to ``final_frac * peak``.

  ``peak`` may be a traced scalar, so one compiled step serves a whole
  learning-rate sweep.
  """

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = (count + 1.0) / max(warmup_steps, 1)
    progress = jnp.clip((count - warmup_steps) / max(steps - warmup_steps, 1), 0.0, 1.0)
    cosine = final_frac + (1.0 - final_frac) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return peak * jnp.where(count < warmup_steps, warm, cosine)

  return schedule


def build_optimizer(
  name: str,
  lr: Any,
  adam_lr: Any,
  *,
  routing: Any,
  steps: int,
  warmup_steps: int,
  final_lr_frac: float = 0.1,
  clip_norm: float | None = 1.0,
  weight_decay: float | None = None,
  diagnostics_every: int = 0,
  clamp: Any = 0.75,
) -> optax.GradientTransformation:
  """One of :data:`OPTIMIZERS`, with the schedule, routing and clipping.

  ``routing`` is the model's dimension-numbers spec (:func:`model_routing`).

  ``weight_decay=None`` keeps each optimizer's reference default (AdamW 0.1 on
  matrices and embeddings, NAMO/NAMO-D 0.1 adaptive, Muon and NorMuon 0). The
  orthogonal optimizers' AdamW branch (embeddings, norm scales) uses
  ``adam_lr`` on the same schedule, with betas ``(0.9, 0.95)``.

  ``diagnostics_every > 0`` wraps the optimizer (inside the clipping, so that
  the diagnostics see the gradient it sees) in
  :func:`optax_orth.diagnostics.with_diagnostics`, computed every
  ``diagnostics_every`` steps on the hidden matrices (the routing's
  orthogonal leaves); the metrics are at
  ``optax.tree_utils.tree_get(opt_state, "metrics")``.

  ``lr``, ``adam_lr`` and NAMO-D's ``clamp`` may be traced scalars (one
  compiled step for a whole sweep).
  """
  sched = lr_schedule(lr, steps, warmup_steps, final_lr_frac)
  adam_sched = lr_schedule(adam_lr, steps, warmup_steps, final_lr_frac)
  if name == "adamw":
    wd = 0.1 if weight_decay is None else weight_decay
    tx = optax.adamw(
      sched,
      b1=0.9,
      b2=0.95,
      weight_decay=wd,
      mask=lambda p: jax.tree.map(lambda x: jnp.ndim(x) >= 2, p),
    )
  elif name == "muon":
    tx = optax_orth.muon(
      sched,
      weight_decay=0.0 if weight_decay is None else weight_decay,
      adam_learning_rate=adam_sched,
      adam_b2=0.95,
      muon_weight_dimension_numbers=routing,
    )
  elif name in ("namo", "namo_d"):
    kw = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "namo":
      factory = optax_orth.namo
    else:
      factory = functools.partial(optax_orth.namo_d, clamp=clamp)
    tx = factory(
      sched, adam_learning_rate=adam_sched, weight_dimension_numbers=routing, **kw
    )
  elif name == "normuon":
    tx = optax_orth.normuon(
      sched,
      weight_decay=0.0 if weight_decay is None else weight_decay,
      adam_learning_rate=adam_sched,
      adam_eps=1e-8,
      weight_dimension_numbers=routing,
    )
  else:
    raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}.")
  if diagnostics_every:
    tx = diag_lib.with_diagnostics(tx, routing, every=diagnostics_every)
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx


def config_optimizer(
  cfg: TrainConfig, routing, lr, adam_lr, clamp, diagnostics_every: int = 0
) -> optax.GradientTransformation:
  """:func:`build_optimizer` with ``cfg``'s schedule, clipping and decay."""
  return build_optimizer(
    cfg.optimizer,
    lr,
    adam_lr,
    routing=routing,
    steps=cfg.steps,
    warmup_steps=cfg.warmup_steps,
    final_lr_frac=cfg.final_lr_frac,
    clip_norm=cfg.clip_norm,
    weight_decay=cfg.weight_decay,
    diagnostics_every=diagnostics_every,
    clamp=clamp,
  )


def model_config(cfg: TrainConfig, vocab_size: int) -> model_lib.GPTConfig:
  return model_lib.GPTConfig(
    vocab_size=model_lib.padded_vocab_size(vocab_size)
    if vocab_size > 256
    else vocab_size,
    seq_len=cfg.seq_len,
    n_layer=cfg.n_layer,
    n_head=cfg.n_head,
    d_model=cfg.d_model,
  )


def init_params(mcfg: model_lib.GPTConfig, seed: int):
  """``(graphdef, params)``: params as a plain nested dict of arrays."""
  graphdef, state = nnx.split(model_lib.GPT(mcfg, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def model_routing(graphdef, params) -> optax_orth._src.model_routing.ModelRouting:
  """The model's routing, read by :func:`optax_orth.route_by_model` from one
  abstract forward pass (as the research script reads it): the attention and
  MLP kernels are orthogonal (the fused QKV kernel as three matrices), the
  tied embedding, the position embedding and the norm scales go to AdamW."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  apply = lambda p, x: nnx.merge(graphdef, nnx.State(p))(x)
  return optax_orth.route_by_model(apply, tokens, params=abstract, strict=True)


class Steps:
  """Jitted train and eval steps for one optimizer and model.

  The peak learning rates are arguments of the compiled step, so a sweep over
  them compiles once.
  """

  def __init__(
    self, graphdef, cfg: TrainConfig, diagnostics_every: int = 0, *, routing: Any
  ):
    if diagnostics_every < 0:
      raise ValueError(f"diagnostics_every must be >= 0; got {diagnostics_every}.")
    self.cfg = cfg
    self.diagnostics_every = diagnostics_every

    def make_tx(lr, adam_lr):
      return config_optimizer(cfg, routing, lr, adam_lr, cfg.clamp, diagnostics_every)

    def loss_fn(params, x, y):
      return model_lib.cross_entropy(nnx.merge(graphdef, params)(x), y)

    def train_step(params, opt_state, x, y, lr, adam_lr):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = make_tx(lr, adam_lr).update(grads, opt_state, params)
      return (
        optax.apply_updates(params, updates),
        opt_state,
        loss,
        optax.tree.norm(grads),
      )

    self.make_tx = make_tx
    self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
    self.eval_step = jax.jit(loss_fn)

  def init_opt_state(self, params):
    return self.make_tx(self.cfg.peak_lr, self.cfg.adam_lr).init(params)

  def evaluate(self, params, batches) -> float:
    return float(np.mean([float(self.eval_step(params, x, y)) for x, y in batches]))


def load_config_splits(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, int]:
  """``(train_tokens, val_tokens, vocab_size)`` of ``cfg``'s corpus and split."""
  return data_lib.load_splits(
    cfg.data, cfg.tokenizer, cfg.val_from_year, cfg.val_fraction
  )


#: The hyperparameters that one compiled :class:`RunGroup` takes per run.
HPARAMS = ("lr", "adam_lr", "clamp")


class RunGroup:
  """Several runs of one optimizer trained in lockstep by one compiled call.

  The runs differ in seed (initialisation and batches) and in the
  hyperparameters of :data:`HPARAMS`, which are arguments of the compiled
  functions: every run of an optimizer with the same model shape and number of
  runs shares one compile. The training step is ``jax.vmap``-ed over the runs
  and ``jax.lax.scan``-ned over ``chunk`` steps, so the host calls (and syncs)
  once per ``chunk`` steps, not once per step; the losses of the chunk come
  back as one array.

  Args:
    graphdef: the model's graph definition (:func:`init_params`).
    cfg: the shared configuration (its ``optimizer``, shape and schedule;
      per-run seeds and hyperparameters are given to :meth:`run`).
    n_runs: number of runs in lockstep.
    chunk: steps per compiled call.
  """

  def __init__(
    self, graphdef, cfg: TrainConfig, n_runs: int, chunk: int, *, routing: Any
  ):
    if n_runs < 1 or chunk < 1:
      raise ValueError(f"n_runs and chunk must be >= 1; got {n_runs}, {chunk}.")
    self.cfg, self.n_runs, self.chunk = cfg, n_runs, chunk
    self.graphdef = graphdef

    def make_tx(hp):
      return config_optimizer(cfg, routing, hp[0], hp[1], hp[2])

    def loss_fn(params, x, y):
      return model_lib.cross_entropy(nnx.merge(graphdef, params)(x), y)

    def train_chunk(params, opt_state, xs, ys, hp):
      tx = make_tx(hp)

      def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

      (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (xs, ys))
      return params, opt_state, losses

    def evaluate(params, xs, ys):
      return jax.lax.map(lambda b: loss_fn(params, *b), (xs, ys)).mean()

    self.make_tx = make_tx
    self.loss_fn = loss_fn
    self.train_chunk = jax.jit(jax.vmap(train_chunk), donate_argnums=(0, 1))
    self._evaluate = jax.jit(jax.vmap(evaluate, in_axes=(0, None, None)))
    self._evaluate_compiled: dict[int, Any] = {}
    self.init_opt_state = jax.jit(jax.vmap(lambda p, hp: make_tx(hp).init(p)))
    self.compile_seconds = 0.0

  def evaluate(self, params, xs, ys) -> jax.Array:
    """Mean validation loss of each run over the batches ``xs, ys``."""
    fn = self._evaluate_compiled.get(xs.shape[0], self._evaluate)
    return fn(params, xs, ys)

  def _batches(self, train_tok, seeds, start: int, n: int):
    cfg = self.cfg
    xs = np.empty((len(seeds), n, cfg.batch_size, cfg.seq_len), np.int32)
    ys = np.empty_like(xs)
    for r, seed in enumerate(seeds):
      for k in range(n):
        xs[r, k], ys[r, k] = data_lib.sample_batch(
          train_tok, cfg.batch_size, cfg.seq_len, seed, start + k
        )
    return xs, ys

  def compile(self, params, hp, splits) -> float:
    """Compiles the chunk, the evaluation and the state init; returns seconds."""
    t0 = time.perf_counter()
    cfg = self.cfg
    opt_state = jax.eval_shape(self.init_opt_state, params, hp)
    xs, ys = self._batches(splits[0], [0] * self.n_runs, 0, self.chunk)
    self.train_chunk = self.train_chunk.lower(params, opt_state, xs, ys, hp).compile()
    self.init_opt_state = self.init_opt_state.lower(params, hp).compile()
    for n in {cfg.eval_batches, cfg.n_final_eval}:
      vx = jax.ShapeDtypeStruct((n, cfg.batch_size, cfg.seq_len), jnp.int32)
      self._evaluate_compiled[n] = self._evaluate.lower(params, vx, vx).compile()
    self.compile_seconds = time.perf_counter() - t0
    return self.compile_seconds

  def step_flops(self, params, hp, splits) -> float:
    """XLA's FLOP count of one training step of one run (model and optimizer),
    from the lowered step (no compile)."""
    p1 = jax.tree.map(lambda x: x[0], params)
    hp1 = hp[0]

    def one_step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(self.loss_fn)(params, x, y)
      tx = self.make_tx(hp1)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    st1 = jax.eval_shape(lambda p: self.make_tx(hp1).init(p), p1)
    x, y = data_lib.sample_batch(splits[0], self.cfg.batch_size, self.cfg.seq_len, 0, 0)
    cost = jax.jit(one_step).lower(p1, st1, x, y).cost_analysis()
    if isinstance(cost, list | tuple):
      cost = cost[0]
    return float(cost.get("flops", float("nan")))

  def init(self, mcfg: model_lib.GPTConfig, seeds):
    """Stacked parameters of ``seeds`` (each as :func:`init_params`)."""
    trees = [init_params(mcfg, s)[1] for s in seeds]
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *trees)

  def run(
    self,
    seeds,
    hparams,
    splits,
    on_chunk: Callable[[int], None] | None = None,
  ) -> list[dict[str, Any]]:
    """Trains ``len(seeds)`` runs; returns one record per run.

    Args:
      seeds: one seed per run (``n_runs`` of them).
      hparams: one ``(lr, adam_lr, clamp)`` per run.
      splits: ``(train_tokens, val_tokens, vocab_size)``.
      on_chunk: called with the number of steps done in each chunk.

    Returns:
      Per run: ``history`` (one ``{"step", "tokens", "train_loss",
      "val_loss", "time"}`` per evaluation), ``final_val_loss`` (on
      ``n_final_eval`` batches after the last step; ``inf`` if the run
      diverged), ``diverged`` and ``wall_time`` (the group's seconds, shared
      by its runs: they train together).
    """
    cfg = self.cfg
    if len(seeds) != self.n_runs or len(hparams) != self.n_runs:
      raise ValueError(f"expected {self.n_runs} seeds and hyperparameter rows.")
    train_tok, val_tok, vocab = splits
    mcfg = model_config(cfg, vocab)
    hp = jnp.asarray(np.asarray(hparams, np.float32))
    params = self.init(mcfg, seeds)
    opt_state = self.init_opt_state(params, hp)

    def val_set(n):
      b = data_lib.eval_batches(val_tok, n, cfg.batch_size, cfg.seq_len)
      return np.stack([x for x, _ in b]), np.stack([y for _, y in b])

    vx, vy = val_set(cfg.eval_batches)
    histories: list[list[dict[str, Any]]] = [[] for _ in seeds]
    t0 = time.perf_counter()
    done = 0
    losses = []
    next_eval = cfg.eval_every
    while done < cfg.steps:
      n = min(self.chunk, cfg.steps - done)
      if n != self.chunk:
        raise ValueError(
          f"steps={cfg.steps} is not a multiple of the chunk ({self.chunk})."
        )
      xs, ys = self._batches(train_tok, seeds, done, n)
      params, opt_state, chunk_losses = self.train_chunk(params, opt_state, xs, ys, hp)
      losses.append(chunk_losses)
      done += n
      if done >= next_eval or done == cfg.steps:
        next_eval += cfg.eval_every
        val = np.asarray(self.evaluate(params, vx, vy))  # the one sync
        train = np.asarray(chunk_losses[:, -1])
        elapsed = time.perf_counter() - t0
        for r in range(self.n_runs):
          histories[r].append(
            {
              "step": done,
              "tokens": done * cfg.tokens_per_step,
              "train_loss": float(train[r]),
              "val_loss": float(val[r]),
              "time": elapsed,
            }
          )
      if on_chunk is not None:
        on_chunk(n)
    if cfg.n_final_eval == cfg.eval_batches:
      final = np.array([h[-1]["val_loss"] for h in histories])
    else:
      final = np.asarray(self.evaluate(params, *val_set(cfg.n_final_eval)))
    wall = time.perf_counter() - t0
    all_losses = np.concatenate([np.asarray(x) for x in losses], axis=1)
    out = []
    for r in range(self.n_runs):
      diverged = not (np.all(np.isfinite(all_losses[r])) and np.isfinite(final[r]))
      out.append(
        {
          "seed": int(seeds[r]),
          **{k: float(v) for k, v in zip(HPARAMS, hparams[r], strict=True)},
          "final_val_loss": float("inf") if diverged else float(final[r]),
          "diverged": bool(diverged),
          "history": histories[r],
          "wall_time": wall,
          "tokens": cfg.steps * cfg.tokens_per_step,
        }
      )
    return out


def _progress(total: int, initial: int, enabled: bool):
  """A tqdm bar, or ``None`` (plain prints) when tqdm is missing or disabled."""
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return None
  return tqdm(total=total, initial=initial, dynamic_ncols=True, leave=False)


def train(
  cfg: TrainConfig,
  out_dir: str | Path | None = None,
  *,
  resume: bool = False,
  ckpt_every: int | None = None,
  stop_at: int | None = None,
  progress: bool = True,
  splits: tuple[np.ndarray, np.ndarray, int] | None = None,
  steps_fns: Steps | None = None,
  verbose: bool = True,
  diagnostics_every: int = 0,
) -> dict[str, Any]:
  """Runs (or resumes) one training run.

  Args:
    cfg: the run's configuration.
    out_dir: where ``log.jsonl``, ``config.json`` and ``ckpt/`` go (``None``:
      no files, no checkpoint).
    resume: restore the latest checkpoint in ``out_dir/ckpt`` and go on.
    ckpt_every: checkpoint period in steps (``None``: ``eval_every``); a
      checkpoint is always written at the last step run.
    stop_at: stop after this step (to simulate an interruption); the schedule
      still spans ``cfg.steps``.
    progress: show a progress bar.
    splits: pre-loaded ``(train_tokens, val_tokens, vocab_size)``.
    steps_fns: a compiled :class:`Steps` to reuse (same shapes and optimizer).
    verbose: print eval lines.
    diagnostics_every: ``k > 0``: compute the diagnostics of
      :mod:`optax_orth.diagnostics` inside the jitted step every ``k`` steps
      (at steps ``1, k + 1, 2k + 1, ...``, counting from 1), append them to
      ``out_dir/diagnostics.jsonl`` and draw ``out_dir/diagnostics.png`` at
      the end; ``0``: off. A resumed run must use the same value (it is part
      of the optimizer state).

  Returns:
    ``{"params", "history", "best_val_loss", "final_val_loss", "wall_time",
    "step", "diagnostics"}``; ``history`` holds one dict per evaluation,
    ``diagnostics`` one ``{"step": s, metric: {layer: value}}`` per logged
    step of this call (empty when off).
  """
  train_tok, val_tok, vocab = splits or load_config_splits(cfg)
  mcfg = model_config(cfg, vocab)
  graphdef, params = init_params(mcfg, cfg.seed)
  fns = steps_fns or Steps(
    graphdef, cfg, diagnostics_every, routing=model_routing(graphdef, params)
  )
  if fns.diagnostics_every != diagnostics_every:
    raise ValueError(
      f"steps_fns were built with diagnostics_every={fns.diagnostics_every}, "
      f"not {diagnostics_every}."
    )
  opt_state = fns.init_opt_state(params)
  val_batches = data_lib.eval_batches(
    val_tok, cfg.eval_batches, cfg.batch_size, cfg.seq_len
  )
  out = Path(out_dir) if out_dir is not None else None
  mngr = None
  start = 0
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    config_f = out / "config.json"
    if resume and config_f.exists():
      old = json.loads(config_f.read_text())
      changed = sorted(k for k, v in dataclasses.asdict(cfg).items() if old.get(k) != v)
      if changed and verbose:
        print(f"resume: configuration differs from the checkpoint's in {changed}")
    config_f.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(
      (out / "ckpt").resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    if resume:
      latest = mngr.latest_step()
      if latest is None:
        raise ValueError(f"--resume: no checkpoint in {out / 'ckpt'}.")
      target = {"params": params, "opt_state": opt_state}
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      restored = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
      params, opt_state, start = restored["params"], restored["opt_state"], latest
    else:
      for name in ("log.jsonl", "diagnostics.jsonl"):
        if (out / name).exists():
          (out / name).unlink()
  log_f = open(out / "log.jsonl", "a") if out is not None else None
  diag_f = (
    open(out / "diagnostics.jsonl", "a")
    if out is not None and diagnostics_every
    else None
  )
  diag_history: list[dict[str, Any]] = []
  lr = jnp.float32(cfg.peak_lr)
  adam_lr = jnp.float32(cfg.adam_lr)
  sched = lr_schedule(cfg.peak_lr, cfg.steps, cfg.warmup_steps, cfg.final_lr_frac)
  end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
  ckpt_every = ckpt_every or cfg.eval_every
  history: list[dict[str, Any]] = []
  bar = _progress(cfg.steps, start, progress)

  def log(record):
    history.append(record)
    if log_f is not None:
      log_f.write(json.dumps(record) + "\n")
      log_f.flush()

  t0 = time.perf_counter()
  train_loss = float("nan")
  try:
    for step in range(start, end):
      x, y = data_lib.sample_batch(
        train_tok, cfg.batch_size, cfg.seq_len, cfg.seed, step
      )
      params, opt_state, loss, gnorm = fns.train_step(
        params, opt_state, x, y, lr, adam_lr
      )
      done = step + 1
      if diagnostics_every and step % diagnostics_every == 0:
        # with_diagnostics computed them in this step (its count was `step`).
        metrics = optax.tree_utils.tree_get(opt_state, "metrics")
        diag_record = {"step": done, **diag_lib.to_dict(metrics)}
        diag_history.append(diag_record)
        if diag_f is not None:
          diag_f.write(json.dumps(diag_record) + "\n")
          diag_f.flush()
      if done % cfg.eval_every == 0 or done == end:
        train_loss = float(loss)
        if not math.isfinite(train_loss):
          raise FloatingPointError(
            f"{cfg.optimizer}: training loss {train_loss} at step {done} "
            f"(lr={cfg.peak_lr})."
          )
        record = {
          "step": done,
          "tokens": done * cfg.tokens_per_step,
          "train_loss": train_loss,
          "val_loss": fns.evaluate(params, val_batches),
          "grad_norm": float(gnorm),
          "lr": float(sched(step)),
          "time": time.perf_counter() - t0,
        }
        log(record)
        msg = (
          f"step {done:>6d}  train {record['train_loss']:.4f}  "
          f"val {record['val_loss']:.4f}  lr {record['lr']:.2e}"
        )
        if bar is not None:
          bar.set_postfix_str(msg)
        elif verbose:
          print(msg, flush=True)
      if bar is not None:
        bar.update(1)
      if mngr is not None and (done % ckpt_every == 0 or done == end):
        mngr.save(done, args=_save_args({"params": params, "opt_state": opt_state}))
    if mngr is not None:
      mngr.wait_until_finished()
  finally:
    if bar is not None:
      bar.close()
    if log_f is not None:
      log_f.close()
    if diag_f is not None:
      diag_f.close()
    if mngr is not None:
      mngr.close()
  if out is not None and diagnostics_every:
    plot_diagnostics(out / "diagnostics.jsonl", out / "diagnostics.png", cfg)
  vals = [r["val_loss"] for r in history]
  return {
    "params": params,
    "history": history,
    "best_val_loss": min(vals) if vals else float("nan"),
    "final_val_loss": vals[-1] if vals else float("nan"),
    "wall_time": time.perf_counter() - t0,
    "step": end,
    "diagnostics": diag_history,
  }


#: Heat maps drawn by :func:`plot_diagnostics`, when the run has them.
DIAGNOSTIC_PLOTS = (
  "neuron_norm_cv",
  "neuron_norm_max_min",
  "orthogonality_error",
  "update_rms",
  "update_spectral_norm",
  "neuron_rms_cv",
  "alpha",
  "step_size_cv",
  "clamped_fraction",
)


def read_diagnostics(path: str | Path) -> list[dict[str, Any]]:
  """The records of a ``diagnostics.jsonl``, one per step, in step order.

  A step logged twice (a run resumed from a checkpoint older than its last
  log line) keeps its last record.
  """
  by_step = {}
  for line in Path(path).read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


def plot_diagnostics(
  log_path: str | Path,
  png_path: str | Path,
  cfg: TrainConfig | None = None,
  metrics=DIAGNOSTIC_PLOTS,
) -> None:
  """Layer x step heat maps of a ``diagnostics.jsonl`` (one panel per metric).

  Uses ``heatmaps`` of ``examples/plot_diagnostics.py``.
  """
  examples = str(Path(__file__).resolve().parents[1])
  if examples not in sys.path:
    sys.path.insert(0, examples)
  from plot_diagnostics import heatmaps

  records = read_diagnostics(log_path)
  if not records:
    return
  history = [{k: v for k, v in r.items() if k != "step"} for r in records]
  present = [m for m in metrics if history[0].get(m)]
  title = None
  if cfg is not None:
    title = (
      f"{cfg.optimizer}, lr {cfg.peak_lr:g}, {cfg.n_layer} layers x "
      f"d_model {cfg.d_model}, steps {records[0]['step']}-{records[-1]['step']}"
    )
  heatmaps(
    history,
    str(png_path),
    metrics=present,
    steps=[r["step"] for r in records],
    title=title,
  )


def _save_args(state):
  import orbax.checkpoint as ocp

  return ocp.args.StandardSave(state)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends ``(default: ...)`` only to flags whose help does not name one."""

  def _get_help_string(self, action):
    text = action.help or ""
    return text if "default" in text else super()._get_help_string(action)


def preset_default(name: str, presets=PRESETS) -> str:
  """``(default: the preset's; cpu: 320)``: the note for a preset-set flag."""
  fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
  value = presets["cpu"].get(name, fields.get(name))
  cpu = "" if value is None else f"; cpu: {value}"
  return f" (default: the preset's{cpu})"


def add_config_args(parser: argparse.ArgumentParser, presets=PRESETS) -> None:
  """Command-line flags for every :class:`TrainConfig` field, plus --preset."""
  parser.add_argument(
    "--preset",
    choices=sorted(presets),
    default="cpu",
    help="model shape and run length (the flags below override it)",
  )
  for f in dataclasses.fields(TrainConfig):
    flag = "--" + f.name.replace("_", "-")
    kind = {"lr": float, "weight_decay": float, "data": str, "val_from_year": int}.get(
      f.name, type(f.default)
    )
    parser.add_argument(
      flag,
      dest=f.name,
      type=kind,
      default=None,
      help=FIELD_HELP[f.name] + preset_default(f.name, presets),
    )


def config_from_args(
  args: argparse.Namespace, presets=PRESETS, **overrides
) -> TrainConfig:
  """Preset values, then every flag given on the command line."""
  kw = dict(presets[args.preset])
  kw.update(overrides)
  for f in dataclasses.fields(TrainConfig):
    value = getattr(args, f.name, None)
    if value is not None:
      kw[f.name] = value
  return TrainConfig(
    **{k: v for k, v in kw.items() if k in TrainConfig.__annotations__}
  )


def build_parser() -> argparse.ArgumentParser:
  """harness.py's command line (every flag has a description)."""
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], allow_abbrev=False
  )
  add_config_args(parser)
  parser.add_argument("--out", default=None, help="output folder (log, checkpoints)")
  parser.add_argument("--resume", action="store_true", help="resume from --out/ckpt")
  parser.add_argument(
    "--ckpt-every",
    type=int,
    default=None,
    help="checkpoint every this many steps (default: eval_every)",
  )
  parser.add_argument(
    "--stop-at",
    type=int,
    default=None,
    help="stop after this step (the schedule still spans --steps)",
  )
  parser.add_argument(
    "--no-progress", action="store_true", help="plain lines instead of a progress bar"
  )
  parser.add_argument(
    "--diagnostics",
    type=int,
    default=0,
    metavar="EVERY",
    help="log optax_orth.diagnostics every EVERY steps to <out>/diagnostics.jsonl "
    "and draw <out>/diagnostics.png (default 0: off)",
  )
  return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.diagnostics < 0:
    parser.error(f"--diagnostics must be >= 0; got {args.diagnostics}.")
  cfg = config_from_args(args)
  splits = load_config_splits(cfg)
  mcfg = model_config(cfg, splits[2])
  graphdef, params = init_params(mcfg, cfg.seed)
  print(
    f"{cfg.optimizer}: lr {cfg.peak_lr:g}, {model_lib.count_params(params):,} "
    f"parameters, {len(splits[0]):,} training and {len(splits[1]):,} validation "
    f"{cfg.tokenizer} tokens, {cfg.steps} steps of {cfg.tokens_per_step} tokens",
    flush=True,
  )
  routing = model_routing(graphdef, params)
  print(optax_orth.routing_table(params, routing), flush=True)
  result = train(
    cfg,
    args.out,
    resume=args.resume,
    ckpt_every=args.ckpt_every,
    stop_at=args.stop_at,
    progress=not args.no_progress,
    splits=splits,
    diagnostics_every=args.diagnostics,
  )
  print(
    f"done: step {result['step']}, best val loss {result['best_val_loss']:.4f}, "
    f"{result['wall_time']:.1f} s",
    flush=True,
  )
  return result


if __name__ == "__main__":
  main()
