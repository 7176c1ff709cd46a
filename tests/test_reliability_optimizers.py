"""Reliability of the four optimizers: edge cases, round-trips, determinism.

Every test here backs a row of ``docs/reliability.md``: zero, tiny and huge
gradients; NaN or Inf in one leaf (alone and under ``optax.apply_if_finite``);
bfloat16 and float16 parameters; mixed trees; shapes or trees that do not
match the state; Orbax, ``flax.serialization`` and ``jax.tree_util``
round-trips; jit against no jit; two runs bit for bit; and 5,000 steps on an
ill-conditioned least-squares problem.
"""

from __future__ import annotations

import functools
import re

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_orth
from optax_orth._src.transforms import find_states
from tests import helpers as h

OPTIMIZERS = {n: functools.partial(h.make, n) for n in h.NAMES}
NAMES = h.NAMES
MATRICES = ("w", "v")  # the orthogonal branch; "b" goes to the AdamW fallback


def _params(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"w": (8, 12), "v": (12, 8), "b": (12,)}
  return {
    k: jnp.asarray(0.1 * rng.standard_normal(s), dtype) for k, s in shapes.items()
  }


def _grads(steps, dtype=jnp.float32, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  return [
    {
      k: jnp.asarray(scale * rng.standard_normal(p.shape), dtype)
      for k, p in _params().items()
    }
    for _ in range(steps)
  ]


def _run(tx, params, grads, state=None, update=None):
  """Returns the final params, final state and the list of updates."""
  state = tx.init(params) if state is None else state
  update = update or jax.jit(tx.update)
  updates = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
  return params, state, updates


def _all_finite(tree) -> bool:
  return all(
    np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(tree)
  )


def _max_abs(x) -> float:
  return float(np.abs(np.asarray(x, np.float32)).max())


# ---------------------------------------------------------------------------
# Gradient magnitudes.


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_give_zero_updates_and_finite_state(name):
  # Without weight decay: adamuon decays by default (0.01), which moves the
  # weights whatever the gradient, as it should.
  tx = OPTIMIZERS[name](weight_decay=0.0)
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, state, updates = _run(tx, params, [zeros] * 3)
  for u in updates:
    for x in jax.tree.leaves(u):
      np.testing.assert_array_equal(x, 0.0)
  assert _all_finite(state)


#: Optimizers whose matrix step does not shrink with the gradient, by design.
SCALE_FREE = {"adamuon"}


@pytest.mark.parametrize("name", NAMES)
def test_tiny_gradients_give_no_step(name):
  """|G| = 1e-30: far below every eps, so the step is (numerically) zero.

  Except where the rule discards the gradient's scale (``SCALE_FREE``):
  AdaMuon orthogonalizes the sign of the momentum, so its matrix step at
  1e-30 is the step at scale 1 (docs/reliability.md).
  """
  tx = OPTIMIZERS[name]()
  _, state, updates = _run(tx, _params(), _grads(3, scale=1e-30))
  assert _all_finite(state)
  if name in SCALE_FREE:
    _, _, unit = _run(tx, _params(), _grads(3))
    for u, v in zip(updates, unit, strict=True):
      assert _all_finite(u)
      for k in MATRICES:
        np.testing.assert_allclose(u[k], v[k], rtol=1e-5, atol=1e-7)
      assert _max_abs(u["b"]) < 1e-12  # the AdamW fallback takes no step
    return
  for u in updates:
    assert _all_finite(u)
    assert all(_max_abs(x) < 1e-12 for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_huge_gradients_matrix_updates_are_scale_invariant(name):
  """|G| = 1e30: the matrix updates equal those of |G| = 1 (NS normalizes).

  Regression: before the fix, ||X||_F^2 overflowed and the update was 0.
  """
  tx = OPTIMIZERS[name]()
  _, _, huge = _run(tx, _params(), _grads(3, scale=1e30))
  _, _, unit = _run(tx, _params(), _grads(3))
  for u_huge, u_unit in zip(huge, unit, strict=True):
    assert _all_finite(u_huge)
    for k in MATRICES:
      np.testing.assert_allclose(u_huge[k], u_unit[k], rtol=1e-4, atol=1e-6)
    # The AdamW fallback is scale invariant too: optax.adamw's G^2 overflowed
    # to inf and its step was 0 (regression).
    np.testing.assert_allclose(u_huge["b"], u_unit["b"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["namo", "namo_d"])
def test_huge_gradients_namo_steps_are_finite_and_capped(name):
  """|G| = 1e30: the squared norms saturate at float32's max, d stays finite.

  Regression: before the fix, d = inf / inf = NaN. Up to |G| ~ 1e15 (no
  saturation) the step is scale invariant, as in exact arithmetic.
  """
  tx = OPTIMIZERS[name]()
  params = _params()
  _, state, huge = _run(tx, params, _grads(3, scale=1e30))
  for u in huge:
    assert _all_finite(u)
    for k in MATRICES:
      # |step| <= min(alpha s, 1) |O| + weight decay <= ~1.2 + 0.1 |K|.
      assert _max_abs(u[k]) <= 1.3
  assert _all_finite(state)
  _, _, large = _run(tx, params, _grads(3, scale=1e15))
  _, _, unit = _run(tx, params, _grads(3))
  for u_large, u_unit in zip(large, unit, strict=True):
    for k in MATRICES:
      np.testing.assert_allclose(u_large[k], u_unit[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# NaN and Inf.


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_value_stays_in_its_leaf(name, bad):
  """A NaN/Inf in leaf 'w' makes that leaf's update and momentum NaN; the
  other leaves' updates are bit for bit those without the bad value."""
  tx = OPTIMIZERS[name]()
  params = _params()
  good = _grads(1)[0]
  poisoned = dict(good, w=good["w"].at[0, 0].set(bad))
  u_bad, state_bad = tx.update(poisoned, tx.init(params), params)
  u_good, _ = tx.update(good, tx.init(params), params)
  assert np.isnan(np.asarray(u_bad["w"])).any()
  for k in ("v", "b"):
    np.testing.assert_array_equal(u_bad[k], u_good[k])
  (momentum,) = find_states(state_bad, optax_orth.OrthogonalizeMomentumState)
  mu = momentum.mu
  assert not np.all(np.isfinite(mu["w"])) and np.all(np.isfinite(mu["v"]))


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_in_adam_leaf_stays_in_its_leaf(name):
  tx = OPTIMIZERS[name]()
  params = _params()
  good = _grads(1)[0]
  poisoned = dict(good, b=good["b"].at[3].set(np.nan))
  u_bad, _ = tx.update(poisoned, tx.init(params), params)
  u_good, _ = tx.update(good, tx.init(params), params)
  assert np.isnan(np.asarray(u_bad["b"])).any()
  for k in MATRICES:
    np.testing.assert_array_equal(u_bad[k], u_good[k])


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_the_bad_step(name):
  """Under optax.apply_if_finite a NaN step is a zero update with the state
  kept, and training resumes exactly as if the step had not happened."""
  tx = optax.apply_if_finite(OPTIMIZERS[name](), max_consecutive_errors=3)
  update = jax.jit(tx.update)
  params = _params()
  g1, g2, g3 = _grads(3)
  bad = dict(g2, v=g2["v"].at[1, 1].set(np.nan))
  p, state, _ = _run(tx, params, [g1], update=update)
  u, state_after = update(bad, state, p)
  for x in jax.tree.leaves(u):
    np.testing.assert_array_equal(x, 0.0)
  chex.assert_trees_all_equal(state_after.inner_state, state.inner_state)
  assert int(state_after.notfinite_count) == 1
  assert int(state_after.total_notfinite) == 1
  p_skip, _, _ = _run(tx, params, [g1, bad, g3], update=update)
  p_ref, _, _ = _run(tx, params, [g1, g3], update=update)
  chex.assert_trees_all_equal(p_skip, p_ref)


# ---------------------------------------------------------------------------
# Parameter dtypes and tree shapes.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_parameters(name, dtype):
  """bfloat16 / float16: updates keep the dtype, stay finite, and follow the
  float32 updates to the half precision's resolution."""
  tx = OPTIMIZERS[name]()
  _, state, half = _run(tx, _params(dtype), _grads(4, dtype))
  _, _, full = _run(tx, _params(), _grads(4))
  assert _all_finite(state)
  # Measured worst deviation over 4 steps, relative to the largest float32
  # update: bfloat16 0.18 (muon), 0.12-0.13 (others); float16 0.012-0.016,
  # and 0.046 for adamuon, whose sign flips where a float16 momentum entry
  # rounds across zero (its updates are all of one magnitude, so one flipped
  # entry is a deviation of the largest update's size before Newton-Schulz).
  tol = {jnp.bfloat16: 0.3, jnp.float16: 0.06 if name == "adamuon" else 0.03}[dtype]
  for u_half, u_full in zip(half, full, strict=True):
    for k, x in u_half.items():
      assert x.dtype == dtype, (k, x.dtype)
      assert _all_finite(x)
      err = _max_abs(x.astype(jnp.float32) - u_full[k])
      assert err <= tol * _max_abs(u_full[k]), (k, err, _max_abs(u_full[k]))


@pytest.mark.parametrize("name", NAMES)
def test_mixed_tree_with_none_masked_node_and_empty_dict(name):
  tx = OPTIMIZERS[name]()
  plain = _params()
  mixed = {**plain, "none": None, "masked": optax.MaskedNode(), "empty": {}}
  g = _grads(2)
  g_mixed = [{**x, "none": None, "masked": optax.MaskedNode(), "empty": {}} for x in g]
  _, _, u_mixed = _run(tx, mixed, g_mixed)
  _, _, u_plain = _run(tx, plain, g)
  for a, b in zip(u_mixed, u_plain, strict=True):
    assert a["none"] is None and a["empty"] == {}
    assert isinstance(a["masked"], optax.MaskedNode)
    for k in plain:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
  ("leaf", "new_shape", "old_shape"),
  [("w", (1, 12), (8, 12)), ("w", (12, 8), (8, 12)), ("b", (2, 12), (12,))],
)
def test_shape_change_after_init_names_the_leaf(name, leaf, new_shape, old_shape):
  """Regression: (8, 12) -> (1, 12) used to broadcast silently into the
  momentum; other changes failed with an opaque TypeError."""
  tx = OPTIMIZERS[name]()
  params = _params()
  state = tx.init(params)
  changed = dict(params, **{leaf: jnp.ones(new_shape)})
  message = (
    f"leaf '{leaf}' has shape {re.escape(str(new_shape))}, but the optimizer "
    f"state was initialized for shape {re.escape(str(old_shape))}"
  )
  with pytest.raises(ValueError, match=message):
    tx.update(changed, state, changed)
  with pytest.raises(ValueError, match=message):
    jax.jit(tx.update)(changed, state, changed)


def test_shape_change_in_the_orthogonalize_momentum_block():
  tx = optax_orth.orthogonalize_momentum()
  state = tx.init({"w": jnp.ones((1, 6))})
  with pytest.raises(ValueError, match=r"orthogonalize_momentum: leaf 'w'"):
    tx.update({"w": jnp.ones((4, 6))}, state)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
  ("change", "message"),
  [
    ({"extra": jnp.ones((3, 3))}, r"unexpected in the updates: \['extra'\]"),
    ({"b": None}, r"missing from the updates: \['b'\]"),
    ({"nested": {"k": jnp.ones((2, 2))}}, r"unexpected in the updates: \['nested/k'\]"),
  ],
)
def test_tree_that_does_not_match_the_state_names_the_leaf(name, change, message):
  tx = OPTIMIZERS[name]()
  params = _params()
  state = tx.init(params)
  updates = {**params, **change}
  with pytest.raises(ValueError, match=message):
    tx.update(updates, state, None)


@pytest.mark.parametrize("name", NAMES)
def test_container_type_change_is_named(name):
  tx = OPTIMIZERS[name]()
  params = {"layer": {"w": jnp.ones((4, 6))}}
  state = tx.init(params)
  as_list = {"layer": [jnp.ones((4, 6))]}
  with pytest.raises(ValueError, match="tree structure"):
    tx.update(as_list, state, None)


@pytest.mark.parametrize("name", NAMES)
def test_state_of_another_kind_is_a_clear_error(name):
  tx = OPTIMIZERS[name]()
  params = _params()
  with pytest.raises(ValueError, match="expected the state that this optimizer"):
    tx.update(params, {"mu": params}, params)
  # The state of every other optimizer of this package (normuon's and
  # adamuon's have as many blocks: a reshape failed deep inside, regression).
  for other in NAMES:
    if other != name:
      with pytest.raises(ValueError, match="called init first"):
        tx.update(params, OPTIMIZERS[other]().init(params), params)


# ---------------------------------------------------------------------------
# State round-trips.


@pytest.mark.parametrize("name", NAMES)
def test_orbax_checkpoint_mid_training_resumes_bit_identically(name, tmp_path):
  tx = OPTIMIZERS[name]()
  update = jax.jit(tx.update)
  grads = _grads(6)
  params = _params()
  p_full, s_full, _ = _run(tx, params, grads, update=update)

  p_mid, s_mid, _ = _run(tx, params, grads[:3], update=update)
  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / name
  checkpointer.save(path, {"params": p_mid, "opt_state": s_mid})
  checkpointer.wait_until_finished()
  target = {"params": p_mid, "opt_state": tx.init(params)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = checkpointer.restore(path, abstract)
  checkpointer.close()
  chex.assert_trees_all_equal_structs(restored["opt_state"], s_mid)
  chex.assert_trees_all_equal(restored["opt_state"], s_mid)
  p_res, s_res, _ = _run(
    tx, restored["params"], grads[3:], state=restored["opt_state"], update=update
  )
  chex.assert_trees_all_equal(p_res, p_full)
  chex.assert_trees_all_equal(s_res, s_full)


@pytest.mark.parametrize("name", NAMES)
def test_flax_serialization_round_trip(name):
  tx = OPTIMIZERS[name]()
  params = _params()
  grads = _grads(4)
  _, state, _ = _run(tx, params, grads[:2])
  restored = flax.serialization.from_bytes(
    tx.init(params), flax.serialization.to_bytes(state)
  )
  chex.assert_trees_all_equal_structs(restored, state)
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  a, _, _ = _run(tx, params, grads[2:], state=state)
  b, _, _ = _run(tx, params, grads[2:], state=restored)
  chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_tree_util_flatten_unflatten_round_trip(name):
  tx = OPTIMIZERS[name]()
  params = _params()
  _, state, _ = _run(tx, params, _grads(2))
  leaves, treedef = jax.tree_util.tree_flatten(state)
  rebuilt = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])
  assert type(rebuilt) is type(state)
  chex.assert_trees_all_equal(rebuilt, state)
  g = _grads(1, seed=5)[0]
  chex.assert_trees_all_equal(
    tx.update(g, rebuilt, params), tx.update(g, state, params)
  )


# ---------------------------------------------------------------------------
# Determinism.


class DeterminismTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit_agree(self):
    for name in NAMES:
      tx = OPTIMIZERS[name]()
      a, _, _ = _run(tx, _params(), _grads(4), update=self.variant(tx.update))
      b, _, _ = _run(tx, _params(), _grads(4), update=jax.jit(tx.update))
      chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)

  def test_two_runs_are_bit_identical(self):
    for name in NAMES:
      runs = []
      for _ in range(2):
        tx = OPTIMIZERS[name]()  # a fresh optimizer and a fresh compilation
        runs.append(_run(tx, _params(), _grads(5), update=jax.jit(tx.update))[:2])
      chex.assert_trees_all_equal(runs[0], runs[1])


# ---------------------------------------------------------------------------
# Long runs.

LONG_STEPS = 5000
LONG_LR = 0.05
# Measured final losses (2-core CPU, JAX 0.10.2): muon 1.1e-12, namo 2.2e-13,
# namo_d 2.1e-13, normuon 7.0e-13, from 37.3 at the start, and adamuon
# 2.9e-10 (sign steps). The threshold leaves 1.5 to 4 orders of margin.
LONG_THRESHOLD = 1e-8


def _least_squares(seed=0, n=128, d_in=32, d_out=16, cond=1e4):
  """``0.5 mean_i ||x_i W + b - y_i||^2`` whose Hessian in W has condition
  number ``cond`` (eigenvalues geometrically spaced in [1/cond, 1])."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((n, d_in)))
  v, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
  s = np.sqrt(np.geomspace(1.0, 1.0 / cond, d_in))
  x = np.sqrt(n) * (u * s) @ v.T
  y = x @ rng.standard_normal((d_in, d_out)) + rng.standard_normal(d_out)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  return lambda p: 0.5 * jnp.mean(jnp.sum((x @ p["w"] + p["b"] - y) ** 2, -1))


LONG_OPTIMIZERS = {
  "muon": lambda lr: optax_orth.muon(lr),
  "namo": lambda lr: optax_orth.namo(lr, weight_decay=0.0),
  "namo_d": lambda lr: optax_orth.namo_d(lr, weight_decay=0.0),
  "normuon": lambda lr: optax_orth.normuon(lr, adam_learning_rate=None),
  "adamuon": lambda lr: optax_orth.adamuon(lr, weight_decay=0.0),
}


@pytest.mark.parametrize("name", NAMES)
def test_5000_steps_on_ill_conditioned_least_squares(name):
  loss = _least_squares()
  tx = LONG_OPTIMIZERS[name](optax.cosine_decay_schedule(LONG_LR, LONG_STEPS))
  params = {"w": jnp.zeros((32, 16)), "b": jnp.zeros(16)}

  def step(carry, _):
    p, s = carry
    value, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), value

  @jax.jit
  def train(p):
    (p, s), losses = jax.lax.scan(step, (p, tx.init(p)), None, length=LONG_STEPS)
    return p, s, losses

  params, state, losses = train(params)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)) and _all_finite(state) and _all_finite(params)
  assert losses[0] > 30.0
  final = float(loss(params))
  assert final < LONG_THRESHOLD, final
