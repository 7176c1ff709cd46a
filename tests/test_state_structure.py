"""Every optimizer's state keeps one pytree structure from ``init`` on.

Wrappers that carry the state through ``lax.cond`` or ``tree_map`` against
the initial state (``optax.MultiSteps``, ``optax.apply_if_finite``) need the
structure, dtypes and shapes after ``update`` to equal those after ``init``,
on every kind of parameter tree: ``nnx.State``, dicts, lists, dataclasses.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests import helpers as h

OPTIMIZERS = {n: functools.partial(h.make, n) for n in h.NAMES}
NAMES = h.NAMES

pytestmark = pytest.mark.filterwarnings("ignore::optax_orth.RoutingWarning")


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 8, rngs=rngs)
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["w", "v", "b"], meta_fields=[]
)
@dataclasses.dataclass
class _Params:
  w: jax.Array
  v: jax.Array
  b: jax.Array


def _trees():
  rng = np.random.default_rng(0)
  a = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
    "nnx_state": nnx.state(_MLP(nnx.Rngs(0)), nnx.Param),
    "dict": {"w": a(8, 12), "stack": a(2, 6, 10), "b": a(12)},
    "list": [a(8, 12), a(12, 6), a(6)],
    "dataclass": _Params(a(8, 12), a(12, 4), a(4)),
  }


def _skeleton(tree):
  return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def _grads(params, seed):
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))
  return jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), params)


@pytest.mark.parametrize("tree", ["nnx_state", "dict", "list", "dataclass"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_after_update_is_shaped_like_init(name, tree):
  params = _trees()[tree]
  tx = OPTIMIZERS[name](1e-2)
  state = tx.init(params)
  _, new = jax.jit(tx.update)(_grads(params, 0), state, params)
  assert _skeleton(new) == _skeleton(state)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_multi_steps_and_apply_if_finite_on_nnx_state(name):
  params = _trees()["nnx_state"]
  for wrap, nan_at in (
    (lambda tx: optax.MultiSteps(tx, every_k_schedule=2), None),
    (lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3), 3),
  ):
    tx = wrap(OPTIMIZERS[name](1e-2))
    p, state, update = params, tx.init(params), jax.jit(tx.update)
    for step in range(5):
      g = _grads(params, step)
      if step == nan_at:  # one non-finite gradient: apply_if_finite skips it
        g = jax.tree.map(lambda x: x * jnp.nan, g)
      u, state = update(g, state, p)
      p = optax.apply_updates(p, u)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(p))
    moved = [
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True)
    ]
    assert max(moved) > 0
