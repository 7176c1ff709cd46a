"""Every input a user can pass: checked at construction, or handled exactly.

Each test backs a row of ``docs/reliability.md`` ("Inputs").
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from optax_orth._src.transforms import find_states
from tests import helpers as h

warnings.filterwarnings("ignore", category=optax_orth.RoutingWarning)

OPTIMIZERS = {n: functools.partial(h.make, n) for n in h.NAMES}
NAMES = h.NAMES


def _params(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"w": (8, 12), "v": (12, 8), "b": (12,)}
  return {
    k: jnp.asarray(0.1 * rng.standard_normal(s), dtype) for k, s in shapes.items()
  }


def _grads(scale=1.0, seed=1, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
    k: jnp.asarray(scale * rng.standard_normal(p.shape), dtype)
    for k, p in _params().items()
  }


# ---------------------------------------------------------------------------
# Hyperparameters, checked at construction with the argument's name.

COMMON_BAD = [
  ("learning_rate", float("nan")),
  ("learning_rate", float("inf")),
  ("learning_rate", -0.01),
  ("adam_b1", 1.0),
  ("adam_b2", 1.0),
  ("adam_b2", 1.5),
  ("adam_b1", -0.1),
  ("weight_decay", -0.1),
  ("weight_decay", float("nan")),
  ("mu_dtype", jnp.int32),
  ("ns_dtype", jnp.int32),
  ("ns_steps", 2.5),
  ("ns_steps", 0),
  ("adam_learning_rate", float("nan")),
]
SPECIFIC_BAD = {
  "muon": [("consistent_rms", -0.2), ("consistent_rms", 0.0), ("eps", -1.0)],
  "namo": [("adam_eps", -1.0), ("b2", 1.0), ("clamp", -0.5), ("scale_coeff", -1)],
  "namo_d": [("adam_eps", -1.0), ("b1", 1.0), ("eps", -1e-8)],
  "normuon": [("target_rms", -0.2), ("target_rms", 0.0), ("adam_eps", -1.0)],
  "adamuon": [("target_rms", -0.2), ("b2", 1.0), ("eps", -1e-8), ("ns_eps", -1.0)],
}
CASES = [(n, a, v) for n in NAMES for a, v in COMMON_BAD + SPECIFIC_BAD[n]]


@pytest.mark.parametrize(("name", "arg", "value"), CASES)
def test_bad_hyperparameter_is_named_at_construction(name, arg, value):
  if name == "muon" and arg == "ns_steps":
    pytest.skip("muon's ns_steps is checked by its own test below")
  with pytest.raises(ValueError, match=arg):
    OPTIMIZERS[name](**{arg: value})


@pytest.mark.parametrize("steps", [2.5, 0, -1, True])
def test_muon_ns_steps_must_be_a_positive_int(steps):
  with pytest.raises(ValueError, match="ns_steps"):
    optax_orth.muon(0.02, ns_steps=steps)


def test_muon_multi_row_preset_with_fewer_steps_is_refused_as_in_optax():
  with pytest.raises(ValueError, match="ns_steps=3"):
    optax_orth.muon(0.02, ns_coeffs="dion", ns_steps=3)
  with pytest.raises(ValueError):
    optax.contrib.muon(0.02, ns_coeffs="dion", ns_steps=3).init({"w": jnp.ones((4, 6))})


BLOCKS_BAD = [
  (lambda: optax_orth.orthogonalize_momentum(beta=1.0), "beta"),
  (lambda: optax_orth.orthogonalize_momentum(ns_steps=2.5), "ns_steps"),
  (lambda: optax_orth.orthogonalize_momentum(mu_dtype=jnp.int32), "mu_dtype"),
  (lambda: optax_orth.orthogonalize_momentum(ns_dtype=jnp.int32), "ns_dtype"),
  (lambda: optax_orth.orthogonalize_momentum(eps=-1.0), "eps"),
  (lambda: optax_orth.scale_by_shape(consistent_rms=-0.2), "consistent_rms"),
  (lambda: optax_orth.scale_by_neuron_rms(b2=1.0), "b2"),
  (lambda: optax_orth.scale_by_neuron_rms(target_rms=-0.2), "target_rms"),
  (lambda: optax_orth.clamp_diagonal(-1.0), "c"),
  (lambda: optax_orth._src.adam.scale_by_adam(b1=1.0), "b1"),
  (lambda: optax_orth._src.adam.scale_by_adam(eps_root=-1.0), "eps_root"),
]


@pytest.mark.parametrize(("make", "arg"), BLOCKS_BAD)
def test_bad_block_argument_is_named(make, arg):
  with pytest.raises(ValueError, match=arg):
    make()


@pytest.mark.parametrize("value", [float("nan"), -1.0])
def test_norm_adaptive_bad_arguments(value):
  direction = optax_orth.orthogonalize_momentum(statistics=True)
  for arg in ("learning_rate", "b2", "weight_decay", "eps"):
    with pytest.raises(ValueError, match=arg):
      kwargs = {"learning_rate": 0.01, arg: value}
      optax_orth.scale_by_norm_adaptive(direction, **kwargs)


def test_schedules_and_traced_values_are_not_inspected():
  schedule = optax.linear_schedule(-1.0, 1.0, 10)  # the user's choice
  for name in NAMES:
    OPTIMIZERS[name](learning_rate=schedule)
  tx = optax.inject_hyperparams(optax_orth.namo)(learning_rate=0.01)
  params = _params()
  tx.update(_grads(), tx.init(params), params)


# ---------------------------------------------------------------------------
# Zero-size leaves, and zero, tiny and huge gradients.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(0, 8), (8, 0)])
def test_zero_size_matrix_leaf_gives_a_zero_size_update(name, shape):
  params = dict(_params(), z=jnp.zeros(shape))
  if name == "muon":
    tx = optax_orth.muon(0.02)
  else:
    spec = optax_orth.route_by_path({"z": DN()})
    tx = OPTIMIZERS[name](weight_dimension_numbers=spec)
  grads = dict(_grads(), z=jnp.zeros(shape))
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert updates["z"].shape == shape
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(updates))


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
def test_extreme_gradients_give_finite_updates_and_state(name, scale):
  tx = OPTIMIZERS[name]()
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(3):
    updates, state = update(_grads(scale, seed=t), state, params)
    assert _finite(updates), f"step {t}"
    assert _finite(state), f"step {t}"


@pytest.mark.parametrize("name", NAMES)
def test_adam_leaf_trains_again_after_a_huge_gradient(name):
  """optax.adamw's second moment overflows to inf at |g| = 1e30 and the leaf
  never moves again; the fallback's stays finite and decays back by sqrt(b2)
  a step, so the leaf keeps moving (slowly at first, as Adam does after a
  large gradient)."""
  tx = OPTIMIZERS[name]()
  b2 = 0.999 if name == "muon" else 0.95
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update(_grads(1e30), state, params)
  (adam_state,) = find_states(state, optax_orth.ScaleByAdamState)
  for t in range(20):
    updates, state = update(_grads(1.0, seed=t), state, params)
    (new,) = find_states(state, optax_orth.ScaleByAdamState)
    assert float(jnp.min(jnp.abs(updates["b"]))) > 0
    ratio = np.asarray(new.rms["b"]) / np.asarray(adam_state.rms["b"])
    np.testing.assert_allclose(ratio, np.sqrt(b2), rtol=1e-5)
    adam_state = new
  adam = optax.adam(1e-2)
  s = adam.init(params)
  _, s = adam.update(_grads(1e30), s, params)
  u, _ = adam.update(_grads(1.0), s, params)
  assert float(jnp.max(jnp.abs(u["b"]))) == 0.0  # optax's behaviour, for the record


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"nesterov": True},
    {"eps_root": 1e-8, "weight_decay": 0.1},
    {"b1": 0.5, "b2": 0.9, "mu_dtype": jnp.bfloat16},
  ],
)
def test_adam_fallback_equals_optax_adamw(kwargs):
  params = _params()
  ours, theirs = optax_orth._src.adam.adamw(1e-2, **kwargs), optax.adamw(1e-2, **kwargs)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  p_ours = p_theirs = params
  for t in range(30):
    g = _grads(10.0 ** ((t % 7) - 3), seed=t)
    u, s_ours = ours.update(g, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_theirs = theirs.update(g, s_theirs, p_theirs)
    p_theirs = optax.apply_updates(p_theirs, u)
  chex.assert_trees_all_close(p_ours, p_theirs, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(
    jax.tree.map(jnp.square, s_ours[0].rms), s_theirs[0].nu, rtol=1e-5
  )


# ---------------------------------------------------------------------------
# float64 and complex parameters.

_X64 = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np, optax_orth, warnings
  from optax_orth._src.transforms import find_states
  warnings.simplefilter("ignore")
  assert jax.config.jax_enable_x64
  rng = np.random.default_rng(0)
  b1, b2, eps = 0.95, 0.99, 1e-8
  cases = ((False, optax_orth.namo(0.01)), (True, optax_orth.namo_d(0.01, clamp=0.0)))
  for per_feature, tx in cases:
    params = {"w": jnp.asarray(rng.standard_normal((12, 20)))}
    state = tx.init(params)
    m = v = 0.0
    for t in range(1, 6):
      g = rng.standard_normal((12, 20)) * 10.0 ** rng.uniform(-3, 3)
      u, state = tx.update({"w": jnp.asarray(g)}, state, params)
      m = b1 * m + (1 - b1) * g
      mt = b1 * m + (1 - b1) * g
      axis = 1 if per_feature else None
      v = b2 * v + (1 - b2) * np.sum(g * g, axis=axis)
      corr = np.sqrt(1 - b2**t) / (1 - b1**t + 1e-12)
      d = corr * np.sqrt(np.sum(mt * mt, axis=axis)) / (np.sqrt(v) + eps)
    kind = optax_orth.ScaleByNormAdaptiveState
    (step,) = find_states(state, kind)
    got = np.asarray(step.step_size["w"]).reshape(-1)
    assert step.step_size["w"].dtype == jnp.float64
    assert u["w"].dtype == jnp.float64
    err = np.max(np.abs(got - np.reshape(d, -1)) / np.abs(d))
    # Far below float32's 6e-8: the statistics are not float32 values.
    assert err < 1e-12, err
  print("ok")
  """
)


