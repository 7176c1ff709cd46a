"""FSDP training of a Flax NNX model, as the Flax guide writes it, with NAMO-D.

The idiomatic flow, with nothing added for the optimizer:

* kernels annotated with ``nnx.with_partitioning`` (FSDP: sharded over the
  ``"fsdp"`` mesh axis), biases and norms replicated;
* the model created under ``jax.set_mesh(mesh)``, so that Flax creates every
  variable already sharded;
* ``nnx.Optimizer(model, tx, wrt=nnx.Param)``: the momentum is created like
  the parameters, with their shardings;
* an ``nnx.jit`` train step, called under ``jax.set_mesh(mesh)``, with no
  ``in_shardings``/``out_shardings`` written by hand.

The optimizer's default ``sharding="auto"`` sees the mesh in context when the
step is traced and orthogonalizes every weight matrix whole on one device (the
owner scheme, :class:`optax_orth.OwnerSharding`); results come back in the
parameters' layout. The script checks that the parameters and the momentum
keep their shardings, that the compiled step has no collective-permute, and
that the loss decreases.

On a machine without 8 accelerators, 8 CPU devices are simulated (the XLA flag
is set below, before JAX is imported). Run::

  python examples/distributed.py --steps 200

The mesh has ``Auto`` axes, as in the Flax guide "Scale up on multiple
devices" (on ``Explicit`` axes the optimizer reads each leaf's sharding from
its type; the model code then reshards its operands itself). ``--devices 1``
runs on one device; on a pod, call ``jax.distributed.initialize()`` first and
build the mesh over all devices.
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
from jax.sharding import AxisType  # noqa: E402
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


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def shardings(tree):
  return [x.sharding for x in jax.tree.leaves(tree)]


def main():
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):  # Flax creates the variables already sharded
    model = MLP(ARGS.width, depth=4, rngs=nnx.Rngs(0))
    # reads what the model computes on (abstract) inputs of its shape
    routing = optax_orth.route_by_model(
      model, jax.ShapeDtypeStruct((8, IN), jnp.float32)
    )
    tx = optax_orth.namo_d(ARGS.lr, weight_dimension_numbers=routing, weight_decay=0.0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  print(optax_orth.routing_table(params, routing))
  before = shardings(params)

  k1, k2, key = jax.random.split(jax.random.key(1), 3)
  w1 = jax.random.normal(k1, (IN, 64)) / np.sqrt(IN)
  w2 = jax.random.normal(k2, (64, CLASSES)) / 8.0
  batch = lambda k: jax.device_put(teacher_batch(k, ARGS.batch, w1, w2), P("fsdp"))
  with jax.set_mesh(mesh):  # the step is traced with the mesh in context
    x, y = batch(key)
    hlo = train_step.lower(model, optimizer, x, y).compile().as_text()
    first = None
    for step in range(ARGS.steps):
      key, sub = jax.random.split(key)
      loss = float(train_step(model, optimizer, *batch(sub)))
      first = loss if first is None else first
      if step % 50 == 0 or step == ARGS.steps - 1:
        print(f"step {step:4d}  loss {loss:.4f}")
  coll = optax_orth.measure.hlo_collective_bytes(hlo, n)
  print(
    f"{n} devices; collectives per step: "
    + ", ".join(f"{k} {v['count']}" for k, v in coll.items() if k != "total")
  )
  kernel = model.blocks[0].kernel[...]
  print(f"blocks/0/kernel: {kernel.shape}, {kernel.sharding.spec}")
  for x, sh in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), before, strict=True):
    assert x.sharding.is_equivalent_to(sh, x.ndim), "the parameters moved"
  # Every state leaf shaped like a matrix parameter (the momentum) is sharded
  # over the 8 devices, as FSDP wants: each holds 1/8 of it.
  for x in jax.tree.leaves(optimizer.opt_state):
    if x.ndim == 2 and x.shape[0] == x.shape[1] == ARGS.width:
      assert np.prod(x.sharding.shard_shape(x.shape)) * n == x.size, x.sharding
  print(f"loss {first:.4f} -> {loss:.4f}")
  assert coll["collective-permute"]["count"] == 0, coll
  assert loss < first, "the loss did not decrease"


if __name__ == "__main__":
  main()
