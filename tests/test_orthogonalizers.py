"""Newton–Schulz and the SVD polar factor."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import optax_orth
from optax_orth._src.orthogonalizers import PRESETS
from tests import reference_numpy as ref

SHAPES = [(16, 24), (24, 16), (20, 20), (3, 8, 12)]


def _well_conditioned(shape, seed=0, cond=50.0):
  """A matrix (stack) with singular values spread over [1/cond, 1]."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  u, _, vt = np.linalg.svd(x, full_matrices=False)
  s = np.geomspace(1.0, 1.0 / cond, min(shape[-2:]))
  return jnp.asarray((u * s) @ vt, jnp.float32)


class NewtonSchulzTest(chex.TestCase, parameterized.TestCase):
  @parameterized.product(preset=sorted(PRESETS), shape=SHAPES)
  def test_singular_values_inside_the_preset_band(self, preset, shape):
    x = _well_conditioned(shape)
    y = optax_orth.newton_schulz(x, preset)
    lo, hi = PRESETS[preset].band
    sv = np.linalg.svd(np.asarray(y, np.float64), compute_uv=False)
    assert lo <= sv.min() and sv.max() <= hi, (sv.min(), sv.max())
    # Same singular vectors as the exact polar factor: y^T p is symmetric PSD.
    p = np.asarray(optax_orth.polar_svd(x), np.float64)
    cross = np.swapaxes(p, -1, -2) @ np.asarray(y, np.float64)
    if shape[-2] > shape[-1]:
      cross = p @ np.swapaxes(np.asarray(y, np.float64), -1, -2)
    np.testing.assert_allclose(cross, np.swapaxes(cross, -1, -2), atol=2e-4)

  @parameterized.parameters(*SHAPES)
  def test_matches_numpy_reference(self, *shape):
    x = _well_conditioned(shape, seed=1)
    y = optax_orth.newton_schulz(x)
    flat = np.asarray(x).reshape((-1, *shape[-2:]))
    expected = np.stack([ref.ns(m) for m in flat]).reshape(shape)
    np.testing.assert_allclose(y, expected, atol=3e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_transpose_equivariance(self):
    x = _well_conditioned((3, 10, 17), seed=2)
    ns = self.variant(optax_orth.newton_schulz)
    np.testing.assert_allclose(
      ns(jnp.swapaxes(x, -1, -2)), jnp.swapaxes(ns(x), -1, -2), atol=5e-5
    )

  @parameterized.parameters(1e-4, 0.5, 3.0, 1e4)
  def test_scale_invariance(self, c):
    x = _well_conditioned((12, 20), seed=3)
    ns = lambda x: optax_orth.newton_schulz(x, eps=0.0)
    np.testing.assert_allclose(ns(c * x), ns(x), atol=5e-5)
    # With eps > 0, invariance holds while eps << ||cX||_F.
    if c >= 0.5:
      np.testing.assert_allclose(
        optax_orth.newton_schulz(c * x), optax_orth.newton_schulz(x), atol=5e-5
      )

  def test_stack_equals_per_matrix_loop(self):
    x = _well_conditioned((5, 12, 20), seed=4)
    loop = jnp.stack([optax_orth.newton_schulz(m) for m in x])
    np.testing.assert_allclose(optax_orth.newton_schulz(x), loop, atol=1e-6)

  def test_scan_equals_unroll(self):
    x = _well_conditioned((12, 20), seed=5)
    for preset in PRESETS:
      np.testing.assert_allclose(
        optax_orth.newton_schulz(x, preset, unroll=False),
        optax_orth.newton_schulz(x, preset),
        atol=1e-5,
      )

  def test_dtypes(self):
    x = _well_conditioned((12, 20), seed=6)
    y = optax_orth.newton_schulz(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    z = optax_orth.newton_schulz(x, dtype=jnp.bfloat16)
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(z, optax_orth.newton_schulz(x), atol=0.1)

  @parameterized.parameters("frobenius", "spectral", "aol", "schatten")
  def test_zero_matrix_maps_to_zero(self, preconditioning):
    for eps in (0.0, 1e-7):
      y = optax_orth.newton_schulz(
        jnp.zeros((2, 4, 6)), eps=eps, preconditioning=preconditioning
      )
      assert np.all(np.isfinite(y)) and not np.any(y)

  @parameterized.parameters("aol", "schatten", "spectral")
  def test_preconditioned_variants_orthogonalize(self, preconditioning):
    x = _well_conditioned((16, 24), seed=7, cond=20.0)
    y = optax_orth.newton_schulz(x, preconditioning=preconditioning)
    sv = np.linalg.svd(np.asarray(y), compute_uv=False)
    assert 0.6 < sv.min() and sv.max() < 1.25, sv

  def test_custom_rows_and_steps(self):
    x = _well_conditioned((8, 12), seed=8)
    rows = [(3.4445, -4.7750, 2.0315)] * 3
    np.testing.assert_allclose(
      optax_orth.newton_schulz(x, rows), optax_orth.newton_schulz(x, steps=3), atol=1e-6
    )
    # More steps than rows repeats the last row.
    np.testing.assert_allclose(
      optax_orth.newton_schulz(x, rows[:1], steps=4),
      optax_orth.newton_schulz(x, steps=4),
      atol=1e-6,
    )

  def test_errors(self):
    x = jnp.ones((4, 4))
    with pytest.raises(ValueError, match="rank >= 2"):
      optax_orth.newton_schulz(jnp.ones(4))
    with pytest.raises(ValueError, match="shape"):
      optax_orth.newton_schulz(x, [[1.0, 2.0]])
    with pytest.raises(ValueError, match="preset"):
      optax_orth.newton_schulz(x, "nope")
    with pytest.raises(ValueError, match="eps"):
      optax_orth.newton_schulz(x, eps=-1.0)
    with pytest.raises(ValueError, match="steps"):
      optax_orth.newton_schulz(x, steps=0)
    with pytest.raises(ValueError, match="finite"):
      optax_orth.newton_schulz(x, [[np.nan, 1.0, 1.0]])
    with pytest.raises(ValueError, match="floating"):
      optax_orth.newton_schulz(jnp.ones((3, 3), jnp.int32))


class PolarSvdTest(parameterized.TestCase):
  @parameterized.parameters(*SHAPES)
  def test_is_orthogonal_and_matches_numpy(self, *shape):
    x = _well_conditioned(shape, seed=9)
    p = np.asarray(optax_orth.polar_svd(x), np.float64)
    flat = np.asarray(x, np.float64).reshape((-1, *shape[-2:]))
    expected = np.stack([ref.polar(m) for m in flat]).reshape(shape)
    np.testing.assert_allclose(p, expected, atol=1e-5)

  def test_rank_deficient_is_a_partial_isometry(self):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3)) @ rng.standard_normal((3, 14))
    p = np.asarray(optax_orth.polar_svd(jnp.asarray(x, jnp.float32)), np.float64)
    sv = np.linalg.svd(p, compute_uv=False)
    np.testing.assert_allclose(sv[:3], 1.0, atol=1e-5)
    np.testing.assert_allclose(sv[3:], 0.0, atol=1e-5)
    assert not np.any(np.asarray(optax_orth.polar_svd(jnp.zeros((3, 5)))))


if __name__ == "__main__":
  pytest.main([__file__])
