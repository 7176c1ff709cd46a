"""Trains a small Flax NNX model FSDP-sharded over 8 devices with NAMO-D.

Parameters, gradients and optimizer state are sharded over a 1-D ``("fsdp",)``
mesh; the batch is sharded over the same axis (data parallel). NAMO-D runs
with ``sharding=optax_orth.OwnerSharding(mesh, "fsdp")``: each weight matrix
is orthogonalized whole on one device (the owner scheme), and the optimizer
state's shardings come from :func:`optax_orth.state_shardings`.

On a machine without 8 accelerators, 8 CPU devices are simulated (the XLA flag
is set below, before JAX is imported). Run::

  python examples/distributed.py --steps 200

The same script runs on one device (``--devices 1``) and on a pod (set the
mesh to your devices; call ``jax.distributed.initialize()`` first when there
are several processes).
"""

from __future__ import annotations

import argparse
import os
import sys

_parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
_parser.add_argument("--steps", type=int, default=200)
_parser.add_argument("--batch", type=int, default=256)
_parser.add_argument("--width", type=int, default=128)
_parser.add_argument("--lr", type=float, default=0.02)
ARGS = _parser.parse_args()
_flags = os.environ.get("XLA_FLAGS", "")
if "jax" not in sys.modules and "host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (
    f"{_flags} --xla_force_host_platform_device_count={ARGS.devices}".strip()
  )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_orth  # noqa: E402

IN, CLASSES = 32, 10


class MLP(nnx.Module):
  """A residual MLP; kernels FSDP-sharded on alternating axes."""

  def __init__(self, width: int, depth: int, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()

    def dense(din, dout, spec):
      return nnx.Linear(
        din, dout, kernel_init=nnx.with_partitioning(init, spec), rngs=rngs
      )

    self.stem = dense(IN, width, ("fsdp", None))  # sharded on fan-in
    self.blocks = nnx.List(
      [
        dense(width, width, ("fsdp", None) if i % 2 else (None, "fsdp"))
        for i in range(depth)
      ]
    )
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = dense(width, CLASSES, (None, None))  # replicated; Adam

  def __call__(self, x):
    h = jax.nn.gelu(self.stem(x))
    for block in self.blocks:
      h = h + jax.nn.gelu(block(h))
    return self.head(self.norm(h))


def teacher_batch(key, batch, w1, w2):
  """Inputs and labels from a fixed random two-layer teacher network."""
  x = jax.random.normal(key, (batch, IN))
  return x, jnp.argmax(jnp.tanh(x @ w1) @ w2, axis=-1)


def main():
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):  # Flax creates the variables already sharded
    model = MLP(ARGS.width, depth=4, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  routing = optax_orth.route_by_model(model)  # reads each layer's layout
  print(optax_orth.routing_table(params, routing))

  tx = optax_orth.namo_d(
    ARGS.lr,
    weight_dimension_numbers=routing,
    weight_decay=0.0,
    sharding=optax_orth.OwnerSharding(mesh, "fsdp"),
  )
  state_sh = optax_orth.state_shardings(tx, params, param_sh)
  opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)

  data_sh = NamedSharding(mesh, P("fsdp"))
  replicated = NamedSharding(mesh, P())

  def loss_fn(p, x, y):
    logits = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train_step(p, s, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  train_step = jax.jit(
    train_step,
    in_shardings=(param_sh, state_sh, data_sh, data_sh),
    out_shardings=(param_sh, state_sh, replicated),
    donate_argnums=(0, 1),
  )
  k1, k2, key = jax.random.split(jax.random.key(1), 3)
  w1 = jax.random.normal(k1, (IN, 64)) / np.sqrt(IN)
  w2 = jax.random.normal(k2, (64, CLASSES)) / 8.0

  x, y = teacher_batch(key, ARGS.batch, w1, w2)
  hlo = train_step.lower(params, opt_state, x, y).compile().as_text()
  coll = optax_orth.hlo_collective_bytes(hlo, n)
  print(
    f"{n} devices; collectives per step: "
    + ", ".join(f"{k} {v['count']}" for k, v in coll.items() if k != "total")
  )
  first = None
  for step in range(ARGS.steps):
    key, sub = jax.random.split(key)
    x, y = teacher_batch(sub, ARGS.batch, w1, w2)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    first = float(loss) if first is None else first
    if step % 50 == 0 or step == ARGS.steps - 1:
      print(f"step {step:4d}  loss {float(loss):.4f}")
  kernel = params["blocks"][0]["kernel"]
  print(f"blocks/0/kernel: {kernel.shape}, {kernel.sharding.spec}")
  print(f"loss {first:.4f} -> {float(loss):.4f}")
  assert float(loss) < first, "the loss did not decrease"


if __name__ == "__main__":
  main()
