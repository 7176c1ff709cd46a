"""Tests of the fast orthogonalizer options: Gram Newton–Schulz, symmetric
products, preconditioning, loop form, compute dtype and the FLOP counter.

Every option is checked against the exact polar factor (``polar_svd``) and
against the plain iteration. Shapes are small; the speed claims live in
``benchmarks/bench_orthogonalize.py``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from optax_orth._src import orthogonalizers as orth


def _with_spectrum(seed, batch, r, c, s_min=0.05):
  """``U diag(s) V^T`` with ``s`` spaced geometrically from 1 down to s_min."""
  rng = np.random.default_rng(seed)
  u = np.linalg.qr(rng.standard_normal((batch, r, r)))[0]
  v = np.linalg.qr(rng.standard_normal((batch, c, r)))[0]
  s = np.geomspace(1.0, s_min, r)
  return jnp.asarray((u * s) @ np.swapaxes(v, 1, 2), jnp.float32)


def _polar_error(y, x):
  p = _polar(x)
  y = y.astype(jnp.float32)
  return np.asarray(
    jnp.linalg.norm(y - p, axis=(-2, -1)) / jnp.linalg.norm(p, axis=(-2, -1))
  )


def _sv(y):
  return np.asarray(jnp.linalg.svd(y.astype(jnp.float32), compute_uv=False))


PRESETS = ("standard", "dion", "polar_express")

_polar = jax.jit(orth.polar_svd)


class GramTest(parameterized.TestCase):
  @parameterized.product(preset=PRESETS, method=("plain", "gram"))
  def test_singular_values_in_band_and_vectors_exact(self, preset, method):
    # Every singular value is >= 3e-3 ||X||_F, so all reach the preset's band.
    x = _with_spectrum(0, 2, 24, 80)
    y = orth.newton_schulz(x, preset, method=method)
    lo, hi = orth.PRESETS[preset].band
    s = _sv(y)
    self.assertGreaterEqual(s.min(), lo)
    self.assertLessEqual(s.max(), hi)
    # The singular vectors are those of X: the polar factor of Y is X's.
    chex.assert_trees_all_close(_polar(y), _polar(x), atol=2e-4)

  @parameterized.parameters(*PRESETS)
  def test_gram_matches_plain_float32(self, preset):
    x = _with_spectrum(1, 3, 24, 80, s_min=1e-3)
    plain = orth.newton_schulz(x, preset, method="plain")
    for restart in (1, 2, 3):
      gram = orth.newton_schulz(x, preset, method="gram", restart=restart)
      chex.assert_trees_all_close(gram, plain, atol=1e-4, rtol=1e-4)
    # Tall and square inputs.
    tall = jnp.swapaxes(x, 1, 2)
    chex.assert_trees_all_close(
      orth.newton_schulz(tall, preset, method="gram"),
      jnp.swapaxes(plain, 1, 2),
      atol=1e-4,
      rtol=1e-4,
    )
    square = x[:, :, :24]
    chex.assert_trees_all_close(
      orth.newton_schulz(square, preset, method="gram"),
      orth.newton_schulz(square, preset, method="plain"),
      atol=1e-4,
      rtol=1e-4,
    )

  @parameterized.parameters("frobenius", "spectral", "aol", "schatten")
  def test_gram_matches_plain_each_preconditioning(self, preconditioning):
    x = _with_spectrum(2, 2, 20, 64)
    kw = dict(preconditioning=preconditioning)
    plain = orth.newton_schulz(x, "polar_express", method="plain", **kw)
    for restart in (2, 5):
      gram = orth.newton_schulz(
        x, "polar_express", method="gram", restart=restart, **kw
      )
      chex.assert_trees_all_close(gram, plain, atol=1e-4, rtol=1e-4)

  def test_gram_rank_deficient_and_zero(self):
    x = _with_spectrum(3, 2, 16, 48, s_min=1e-2)
    x = x.at[:, 8:].set(0.0)  # rank 8: half of the singular values are 0
    plain = orth.newton_schulz(x, method="plain")
    gram = orth.newton_schulz(x, method="gram")
    chex.assert_trees_all_close(gram, plain, atol=1e-4, rtol=1e-4)
    self.assertTrue(np.all(np.isfinite(gram)))
    zero = orth.newton_schulz(jnp.zeros((2, 8, 32)), method="gram")
    chex.assert_trees_all_equal(zero, jnp.zeros((2, 8, 32)))

  def test_gram_restart_bounds_drift_float32(self):
    # 10 steps: Q's entries grow like 3.4^10 for small singular values. With
    # the default restart the Gram form stays at the plain one's rounding
    # level; one long segment drifts (which is why float32 restarts).
    x = _with_spectrum(4, 2, 16, 64, s_min=1e-4)
    plain = orth.newton_schulz(x, steps=10, method="plain")
    gram = orth.newton_schulz(x, steps=10, method="gram")
    chex.assert_trees_all_close(gram, plain, atol=1e-4, rtol=1e-4)
    long = orth.newton_schulz(x, steps=10, method="gram", restart=10)
    drift = float(jnp.abs(long - plain).max())
    self.assertGreater(drift, float(jnp.abs(gram - plain).max()))

  @parameterized.parameters("standard", "polar_express")
  def test_gram_bfloat16_default_restart_as_accurate_as_plain(self, preset):
    x = _with_spectrum(5, 4, 32, 128, s_min=1e-2)
    plain = orth.newton_schulz(x, preset, dtype=jnp.bfloat16, method="plain")
    gram = orth.newton_schulz(x, preset, dtype=jnp.bfloat16, method="gram")
    self.assertEqual(gram.dtype, jnp.float32)
    err_plain, err_gram = _polar_error(plain, x), _polar_error(gram, x)
    self.assertLessEqual(err_gram.mean(), err_plain.mean() + 0.01)
    lo, hi = orth.PRESETS[preset].band
    s = _sv(gram)
    self.assertGreaterEqual(s.min(), lo - 0.05)
    self.assertLessEqual(s.max(), hi + 0.05)

  def test_gram_bfloat16_without_restart_diverges(self):
    # Why bfloat16 restarts: one 5-step segment loses the band.
    x = _with_spectrum(5, 4, 32, 128, s_min=1e-2)
    no_restart = orth.newton_schulz(
      x, "polar_express", dtype=jnp.bfloat16, method="gram", restart=5
    )
    restarted = orth.newton_schulz(
      x, "polar_express", dtype=jnp.bfloat16, method="gram"
    )
    self.assertGreater(_polar_error(no_restart, x).mean(), 0.5)
    self.assertLess(_polar_error(restarted, x).mean(), 0.2)

  def test_auto_picks_gram_for_wide_and_plain_for_square(self):
    def program(x, method):
      return str(jax.make_jaxpr(lambda x: orth.newton_schulz(x, method=method))(x))

    wide = jnp.ones((2, 16, 64))
    square = jnp.ones((2, 16, 16))
    self.assertEqual(program(wide, "auto"), program(wide, "gram"))
    self.assertNotEqual(program(wide, "auto"), program(wide, "plain"))
    self.assertEqual(program(square, "auto"), program(square, "plain"))
    tall = jnp.ones((2, 64, 16))
    self.assertEqual(program(tall, "auto"), program(tall, "gram"))

  def test_scan_matches_unroll(self):
    x = _with_spectrum(7, 2, 16, 48)
    for method in ("plain", "gram"):
      for restart in (2,):
        a = orth.newton_schulz(x, "dion", method=method, restart=restart)
        b = orth.newton_schulz(x, "dion", method=method, restart=restart, unroll=False)
        chex.assert_trees_all_close(a, b, atol=1e-5, rtol=1e-5)

  @parameterized.parameters("plain", "gram")
  def test_symmetric_products_match(self, method):
    r = 15  # odd: the halves differ in size
    x = _with_spectrum(8, 2, r, 40)
    full = orth.newton_schulz(x, "polar_express", method=method)
    half = orth.newton_schulz(x, "polar_express", method=method, symmetric=True)
    chex.assert_trees_all_close(half, full, atol=1e-4, rtol=1e-4)
    a = jax.random.normal(jax.random.PRNGKey(0), (3, r, r))
    a = a + jnp.swapaxes(a, 1, 2)
    f32 = orth._arith(jnp.float32, None)
    chex.assert_trees_all_close(
      orth._product(a, a, f32, symmetric=True), a @ a, atol=1e-5, rtol=1e-5
    )

  def test_aol_and_schatten_against_polar_svd(self):
    x = _with_spectrum(9, 2, 24, 80)
    lo, hi = orth.PRESETS["polar_express"].band
    for pre in ("schatten", "spectral"):
      # Scalar rescalings: the polar factor is X's, the band is the preset's.
      y = orth.newton_schulz(x, "polar_express", preconditioning=pre, method="gram")
      s = _sv(y)
      self.assertGreaterEqual(s.min(), lo)
      self.assertLessEqual(s.max(), hi)
      chex.assert_trees_all_close(_polar(y), _polar(x), atol=2e-4)
    # AOL rescales rows, X -> S X: its polar factor is that of S X, not X's.
    a = x @ jnp.swapaxes(x, 1, 2)
    sx = x * jax.lax.rsqrt(jnp.abs(a).sum(-1))[..., None]
    y = orth.newton_schulz(x, "polar_express", preconditioning="aol", method="gram")
    s = _sv(y)
    self.assertGreaterEqual(s.min(), lo)
    self.assertLessEqual(s.max(), hi)
    chex.assert_trees_all_close(_polar(y), _polar(sx), atol=2e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_make_newton_schulz_passes_options(self):
    x = _with_spectrum(10, 2, 16, 64)
    f = self.variant(orth.make_newton_schulz("dion", method="gram", restart=2))
    chex.assert_trees_all_close(
      f(x), orth.newton_schulz(x, "dion", method="plain"), atol=1e-4, rtol=1e-4
    )

  def test_bad_options(self):
    x = jnp.ones((4, 8))
    with self.assertRaisesRegex(ValueError, "method"):
      orth.newton_schulz(x, method="fast")
    with self.assertRaisesRegex(ValueError, "restart"):
      orth.newton_schulz(x, method="gram", restart=0)
    with self.assertRaisesRegex(ValueError, "restart"):
      orth.make_newton_schulz(restart=-1)
    with self.assertRaisesRegex(ValueError, "method"):
      orth.newton_schulz_flops((4, 8), method="svd")


class FlopCountTest(parameterized.TestCase):
  def test_plain_hand_count(self):
    # r=4, c=16, 5 steps, batch 2. Per step: X X^T 2*4*16*4 = 512, A A
    # 2*4^3 = 128, B X 2*4*4*16 = 512 -> 1152; elementwise 3 r^2 + 2 r c = 176.
    # Normalization 3 r c = 192.
    f = orth.newton_schulz_flops((2, 16, 4), "standard", method="plain")
    self.assertEqual(f.matmul, 2 * 5 * 1152)
    self.assertEqual(f.elementwise, 2 * (192 + 5 * 176))
    self.assertEqual(f.total, f.matmul + f.elementwise)

  def test_gram_hand_count(self):
    # r=4, c=16. One segment of 5 steps: X X^T 512, 5 x R^2 (128 each),
    # 4 x (P R, (P R) P, P Q) (3 x 128 each), Q X 512 -> 3200.
    f = orth.newton_schulz_flops((4, 16), 5, method="gram", restart=5)
    self.assertEqual(f.matmul, 512 + 5 * 128 + 4 * 3 * 128 + 512)
    self.assertEqual(f.elementwise, 192 + 5 * 4 * 16)
    # restart=2: segments of 2, 2, 1 steps.
    f = orth.newton_schulz_flops((4, 16), 5, method="gram", restart=2)
    seg = lambda m: 512 + m * 128 + (m - 1) * 3 * 128 + 512
    self.assertEqual(f.matmul, 2 * seg(2) + seg(1))

  def test_symmetric_and_preconditioned_hand_count(self):
    # Symmetric X X^T for r=5 (h=2): 2*2*16*5 + 2*3*16*3 = 320 + 288.
    f = orth.newton_schulz_flops((5, 16), 1, method="plain", symmetric=True)
    aa = 2 * 2 * 5 * 5 + 2 * 3 * 5 * 3
    self.assertEqual(f.matmul, 608 + aa + 2 * 5 * 5 * 16)
    # AOL: the first step's X X^T is the preconditioner's; none is added.
    f1 = orth.newton_schulz_flops((4, 16), 2, method="plain", preconditioning="aol")
    f0 = orth.newton_schulz_flops((4, 16), 2, method="plain")
    self.assertEqual(f1.matmul, f0.matmul)
    self.assertEqual(f1.elementwise - f0.elementwise, (64 + 64 + 4) - 3 * 64 + 0)

  def test_auto_resolves_like_newton_schulz(self):
    square = orth.newton_schulz_flops((64, 64), method="auto")
    self.assertEqual(square, orth.newton_schulz_flops((64, 64), method="plain"))
    wide = orth.newton_schulz_flops((64, 256), method="auto")
    self.assertEqual(wide, orth.newton_schulz_flops((64, 256), method="gram"))
    self.assertLess(
      wide.total, orth.newton_schulz_flops((64, 256), method="plain").total
    )

  @parameterized.product(method=("plain", "gram"), shape=((3, 32, 96), (2, 40, 40)))
  def test_matches_xla_cost_analysis(self, method, shape):
    x = jnp.ones(shape, jnp.float32)
    compiled = (
      jax.jit(lambda x: orth.newton_schulz(x, method=method)).lower(x).compile()
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if not cost or "flops" not in cost:
      pytest.skip("this backend reports no cost analysis")
    ours = orth.newton_schulz_flops(shape, method=method).total
    self.assertAlmostEqual(cost["flops"] / ours, 1.0, delta=0.01)
