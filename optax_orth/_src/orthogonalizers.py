r"""Orthogonalizers: maps from a (batch of) matrices to their polar factors.

An orthogonalizer is any function ``f(x) -> y`` that takes an array of shape
``(..., m, n)`` and returns an array of the same shape and dtype whose trailing
matrices approximate the polar factor ``U V^H`` of ``x = U S V^H``. The
transformations in :mod:`optax_orth.transforms` accept any such function, so
users can plug in their own.

**Gram form.** Each Newton–Schulz step factor ``P_k = a I + b R_k + c R_k^2``
is a polynomial in ``R_0 = X_0 X_0^H``, so

.. math::
  X_k = Q_k X_0, \quad Q_{k+1} = P_k Q_k, \quad R_{k+1} = P_k R_k P_k,

and ``X`` (``r x c``, ``r <= c``) is touched twice per segment (``R_0 = X
X^H`` and ``X <- Q X``) instead of twice per step: ``4 r^2 c`` per segment
plus ``8 r^3`` per step (less ``6 r^3`` per segment), against ``4 r^2 c + 2
r^3`` per plain step. Every ``restart`` steps the segment ends, ``X`` and
``R`` are re-formed from scratch and ``Q`` is reset, which bounds the growth
of rounding errors in ``R`` and ``Q``.

**Low precision.** With a bfloat16 or float16 compute dtype, ``X`` is stored
and every product reads its operands in that dtype, but products accumulate
in float32 (``preferred_element_type``) and everything else is float32: the
``r x r`` matrices ``A``, ``R``, ``P``, ``Q``, the coefficients (never rounded
to bfloat16) and the axpy ``a X + B X``. The normalization is computed from
the input before it is rounded. This is the product that runs at a CPU's or
GPU's bfloat16 rate, and the iteration is as accurate as bfloat16 storage of
``X`` allows.

**Complex inputs** use conjugate transposes throughout (``A = X X^H``) and
converge to the unitary polar factor, as ``optax.contrib.muon`` does.

**Invariances.** The iteration commutes with transposition, so ``NS(X.T) ==
NS(X).T``, and the normalization makes it invariant to scaling ``X`` by a
positive constant (up to ``eps``). A zero matrix maps to zero. The
normalization first scales each matrix by a power of two (exactly, with
``eps`` scaled to match), so it neither overflows nor underflows for any
finite input.

References:
  Jordan et al., `Muon: An optimizer for hidden layers in neural networks
  <https://kellerjordan.github.io/posts/muon/>`_, 2024.
  Amsel et al., `The Polar Express: Optimal Matrix Sign Methods and Their
  Application to the Muon Algorithm <https://arxiv.org/abs/2505.16932>`_, 2025.
  Ahn et al., `Dion: Distributed Orthonormalized Updates
  <https://arxiv.org/abs/2504.05295>`_, 2025.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_orth._src import validation

Orthogonalizer = Callable[[jax.Array], jax.Array]
Preconditioning = Literal["frobenius", "spectral", "aol", "schatten"]
Method = Literal["auto", "plain", "gram"]
CoeffsLike = str | Sequence[float] | Sequence[Sequence[float]] | np.ndarray


class NewtonSchulzPreset(NamedTuple):
  """Coefficient rows ``(a, b, c)`` of a Newton–Schulz preset, one per step.

  Attributes:
    coeffs: ``(n, 3)`` rows. A preset with one row repeats it for every step.
    safety: the Frobenius normalization is ``X / (||X||_F * safety + eps)``.
    band: ``(lo, hi)``, the interval that the output's singular values lie in
      after the preset's default number of steps, for every input singular
      value of at least ``3e-3 * ||X||_F`` (computed by iterating the scalar
      polynomial; smaller singular values have not yet reached it).
    steps: the default number of steps.
  """

  coeffs: tuple[tuple[float, float, float], ...]
  safety: float
  band: tuple[float, float]
  steps: int


PRESETS: dict[str, NewtonSchulzPreset] = {
  # Jordan (2024), modded-nanogpt; the coefficients of every reference here.
  "standard": NewtonSchulzPreset(
    coeffs=((3.4445, -4.7750, 2.0315),), safety=1.0, band=(0.675, 1.21), steps=5
  ),
  # Ahn et al. (2025), Dion.
  "dion": NewtonSchulzPreset(
    coeffs=(
      (4.0848, -6.8946, 2.9270),
      (3.9505, -6.3029, 2.6377),
      (3.7418, -5.5913, 2.3037),
      (2.8769, -3.1427, 1.2046),
      (2.8366, -3.0525, 1.2012),
    ),
    safety=1.0,
    band=(0.97, 1.15),
    steps=5,
  ),
  # Amsel et al. (2025), The Polar Express, as used in modded-nanogpt.
  "polar_express": NewtonSchulzPreset(
    coeffs=(
      (8.156554524902461, -22.48329292557795, 15.878769915207462),
      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
    safety=1.02,
    band=(0.84, 1.15),
    steps=5,
  ),
}


def resolve_coeffs(
  coeffs: CoeffsLike, steps: int | None = None
) -> tuple[np.ndarray, float]:
  """Returns the ``(steps, 3)`` coefficient rows and the safety factor.

  A preset name or a single row ``(a, b, c)`` is repeated for ``steps`` steps
  (default: the preset's). With an ``(n, 3)`` array, ``steps=None`` runs the
  ``n`` rows; ``steps < n`` runs the first ``steps`` rows and ``steps > n``
  repeats the last row.

  Raises:
    ValueError: for an unknown preset, rows that are not of shape ``(3,)`` or
      ``(n, 3)`` with ``n >= 1``, non-finite coefficients, or ``steps`` that
      is not a positive int (``2.5`` is refused, not truncated).
  """
  safety = 1.0
  default_steps = None
  if isinstance(coeffs, str):
    if coeffs not in PRESETS:
      raise ValueError(
        f"Unknown Newton-Schulz preset ns_coeffs={coeffs!r}; "
        f"choose one of {sorted(PRESETS)} or pass rows (a, b, c)."
      )
    preset = PRESETS[coeffs]
    rows = np.asarray(preset.coeffs, dtype=np.float64)
    safety, default_steps = preset.safety, preset.steps
  else:
    rows = np.asarray(coeffs, dtype=np.float64)
    if rows.ndim == 1:
      rows = rows[None]
    if rows.ndim != 2 or rows.shape[-1] != 3 or rows.shape[0] < 1:
      raise ValueError(
        "Newton-Schulz coefficients must have shape (3,) or (n, 3) with "
        f"n >= 1; got shape {np.shape(coeffs)}."
      )
    if not np.all(np.isfinite(rows)):
      raise ValueError(f"Newton-Schulz coefficients must be finite; got {rows}.")
    default_steps = 5 if rows.shape[0] == 1 else rows.shape[0]
  if steps is None:
    assert default_steps is not None  # every preset and every row array has one
    n = default_steps
  else:
    validation.check_positive_int("ns_steps", steps)
    n = int(steps)
  if n <= rows.shape[0]:
    rows = rows[:n]
  else:
    rows = np.concatenate([rows, np.repeat(rows[-1:], n - rows.shape[0], 0)])
  return rows, safety


def _traced_steps(coeffs: CoeffsLike, steps):
  """``(steps, traced)``: a traced step count (``optax.inject_hyperparams``)
  is returned as ``traced``, with ``steps=1`` to resolve the one coefficient row
  it repeats; several distinct rows need a static count."""
  steps, traced = validation.static_or_traced_int("ns_steps", steps)
  if traced is None:
    return steps, None
  rows = np.unique(resolve_coeffs(coeffs)[0], axis=0)
  if len(rows) > 1:
    raise ValueError(
      f"ns_steps arrived traced (optax.inject_hyperparams passes numbers as "
      f"arrays), but ns_coeffs={coeffs!r} has {len(rows)} distinct rows, which "
      "need a static count: pass static_args=('ns_steps',) to inject_hyperparams."
    )
  return 1, traced


def _check_eps(eps) -> None:
  validation.check_non_negative("eps", eps)


def _check_options(preconditioning, method, restart, eps, dtype) -> None:
  if preconditioning not in ("frobenius", "spectral", "aol", "schatten"):
    raise ValueError(f"Unknown preconditioning={preconditioning!r}.")
  _check_method(method, restart)
  _check_eps(eps)
  validation.check_float_dtype("dtype", dtype)


# ---------------------------------------------------------------------------
# Products: operands in the compute dtype, accumulation in the carry dtype.


class _Arith(NamedTuple):
  """How the iteration computes.

  ``operand``: the dtype that ``X`` is stored in and that every product
  reads. ``carry``: the dtype that products accumulate into and that the
  ``r x r`` Gram-side matrices, the coefficients and every axpy use. For
  bfloat16 and float16 the carry is float32 (the products run at the
  low-precision rate with float32 accumulation, and the coefficients stay
  exact); otherwise it is the compute dtype itself.
  """

  operand: jnp.dtype
  carry: jnp.dtype

  @property
  def low_precision(self) -> bool:
    return self.operand != self.carry


def _arith(in_dtype, dtype) -> _Arith:
  compute = jnp.dtype(dtype) if dtype is not None else jnp.dtype(in_dtype)
  if jnp.issubdtype(in_dtype, jnp.complexfloating) != jnp.issubdtype(
    compute, jnp.complexfloating
  ):
    raise ValueError(
      f"newton_schulz computes complex inputs in a complex dtype and real inputs "
      f"in a real one; got an input of {jnp.dtype(in_dtype).name} and "
      f"dtype={compute.name}."
    )
  if compute.itemsize == 2:  # bfloat16, float16
    return _Arith(compute, jnp.dtype(jnp.float32))
  return _Arith(compute, compute)


def _dot(a: jax.Array, b: jax.Array, arith: _Arith, adjoint_b: bool = False):
  """``a @ b`` (or ``a @ b^H``) over the leading batch axes.

  Both operands are read in ``arith.operand`` and the product accumulates in
  ``arith.carry`` (``preferred_element_type``): for bfloat16 this is the
  product that runs at the machine's bfloat16 rate. ``b^H`` is contracted on
  its last axis directly, so no transposed copy is formed.
  """
  a, b = a.astype(arith.operand), b.astype(arith.operand)
  batch = tuple(range(a.ndim - 2))
  contract_b = b.ndim - 1 if adjoint_b else b.ndim - 2
  if adjoint_b:
    b = jnp.conj(b)
  dims = (((a.ndim - 1,), (contract_b,)), (batch, batch))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=arith.carry)


def _mirror(top: jax.Array, bottom_right: jax.Array, h: int) -> jax.Array:
  """Assembles a Hermitian matrix from its top rows and bottom-right block."""
  bottom_left = jnp.conj(jnp.swapaxes(top[..., :, h:], -1, -2))
  return jnp.concatenate([top, jnp.concatenate([bottom_left, bottom_right], -1)], -2)


class _Sym(NamedTuple):
  """Which products are formed from their upper half (see ``symmetric``)."""

  gram: bool  # X X^H, Hermitian in any arithmetic
  products: bool  # A^2 and the r x r Gram-form products, Hermitian in exact one


def _resolve_symmetric(symmetric: bool | None, low_precision: bool) -> _Sym:
  if symmetric is None:
    return _Sym(gram=low_precision, products=False)
  return _Sym(bool(symmetric), bool(symmetric))


def _product(a, b, arith: _Arith, symmetric: bool = False) -> jax.Array:
  """``a @ b``; with ``symmetric``, for a product known to be Hermitian.

  The symmetric form computes the top ``h = n // 2`` rows and the
  bottom-right block (3/4 of the FLOPs) and mirrors the bottom-left block.
  """
  h = a.shape[-2] // 2
  if not symmetric or h == 0:
    return _dot(a, b, arith)
  top = _dot(a[..., :h, :], b, arith)
  return _mirror(top, _dot(a[..., h:, :], b[..., :, h:], arith), h)


def _gram(x: jax.Array, arith: _Arith, symmetric: bool = False) -> jax.Array:
  """``X X^H`` in the carry dtype (from its upper half with ``symmetric``)."""
  h = x.shape[-2] // 2
  if not symmetric or h == 0:
    return _dot(x, x, arith, adjoint_b=True)
  top = _dot(x[..., :h, :], x, arith, adjoint_b=True)
  bottom_right = _dot(x[..., h:, :], x[..., h:, :], arith, adjoint_b=True)
  return _mirror(top, bottom_right, h)


# ---------------------------------------------------------------------------
# Normalization.


def _safe_divide(x: jax.Array, denom: jax.Array) -> jax.Array:
  return x / jnp.where(denom > 0, denom, 1).astype(x.dtype)


def _safe_rsqrt(x: jax.Array) -> jax.Array:
  """``1 / sqrt(x)``, and 0 where ``x == 0`` (a zero row or matrix stays zero)."""
  return jnp.where(x > 0, jax.lax.rsqrt(jnp.where(x > 0, x, 1)), 0).astype(x.dtype)


def _power_of_two_scale(x: jax.Array) -> jax.Array:
  """Per trailing matrix, a power of two ``s`` with ``max |s x|`` in ``[0.5, 1)``.

  Multiplying by a power of two is exact, so normalizing ``s x`` with ``eps``
  scaled by ``s`` gives the same bits as normalizing ``x``, but the squares
  that the norms sum no longer overflow (``|x| > ~1e19`` in float32) or
  underflow (``|x| < ~1e-19``). Float32, shape ``(..., 1, 1)``; 1 for a zero
  or non-finite matrix; clipped so that ``s`` is a normal number of both
  float32 and ``x.dtype``.
  """
  amax = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  return power_of_two_from_amax(amax, x.dtype)


def power_of_two_from_amax(amax: jax.Array, dtype) -> jax.Array:
  """The scale of :func:`_power_of_two_scale` from ``max |x|`` per matrix."""
  _, e = jnp.frexp(
    amax.astype(jnp.float32)
  )  # amax = m 2^e, m in [0.5, 1); e = 0 for 0, inf, nan
  info = jnp.finfo(dtype)
  e = jnp.clip(e, max(1 - info.maxexp, -127), min(-info.minexp, 126))
  return jax.lax.bitcast_convert_type((127 - e) << 23, jnp.float32)  # 2^-e


def _normalize(x, preconditioning, eps, safety, arith: _Arith, symmetric: _Sym):
  r"""The first stage: ``X / (||X|| \cdot safety + eps)``, or a preconditioning.

  ``x`` is first scaled by a power of two ``s`` (exact; ``eps`` scaled to
  match), so that the norms neither overflow nor underflow. The norm is taken
  in the wider of float32 and ``x``'s dtype, before ``x`` is rounded to the
  operand dtype, and the division and the rounding are one elementwise pass.

  Returns ``(x, first)``: ``x`` in the operand dtype, and for ``"aol"`` and
  ``"schatten"`` ``first = (x, A)``, the rescaled ``x`` and its Gram matrix
  ``A = X X^H`` (carry dtype) that the first step uses; else ``None``.
  """
  wide = jnp.promote_types(x.dtype, jnp.float32)
  scale = _power_of_two_scale(x)
  if preconditioning in ("frobenius", "spectral"):
    scaled = x.astype(wide) * scale.astype(wide)
    if preconditioning == "frobenius":
      norm = jnp.linalg.norm(scaled, axis=(-2, -1), keepdims=True)
    else:
      norm = jnp.linalg.norm(scaled, ord=2, axis=(-2, -1))[..., None, None]
    denom = norm * safety + eps * scale
    if not arith.low_precision:
      return _safe_divide(scaled, denom).astype(arith.operand), None
    # x * (s / denom), with s / denom one scalar per matrix: a single pass
    # over x (the scaled copy is then read by the norm alone, and XLA fuses
    # it into the reduction instead of writing it out).
    inv = jnp.where(denom > 0, scale / jnp.where(denom > 0, denom, 1), 0)
    return (x.astype(wide) * inv.astype(wide)).astype(arith.operand), None
  x = (x.astype(wide) * scale.astype(wide)).astype(arith.operand)
  a = _gram(x, arith, symmetric.gram)
  real = jnp.finfo(arith.carry).dtype
  scaled_eps = (eps * scale * scale).astype(real)
  if preconditioning == "aol":
    # Boissin et al. (2025): row scaling s_i = (sum_j |A_ij|)^(-1/2).
    s = _safe_rsqrt(jnp.maximum(jnp.abs(a).sum(-1, keepdims=True), scaled_eps))
    a = a * s * jnp.swapaxes(s, -1, -2)
  else:
    # Grishina et al. (2025): scale by ||X X^H||_F^(-1/2) = ||X||_{S4}^(-1).
    s = jnp.linalg.norm(a, axis=(-2, -1), keepdims=True)
    s = _safe_rsqrt(jnp.maximum(s, scaled_eps))
    a = a * (s * s)
  x = (x.astype(arith.carry) * s).astype(arith.operand)
  return x, (x, a)


# ---------------------------------------------------------------------------
# The iterations.


def _ns_step(x, a, row, arith: _Arith, symmetric: _Sym) -> jax.Array:
  r"""One quintic step ``a_0 X + (a_1 A + a_2 A^2) X`` with ``A = X X^H``.

  ``A`` and the result are in the carry dtype; the coefficients multiply
  carry-dtype values, so they are never rounded to the operand dtype.
  """
  b = row[1] * a + row[2] * _product(a, a, arith, symmetric.products)
  return row[0] * x.astype(arith.carry) + _dot(b, x, arith)


def _plain(x, rows, first, arith: _Arith, unroll: bool, symmetric: _Sym, count=None):
  """The plain iteration; ``X`` is rounded to the operand dtype between steps.

  With a traced ``count``, ``rows[0]`` runs ``count`` times in a loop.
  """
  n, row0 = len(rows), rows[0]
  if first is not None:
    x = _ns_step(first[0], first[1], rows[0], arith, symmetric)
    rows, n = rows[1:], n - 1
    if n or count is not None:
      x = x.astype(arith.operand)

  def step(x, row, last=False):
    y = _ns_step(x, _gram(x, arith, symmetric.gram), row, arith, symmetric)
    return y if last else y.astype(arith.operand)

  if count is not None:
    left = count - (first is not None)
    return jax.lax.fori_loop(0, left, lambda _, x: step(x, row0), x)
  if unroll or n <= 1:
    for i in range(n):
      x = step(x, rows[i], last=i == n - 1)
  else:
    x, _ = jax.lax.scan(lambda x, row: (step(x, row), None), x, rows[:-1])
    x = step(x, rows[-1], last=True)
  return x


def _poly(r: jax.Array, row, arith: _Arith, symmetric: _Sym) -> jax.Array:
  """``p(R) = a I + b R + c R^2`` for a Hermitian ``R`` (one product)."""
  eye = jnp.eye(r.shape[-1], dtype=r.dtype)
  return (row[1] * r + row[2] * _product(r, r, arith, symmetric.products)) + (
    row[0] * eye
  )


def _gram_segment(x, r, rows, arith: _Arith, unroll: bool, symmetric: _Sym):
  """Runs ``len(rows)`` Newton–Schulz steps on the Gram matrix ``r = x x^H``.

  With ``P_k = p_k(R_k)`` (every matrix here is a polynomial in ``R_0``, so all
  of them are Hermitian and commute): ``Q <- P_k Q``, ``R_{k+1} = P_k R_k
  P_k``, and at the end ``x <- Q x``. ``R``, ``P`` and ``Q`` stay in the carry
  dtype; the products read them in the operand dtype.
  """

  def mm(a, b):
    return _product(a, b, arith, symmetric.products)

  p = _poly(r, rows[0], arith, symmetric)
  q = p

  def body(carry, row):
    r, p, q = carry
    r = mm(mm(p, r), p)
    p = _poly(r, row, arith, symmetric)
    return (r, p, mm(p, q)), None

  if unroll:
    for i in range(1, len(rows)):
      (r, p, q), _ = body((r, p, q), rows[i])
  elif len(rows) > 1:
    (r, p, q), _ = jax.lax.scan(body, (r, p, q), rows[1:])
  return _dot(q, x, arith)


def _gram_iteration(x, rows, first, restart, arith, unroll, symmetric):
  """The Gram form in segments of ``restart`` steps, ``X`` re-formed between."""
  for start in range(0, len(rows), restart):
    if start:
      x = x.astype(arith.operand)
    if start == 0 and first is not None:
      x, r = first
    else:
      r = _gram(x, arith, symmetric.gram)
    x = _gram_segment(x, r, rows[start : start + restart], arith, unroll, symmetric)
  return x


def _gram_saves_work(r: int, c: int, rows: int, restart: int, symmetric: _Sym) -> bool:
  pre = "frobenius"
  plain = sum(_count_flops(r, c, rows, "plain", restart, pre, symmetric))
  return sum(_count_flops(r, c, rows, "gram", restart, pre, symmetric)) < plain


def _coefficient_rows(rows: np.ndarray, arith: _Arith, unroll: bool):
  """Python floats when unrolled (XLA folds them), else a carry-dtype array."""
  if unroll:
    return [tuple(float(v) for v in row) for row in rows]
  return jnp.asarray(rows, dtype=jnp.finfo(arith.carry).dtype)


def newton_schulz(
  x: jax.Array,
  coeffs: CoeffsLike = "standard",
  steps: int | None = None,
  eps: float = 1e-7,
  dtype: jax.typing.DTypeLike | None = None,
  *,
  safety: float | None = None,
  preconditioning: Preconditioning = "frobenius",
  unroll: bool = True,
  method: Method = "auto",
  restart: int | None = None,
  symmetric: bool | None = None,
) -> jax.Array:
  r"""Approximates the polar factor of each trailing matrix by Newton–Schulz.

  For ``X`` of shape ``(..., m, n)``, each matrix is transposed so that it has
  no more rows than columns (``r x c``, ``r <= c``), normalized,
  ``X <- X / (||X||_F * safety + eps)``, then iterated with one quintic step
  per coefficient row ``(a, b, c)``:

  .. math::
    A = X X^H, \qquad X \leftarrow a X + (b A + c A^2) X,

  with ``X^H`` the conjugate transpose (complex inputs are supported).
  ``method="plain"`` runs exactly that, ``4 r^2 c + 2 r^3`` FLOPs a step;
  ``method="gram"`` the same iteration on the ``r x r`` Gram matrix (see the
  module docstring), equal in exact arithmetic; ``method="auto"`` (default)
  the Gram form where :func:`newton_schulz_flops` counts fewer FLOPs for it
  (about ``c > 1.5 r`` at 5 steps). A bfloat16 ``dtype`` reads products in
  bfloat16 and does everything else, coefficients included, in float32.

  ``NS(X.T) == NS(X).T``; scaling ``X`` by ``s > 0`` leaves the result
  unchanged (up to ``eps``); zero maps to zero, a zero-size array to itself,
  and no finite input overflows (see the module docstring).

  Args:
    x: array of shape ``(..., m, n)``, real or complex; leading axes batch.
    coeffs: a preset name (``"standard"``, ``"dion"``, ``"polar_express"``), a
      row ``(a, b, c)`` repeated for every step, or ``(n, 3)`` rows.
    steps: a positive int, combined with ``coeffs`` as in
      :func:`resolve_coeffs` (``None``: the preset's 5, or the number of rows).
    eps: non-negative term added to the normalizing denominator.
    dtype: compute dtype (``None``: ``x``'s; complex for complex ``x``).
      ``jnp.bfloat16`` is the usual choice on accelerators and pays on CPUs
      with bfloat16 matrix units (``docs/benchmarks.md``).
    safety: overrides the preset's safety factor.
    preconditioning: ``"frobenius"`` (default), ``"spectral"`` (divide by the
      largest singular value, computed exactly; costly), ``"aol"`` or
      ``"schatten"`` (rescalings folded into the first step, as
      ``optax.contrib.muon`` offers them).
    unroll: unroll the steps in Python, or run them in a ``lax.scan``
      (``False``: compile time and live set stay small for many steps).
    method: ``"auto"``, ``"plain"`` or ``"gram"`` (see above).
    restart: Gram steps per segment (``None``: by the compute dtype, 3 in
      float32, 5 in float64, 2 in bfloat16 and float16). Unused by the plain
      method.
    symmetric: compute the products known to be Hermitian (``X X^H``,
      ``A^2``, and in the Gram form every ``r x r`` product) from their upper
      half, 3/4 of their FLOPs, and mirror the rest. ``None`` (default): only
      ``X X^H``, and only for a bfloat16 or float16 compute dtype, where it
      was measured faster (see ``docs/benchmarks.md``).

  Returns:
    The orthogonalized array, same shape and dtype as ``x``.

  Raises:
    ValueError: for an array of rank < 2 or not inexact, a compute dtype that
      is not inexact or mixes real and complex with ``x``, an unknown
      preconditioning or method, ``restart < 1``, ``eps < 0``, or ``steps``
      not a positive int.

  References: see the module docstring.
  """
  if x.ndim < 2:
    raise ValueError(
      f"newton_schulz needs an array of rank >= 2 (..., m, n); got shape {x.shape}."
    )
  _check_options(preconditioning, method, restart, eps, dtype)
  steps, traced = _traced_steps(coeffs, steps)
  rows, preset_safety = resolve_coeffs(coeffs, steps)
  safety = preset_safety if safety is None else safety
  in_dtype = x.dtype
  if not jnp.issubdtype(in_dtype, jnp.inexact):
    raise ValueError(f"newton_schulz needs a floating-point array; got {in_dtype}.")
  arith = _arith(in_dtype, dtype)
  if x.size == 0:
    return jnp.zeros(x.shape, in_dtype)
  sym = _resolve_symmetric(symmetric, arith.low_precision)
  if traced is not None:  # one row, repeated a traced number of times
    method = "plain"
  return _iterate(
    x,
    rows,
    safety,
    eps,
    arith,
    sym,
    unroll,
    traced_steps=traced,
    preconditioning=preconditioning,
    method=method,
    restart=restart,
  ).astype(in_dtype)


def _iterate(
  x,
  rows,
  safety,
  eps,
  arith: _Arith,
  symmetric: _Sym,
  unroll: bool,
  *,
  preconditioning: str,
  method: str,
  restart: int | None,
  traced_steps: jax.Array | np.ndarray | None = None,
) -> jax.Array:
  """The validated :func:`newton_schulz`: transposition, normalization, steps."""
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = _transpose(x, arith)
  r_dim, c_dim = x.shape[-2:]
  if restart is None:
    restart = default_restart(arith.operand)
  if method == "auto":
    gram_wins = _gram_saves_work(r_dim, c_dim, len(rows), restart, symmetric)
    method = "gram" if gram_wins else "plain"
  x, first = _normalize(x, preconditioning, eps, safety, arith, symmetric)
  coeff_rows = _coefficient_rows(rows, arith, unroll)
  if method == "gram":
    x = _gram_iteration(x, coeff_rows, first, restart, arith, unroll, symmetric)
  else:
    x = _plain(x, coeff_rows, first, arith, unroll, symmetric, traced_steps)
  return _transpose(x, arith) if transposed else x


def _transpose(x: jax.Array, arith: _Arith) -> jax.Array:
  """Swaps the last two axes, as a copy of its own for a low-precision dtype."""
  if arith.low_precision:
    return materialized_transpose(x)
  return jnp.swapaxes(x, -1, -2)


def materialized_transpose(x: jax.Array) -> jax.Array:
  """Swaps the last two axes as a copy that XLA cannot fold into a dot.

  XLA folds a transpose into the dot that reads or produces it. On CPU a
  bfloat16 dot with float32 accumulation and such folded dimensions has no
  kernel (``UNIMPLEMENTED: ... BF16 x BF16 = F32``), so the transposes around
  a low-precision Newton–Schulz are kept apart from the dots on either side.
  """
  barrier = jax.lax.optimization_barrier
  return barrier(jnp.swapaxes(barrier(x), -1, -2))


def polar_svd(x: jax.Array, rtol: float | None = None) -> jax.Array:
  r"""The exact polar factor of each trailing matrix, via the SVD.

  For ``X = U S V^H`` returns ``U \,\mathrm{diag}(s_i > \tau)\, V^H``
  with ``tau = rtol * max_i s_i``: the partial isometry that Newton–Schulz
  converges to (zero singular values stay zero, so the zero matrix maps to
  zero; a zero-size array maps to itself). Complex inputs give the unitary
  polar factor. Computed in float32 (or float64 where enabled; complex64 or
  complex128 for complex inputs) and returned in the dtype of ``x``.

  Args:
    x: array of shape ``(..., m, n)``.
    rtol: relative threshold below which singular values count as zero.
      Defaults to ``max(m, n) * finfo(float32).eps``.

  Returns:
    The polar factor, same shape and dtype as ``x``.
  """
  if x.ndim < 2:
    raise ValueError(f"polar_svd needs an array of rank >= 2; got shape {x.shape}.")
  in_dtype = x.dtype
  if x.size == 0:
    return jnp.zeros(x.shape, in_dtype)
  compute = jnp.promote_types(in_dtype, jnp.float32)
  u, s, vt = jnp.linalg.svd(x.astype(compute), full_matrices=False)
  if rtol is None:
    rtol = max(x.shape[-2:]) * float(jnp.finfo(jnp.float32).eps)
  keep = s > rtol * jnp.max(s, axis=-1, keepdims=True)
  return ((u * keep[..., None, :].astype(compute)) @ vt).astype(in_dtype)


def make_newton_schulz(
  coeffs: CoeffsLike = "standard",
  steps: int | None = None,
  eps: float = 1e-7,
  dtype: jax.typing.DTypeLike | None = None,
  **kwargs,
) -> Orthogonalizer:
  """Binds the options of :func:`newton_schulz` into an orthogonalizer.

  The coefficients, ``steps``, ``eps``, ``dtype`` (inexact or ``None``),
  ``method``, ``restart`` and ``preconditioning`` are validated here, at
  construction, not at trace time.

  Args:
    coeffs: a preset name or coefficient rows, as in :func:`newton_schulz`.
    steps: Newton–Schulz steps (``None``: the preset's or all rows).
    eps: non-negative normalization epsilon.
    dtype: compute dtype (``None``: the input's).
    **kwargs: further options of :func:`newton_schulz` (``method``,
      ``restart``, ``preconditioning``, ``symmetric``, ``unroll``, ``safety``).

  Returns:
    A function from ``(..., m, n)`` arrays to their orthogonalized arrays.
  """
  resolve_coeffs(coeffs, _traced_steps(coeffs, steps)[0])
  _check_options(
    kwargs.get("preconditioning", "frobenius"),
    kwargs.get("method", "auto"),
    kwargs.get("restart"),
    eps,
    dtype,
  )
  return functools.partial(
    newton_schulz, coeffs=coeffs, steps=steps, eps=eps, dtype=dtype, **kwargs
  )


# ---------------------------------------------------------------------------
# Gram restarts and FLOP counts.

#: Default Gram steps per restart segment, per compute dtype (measured: see
#: ``docs/benchmarks.md``). Other dtypes use the float32 value.
GRAM_RESTART: dict[str, int] = {"float32": 3, "float64": 5, "bfloat16": 2, "float16": 2}


def default_restart(dtype: jax.typing.DTypeLike) -> int:
  """The default Gram restart period for a compute dtype."""
  return GRAM_RESTART.get(jnp.dtype(dtype).name, GRAM_RESTART["float32"])


def _check_method(method, restart) -> None:
  if method not in ("auto", "plain", "gram"):
    raise ValueError(
      f"Unknown Newton-Schulz method={method!r}; choose 'auto', 'plain' or 'gram'."
    )
  if restart is not None and (not isinstance(restart, int) or restart < 1):
    raise ValueError(
      f"restart must be a positive int or None; got restart={restart!r}."
    )


class NewtonSchulzFlops(NamedTuple):
  """FLOPs of one :func:`newton_schulz` call, see :func:`newton_schulz_flops`."""

  matmul: int
  elementwise: int

  @property
  def total(self) -> int:
    return self.matmul + self.elementwise


def _product_flops(r: int, k: int, symmetric: bool) -> int:
  """FLOPs of an ``(r, k) @ (k, r)`` product, or of its symmetric half."""
  if not symmetric or r == 1:
    return 2 * r * k * r
  h = r // 2
  return 2 * h * k * r + 2 * (r - h) * k * (r - h)


def newton_schulz_flops(
  shape: Sequence[int],
  coeffs: CoeffsLike | int = "standard",
  steps: int | None = None,
  *,
  method: Method = "auto",
  restart: int | None = None,
  preconditioning: Preconditioning = "frobenius",
  symmetric: bool | None = None,
  dtype: jax.typing.DTypeLike = jnp.float32,
) -> NewtonSchulzFlops:
  """Exact FLOP count of :func:`newton_schulz` on an array of ``shape``.

  Counts what the implementation computes, per matrix ``r x c`` (``r <= c``
  after the transposition), times the batch size:

  * ``matmul``: every matrix product ``(m, k) @ (k, n)`` as ``2 m k n``
    (a symmetric half-product, ``symmetric=True``, as the two products it
    runs);
  * ``elementwise``: one FLOP per element per arithmetic operation on the
    ``r x c`` and ``r x r`` arrays: the normalization ``3 r c`` (square, sum,
    divide); per plain step ``3 r^2`` (``b A + c A^2``) and ``2 r c``
    (``a X + B X``); per Gram step ``4 r^2`` (``b R + c R^2 + a I``).
    Per-matrix scalar operations and the SVD of ``"spectral"`` are not
    counted.

  A plain step is ``4 r^2 c + 2 r^3`` matmul FLOPs. A Gram segment of ``m``
  steps is ``4 r^2 c + (8 m - 6) r^3``.

  Args:
    shape: ``(..., m, n)``.
    coeffs: as in :func:`newton_schulz`, or the number of steps.
    steps: as in :func:`newton_schulz`.
    method: ``"auto"`` (resolved as :func:`newton_schulz` does), ``"plain"``
      or ``"gram"``.
    restart: Gram steps per segment (``None``: the default for ``dtype``).
    preconditioning: as in :func:`newton_schulz`.
    symmetric: as in :func:`newton_schulz` (``None``: the default for
      ``dtype``).
    dtype: compute dtype; selects the defaults of ``restart`` and
      ``symmetric``.

  Returns:
    A :class:`NewtonSchulzFlops` (``matmul``, ``elementwise``, ``total``).
  """
  if len(shape) < 2:
    raise ValueError(f"shape must have rank >= 2; got {tuple(shape)}.")
  if preconditioning not in ("frobenius", "spectral", "aol", "schatten"):
    raise ValueError(f"Unknown preconditioning={preconditioning!r}.")
  _check_method(method, restart)
  n_steps = coeffs if isinstance(coeffs, int) else len(resolve_coeffs(coeffs, steps)[0])
  batch = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1
  r, c = sorted(int(d) for d in shape[-2:])
  if restart is None:
    restart = default_restart(dtype)
  low_precision = jnp.dtype(dtype).itemsize == 2  # bfloat16, float16
  sym = _resolve_symmetric(symmetric, low_precision)
  if method == "auto":
    method = "gram" if _gram_saves_work(r, c, n_steps, restart, sym) else "plain"
  mm, ew = _count_flops(r, c, n_steps, method, restart, preconditioning, sym)
  return NewtonSchulzFlops(matmul=batch * mm, elementwise=batch * ew)


def _count_flops(r, c, n_steps, method, restart, preconditioning, sym: _Sym):
  """``(matmul, elementwise)`` FLOPs for one ``r x c`` matrix (``r <= c``)."""
  xxt = _product_flops(r, c, sym.gram)  # X X^H
  rrr = _product_flops(r, r, sym.products)  # a Hermitian r x r product
  mm = ew = 0
  if preconditioning in ("frobenius", "spectral"):
    ew += 3 * r * c if preconditioning == "frobenius" else r * c
    pre_gram = False
  else:
    # A = X X^H; the scale (AOL: |A| summed per row, rsqrt; Schatten: ||A||_F);
    # X * s; A * s * s^T.
    mm += xxt
    ew += r * c + 4 * r * r + (r if preconditioning == "aol" else 0)
    pre_gram = True
  if method == "plain":
    for k in range(n_steps):
      if not (k == 0 and pre_gram):
        mm += xxt
      mm += rrr + 2 * r * r * c
      ew += 3 * r * r + 2 * r * c
  else:
    for start in range(0, n_steps, restart):
      m = min(restart, n_steps - start)
      if not (start == 0 and pre_gram):
        mm += xxt
      # m products R^2; per later step P R, (P R) P, P Q; then Q X.
      mm += m * rrr + (m - 1) * 3 * rrr + 2 * r * r * c
      ew += m * 4 * r * r
  return mm, ew
