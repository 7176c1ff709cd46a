"""Train a small GPT-2 with one optimizer of optax_orth, top to bottom.

Run from a clone, with no arguments: NAMO-D on the bundled State of the Union
corpus (UTF-8 bytes as tokens), half a minute to a minute on 2 CPU cores::

  python examples/gpt2/train.py
  python examples/gpt2/train.py --optimizer muon --steps 1200

Everything a training loop needs is here, in order: the data, the model,
the routing (read from what the model computes), the optimizer, a jitted step
and the evaluation. The model and data code (``model.py``, ``data.py``) is the
same as the benchmark harness's; the harness (paired seeds, sweeps, runs in
lockstep, resume, reports) is ``benchmarks/gpt2/compare.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as data_lib
import model as model_lib

import optax_orth

OPTIMIZERS = {
  "adamw": lambda lr, routing: optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1),
  "muon": lambda lr, routing: optax_orth.muon(
    lr, muon_weight_dimension_numbers=routing, adam_learning_rate=4e-3
  ),
  "namo": lambda lr, routing: optax_orth.namo(
    lr, weight_dimension_numbers=routing, adam_learning_rate=4e-3
  ),
  "namo_d": lambda lr, routing: optax_orth.namo_d(
    lr, weight_dimension_numbers=routing, adam_learning_rate=4e-3
  ),
  "normuon": lambda lr, routing: optax_orth.normuon(
    lr, weight_dimension_numbers=routing, adam_learning_rate=4e-3
  ),
  "adamuon": lambda lr, routing: optax_orth.adamuon(
    lr, weight_dimension_numbers=routing
  ),
}
#: Peak learning rates: the bundled corpus's sweep (benchmarks/gpt2/sweeps/) where
#: there is one; AdaMuon at AdamW's, as its authors advise.
DEFAULT_LR = {
  "adamw": 2e-3,
  "muon": 0.02,
  "namo": 0.16,
  "namo_d": 0.16,
  "normuon": 0.02,
  "adamuon": 2e-3,
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--optimizer", default="namo_d", choices=sorted(OPTIMIZERS))
  p.add_argument("--lr", type=float, help="peak learning rate (default: per optimizer)")
  p.add_argument("--steps", type=int, default=600, help="training steps")
  p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
  p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
  p.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
  p.add_argument("--d-model", type=int, default=64, help="width")
  p.add_argument("--eval-every", type=int, default=100, help="steps between evals")
  p.add_argument("--data", help="a text file or folder (default: the bundled corpus)")
  p.add_argument("--seed", type=int, default=0, help="initialization and batches")
  args = p.parse_args(argv)
  if args.steps < 1 or args.eval_every < 1:
    p.error("--steps and --eval-every must be >= 1")
  return args


def schedule(peak: float, steps: int) -> optax.Schedule:
  """Linear warmup over the first 5 % of the steps, then cosine decay to 10 %."""
  warmup = max(1, steps // 20)
  return optax.warmup_cosine_decay_schedule(
    0.0, peak, warmup, max(steps, warmup + 1), end_value=0.1 * peak
  )


def main(argv=None) -> list[float]:
  """Trains; returns the validation losses, one per evaluation."""
  args = parse_args(argv)

  # The data: byte tokens, a training and a validation split (by year).
  train_tokens, val_tokens, vocab = data_lib.load_splits(args.data)
  val_set = data_lib.eval_batches(val_tokens, 4, args.batch_size, args.seq_len)

  # The model: a compact GPT-2 (tied embedding, pre-LayerNorm blocks).
  cfg = model_lib.GPTConfig(
    vocab_size=vocab,
    seq_len=args.seq_len,
    n_layer=args.n_layer,
    n_head=4,
    d_model=args.d_model,
  )
  model = model_lib.GPT(cfg, rngs=nnx.Rngs(args.seed))

  # The routing, read from one abstract forward pass: every kernel that the
  # model multiplies by is a matrix (the fused QKV kernel three of them); the
  # embeddings and the norm scales go to the AdamW fallback.
  example = jax.ShapeDtypeStruct((1, args.seq_len), jnp.int32)
  routing = optax_orth.route_by_model(model, example)
  params = nnx.state(model, nnx.Param)
  print(optax_orth.routing_table(params, routing))

  # The optimizer: clipping, then one of optax_orth's (or AdamW), on a schedule.
  lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    OPTIMIZERS[args.optimizer](schedule(lr, args.steps), routing),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model, x, y):
    return model_lib.cross_entropy(model(x), y)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def eval_step(model, x, y):
    return loss_fn(model, x, y)

  def evaluate() -> float:
    return sum(float(eval_step(model, x, y)) for x, y in val_set) / len(val_set)

  n = model_lib.count_params(params)
  print(
    f"{args.optimizer} at lr {lr:g}: {n:,} parameters, {args.steps} steps of "
    f"{args.batch_size} x {args.seq_len} tokens; validation loss "
    f"{evaluate():.4f} at step 0 (uniform: {math.log(vocab):.4f})"
  )
  losses, start = [], time.perf_counter()
  for step in range(1, args.steps + 1):
    x, y = data_lib.sample_batch(
      train_tokens, args.batch_size, args.seq_len, args.seed, step
    )
    loss = train_step(model, optimizer, x, y)
    if step % args.eval_every == 0 or step == args.steps:
      losses.append(evaluate())
      print(
        f"step {step:5d}  train {float(loss):.4f}  val {losses[-1]:.4f}  "
        f"{time.perf_counter() - start:6.1f} s",
        flush=True,
      )
  return losses


if __name__ == "__main__":
  main()
