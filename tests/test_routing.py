"""Parameter routing on Flax NNX state and Linen param dicts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from optax_orth._src import routing as routing_lib


class TinyLinen(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(32, 16, name="embed")(tokens)
    x = nn.LayerNorm(name="ln")(x)
    x = nn.Dense(24, name="mlp_in")(x)
    x = nn.Dense(16, use_bias=False, name="mlp_out")(x)
    return nn.Dense(32, use_bias=False, name="head")(x)


class TinyNNX(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(32, 16, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])
    self.ln = nnx.LayerNorm(16, rngs=rngs)
    self.lm_head = nnx.Linear(16, 32, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.ln(x))


def _branches(params, spec):
  labels = optax_orth.layout.label_tree(params, spec)
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  return {routing_lib.path_str(p): label for p, label in flat}


def test_route_by_path_on_linen_params():
  params = TinyLinen().init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))["params"]
  branches = _branches(params, optax_orth.route_by_path())
  assert branches == {
    "embed/embedding": "adam",
    "head/kernel": "adam",
    "ln/bias": "adam",
    "ln/scale": "adam",
    "mlp_in/bias": "adam",
    "mlp_in/kernel": "orthogonal",
    "mlp_out/kernel": "orthogonal",
  }


def test_route_by_path_on_nnx_state_and_optimizer():
  model = TinyNNX(nnx.Rngs(0))
  branches = _branches(nnx.state(model, nnx.Param), optax_orth.route_by_path())
  orthogonal = sorted(p for p, label in branches.items() if label == "orthogonal")
  assert orthogonal == ["blocks/0/kernel/value", "blocks/1/kernel/value"]
  assert branches["lm_head/kernel/value"] == "adam"
  assert branches["embed/embedding/value"] == "adam"

  optimizer = nnx.Optimizer(model, optax_orth.namo_d(1e-2), wrt=nnx.Param)
  tokens = jnp.arange(10).reshape(2, 5)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(5)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_rules_for_stacked_leaves_and_table():
  params = {
    "layers": {"kernel": jnp.zeros((3, 8, 12)), "scale": jnp.zeros((3, 8))},
    "conv": jnp.zeros((3, 3, 4, 8)),
  }
  spec = optax_orth.route_by_path({r"layers/kernel": DN(1, 2)})
  assert _branches(params, spec) == {
    "conv": "adam",
    "layers/kernel": "orthogonal",
    "layers/scale": "adam",
  }
  table = optax_orth.routing_table(params, spec)
  assert "| layers/kernel | (3, 8, 12) | orthogonal | 3 x 8 x 12 |" in table
  assert "| conv | (3, 3, 4, 8) | adam | - |" in table


def test_default_spec_is_route_by_path_and_optax_rule_is_every_matrix():
  params = {"embedding": jnp.zeros((10, 4)), "b": jnp.zeros(4)}
  assert _branches(params, None) == {"b": "adam", "embedding": "adam"}
  assert routing_lib.resolve_spec(None) is routing_lib.default_routing()
  with pytest.warns(optax_orth.RoutingWarning, match="embedding"):
    branches = _branches(params, routing_lib.optax_rule)
  assert branches == {"b": "adam", "embedding": "orthogonal"}


def test_prefix_tree_spec():
  params = {
    "a": {"x": jnp.zeros((4, 6)), "y": jnp.zeros((6, 4))},
    "b": jnp.zeros((2, 2)),
  }
  spec = {"a": DN(), "b": None}
  assert _branches(params, spec) == {
    "a/x": "orthogonal",
    "a/y": "orthogonal",
    "b": "adam",
  }
  tx = optax_orth.muon(0.1, muon_weight_dimension_numbers=spec)
  u, _ = tx.update(params, tx.init(params), params)
  assert jax.tree.structure(u) == jax.tree.structure(params)


def test_matrix_layout_round_trip():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  lay = optax_orth.layout.matrix_layout(x.shape, DN((1, 3), 0))
  assert (lay.batch, lay.fan_in, lay.fan_out) == (4, 15, 2)
  m = lay.to_matrices(x)
  np.testing.assert_array_equal(m[1, :, 0], np.asarray(x[0, :, 1, :]).reshape(-1))
  np.testing.assert_array_equal(lay.from_matrices(m), x)


def test_integer_leaf_is_named():
  with pytest.raises(ValueError, match="'count'"):
    optax_orth.layout.label_tree({"count": jnp.zeros((), jnp.int32)}, None)


def test_partition_state_routes_adam():
  params = {"w": jnp.ones((4, 6)), "b": jnp.ones(6)}
  tx = optax_orth.muon(0.1)
  state = tx.init(params)
  adam_state = state.inner_states["adam"].inner_state
  assert isinstance(adam_state[0], optax_orth.ScaleByAdamState)


def test_path_spec_under_inject_hyperparams_is_an_error_not_a_silent_reroute():
  params = {"w": jnp.ones((4, 6)), "embed": jnp.ones((10, 4))}
  tx = optax.inject_hyperparams(optax_orth.namo_d)(
    learning_rate=0.01, weight_dimension_numbers=optax_orth.route_by_path()
  )
  with pytest.raises(ValueError, match="static_args"):
    tx.update(params, tx.init(params), params)
  tx = optax.inject_hyperparams(
    optax_orth.namo_d, static_args=("weight_dimension_numbers",)
  )(learning_rate=0.01, weight_dimension_numbers=optax_orth.route_by_path())
  updates, _ = tx.update(params, tx.init(params), params)
  assert updates["w"].shape == (4, 6)