def test_float64_statistics_under_x64():
  env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-c", _X64], env=env, cwd=root, capture_output=True, text=True
  )
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def _complex_params(seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((8, 12)) + 1j * rng.standard_normal((8, 12))
  return {"w": jnp.asarray(w, jnp.complex64), "b": jnp.zeros(12, jnp.complex64)}


def test_complex_muon_matches_optax():
  params = _complex_params()
  ours, theirs = optax_orth.muon(0.02), optax.contrib.muon(0.02)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  for t in range(10):
    g = jax.tree.map(lambda x, t=t: x * (1 + 0.1 * t), _complex_params(seed=t + 1))
    u_ours, s_ours = ours.update(g, s_ours, params)
    u_theirs, s_theirs = theirs.update(g, s_theirs, params)
    chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["namo", "namo_d", "normuon"])
def test_complex_leaves_with_zero_imaginary_part_equal_the_real_computation(name):
  tx = OPTIMIZERS[name](weight_dimension_numbers=optax_orth.route_by_path({"w": DN()}))
  real = {
    "w": jnp.asarray(np.random.default_rng(0).standard_normal((8, 12)), jnp.float32)
  }
  cplx = jax.tree.map(lambda x: x.astype(jnp.complex64), real)
  s_r, s_c = tx.init(real), tx.init(cplx)
  for t in range(5):
    g = {
      "w": jnp.asarray(
        np.random.default_rng(t + 1).standard_normal((8, 12)), jnp.float32
      )
    }
    u_r, s_r = tx.update(g, s_r, real)
    u_c, s_c = tx.update(jax.tree.map(lambda x: x.astype(jnp.complex64), g), s_c, cplx)
    assert u_c["w"].dtype == jnp.complex64
    chex.assert_trees_all_close(u_c["w"].real, u_r["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(u_c["w"].imag), 0)


def test_complex_phase_rotation_is_equivariant_for_namo_d():
  """Multiplying the gradients and weights by e^{i phi} rotates the update."""
  tx = optax_orth.namo_d(weight_dimension_numbers=optax_orth.route_by_path({"w": DN()}))
  params = {"w": _complex_params()["w"]}
  rot = np.exp(0.7j).astype(np.complex64)
  s1, s2 = tx.init(params), tx.init(params)
  for t in range(4):
    g = {"w": _complex_params(seed=t + 1)["w"]}
    u1, s1 = tx.update(g, s1, params)
    u2, s2 = tx.update({"w": g["w"] * rot}, s2, {"w": params["w"] * rot})
    chex.assert_trees_all_close(u2["w"], u1["w"] * rot, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# optax.contrib.muon states carry over.


def test_optax_muon_state_continues_in_optax_orth_and_back():
  params = _params()
  theirs, ours = optax.contrib.muon(0.02), optax_orth.muon(0.02)
  state = theirs.init(params)
  for t in range(3):
    _, state = theirs.update(_grads(seed=t), state, params)
  converted = optax_orth.interop.muon_state_from_optax(state)
  chex.assert_trees_all_equal_structs(converted, ours.init(params))
  for t in range(3, 6):
    u_theirs, state = theirs.update(_grads(seed=t), state, params)
    u_ours, converted = ours.update(_grads(seed=t), converted, params)
    chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-5, atol=1e-6)
  back = optax_orth.interop.muon_state_to_optax(converted)
  chex.assert_trees_all_equal_structs(back, state)
  chex.assert_trees_all_close(back, state, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="muon state"):
    optax_orth.interop.muon_state_from_optax(optax.sgd(0.1).init(params))
