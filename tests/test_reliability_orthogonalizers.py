"""Property-based tests (hypothesis) of the Newton–Schulz orthogonalizers.

Inputs: shapes from 1 x 1 to 256 x 512 in both orientations and batched,
scales from 1e-30 to 1e30, full-rank and rank-deficient matrices, the zero
matrix, float32 and bfloat16, every preset. Properties: the output is finite;
at full rank its singular values lie in the preset's band; ``NS(cX) = NS(X)``
for ``c > 0``; ``NS(X.T) = NS(X).T``; ``NS(QXR) = Q NS(X) R`` for orthogonal
``Q, R``. See ``docs/reliability.md`` for the table of what is checked where.

The examples are derandomized (profile ``optax_orth_ci``) so that CI is
deterministic; set ``OPTAX_ORTH_HYPOTHESIS_PROFILE=optax_orth_explore`` to
search with fresh random examples locally.
"""

from __future__ import annotations

import functools
import os

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import optax_orth
from optax_orth._src.orthogonalizers import PRESETS

settings.register_profile(
  "optax_orth_ci",
  derandomize=True,
  deadline=None,
  database=None,
  suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
  "optax_orth_explore",
  derandomize=False,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow],
)
_PROFILE = settings.get_profile(
  os.environ.get("OPTAX_ORTH_HYPOTHESIS_PROFILE", "optax_orth_ci")
)


def _settings(max_examples: int):
  return settings(_PROFILE, max_examples=max_examples)


PRESET_NAMES = sorted(PRESETS)
# Small dimensions most of the time; the 256 x 512 cases come from @example.
DIMS = st.sampled_from([1, 2, 5, 16])
BATCH = st.sampled_from([(), (), (2,)])
SEED = st.integers(0, 2**31 - 1)
# Float32 rounding of the input and of five steps moves the singular values
# by about 1e-5 relative; bfloat16 by a few 1e-2 (8-bit significand).
BAND_TOL = {"float32": 2e-3, "bfloat16": 0.08}

# Singular values at least this multiple of ||X||_F reach the band (see
# optax_orth._src.orthogonalizers.NewtonSchulzPreset); our inputs keep a 1.5x margin.
BAND_FLOOR = 3e-3


def _ns(coeffs, eps, preconditioning="frobenius", method="auto"):
  # Eager (not jitted): JAX caches each operation per shape, so the presets
  # and options share one compilation per shape and the tests stay fast.
  return functools.partial(
    optax_orth.newton_schulz,
    coeffs=coeffs,
    eps=eps,
    preconditioning=preconditioning,
    method=method,
  )


def _orthogonal(rng, n):
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))


def _matrix(shape, seed, rank=None, floor=None):
  """A float64 stack with chosen rank and singular values in [floor, 1].

  ``floor`` defaults to the smallest value whose singular values are all at
  least ``1.5 * BAND_FLOOR * ||X||_F``.
  """
  rng = np.random.default_rng(seed)
  *batch, m, n = shape
  k = min(m, n)
  rank = k if rank is None else rank
  if floor is None:
    floor = min(1.0, 1.5 * BAND_FLOOR * np.sqrt(max(rank, 1)))
  out = np.zeros(shape)
  for idx in np.ndindex(*batch):
    s = np.zeros(k)
    s[:rank] = np.exp(rng.uniform(np.log(floor), 0.0, rank))
    u, v = _orthogonal(rng, m)[:, :k], _orthogonal(rng, n)[:, :k]
    out[idx] = (u * s) @ v.T
  return out


def _singular_values(y):
  return np.linalg.svd(np.asarray(y, np.float64), compute_uv=False)


def _assert_finite(y):
  y = np.asarray(y, np.float32)
  assert np.all(np.isfinite(y)), "non-finite output"


@st.composite
def shapes(draw):
  return (*draw(BATCH), draw(DIMS), draw(DIMS))


BIG = [(256, 512), (512, 256), (2, 64, 128)]


# ---------------------------------------------------------------------------
# Finite output and the band.


