"""NAMO, NAMO-D and NorMuon against our NumPy statement of the specification."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_orth
from tests import helpers as h
from tests import reference_numpy as ref

SHAPES, DIMS = h.SHAPES, h.DIMS
STEPS = 25


CASES = {
  "namo": (
    lambda **kw: optax_orth.namo(0.01, weight_dimension_numbers=DIMS, **kw),
    lambda **kw: functools.partial(ref.Namo, 0.01, **kw),
  ),
  "namo_d": (
    lambda **kw: optax_orth.namo_d(0.01, weight_dimension_numbers=DIMS, **kw),
    lambda **kw: functools.partial(ref.Namo, 0.01, diagonal=True, **kw),
  ),
  "normuon": (
    lambda **kw: optax_orth.normuon(0.02, weight_dimension_numbers=DIMS, **kw),
    lambda **kw: functools.partial(ref.NorMuon, 0.02, **kw),
  ),
}


class SpecificationTest(parameterized.TestCase):
  @parameterized.named_parameters(
      ("namo", "namo", {}, {}),
      ("namo_decoupled", "namo", {"weight_decay_mode": "decoupled"},
       {"decoupled": True}),
      ("namo_no_nesterov", "namo", {"nesterov": False}, {"nesterov": False}),
      ("namo_d", "namo_d", {}, {}),
      ("namo_d_clamp_1", "namo_d", {"clamp": 1.0}, {"clamp": 1.0}),
      ("namo_d_clamp_0_4", "namo_d", {"clamp": 0.4}, {"clamp": 0.4}),
      ("namo_d_no_clamp", "namo_d", {"clamp": 0.0}, {"clamp": 0.0}),
      ("namo_d_clamp_over_1", "namo_d", {"clamp": 1.5}, {"clamp": 1.5}),
      ("namo_d_decoupled", "namo_d", {"weight_decay_mode": "decoupled"},
       {"decoupled": True}),
      ("normuon", "normuon", {}, {}),
      ("normuon_wd", "normuon", {"weight_decay": 0.1}, {"wd": 0.1}),
      ("normuon_paper", "normuon", {"target_rms": 0.2, "nesterov": False},
       {"target_rms": 0.2, "nesterov": False}),
  )  # fmt: skip
  def test_trajectory_matches_numpy(self, name, kwargs, ref_kwargs):
    make_tx, make_ref = CASES[name]
    grads = h.scaled_gradients(STEPS)
    params = h.initial_params()
    ours = h.run_optax(make_tx(**kwargs), params, grads)
    theirs = h.run_reference(make_ref(**ref_kwargs), params, grads)
    h.assert_trajectories_close(ours, theirs)

  def test_schedule_reaches_the_caps(self):
    # A large, decaying learning rate makes the caps min(alpha s, 1) bind early.
    schedule = optax.linear_schedule(5.0, 0.001, STEPS)
    grads = h.scaled_gradients(STEPS, seed=3)
    params = h.initial_params()
    tx = optax_orth.namo_d(schedule, weight_dimension_numbers=DIMS)
    ours = h.run_optax(tx, params, grads)
    theirs = h.run_reference(
      functools.partial(ref.Namo, schedule, diagonal=True), params, grads
    )
    h.assert_trajectories_close(ours, theirs)


class BlocksTest(chex.TestCase):
  def test_statistics_are_row_norms_of_gradient_and_momentum(self):
    rng = np.random.default_rng(0)
    g = rng.standard_normal((6, 10)).astype(np.float32)
    tx = optax_orth.orthogonalize_momentum(0.9, statistics=True)
    u, state = tx.update({"w": jnp.asarray(g)}, tx.init({"w": jnp.asarray(g)}))
    mt = 0.1 * g + 0.9 * (0.1 * g)  # Nesterov direction after one step
    stats = state.statistics
    np.testing.assert_allclose(stats.grad_sq_norms["w"][0], (g * g).sum(1), rtol=1e-5)
    np.testing.assert_allclose(
      stats.momentum_sq_norms["w"][0], (mt * mt).sum(1), rtol=1e-5
    )
    np.testing.assert_allclose(u["w"], ref.ns(mt), atol=2e-5)

  def test_updates_are_parameter_shaped_arrays_between_blocks(self):
    params = h.initial_params()
    tx = optax_orth.orthogonalize_momentum(
      statistics=True, weight_dimension_numbers=DIMS
    )
    u, _ = tx.update(params, tx.init(params))
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)

  @parameterized.parameters(0.0, 1.5)
  def test_clamp_disabled(self, c):
    d = jnp.asarray([[0.1, 1.0, 10.0]])
    out, _ = optax_orth.clamp_diagonal(c).update({"w": d}, (), matrix_step_sizes=True)
    np.testing.assert_array_equal(out["w"], d)

  def test_clamp_one_gives_the_mean(self):
    d = jnp.asarray([[0.1, 1.0, 10.0], [1.0, 2.0, 3.0]])
    out, _ = optax_orth.clamp_diagonal(1.0).update({"w": d}, (), matrix_step_sizes=True)
    expected = np.repeat(np.asarray(d).mean(1, keepdims=True), 3, 1)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)

  def test_clamp_leaves_non_finite_or_zero_mean_alone(self):
    d = jnp.asarray([[0.0, 0.0, 0.0], [1.0, jnp.inf, 2.0]])
    out, _ = optax_orth.clamp_diagonal(0.5).update({"w": d}, (), matrix_step_sizes=True)
    np.testing.assert_array_equal(out["w"], d)

  def test_normuon_normalization_on_namo_d_diagonal(self):
    """A variant built from public blocks: NorMuon's normalization under NAMO-D."""
    grads = h.scaled_gradients(12, seed=5)
    params = h.initial_params()
    tx = optax_orth.scale_by_norm_adaptive(
      optax.chain(
        optax_orth.orthogonalize_momentum(
          statistics=True, weight_dimension_numbers=DIMS
        ),
        optax_orth.scale_by_neuron_rms(weight_dimension_numbers=DIMS),
      ),
      0.01,
      granularity="input_feature",
      step_size_transform=optax_orth.clamp_diagonal(0.75),
      weight_decay=0.1,
      weight_dimension_numbers=DIMS,
    )
    ours = h.run_optax(tx, params, grads)

    def variant():
      neuron = ref.NorMuon(0.0)
      return ref.Namo(
        0.01, diagonal=True, direction=lambda mt: neuron.normalize(ref.ns(mt))
      )

    theirs = h.run_reference(variant, params, grads)
    h.assert_trajectories_close(ours, theirs)

  def test_norm_adaptive_needs_statistics(self):
    tx = optax_orth.scale_by_norm_adaptive(optax_orth.orthogonalize_momentum(), 0.01)
    params = {"w": jnp.ones((3, 4))}
    with self.assertRaisesRegex(ValueError, "orthogonalize_momentum.statistics=True"):
      tx.init(params)

  def test_clamp_refuses_parameter_updates(self):
    params = {"w": jnp.ones((3, 4))}
    tx = optax.chain(
      optax_orth.orthogonalize_momentum(), optax_orth.clamp_diagonal(0.75)
    )
    with self.assertRaisesRegex(ValueError, "clamp_diagonal.*step_size_transform"):
      tx.update(params, tx.init(params))

  def test_norm_adaptive_needs_params_for_decay(self):
    tx = optax_orth.scale_by_norm_adaptive(
      optax_orth.orthogonalize_momentum(statistics=True), 0.1, weight_decay=0.1
    )
    params = {"w": jnp.ones((3, 4))}
    with self.assertRaisesRegex(ValueError, "needs params"):
      tx.update(params, tx.init(params))

  def test_state_is_muon_plus_a_few_vectors_per_matrix(self):
    # NAMO: v, d and d before the step-size transform, one value per matrix
    # (NAMO-D: per input feature), and the two per-input-feature statistics of
    # orthogonalize_momentum; NorMuon: one vector per neuron.
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    sizes = {}
    for name, tx in {
      "muon": optax_orth.muon(0.02, muon_weight_dimension_numbers=DIMS),
      "namo": optax_orth.namo(weight_dimension_numbers=DIMS),
      "namo_d": optax_orth.namo_d(weight_dimension_numbers=DIMS),
      "normuon": optax_orth.normuon(weight_dimension_numbers=DIMS),
    }.items():
      sizes[name] = sum(x.size for x in jax.tree.leaves(tx.init(params)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    matrices = {"wide": 1, "tall": 1, "stacked": 4}
    fan_in = {"wide": 32, "tall": 48, "stacked": 24}
    fan_out = {"wide": 48, "tall": 32, "stacked": 40}
    assert sizes["muon"] <= n_params + 4  # momentum and counts
    stats = sum(2 * matrices[n] * fan_in[n] for n in SHAPES)
    assert sizes["namo"] - sizes["muon"] <= stats + 3 * sum(matrices.values()) + 4
    assert sizes["namo_d"] - sizes["muon"] <= (
      stats + 3 * sum(matrices[n] * fan_in[n] for n in SHAPES) + 4
    )
    assert sizes["normuon"] - sizes["muon"] <= (
      sum(matrices[n] * fan_out[n] for n in SHAPES) + 4
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_gradient_gives_zero_update(self):
    params = h.initial_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    for tx in (
      optax_orth.namo(weight_dimension_numbers=DIMS, weight_decay=0.0),
      optax_orth.namo_d(weight_dimension_numbers=DIMS, weight_decay=0.0),
      optax_orth.normuon(weight_dimension_numbers=DIMS),
    ):
      updates, _ = self.variant(tx.update)(zeros, tx.init(params), params)
      for u in jax.tree.leaves(updates):
        assert np.all(np.isfinite(u)) and not np.any(u)

  def test_inject_hyperparams(self):
    params = h.initial_params()
    grads = h.scaled_gradients(3)
    for factory, kwargs in (
      (optax_orth.namo_d, {"learning_rate": 0.01, "clamp": 0.5}),
      (optax_orth.namo, {"learning_rate": 0.01, "b2": 0.9}),
      (optax_orth.normuon, {"learning_rate": 0.02}),
    ):
      tx = optax.inject_hyperparams(factory)(weight_dimension_numbers=DIMS, **kwargs)
      plain = factory(weight_dimension_numbers=DIMS, **kwargs)
      a = h.run_optax(tx, params, grads)
      b = h.run_optax(plain, params, grads)
      chex.assert_trees_all_close(a[-1], b[-1], rtol=1e-6, atol=1e-7)

  @parameterized.parameters(("b1", 1.0), ("b2", -0.1), ("eps", -1.0))
  def test_bad_hyperparameters(self, name, value):
    with self.assertRaisesRegex(ValueError, name):
      optax_orth.namo(**{name: value})

  def test_bad_weight_decay_mode(self):
    with self.assertRaisesRegex(ValueError, "weight_decay_mode"):
      optax_orth.namo(weight_decay_mode="l2")


if __name__ == "__main__":
  pytest.main([__file__])


@pytest.mark.parametrize(
  "factory", [optax_orth.namo, optax_orth.namo_d, optax_orth.normuon]
)
def test_default_routing_sends_embeddings_and_vectors_to_adam(factory):
  rng = np.random.default_rng(0)
  params = {
    "embed": {"embedding": jnp.asarray(rng.standard_normal((20, 8)), jnp.float32)},
    "mlp": {"kernel": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)},
    "ln": {"scale": jnp.ones((8,))},
  }
  tx = factory()
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(params, state, params)
  adam_state = state.inner_states["adam"].inner_state[0]
  assert adam_state.mu["embed"]["embedding"].shape == (20, 8)
  assert not isinstance(adam_state.mu["mlp"]["kernel"], jax.Array)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
