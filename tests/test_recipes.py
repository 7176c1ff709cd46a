"""The newer rules' blocks and recipes against their NumPy statements.

Every trajectory runs many steps on a wide, a tall and a stacked leaf (each
slice of the stacked leaf its own matrix), see ``tests/reference_recipes.py``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_orth
from optax_orth._src.hyperball import scale_by_hyperball
from optax_orth._src.rescale import scale_to_rms
from optax_orth._src.weight_decay import add_cautious_weight_decay, cautious_mask
from tests import helpers as h
from tests import reference_numpy as ref
from tests import reference_recipes as rr
from tests.helpers import DIMS, SHAPES

STEPS = 20


def _trajectories(tx, make_rule, steps=STEPS, seed=0):
  grads = h.scaled_gradients(steps, seed=seed)
  params = h.initial_params()
  return h.run_optax(tx, params, grads), h.run_reference(make_rule, params, grads)


# ---------------------------------------------------------------------------
# Cautious weight decay.


def test_cautious_mask_is_the_papers_indicator():
  u = jnp.asarray([1.0, -1.0, 1.0, 0.0, 2.0])
  k = jnp.asarray([2.0, 3.0, -1.0, 5.0, 0.0])
  np.testing.assert_array_equal(cautious_mask(u, k), [1, 0, 0, 1, 1])


@pytest.mark.parametrize("schedule", [False, True])
def test_add_cautious_weight_decay_matches_numpy(schedule):
  rng = np.random.default_rng(0)
  params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  wd = optax.linear_schedule(0.5, 0.1, 4) if schedule else 0.3
  tx = add_cautious_weight_decay(wd)
  state = tx.init(params)
  for step in range(4):
    u = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    out, state = jax.jit(tx.update)(u, state, params)
    lam = wd(step) if schedule else wd
    for n in SHAPES:
      want = u[n] + lam * rr.cautious(u[n], params[n]) * params[n]
      np.testing.assert_allclose(out[n], want, rtol=1e-6, atol=1e-6)


def test_add_cautious_weight_decay_mask_and_params():
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  u = jax.tree.map(jnp.ones_like, params)
  tx = add_cautious_weight_decay(0.5, mask={"w": True, "b": False})
  out, _ = tx.update(u, tx.init(params), params)
  np.testing.assert_allclose(out["w"], 1.5)
  np.testing.assert_allclose(out["b"], 1.0)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(u, tx.init(params))
  with pytest.raises(ValueError, match="weight_decay"):
    add_cautious_weight_decay(-1.0)


def test_cautious_muon_recipe_matches_numpy():
  tx = optax.chain(
    optax_orth.orthogonalize_momentum(
      bias_correction=True, eps=1e-8, weight_dimension_numbers=DIMS
    ),
    optax_orth.scale_by_shape(DIMS),
    add_cautious_weight_decay(0.5),
    optax.scale_by_learning_rate(0.02),
  )
  ours, theirs = _trajectories(tx, functools.partial(rr.CautiousMuon, 0.02, wd=0.5))
  rr.assert_close_up_to_mask_flips(ours, theirs)


# ---------------------------------------------------------------------------
# RMS alignment and AdaMuon's chain.


def test_scale_to_rms_gives_each_matrix_the_rms():
  params = h.initial_params()
  out, _ = scale_to_rms(0.2, weight_dimension_numbers=DIMS).update(params, ())
  for name, x in out.items():
    x = np.asarray(x).reshape(-1, *SHAPES[name][-2:])
    rms = np.sqrt(np.mean(x * x, axis=(-2, -1)))
    np.testing.assert_allclose(rms, 0.2, rtol=1e-5, err_msg=name)
  zero, _ = scale_to_rms().update({"w": jnp.zeros((3, 4))}, ())
  assert not np.any(zero["w"])


def _adamuon_chain(lr, b2=0.95, wd=0.0, sign=True):
  ns = optax_orth._src.orthogonalizers.make_newton_schulz("standard", 5, 1e-7)
  orth = (lambda x: ns(jnp.sign(x))) if sign else None
  return optax.chain(
    optax_orth.orthogonalize_momentum(
      0.95, orthogonalizer=orth, weight_dimension_numbers=DIMS
    ),
    optax.scale_by_rms(b2, 1e-8, eps_in_sqrt=False),
    scale_to_rms(0.2, 1e-8, weight_dimension_numbers=DIMS),
    optax.add_decayed_weights(wd),
    optax.scale_by_learning_rate(lr),
  )


@pytest.mark.parametrize("sign", [True, False])
def test_adamuon_chain_matches_numpy(sign):
  tx = _adamuon_chain(3e-3, wd=0.1, sign=sign)
  rule = functools.partial(rr.AdaMuon, 3e-3, wd=0.1, sign=sign)
  ours, theirs = _trajectories(tx, rule, seed=2)
  h.assert_trajectories_close(ours, theirs)


# ---------------------------------------------------------------------------
# Hyperball (MuonH).


def test_muonh_recipe_matches_numpy_and_keeps_norms():
  tx = optax.chain(
    optax_orth.orthogonalize_momentum(
      0.95, ns_coeffs="dion", eps=1e-8, weight_dimension_numbers=DIMS
    ),
    scale_by_hyperball(0.05, weight_dimension_numbers=DIMS),
  )
  ours, theirs = _trajectories(tx, functools.partial(rr.MuonH, 0.05))
  h.assert_trajectories_close(ours, theirs)
  start = h.initial_params()
  for name, shape in SHAPES.items():
    norms = [
      np.linalg.norm(np.reshape(x, (-1, *shape[-2:])), axis=(1, 2))
      for x in (ours[-1][name], start[name])
    ]
    np.testing.assert_allclose(*norms, rtol=1e-5)


def test_hyperball_schedule_zero_direction_and_zero_matrix():
  params = {"w": jnp.ones((3, 4)), "z": jnp.zeros((3, 4))}
  tx = scale_by_hyperball(
    optax.constant_schedule(0.1),
    weight_dimension_numbers=optax_orth.MuonDimensionNumbers(),
  )
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  out, state = tx.update(zeros, state, params)
  chex.assert_trees_all_equal(out, zeros)
  out, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert np.all(np.isfinite(out["w"])) and not np.any(out["z"])
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state)


# ---------------------------------------------------------------------------
# NorMuon over the larger axis, and NorMuon on NAMO-D.


@pytest.mark.parametrize("axis", ["fan_in", "larger"])
def test_neuron_rms_axis_matches_numpy(axis):
  tx = optax.chain(
    optax_orth.orthogonalize_momentum(0.95, weight_dimension_numbers=DIMS),
    optax_orth.scale_by_neuron_rms(0.95, axis=axis, weight_dimension_numbers=DIMS),
    optax_orth.scale_by_shape(DIMS),
    optax.scale_by_learning_rate(0.02),
  )
  rule = functools.partial(rr.NorMuonAxis, 0.02, axis)
  ours, theirs = _trajectories(tx, rule, seed=4)
  h.assert_trajectories_close(ours, theirs)


def test_neuron_rms_axis_state_shapes():
  params = h.initial_params()
  for axis, want in (
    ("fan_out", {"wide": (1, 48), "tall": (1, 32), "stacked": (4, 40)}),
    ("fan_in", {"wide": (1, 32), "tall": (1, 48), "stacked": (4, 24)}),
    ("larger", {"wide": (1, 48), "tall": (1, 48), "stacked": (4, 40)}),
  ):
    tx = optax_orth.scale_by_neuron_rms(axis=axis, weight_dimension_numbers=DIMS)
    got = {n: tuple(v.shape) for n, v in tx.init(params).nu.items()}
    assert got == want, axis
  with pytest.raises(ValueError, match="axis"):
    optax_orth.scale_by_neuron_rms(axis="rows")


def test_normuon_on_namo_d_recipe_matches_numpy():
  tx = optax_orth.scale_by_norm_adaptive(
    optax.chain(
      optax_orth.orthogonalize_momentum(statistics=True, weight_dimension_numbers=DIMS),
      optax_orth.scale_by_neuron_rms(weight_dimension_numbers=DIMS),
    ),
    0.01,
    granularity="input_feature",
    step_size_transform=optax_orth.clamp_diagonal(0.75),
    weight_decay=0.1,
    weight_dimension_numbers=DIMS,
  )

  def variant():
    neuron = ref.NorMuon(0.0)
    return ref.Namo(
      0.01, diagonal=True, direction=lambda m: neuron.normalize(ref.ns(m))
    )

  ours, theirs = _trajectories(tx, variant, seed=5)
  h.assert_trajectories_close(ours, theirs)
