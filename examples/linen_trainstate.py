"""A Flax Linen ``TrainState`` trained with an ``optax_orth`` optimizer.

``TrainState.create(..., tx=optax_orth.namo_d(...))`` is all it takes: the
optimizer is an ordinary ``optax.GradientTransformation``. The dense kernels
(2-D, ``(fan_in, fan_out)`` in Flax) go to NAMO-D; the biases (1-D) and the
leaves matched by ``adam_patterns`` (here the input embedding ``embed``) go to
the AdamW fallback. :func:`optax_orth.routing_table` prints the split.

The task is a small synthetic classification: the class of a token sequence is
the quartile of ``[0, vocab)`` that its mean token falls in. Run::

  python examples/linen_trainstate.py --steps 300 --optimizer namo_d
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import optax_orth


class Classifier(nn.Module):
  """Embedding, mean pooling, a two-layer MLP and a linear readout."""

  vocab: int = 16
  width: int = 64
  n_classes: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width, name="embed")(tokens).mean(axis=1)
    x = nn.gelu(nn.Dense(self.width, name="hidden_0")(x))
    x = nn.gelu(nn.Dense(self.width, name="hidden_1")(x))
    return nn.Dense(self.n_classes, name="readout")(x)


def make_optimizer(
  name: str, learning_rate: float, routing=None
) -> optax.GradientTransformation:
  """``namo_d``, ``namo``, ``normuon``, ``muon`` (all routed) or ``adamw``.

  ``routing``: a spec, ``optax_orth.route_by_model(Classifier(), tokens)`` in
  ``main`` (embed, the readout head, vectors -> AdamW); ``None``: by path.
  """
  routing = routing or optax_orth.route_by_path()
  if name == "adamw":
    return optax.adamw(learning_rate)
  if name == "muon":
    return optax_orth.muon(
      learning_rate, adam_learning_rate=3e-3, muon_weight_dimension_numbers=routing
    )
  factory = {
    "namo": optax_orth.namo,
    "namo_d": optax_orth.namo_d,
    "normuon": optax_orth.normuon,
  }[name]
  return factory(
    learning_rate, adam_learning_rate=3e-3, weight_dimension_numbers=routing
  )


def batch(key, size: int, length: int, vocab: int, n_classes: int):
  tokens = jax.random.randint(key, (size, length), 0, vocab)
  labels = (tokens.mean(axis=1) * n_classes / vocab).astype(jnp.int32)
  return tokens, jnp.clip(labels, 0, n_classes - 1)


def main(argv=None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--optimizer", default="namo_d")
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=128)
  args = parser.parse_args(argv)

  model = Classifier()
  key, init_key = jax.random.split(jax.random.key(0))
  variables = model.init(init_key, jnp.zeros((1, 8), jnp.int32))
  routing = optax_orth.route_by_model(model, jnp.zeros((1, 8), jnp.int32))
  print(optax_orth.routing_table(variables["params"], routing))

  state = train_state.TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    tx=optax.chain(
      optax.clip_by_global_norm(1.0), make_optimizer(args.optimizer, args.lr, routing)
    ),
  )

  @jax.jit
  def train_step(state, tokens, labels):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  t0 = time.perf_counter()
  loss = jnp.nan
  for step in range(1, args.steps + 1):
    key, sub = jax.random.split(key)
    state, loss = train_step(state, *batch(sub, args.batch_size, 8, 16, 4))
    if step % max(1, args.steps // 5) == 0 or step == args.steps:
      print(f"step {step:4d}  loss {float(loss):.4f}")
  seconds = time.perf_counter() - t0
  print(f"{args.optimizer}: final loss {float(loss):.4f} in {seconds:.1f} s")
  return float(loss)


if __name__ == "__main__":
  main()
