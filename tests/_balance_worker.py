"""Subprocess worker for tests/test_balanced_sharding.py (8 simulated devices).

Usage: ``python -m tests._balance_worker OUT.json``

For each case (a parameter tree, a mesh and parameter specs) and each of
``muon``, ``namo_d`` and ``normuon``, runs several steps on one device and on
the 8 devices (the update traced under ``jax.set_mesh``, the owner scheme with
``OwnerSharding(split_min_flops=0)`` so that the small test matrices may be
split over device groups), and writes the largest difference between the two
trajectories, the collectives of the compiled sharded update, the per-device
Newton–Schulz plan (group size per shape) and the per-device FLOPs over the
single-device FLOPs divided by 8. Where transformers is installed, the same
comparison runs on a Hugging Face Flax Llama routed by ``route_by_model``, and
a Flax NNX model with ``nnx.scan`` layers trains three steps through
``nnx.Optimizer`` on one device and on the 8.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_orth
from optax_orth import MuonDimensionNumbers as DimNums
from optax_orth.measure import hlo_collective_bytes

STEPS = 4
N = 8

# name: (shape, dimension numbers, spec on ("fsdp",), spec on ("data", "model")).
# Kernels are sharded as FSDP shards them: the fan-in axis over "fsdp" ("data"),
# the fan-out axis over "model".
UNEVEN = {
  "stack3": ((3, 64, 96), DimNums(1, 2), P(None, "fsdp", None), P(None, "data", "model")),  # noqa: E501
  "tall5": ((5, 96, 48), DimNums(1, 2), P(None, "fsdp", None), P(None, "data", "model")),  # noqa: E501
  "wide": ((40, 200), DimNums(0, 1), P("fsdp", None), P("data", "model")),
  "square6": ((6, 64, 64), DimNums(1, 2), P(None, "fsdp", None), P(None, "data", "model")),  # noqa: E501
  "bias": ((96,), None, P("fsdp"), P("model")),
}  # fmt: skip
# More devices than matrices: one kernel, split 8 ways.
FEW = {
  "kernel": ((128, 256), DimNums(0, 1), P("fsdp", None), P("data", "model")),
  "bias": ((256,), None, P(), P()),
}
# MoE experts (layers, experts, in, out): 6 matrices on 8 devices, in one shape
# group with a dense stack of 8.
MOE = {
  "experts": ((3, 2, 64, 96), DimNums(2, 3), P(None, None, "fsdp", None),
              P(None, None, "data", "model")),
  "dense": ((8, 64, 96), DimNums(1, 2), P(None, "fsdp", None), P(None, "data", "model")),  # noqa: E501
}  # fmt: skip
# Layouts FSDP does not use (a stacking axis, a fan-out axis, replicated).
ODD = {
  "stack_batch": ((8, 64, 96), DimNums(1, 2), P("fsdp", None, None), P("data", None, "model")),  # noqa: E501
  "fan_out": ((3, 64, 96), DimNums(1, 2), P(None, None, "fsdp"), P(None, "model", "data")),  # noqa: E501
  "replicated": ((2, 64, 96), DimNums(1, 2), P(), P()),
}  # fmt: skip
CASES = {
  "uneven/fsdp8": (UNEVEN, (8,), ("fsdp",), 2, None),
  "few/fsdp8": (FEW, (8,), ("fsdp",), 2, None),
  "moe/fsdp8": (MOE, (8,), ("fsdp",), 2, None),
  "odd/fsdp8": (ODD, (8,), ("fsdp",), 2, None),
  "uneven/data4_model2": (UNEVEN, (4, 2), ("data", "model"), 3, None),
  "few/data4_model2_owner_data": (FEW, (4, 2), ("data", "model"), 3, "data"),
  "moe/data4_model2": (MOE, (4, 2), ("data", "model"), 3, None),
}
ALIASES = ("muon", "namo_d", "normuon")


def make(name, dims, sharding):
  if name == "muon":
    return optax_orth.muon(
      0.02, weight_decay=0.1, muon_weight_dimension_numbers=dims, sharding=sharding
    )
  if name == "normuon":
    return optax_orth.normuon(
      0.02, weight_decay=0.1, weight_dimension_numbers=dims, sharding=sharding
    )
  return optax_orth.namo_d(0.02, weight_dimension_numbers=dims, sharding=sharding)


def data(tree, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(v[0]).astype(np.float32) for k, v in tree.items()}
  grads = [
    {k: rng.standard_normal(v[0]).astype(np.float32) for k, v in tree.items()}
    for _ in range(STEPS)
  ]
  return params, grads


def trajectory(tx, params, grads, shardings=None):
  """Updates of every step; with ``shardings``, inputs placed on the mesh."""
  put = (lambda t: t) if shardings is None else (lambda t: jax.device_put(t, shardings))
  update = jax.jit(tx.update)
  params = put(params)
  state = tx.init(params)
  out, compiled, moved = [], None, []
  for g in grads:
    g = put(g)
    if compiled is None:
      compiled = update.lower(g, state, params).compile()
    u, new_state = update(g, state, params)
    if shardings is not None:
      # Updates in their parameters' layouts; from the second step on (the
      # first state is init's), each state leaf in the layout it came in with.
      pairs = [(u, params)] + ([(new_state, state)] if out else [])
      moved += [
        jax.tree_util.keystr(path)
        for new, old in pairs
        for (path, a), b in zip(
          jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(old), strict=True
        )
        if not a.sharding.is_equivalent_to(b.sharding, a.ndim)
      ]
    state = new_state
    out.append(jax.tree.map(np.asarray, u))
  return out, (compiled, sorted(set(moved)))


def flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def record(single, sharded, compiled, **extra):
  """The largest difference of two trajectories, the sharded program's
  collectives, and ``extra``."""
  diff = max(
    float(np.max(np.abs(a - b)))
    for x, y in zip(single, sharded, strict=True)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
  )
  coll = hlo_collective_bytes(compiled.as_text(), N)
  return {"diff": diff, "collectives": {k: v["count"] for k, v in coll.items()}} | extra


def compare(result, case, mesh, dims, params, grads, shardings, sharding):
  for name in ALIASES:
    single, (single_c, _) = trajectory(make(name, dims, None), params, grads)
    with jax.set_mesh(mesh):
      sharded, (compiled, moved) = trajectory(
        make(name, dims, sharding), params, grads, shardings
      )
    ratio = flops(compiled) / (flops(single_c) / N)
    result[f"{case}/{name}"] = record(
      single, sharded, compiled, flops_ratio=ratio, moved=moved
    )


def hugging_face_llama(result):
  """A two-layer FlaxLlamaForCausalLM, routed by what it computes, its kernels
  and embedding FSDP-sharded on their first axis, norms replicated."""
  try:
    import transformers
  except ImportError:
    return
  config = transformers.LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
  )  # fmt: skip
  model = transformers.FlaxLlamaForCausalLM(config, seed=0)
  params = jax.tree.map(np.asarray, model.params)
  dims = optax_orth.route_by_model(model, np.zeros((1, 8), np.int32))
  rng = np.random.default_rng(1)
  grads = [
    jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    for _ in range(STEPS)
  ]
  mesh = jax.make_mesh((N,), ("fsdp",), axis_types=(AxisType.Auto,))
  shardings = jax.tree.map(
    lambda x: NamedSharding(mesh, P("fsdp") if x.ndim == 2 else P()), params
  )
  sharding = optax_orth.OwnerSharding(split_min_flops=0)
  compare(result, "hf_llama/fsdp8", mesh, dims, params, grads, shardings, sharding)


def flax_nnx_scan(result):
  """Three ``nnx.Optimizer`` steps of a scan-over-layers NNX model, its
  kernels annotated FSDP (``nnx.with_partitioning``), created under the mesh
  as the Flax guide does; the parameters after each step are compared."""
  try:
    from flax import nnx
  except ImportError:
    return
  import optax

  init = nnx.initializers.lecun_normal()
  fsdp = lambda: nnx.with_partitioning(init, ("fsdp", None))

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(64, 96, kernel_init=fsdp(), rngs=rngs)
      self.down = nnx.Linear(96, 64, kernel_init=fsdp(), rngs=rngs)

    def __call__(self, x):
      return x + self.down(nnx.gelu(self.up(x)))

  class Model(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
      def create(rngs):
        return Block(rngs)

      self.blocks = create(rngs)
      self.head = nnx.Linear(64, 8, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def forward(x, block):
        return block(x)

      return self.head(forward(x, self.blocks))

  rng = np.random.default_rng(2)
  x = rng.standard_normal((16, 64)).astype(np.float32)
  y = rng.integers(0, 8, 16)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)

  def train(name, mesh, sharding):
    with jax.set_mesh(mesh):  # Flax creates the variables sharded
      model = Model(nnx.Rngs(0))
      dims = optax_orth.route_by_model(model, x)
      optimizer = nnx.Optimizer(model, make(name, dims, sharding), wrt=nnx.Param)
      out = []
      for _ in range(STEPS - 1):
        step(model, optimizer, x, y)
        out.append(jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))
      return out, step.lower(model, optimizer, x, y).compile()

  one = jax.make_mesh(
    (1,), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1]
  )
  mesh = jax.make_mesh((N,), ("fsdp",), axis_types=(AxisType.Auto,))
  for name in ALIASES:
    single, _ = train(name, one, None)
    sharded, compiled = train(name, mesh, optax_orth.OwnerSharding(split_min_flops=0))
    # flops_ratio: None, the program is the whole train step, not the update.
    result[f"nnx_scan/fsdp8/{name}"] = record(
      single, sharded, compiled, flops_ratio=None
    )


def main(path):
  result = {}
  hugging_face_llama(result)
  flax_nnx_scan(result)
  for case, (tree, shape, names, spec_col, owner) in CASES.items():
    dims = {k: v[1] for k, v in tree.items()}
    params, grads = data(tree)
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    specs = {k: v[spec_col] for k, v in tree.items()}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    sharding = optax_orth.OwnerSharding(axis=owner, split_min_flops=0)
    compare(result, case, mesh, dims, params, grads, shardings, sharding)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