@_settings(25)
@given(
  shape=shapes(),
  seed=SEED,
  exponent=st.integers(-30, 30),
  preset=st.sampled_from(PRESET_NAMES),
  preconditioning=st.sampled_from(["frobenius", "spectral", "schatten"]),
  use_eps=st.booleans(),
  dtype=st.sampled_from(["float32", "float32", "bfloat16"]),
)
@example(BIG[0], 0, 30, "standard", "frobenius", True, "float32")
@example(BIG[1], 1, -30, "polar_express", "frobenius", False, "float32")
@example(BIG[2], 2, 0, "dion", "frobenius", True, "bfloat16")
@example(BIG[0], 3, -30, "standard", "schatten", False, "bfloat16")
def test_full_rank_output_is_finite_and_in_the_band(
  shape, seed, exponent, preset, preconditioning, use_eps, dtype
):
  """At full rank, scale 1e-30..1e30: every singular value in the band."""
  scale = 10.0**exponent
  # eps only shifts the band while eps << ||cX||_F; it is 0 for small scales.
  eps = 1e-7 if use_eps and exponent >= -2 else 0.0
  x = jnp.asarray(scale * _matrix(shape, seed), dtype)
  assert np.all(np.isfinite(np.asarray(x, np.float32)))
  y = _ns(preset, eps, preconditioning)(x)
  assert y.shape == x.shape and y.dtype == x.dtype
  _assert_finite(y)
  lo, hi = PRESETS[preset].band
  sv = _singular_values(y)
  tol = BAND_TOL[dtype]
  assert sv.min() >= lo - tol and sv.max() <= hi + tol, (sv.min(), sv.max())


@_settings(20)
@given(
  shape=shapes(),
  seed=SEED,
  exponent=st.integers(-30, 30),
  rank_fraction=st.floats(0.0, 0.99),
  preset=st.sampled_from(PRESET_NAMES),
  dtype=st.sampled_from(["float32", "bfloat16"]),
)
@example((256, 512), 4, 30, 0.5, "standard", "float32")
@example((512, 256), 5, -30, 0.1, "standard", "bfloat16")
def test_rank_deficient_keeps_the_null_space(
  shape, seed, exponent, rank_fraction, preset, dtype
):
  """Rank k: finite, k singular values in the band, the others ~0 (float32)."""
  k = min(shape[-2:])
  rank = int(rank_fraction * k)  # 0 <= rank < k (0: the zero matrix)
  x64 = 10.0**exponent * _matrix(shape, seed, rank=rank)
  y = _ns(preset, 0.0)(jnp.asarray(x64, dtype))
  _assert_finite(y)
  lo, hi = PRESETS[preset].band
  sv = _singular_values(y)
  tol = BAND_TOL[dtype]
  assert np.all(sv[..., :rank] >= lo - tol) and np.all(sv[..., :rank] <= hi + tol)
  if dtype == "float32":
    # NS(X) = p(X X^T) X: what X annihilates, NS(X) annihilates. The bound is
    # float32 rounding of X times the iterated polynomial's slope at 0 (the
    # product of the a's: ~500, ~1000 for polar_express). In bfloat16 the
    # rounding of X alone (2^-8 relative) already makes it full rank.
    assert np.all(sv[..., rank:] <= 2e-3), sv[..., rank:].max()


@_settings(10)
@given(
  shape=shapes(),
  preset=st.sampled_from(PRESET_NAMES),
  preconditioning=st.sampled_from(["frobenius", "spectral", "aol", "schatten"]),
  eps=st.sampled_from([0.0, 1e-7]),
  dtype=st.sampled_from(["float32", "bfloat16"]),
)
@example((256, 512), "standard", "frobenius", 0.0, "float32")
@example((3, 512, 256), "polar_express", "aol", 1e-7, "bfloat16")
def test_zero_matrix_maps_to_zero(shape, preset, preconditioning, eps, dtype):
  y = _ns(preset, eps, preconditioning)(jnp.zeros(shape, dtype))
  assert y.shape == shape and y.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0)


# ---------------------------------------------------------------------------
# Invariances.


@_settings(20)
@given(
  shape=shapes(),
  seed=SEED,
  exponent=st.integers(-30, 30),
  preset=st.sampled_from(PRESET_NAMES),
  preconditioning=st.sampled_from(["frobenius", "spectral", "aol", "schatten"]),
)
@example((256, 512), 6, 30, "standard", "frobenius")
@example((512, 256), 7, -30, "dion", "aol")
def test_scale_invariance(shape, seed, exponent, preset, preconditioning):
  """NS(cX) = NS(X) for c = 10^k, k in [-30, 30] (eps = 0)."""
  x64 = _matrix(shape, seed, floor=1e-2)
  ns = _ns(preset, 0.0, preconditioning)
  base = ns(jnp.asarray(x64, jnp.float32))
  scaled = ns(jnp.asarray(10.0**exponent * x64, jnp.float32))
  _assert_finite(scaled)
  # The only difference is the float32 rounding of c X.
  np.testing.assert_allclose(scaled, base, atol=5e-5)


