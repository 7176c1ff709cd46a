"""Muon: parity with optax.contrib.muon, schedules, jit, inject_hyperparams, errors."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from tests import reference_numpy as ref


def _params(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {
    "wide": (32, 48),
    "tall": (48, 32),
    "stacked": (4, 24, 40),
    "conv": (3, 3, 8, 16),
    "bias": (16,),
  }
  return {
    k: jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()
  }


DIMS = {
  "wide": DN(),
  "tall": DN(),
  "stacked": DN(1, 2),
  "conv": DN((0, 1, 2), 3),
  "bias": None,
}


def _grads(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [
    jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    for _ in range(steps)
  ]


def _assert_float32_close(a, b, where=""):
  """Leafwise max |a - b| <= 1e-5 * max |b|: float32 precision at the leaf's scale."""
  for (path, x), y in zip(
    jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
  ):
    err = float(jnp.max(jnp.abs(x - y)))
    scale = float(jnp.max(jnp.abs(y)))
    assert err <= 1e-5 * scale + 1e-7, (where, jax.tree_util.keystr(path), err, scale)


def _trajectory(tx, params, grads, update=None):
  state = tx.init(params)
  update = update or jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out


def _optax_lacks(kwargs) -> str | None:
  """The first option of ``kwargs`` the installed ``optax.contrib.muon`` lacks.

  This package follows optax 0.2.8's muon; older optax (down to the floor in
  pyproject.toml) lacks some options, whose parity is then not testable.
  """
  accepted = inspect.signature(optax.contrib.muon).parameters
  for name, value in kwargs.items():
    if name not in accepted:
      return f"{name}="
    if name == "ns_coeffs" and isinstance(value, str) and _OPTAX < (0, 2, 8):
      return f"ns_coeffs={value!r}"
  return None


_OPTAX = tuple(int(x) for x in optax.__version__.split(".")[:3])


class ParityTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("default", {}),
    ("no_nesterov", {"nesterov": False}),
    ("weight_decay", {"weight_decay": 0.1, "adam_weight_decay": 0.01}),
    ("consistent_rms", {"consistent_rms": 0.2}),
    ("dion", {"ns_coeffs": "dion"}),
    ("rows", {"ns_coeffs": ((3.4445, -4.7750, 2.0315),) * 3, "ns_steps": 3}),
    ("aol", {"preconditioning": "aol"}),
    ("schatten", {"preconditioning": "schatten"}),
    ("spectral", {"preconditioning": "spectral"}),
    ("adaptive", {"adaptive": True}),
    ("adam_lr", {"adam_learning_rate": 3e-4, "adam_b2": 0.95}),
    ("beta", {"beta": 0.9, "ns_steps": 6}),
  )
  def test_matches_optax_contrib_muon(self, kwargs):
    missing = _optax_lacks(kwargs)
    if missing and _OPTAX < (0, 2, 8):  # on newer optax a missing option fails
      self.skipTest(f"optax {optax.__version__}'s muon has no {missing}")
    params = _params()
    grads = _grads(params, 30)
    ours = _trajectory(
      optax_orth.muon(0.02, muon_weight_dimension_numbers=DIMS, **kwargs), params, grads
    )
    theirs = _trajectory(
      optax.contrib.muon(0.02, muon_weight_dimension_numbers=DIMS, **kwargs),
      params,
      grads,
    )
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
      _assert_float32_close(a, b, f"step {step}")

  def test_matches_optax_on_2d_default_routing(self):
    params = {k: v for k, v in _params().items() if v.ndim <= 2}
    grads = _grads(params, 30)
    ours = _trajectory(optax_orth.muon(0.05), params, grads)
    theirs = _trajectory(optax.contrib.muon(0.05), params, grads)
    _assert_float32_close(ours[-1], theirs[-1])

  def test_matches_numpy_specification(self):
    rng = np.random.default_rng(3)
    k0 = (0.1 * rng.standard_normal((24, 40))).astype(np.float32)
    grads = [rng.standard_normal((24, 40)).astype(np.float32) for _ in range(20)]
    ours = _trajectory(
      optax_orth.muon(0.02, weight_decay=0.1), {"w": k0}, [{"w": g} for g in grads]
    )
    rule, k = ref.Muon(0.02, eps=1e-8, wd=0.1), k0.astype(np.float64)
    for step, g in enumerate(grads):
      k = rule.step(k, g.astype(np.float64))
      np.testing.assert_allclose(ours[step]["w"], k, rtol=1e-4, atol=1e-5)


class BehaviourTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit_agree(self):
    params = _params()
    grads = _grads(params, 4)
    tx = optax_orth.muon(0.02, muon_weight_dimension_numbers=DIMS)
    a = _trajectory(tx, params, grads, update=self.variant(tx.update))
    b = _trajectory(tx, params, grads)
    chex.assert_trees_all_close(a[-1], b[-1], rtol=1e-6, atol=1e-7)

  def test_schedule_is_evaluated_per_step(self):
    params = {"w": jnp.zeros((8, 12))}
    grads = _grads(params, 3)
    schedule = lambda count: 0.1 * (count + 1)
    tx = optax_orth.muon(schedule)
    state = tx.init(params)
    for step, g in enumerate(grads):
      u, state = tx.update(g, state, params)
      # One orthogonal update of an 8 x 12 matrix has spectral norm ~ lr * shape.
      ratio = float(jnp.linalg.norm(u["w"], 2)) / (0.1 * (step + 1) * np.sqrt(1.5))
      assert 0.6 < ratio < 1.3, ratio

  def test_schedule_matches_optax(self):
    params = _params()
    grads = _grads(params, 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, 10)
    ours = _trajectory(
      optax_orth.muon(schedule, muon_weight_dimension_numbers=DIMS), params, grads
    )
    theirs = _trajectory(
      optax.contrib.muon(schedule, muon_weight_dimension_numbers=DIMS), params, grads
    )
    _assert_float32_close(ours[-1], theirs[-1])

  def test_inject_hyperparams(self):
    """As optax.contrib.muon: no static_args needed; ns_steps arrives traced
    and runs as a loop of that length, a state edit included."""
    params = _params()
    grads = _grads(params, 3)
    tx = optax.inject_hyperparams(optax_orth.muon)(
      learning_rate=0.02, muon_weight_dimension_numbers=DIMS
    )
    plain = optax_orth.muon(0.02, muon_weight_dimension_numbers=DIMS)
    _assert_float32_close(
      _trajectory(tx, params, grads)[-1], _trajectory(plain, params, grads)[-1]
    )
    state = tx.init(params)
    state.hyperparams["ns_steps"] = jnp.asarray(2)
    three = optax_orth.muon(0.02, ns_steps=2, muon_weight_dimension_numbers=DIMS)
    u, _ = jax.jit(tx.update)(grads[0], state, params)
    u_three, _ = three.update(grads[0], three.init(params), params)
    _assert_float32_close(u, u_three)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u, _ = jax.jit(tx.update)(grads[0], state, params)
    assert all(not np.any(x) for x in jax.tree.leaves(u))
    # Several distinct rows need a static count, and say so.
    rows = optax.inject_hyperparams(optax_orth.muon)(
      0.02, ns_coeffs="dion", muon_weight_dimension_numbers=DIMS
    )
    with self.assertRaisesRegex(ValueError, "static_args=\\('ns_steps',\\)"):
      jax.jit(rows.update)(grads[0], rows.init(params), params)
    fixed = optax.inject_hyperparams(optax_orth.muon, static_args=("ns_steps",))(
      0.02, ns_coeffs="dion", muon_weight_dimension_numbers=DIMS
    )
    jax.jit(fixed.update)(grads[0], fixed.init(params), params)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_gradient_is_a_zero_update(self):
    params = _params()
    matrices = {k: v for k, v in params.items() if k != "bias"}
    for tx, p in (
      (optax_orth.muon(0.02, muon_weight_dimension_numbers=DIMS), params),
      # eps = 0 in Newton-Schulz alone (Adam needs its eps against 0 / 0).
      (
        optax_orth.orthogonalize_momentum(
          eps=0.0, weight_dimension_numbers={k: DIMS[k] for k in matrices}
        ),
        matrices,
      ),
    ):
      zeros = jax.tree.map(jnp.zeros_like, p)
      u, _ = self.variant(tx.update)(zeros, tx.init(p), p)
      for x in jax.tree.leaves(u):
        assert np.all(np.isfinite(x)) and not np.any(x)

  def test_custom_orthogonalizer(self):
    params = {
      "w": jnp.asarray(np.random.default_rng(0).standard_normal((6, 9)), jnp.float32)
    }
    tx = optax_orth.muon(
      1.0, orthogonalizer=optax_orth.polar_svd, nesterov=False, beta=0.0
    )
    u, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_allclose(
      -u["w"] / np.sqrt(1.5), ref.polar(params["w"]), atol=1e-5
    )

  def test_bfloat16_parameters(self):
    params = {"w": jnp.ones((8, 16), jnp.bfloat16)}
    tx = optax_orth.muon(0.02)
    u, _state = tx.update(params, tx.init(params), params)
    assert u["w"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(u["w"], np.float32)))


