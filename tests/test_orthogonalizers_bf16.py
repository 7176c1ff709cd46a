"""Tests of the bfloat16 path, complex inputs, zero-size inputs and argument errors
of the Newton–Schulz orthogonalizers.

The bfloat16 path is pinned against two references: the exact iteration (same
coefficients, NumPy float64), and a reference bfloat16 iteration that keeps the
coefficients exact, does the axpy in float32 and accumulates every product in
float32 (issue 14's reference). Complex inputs are checked against NumPy's
complex polar factor and against ``optax.contrib``'s own orthogonalizer.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib import _muon as optax_muon

from benchmarks.bench_bf16_accuracy import exact as exact_iteration
from benchmarks.bench_bf16_accuracy import reference_bf16
from optax_orth._src import orthogonalizers as orth

PRESETS = ("standard", "dion", "polar_express")
BF16 = jnp.bfloat16


def _rows(preset):
  rows, safety = orth.resolve_coeffs(preset)
  return [tuple(float(v) for v in row) for row in rows], safety


def _deviation(y, exact):
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))


@pytest.fixture(scope="module")
def gaussian():
  return np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)


@pytest.mark.parametrize("method", ["plain", "gram"])
@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_deviation_within_1p1x_of_reference(gaussian, preset, method):
  # Issue 14/17: the deviation from the exact iteration is at most 1.1x that
  # of the reference bfloat16 iteration, for every preset, plain and Gram.
  rows, safety = _rows(preset)
  exact = exact_iteration(gaussian, rows, safety)
  ref = _deviation(reference_bf16(gaussian, rows, safety), exact)
  y = orth.newton_schulz(jnp.asarray(gaussian), preset, dtype=BF16, method=method)
  assert y.dtype == jnp.float32
  assert _deviation(y, exact) <= 1.1 * ref, (_deviation(y, exact), ref)


def test_bf16_custom_rows_and_scan(gaussian):
  rows = [(3.0, -3.2, 1.2), (2.5, -2.0, 0.6), (1.875, -1.25, 0.375)]
  x = jnp.asarray(gaussian[:128, :512])
  exact = exact_iteration(x, rows, 1.0)
  ref = _deviation(reference_bf16(x, rows, 1.0), exact)
  for method in ("plain", "gram"):
    for unroll in (True, False):
      y = orth.newton_schulz(x, rows, dtype=BF16, method=method, unroll=unroll)
      assert _deviation(y, exact) <= 1.2 * ref, (method, unroll)


def test_bf16_coefficients_are_not_rounded():
  # One plain step from a tiny matrix: y = a x (the cubic terms vanish), so
  # the output is a itself, not bfloat16(a) = 3.4375: the axpy is float32.
  x = jnp.zeros((4, 16)).at[0, 0].set(1.0)
  for unroll in (True, False):
    y = orth.newton_schulz(
      x, [(3.4445, 0.0, 0.0)], 1, dtype=BF16, method="plain", unroll=unroll
    )
    np.testing.assert_allclose(float(y[0, 0]), 3.4445 / (1 + 1e-7), rtol=1e-6)
  # The Gram form builds Q = P_k ... P_0 in float32 from the exact
  # coefficients; the final product Q X reads Q as a bfloat16 operand.
  y = orth.newton_schulz(x, [(3.4445, 0.0, 0.0)], 1, dtype=BF16, method="gram")
  assert float(y[0, 0]) == float(jnp.asarray(3.4445, BF16))


@pytest.mark.parametrize("method", ["plain", "gram"])
@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_equals_f32_at_bf16_tolerance(preset, method):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 32, 96)), jnp.float32)
  f32 = orth.newton_schulz(x, preset, method=method)
  bf16 = orth.newton_schulz(x, preset, dtype=BF16, method=method)
  rel = jnp.linalg.norm(bf16 - f32, axis=(-2, -1)) / jnp.linalg.norm(f32, axis=(-2, -1))
  assert float(rel.max()) < 0.05, rel
  # Tall inputs and bfloat16 inputs: same result, dtype of the input.
  tall = orth.newton_schulz(jnp.swapaxes(x, 1, 2), preset, dtype=BF16, method=method)
  chex.assert_trees_all_close(tall, jnp.swapaxes(bf16, 1, 2), atol=1e-6)
  y = orth.newton_schulz(x.astype(BF16), preset, method=method)
  assert y.dtype == BF16
  chex.assert_trees_all_close(y.astype(jnp.float32), f32, atol=0.08)


def test_bf16_symmetric_options_agree():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 24, 80)), jnp.float32)
  default = orth.newton_schulz(x, dtype=BF16)
  for symmetric in (False, True):
    y = orth.newton_schulz(x, dtype=BF16, symmetric=symmetric)
    chex.assert_trees_all_close(y, default, atol=0.05)
  # The default mirrors only X X^H, which is Hermitian in any arithmetic.
  np.testing.assert_array_equal(
    default, orth.newton_schulz(x, dtype=BF16, symmetric=False)
  )
  full = orth.newton_schulz_flops(x.shape, symmetric=False, dtype=BF16).matmul
  half = orth.newton_schulz_flops(x.shape, dtype=BF16).matmul
  assert half < full
  assert (
    orth.newton_schulz_flops(x.shape).matmul
    == orth.newton_schulz_flops(x.shape, symmetric=False).matmul
  )


def test_bf16_products_accumulate_in_float32():
  hlo = (
    jax.jit(lambda x: orth.newton_schulz(x, dtype=BF16))
    .lower(jnp.ones((2, 16, 64)))
    .as_text()
  )
  dots = [line for line in hlo.splitlines() if "dot_general" in line and "=" in line]
  assert dots
  for line in dots:
    assert "bf16" in line.split("dot_general")[1], line  # operands
    assert "-> tensor<" in line and "xf32>" in line.split("->")[-1], line


@pytest.mark.parametrize("method", ["auto", "plain", "gram"])
@pytest.mark.parametrize("shape", [(256, 64), (2, 128, 32), (3, 2, 96, 32)])
def test_bf16_tall_runs_and_equals_the_transposed_wide(shape, method):
  # On CPU, XLA folded the transposes around a tall input into the dots, and
  # a bfloat16 x bfloat16 -> float32 dot with folded dimensions has no kernel
  # there (UNIMPLEMENTED ... DotThunk); the tall input must run, and give the
  # transpose of the wide result (bit for bit where the Gram form is used;
  # the plain form's float32 norm can round differently in the transposed
  # layout, a difference far below bfloat16's own, about 0.03 from float32).
  x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  ns = jax.jit(lambda x: orth.newton_schulz(x, dtype=BF16, method=method))
  tall = ns(jnp.asarray(x))
  wide = jnp.swapaxes(ns(jnp.asarray(np.swapaxes(x, -1, -2))), -1, -2)
  assert tall.shape == x.shape
  assert float(jnp.linalg.norm(tall - wide) / jnp.linalg.norm(wide)) < 0.01


@pytest.mark.parametrize("alias", ["muon", "namo", "namo_d", "normuon", "adamuon"])
def test_bf16_optimizers_on_stacked_tall_and_wide_leaves(alias):
  # A scan-stacked MLP: (layers, 4d, d) tall and (layers, d, 4d) wide kernels,
  # which crashed every optimizer with ns_dtype=bfloat16 on CPU before.
  import optax_orth

  rng = np.random.default_rng(0)
  shapes = {"fc": (3, 32, 128), "out": (3, 128, 32), "proj": (2, 96, 32)}
  params = {
    k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()
  }
  dims = optax_orth.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
  spec = {k: dims for k in shapes}
  kw = {
    "muon_weight_dimension_numbers"
    if alias == "muon"
    else "weight_dimension_numbers": spec
  }
  bf = getattr(optax_orth, alias)(0.02, ns_dtype=BF16, **kw)
  f32 = getattr(optax_orth, alias)(0.02, **kw)
  s_bf, s_32 = bf.init(params), f32.init(params)
  for _ in range(3):
    u_bf, s_bf = jax.jit(bf.update)(params, s_bf, params)
    u_32, s_32 = jax.jit(f32.update)(params, s_32, params)
  for k in shapes:
    assert bool(jnp.all(jnp.isfinite(u_bf[k]))), k
    err = jnp.linalg.norm(u_bf[k] - u_32[k]) / jnp.linalg.norm(u_32[k])
    assert float(err) < 0.05, (k, float(err))


def test_grouping_keeps_tall_and_wide_apart():
  # One call per shape and orientation: a transposed stack is not concatenated
  # with untransposed ones of the same shape (the copy measured slower).
  from optax_orth._src import transforms

  calls = []

  def orthogonalizer(x):
    calls.append(x.shape)
    return orth.newton_schulz(x)

  rng = np.random.default_rng(0)
  mats = [
    jnp.asarray(rng.standard_normal(s), jnp.float32)
    for s in [(1, 16, 64), (1, 64, 16), (2, 16, 64), (1, 64, 16)]
  ]
  out = transforms.orthogonalize_grouped(mats, orthogonalizer, None)
  assert sorted(calls) == [(2, 16, 64), (3, 16, 64)]
  for x, y in zip(mats, out, strict=True):
    chex.assert_trees_all_close(y, orth.newton_schulz(x), atol=1e-5)


# ---------------------------------------------------------------------------
# Complex inputs.


def _complex(shape, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(
    np.complex64
  )


def _numpy_polar(x):
  u, _, vh = np.linalg.svd(np.asarray(x, np.complex128), full_matrices=False)
  return u @ vh


@pytest.mark.parametrize("shape", [(6, 4), (8, 16), (2, 12, 30)])
def test_complex_converges_to_numpy_polar_factor(shape):
  # A well-conditioned complex matrix and the exactly converging quintic
  # (1.875, -1.25, 0.375) with many steps: the unitary polar factor U V^H.
  x = _complex(shape) + 3 * np.eye(*shape[-2:], dtype=np.complex64)
  for method in ("plain", "gram"):
    y = orth.newton_schulz(
      jnp.asarray(x), [(1.875, -1.25, 0.375)], steps=30, method=method
    )
    assert y.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(y), _numpy_polar(x), atol=2e-4)
  np.testing.assert_allclose(
    np.asarray(orth.polar_svd(jnp.asarray(x))), _numpy_polar(x), atol=2e-5
  )


@pytest.mark.parametrize("preconditioning", ["frobenius", "spectral", "aol"])
def test_complex_matches_optax_orthogonalizer(preconditioning):
  x = _complex((12, 20), seed=3)
  coeffs = jnp.asarray((3.4445, -4.7750, 2.0315))
  theirs = optax_muon.orthogonalize_via_newton_schulz(
    jnp.asarray(x), coeffs, 5, preconditioning=preconditioning, eps=1e-8
  )
  for method, symmetric in (("plain", False), ("gram", False), ("gram", True)):
    ours = orth.newton_schulz(
      jnp.asarray(x),
      preconditioning=preconditioning,
      eps=1e-8,
      method=method,
      symmetric=symmetric,
    )
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=2e-4)
  tall = orth.newton_schulz(jnp.asarray(x.T), eps=1e-8)
  np.testing.assert_allclose(
    np.asarray(tall), np.asarray(orth.newton_schulz(jnp.asarray(x), eps=1e-8)).T
  )


def test_complex_schatten_and_scan():
  x = jnp.asarray(_complex((10, 24), seed=4))
  y = orth.newton_schulz(x, "polar_express", preconditioning="schatten")
  s = np.linalg.svd(np.asarray(y), compute_uv=False)
  assert 0.5 < s.min() and s.max() < 1.3, s
  np.testing.assert_allclose(
    np.asarray(orth.polar_svd(y)), np.asarray(orth.polar_svd(x)), atol=1e-4
  )
  chex.assert_trees_all_close(
    orth.newton_schulz(x, "dion", unroll=False),
    orth.newton_schulz(x, "dion"),
    atol=1e-5,
  )


def test_complex_dtype_mismatch_raises():
  x = jnp.asarray(_complex((4, 8)))
  with pytest.raises(ValueError, match="complex"):
    orth.newton_schulz(x, dtype=BF16)
  with pytest.raises(ValueError, match="complex"):
    orth.newton_schulz(jnp.ones((4, 8)), dtype=jnp.complex64)


# ---------------------------------------------------------------------------
# Zero-size inputs and argument errors.


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0, 0), (3, 0, 5), (0, 4, 6)])
@pytest.mark.parametrize("dtype", [None, BF16])
def test_zero_size_gives_zero_size(shape, dtype):
  x = jnp.ones(shape, jnp.float32)
  for method in ("auto", "plain", "gram"):
    y = jax.jit(orth.make_newton_schulz(dtype=dtype, method=method))(x)
    assert y.shape == shape and y.dtype == jnp.float32
  for pre in ("spectral", "aol", "schatten"):
    assert orth.newton_schulz(x, preconditioning=pre).shape == shape
  y = orth.polar_svd(x)
  assert y.shape == shape and y.dtype == jnp.float32


@pytest.mark.parametrize("steps", [2.5, 3.0, "3", True, 0, -1])
def test_steps_must_be_a_positive_int(steps):
  with pytest.raises(ValueError, match="ns_steps"):
    orth.newton_schulz(jnp.ones((4, 8)), steps=steps)
  with pytest.raises(ValueError, match="ns_steps"):
    orth.make_newton_schulz(steps=steps)


def test_steps_accepts_numpy_ints_and_integer_arrays():
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 8)), jnp.float32)
  ref = orth.newton_schulz(x, steps=3)
  np.testing.assert_array_equal(orth.newton_schulz(x, steps=np.int64(3)), ref)
  np.testing.assert_array_equal(orth.newton_schulz(x, steps=jnp.asarray(3)), ref)
  traced = jax.jit(lambda x, n: orth.newton_schulz(x, steps=n))(x, jnp.asarray(3))
  np.testing.assert_allclose(traced, ref, rtol=1e-6, atol=1e-6)
  for bad in (jnp.asarray(3.0), jnp.asarray([3]), jnp.asarray(0)):
    with pytest.raises(ValueError, match="ns_steps"):
      orth.newton_schulz(x, steps=bad)
  with pytest.raises(ValueError, match="static_args"):  # several rows
    jax.jit(lambda x, n: orth.newton_schulz(x, "dion", steps=n))(x, jnp.asarray(5))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, "not-a-dtype"])
def test_non_floating_dtype_raises_at_construction(dtype):
  with pytest.raises(ValueError, match="dtype"):
    orth.make_newton_schulz(dtype=dtype)
  with pytest.raises(ValueError, match="dtype"):
    orth.newton_schulz(jnp.ones((4, 8)), dtype=dtype)


def test_construction_checks_every_option():
  with pytest.raises(ValueError, match="eps"):
    orth.make_newton_schulz(eps=-1.0)
  with pytest.raises(ValueError, match="preconditioning"):
    orth.make_newton_schulz(preconditioning="qr")
  with pytest.raises(ValueError, match="method"):
    orth.make_newton_schulz(method="fast")
