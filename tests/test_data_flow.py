"""Generic optax blocks between the public blocks act on parameter-shaped arrays.

Each public block hands the next one arrays with the structure and shapes of
the parameters, so an optax transformation placed anywhere in a chain sees
exactly that and acts as optax defines it. Checked by splitting each chain at
every position: running the blocks before the split, the optax block, then the
blocks after it, by hand, gives the same update as the chain.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_orth
from optax_orth import MuonDimensionNumbers as DN

DIMS = {"wide": DN(), "tall": DN(), "stacked": DN(1, 2)}
SHAPES = {"wide": (16, 24), "tall": (24, 16), "stacked": (3, 8, 12)}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    n: jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32) for n, s in SHAPES.items()
  }


def _spy(seen):
  """An identity block that records the shapes of what it receives."""

  def update_fn(updates, state, params=None):
    del params
    seen.append(jax.tree.map(lambda x: (type(x).__name__, x.shape), updates))
    return updates, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


GENERIC = {
  "clip_by_global_norm": lambda: optax.clip_by_global_norm(0.5),
  "add_decayed_weights": lambda: optax.add_decayed_weights(0.3),
  "scale": lambda: optax.scale(-0.7),
}

MUON_BLOCKS = [
  lambda: optax_orth.orthogonalize_momentum(0.9, weight_dimension_numbers=DIMS),
  lambda: optax_orth.scale_by_neuron_rms(weight_dimension_numbers=DIMS),
  lambda: optax_orth.scale_by_shape(DIMS),
  lambda: optax.scale_by_learning_rate(0.02),
]


def _by_hand(blocks, params, grads, steps):
  """Runs each block on its own, feeding each the previous one's output."""
  states = [b.init(params) for b in blocks]
  for g in grads[:steps]:
    u = g
    for i, b in enumerate(blocks):
      u, states[i] = b.update(u, states[i], params)
  return u


def _grads(steps=3):
  return [_params(seed=10 + t) for t in range(steps)]


@pytest.mark.parametrize("generic", sorted(GENERIC))
@pytest.mark.parametrize("position", range(1, len(MUON_BLOCKS)))
def test_generic_block_between_muon_blocks(generic, position):
  params, grads = _params(), _grads()
  seen = []
  blocks = [make() for make in MUON_BLOCKS]
  blocks[position:position] = [_spy(seen), GENERIC[generic]()]
  tx = optax.chain(*blocks)
  state = tx.init(params)
  for g in grads:
    u, state = tx.update(g, state, params)
  for shapes in seen:
    assert shapes == jax.tree.map(lambda x: ("ArrayImpl", x.shape), params)
  blocks = [make() for make in MUON_BLOCKS]
  blocks[position:position] = [GENERIC[generic]()]
  chex.assert_trees_all_close(u, _by_hand(blocks, params, grads, 3), rtol=1e-6)


NAMO_INNER = [
  lambda: optax_orth.orthogonalize_momentum(
    0.9, statistics=True, weight_dimension_numbers=DIMS
  ),
  lambda: optax_orth.scale_by_neuron_rms(weight_dimension_numbers=DIMS),
]


def _namo(inner, after=()):
  return optax.chain(
    optax_orth.scale_by_norm_adaptive(
      optax.chain(*inner),
      1e-2,
      granularity="input_feature",
      step_size_transform=optax_orth.clamp_diagonal(0.75),
      weight_decay=0.1,
      weight_dimension_numbers=DIMS,
    ),
    *after,
  )