@_settings(15)
@given(
  shape=shapes(),
  seed=SEED,
  power=st.integers(-90, 90),
  preset=st.sampled_from(PRESET_NAMES),
  dtype=st.sampled_from(["float32", "bfloat16"]),
)
@example((256, 512), 8, 90, "standard", "float32")
@example((2, 64, 128), 9, -90, "polar_express", "bfloat16")
def test_power_of_two_scale_is_bit_exact(shape, seed, power, preset, dtype):
  """NS(2^k X) == NS(X) bit for bit (eps = 0): scaling by 2^k is exact."""
  x = jnp.asarray(_matrix(shape, seed, floor=1e-2), dtype)
  ns = _ns(preset, 0.0)
  np.testing.assert_array_equal(
    np.asarray(ns(x * jnp.asarray(2.0**power, dtype)), np.float32),
    np.asarray(ns(x), np.float32),
  )


@_settings(15)
@given(
  shape=shapes(),
  seed=SEED,
  exponent=st.integers(-30, 30),
  preset=st.sampled_from(PRESET_NAMES),
  dtype=st.sampled_from(["float32", "bfloat16"]),
)
@example((256, 512), 10, 30, "standard", "float32")
@example((3, 16, 16), 11, 0, "standard", "bfloat16")
def test_transpose_equivariance(shape, seed, exponent, preset, dtype):
  """NS(X.T) = NS(X).T: bit for bit when not square (same computation)."""
  x = jnp.asarray(10.0**exponent * _matrix(shape, seed, floor=1e-2), dtype)
  ns = _ns(preset, 0.0)
  y = np.asarray(ns(x), np.float32)
  yt = np.asarray(ns(jnp.swapaxes(x, -1, -2)), np.float32)
  _assert_finite(y)
  if shape[-1] != shape[-2]:
    np.testing.assert_array_equal(yt, np.swapaxes(y, -1, -2))
  else:  # X X^T against X^T X: equal up to rounding.
    atol = {"float32": 5e-5, "bfloat16": 0.1}[dtype]
    np.testing.assert_allclose(yt, np.swapaxes(y, -1, -2), atol=atol)


@_settings(20)
@given(
  shape=shapes(),
  seed=SEED,
  exponent=st.integers(-30, 30),
  preset=st.sampled_from(PRESET_NAMES),
  preconditioning=st.sampled_from(["frobenius", "spectral", "schatten"]),
  method=st.sampled_from(["plain", "gram"]),
)
@example((256, 512), 12, 30, "standard", "frobenius", "gram")
@example((512, 256), 13, -30, "polar_express", "frobenius", "plain")
def test_orthogonal_equivariance(
  shape, seed, exponent, preset, preconditioning, method
):
  """NS(Q X R) = Q NS(X) R for orthogonal Q (m x m) and R (n x n)."""
  rng = np.random.default_rng(seed + 1)
  m, n = shape[-2:]
  q, r = _orthogonal(rng, m), _orthogonal(rng, n)
  x64 = 10.0**exponent * _matrix(shape, seed, floor=1e-2)
  ns = _ns(preset, 0.0, preconditioning, method)
  y = np.asarray(ns(jnp.asarray(x64, jnp.float32)), np.float64)
  rotated = np.asarray(ns(jnp.asarray(q @ x64 @ r, jnp.float32)), np.float64)
  _assert_finite(rotated)
  np.testing.assert_allclose(rotated, q @ y @ r, atol=2e-4)


# ---------------------------------------------------------------------------
# Regression tests for the defects these properties found.


@pytest.mark.parametrize(
  "preconditioning", ["frobenius", "spectral", "aol", "schatten"]
)
@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e30, 3e37])
def test_regression_extreme_scales_are_orthogonalized(preconditioning, scale):
  """Before the fix: ||X||_F^2 overflowed (1e20, 1e30: zero or NaN output)
  or underflowed (1e-30, eps = 0: the output stayed ~1e-27)."""
  x = _matrix((8, 12), 0, floor=0.1)
  x = x / np.abs(x).max()
  y = _ns("standard", 0.0, preconditioning)(jnp.asarray(scale * x, jnp.float32))
  ref = _ns("standard", 0.0, preconditioning)(jnp.asarray(x, jnp.float32))
  _assert_finite(y)
  np.testing.assert_allclose(y, ref, atol=5e-5)


def test_regression_float16_norm_does_not_overflow():
  """Before the fix: ||X||_F^2 > 65504 overflowed float16 (zero output)."""
  x = np.full((64, 128), 0.9) + 0.1 * _matrix((64, 128), 1, floor=0.5)
  y = optax_orth.newton_schulz(jnp.asarray(x, jnp.float16))
  assert y.dtype == jnp.float16
  _assert_finite(y)
  assert 0.5 < np.abs(_singular_values(y)).max() < 1.3