class ErrorsTest(parameterized.TestCase):
  def test_rank_one_leaf_in_orthogonal_branch(self):
    params = {"layer": {"bias": jnp.zeros(4)}}
    tx = optax_orth.muon(0.1, muon_weight_dimension_numbers={"layer": {"bias": DN()}})
    with self.assertRaisesRegex(ValueError, r"layer/bias.*rank >= 2"):
      tx.init(params)

  @parameterized.named_parameters(
    ("overlap", DN(0, 0), "overlap"),
    ("out_of_range", DN(0, 3), "out of range"),
    ("repeated", DN((0, 0), 1), "repeats"),
    ("empty", DN((), 1), "empty"),
  )
  def test_bad_dimension_numbers(self, dims, message):
    params = {"w": jnp.zeros((2, 3, 4))}
    tx = optax_orth.muon(0.1, muon_weight_dimension_numbers={"w": dims})
    with self.assertRaisesRegex(ValueError, f"'w'.*{message}"):
      tx.init(params)

  def test_rank_three_without_dimension_numbers(self):
    tx = optax_orth.orthogonalize_momentum()
    with self.assertRaisesRegex(ValueError, "'w'.*MuonDimensionNumbers"):
      tx.init({"w": jnp.zeros((2, 3, 4))})

  @parameterized.parameters(
    ((3.0, 1.0),), (((1.0, 2.0, 3.0, 4.0),),), (np.zeros((2, 2, 3)),), ((),)
  )
  def test_bad_coefficient_shape(self, coeffs):
    with self.assertRaisesRegex(ValueError, "shape"):
      optax_orth.muon(0.1, ns_coeffs=coeffs)

  def test_more_rows_than_steps(self):
    with self.assertRaisesRegex(ValueError, "ns_steps"):
      optax_orth.muon(0.1, ns_coeffs=((3.0, -3.0, 1.0),) * 6, ns_steps=5)

  def test_unknown_preset(self):
    with self.assertRaisesRegex(ValueError, "preset"):
      optax_orth.muon(0.1, ns_coeffs="fastest")

  @parameterized.parameters(-0.1, 1.0, 1.5)
  def test_momentum_outside_unit_interval(self, beta):
    with self.assertRaisesRegex(ValueError, "beta"):
      optax_orth.muon(0.1, beta=beta)

  def test_negative_eps(self):
    with self.assertRaisesRegex(ValueError, "eps"):
      optax_orth.muon(0.1, eps=-1e-8)

  def test_integer_parameters(self):
    tx = optax_orth.muon(0.1)
    with self.assertRaisesRegex(ValueError, "'step'.*int32"):
      tx.init({"w": jnp.zeros((3, 3)), "step": jnp.zeros((), jnp.int32)})


if __name__ == "__main__":
  pytest.main([__file__])