@pytest.mark.parametrize("generic", sorted(GENERIC))
@pytest.mark.parametrize("position", [1, 2, 3])
def test_generic_block_in_and_after_namo_d(generic, position):
  """Positions 1 and 2: inside the direction chain; 3: after the NAMO step."""
  params, grads = _params(), _grads()
  seen = []
  inner = [make() for make in NAMO_INNER]
  after = []
  if position < 3:
    inner[position:position] = [_spy(seen), GENERIC[generic]()]
  else:
    after = [_spy(seen), GENERIC[generic]()]
  tx = _namo(inner, after)
  state = tx.init(params)
  for g in grads:
    u, state = tx.update(g, state, params)
  assert seen
  for shapes in seen:
    assert shapes == jax.tree.map(lambda x: ("ArrayImpl", x.shape), params)
  if position == 3:
    want = _by_hand(
      [_namo([make() for make in NAMO_INNER]), GENERIC[generic]()], params, grads, 3
    )
    chex.assert_trees_all_close(u, want, rtol=1e-6)


def test_generic_block_inside_the_direction_changes_only_the_direction():
  """A block inside the direction acts on O: the step size still reads Mt, G."""
  params, grads = _params(), _grads(1)
  plain = _namo([make() for make in NAMO_INNER[:1]])
  scaled = _namo([NAMO_INNER[0](), optax.scale(2.0)])
  _, (s0,) = plain.update(grads[0], plain.init(params), params)
  _, (s1,) = scaled.update(grads[0], scaled.init(params), params)
  chex.assert_trees_all_close(s0.step_size, s1.step_size)
  # Below the caps and without decay the step is linear in O.
  small = lambda inner: optax_orth.scale_by_norm_adaptive(
    optax.chain(*inner), 1e-4, weight_dimension_numbers=DIMS
  )
  a = small([NAMO_INNER[0]()])
  b = small([NAMO_INNER[0](), optax.scale(2.0)])
  ua, _ = a.update(grads[0], a.init(params), params)
  ub, _ = b.update(grads[0], b.init(params), params)
  chex.assert_trees_all_close(ub, jax.tree.map(lambda x: 2 * x, ua), rtol=1e-6)


def test_generic_step_size_transform():
  """Any optax transformation of arrays can refine NAMO's step sizes."""
  params, grads = _params(), _grads(2)
  tx = optax_orth.scale_by_norm_adaptive(
    optax_orth.orthogonalize_momentum(
      0.9, statistics=True, weight_dimension_numbers=DIMS
    ),
    1e-2,
    granularity="input_feature",
    step_size_transform=optax.chain(optax_orth.clamp_diagonal(0.5), optax.scale(0.5)),
    weight_dimension_numbers=DIMS,
  )
  state = tx.init(params)
  for g in grads:
    _, state = tx.update(g, state, params)
  clamped, _ = optax_orth.clamp_diagonal(0.5).update(
    state.raw_step_size, (), matrix_step_sizes=True
  )
  chex.assert_trees_all_close(state.step_size, jax.tree.map(lambda x: 0.5 * x, clamped))


def test_step_size_transform_that_changes_shapes_is_refused():
  params = _params()
  tx = optax_orth.scale_by_norm_adaptive(
    optax_orth.orthogonalize_momentum(
      0.9, statistics=True, weight_dimension_numbers=DIMS
    ),
    1e-2,
    granularity="input_feature",
    step_size_transform=optax.GradientTransformation(
      optax.init_empty_state, lambda u, s, p=None: (jax.tree.map(jnp.sum, u), s)
    ),
    weight_dimension_numbers=DIMS,
  )
  with pytest.raises(
    ValueError, match=r"step_size_transform.*leaf '(wide|tall|stacked)'"
  ):
    tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_clamp_in_a_chain_of_updates_is_refused(position):
  blocks = [make() for make in MUON_BLOCKS[:2]]
  blocks.insert(position, optax_orth.clamp_diagonal(0.75))
  tx = optax.chain(*blocks)
  params = _params()
  with pytest.raises(ValueError, match=r"clamp_diagonal.*step_size_transform"):
    tx.update(params, tx.init(params), params)


def test_block_given_something_else_than_arrays_names_the_leaf():
  params = _params()
  tx = optax_orth.scale_by_shape(DIMS)
  bad = dict(params, wide=("not", "an array"))
  with pytest.raises(ValueError, match="'wide"):
    tx.update(bad, tx.init(params))
