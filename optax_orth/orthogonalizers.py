"""Orthogonalizers: maps from a (batch of) matrices to their polar factors.

An orthogonalizer is any function ``f(x) -> y`` that takes an array of shape
``(..., m, n)`` and returns an array of the same shape and dtype whose trailing
matrices approximate the polar factor ``U V^T`` of ``x = U S V^T``. The
transformations in :mod:`optax_orth.transforms` accept any such function, so
users can plug in their own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Orthogonalizer = Callable[[jax.Array], jax.Array]
Preconditioning = Literal["frobenius", "spectral", "aol", "schatten"]
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
      ``(n, 3)`` with ``n >= 1``, non-finite coefficients or ``steps < 1``.
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
    steps = default_steps
  steps = int(steps)
  if steps < 1:
    raise ValueError(f"Newton-Schulz steps must be >= 1; got ns_steps={steps}.")
  if steps <= rows.shape[0]:
    rows = rows[:steps]
  else:
    rows = np.concatenate([rows, np.repeat(rows[-1:], steps - rows.shape[0], 0)])
  return rows, safety


def _check_eps(eps) -> None:
  try:
    value = float(eps)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # A traced value (e.g. under inject_hyperparams) is not checked.
  if not value >= 0:
    raise ValueError(f"eps must be a non-negative number; got eps={eps}.")


def _ns_step(x: jax.Array, a: jax.Array, row) -> jax.Array:
  """One quintic step ``x <- a0 x + (a1 A + a2 A A) x`` with ``A = x x^T``."""
  b = row[1] * a + row[2] * (a @ a)
  return row[0] * x + b @ x


def _gram(x: jax.Array) -> jax.Array:
  return x @ jnp.swapaxes(x, -1, -2)


def _safe_divide(x: jax.Array, denom: jax.Array) -> jax.Array:
  return x / jnp.where(denom > 0, denom, 1).astype(x.dtype)


def _precondition_first_step(
  x: jax.Array, preconditioning: str, eps
) -> tuple[jax.Array, jax.Array]:
  """AOL or Schatten-4 rescaling, folded into the first step's Gram matrix."""
  a = _gram(x)
  if preconditioning == "aol":
    # Boissin et al. (2025): row scaling s_i = (sum_j |A_ij|)^(-1/2).
    s = jax.lax.rsqrt(jnp.maximum(jnp.abs(a).sum(-1), eps))[..., :, None]
    return x * s, a * s * jnp.swapaxes(s, -1, -2)
  # Grishina et al. (2025): scale by ||X X^T||_F^(-1/2) = ||X||_{S4}^(-1).
  s = jax.lax.rsqrt(jnp.maximum(jnp.linalg.norm(a, axis=(-2, -1)), eps))
  s = s[..., None, None]
  return x * s, a * s * s


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
) -> jax.Array:
  r"""Approximates the polar factor of each trailing matrix by Newton–Schulz.

  For ``X`` of shape ``(..., m, n)``, each matrix is transposed so that it has
  no more rows than columns, normalized, ``X <- X / (||X||_F * safety + eps)``,
  then iterated with one quintic step per coefficient row ``(a, b, c)``:

  .. math::
    A = X X^\top, \qquad X \leftarrow a X + (b A + c A^2) X.

  Each step costs ``4 r^2 c + 2 r^3`` FLOPs for an ``r x c`` matrix
  (``r <= c``). The iteration commutes with transposition, so
  ``NS(X.T) == NS(X).T``, and the normalization makes it invariant to scaling
  ``X`` by a positive constant (up to ``eps``). A zero matrix maps to zero.

  Args:
    x: array of shape ``(..., m, n)``; leading axes are a batch.
    coeffs: a preset name (``"standard"``, ``"dion"``, ``"polar_express"``), a
      row ``(a, b, c)`` repeated for every step, or ``(n, 3)`` rows.
    steps: number of steps; see :func:`resolve_coeffs` for how it combines
      with ``coeffs``. Defaults to the preset's (5) or the number of rows.
    eps: non-negative term added to the normalizing denominator.
    dtype: compute dtype (``None``: the dtype of ``x``). ``jnp.bfloat16`` is
      the usual choice on accelerators; float32 on CPU. The result is returned
      in the dtype of ``x``.
    safety: overrides the preset's safety factor.
    preconditioning: ``"frobenius"`` (default), ``"spectral"`` (divide by the
      largest singular value, computed exactly; costly), ``"aol"`` or
      ``"schatten"`` (rescalings folded into the first step, as
      ``optax.contrib.muon`` offers them).
    unroll: unroll the steps in Python (``True``) or run them in a
      ``lax.scan`` (``False``), which keeps compile time and the live set
      small for many steps.

  Returns:
    The orthogonalized array, same shape and dtype as ``x``.

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.
    Amsel et al., `The Polar Express: Optimal Matrix Sign Methods and Their
    Application to the Muon Algorithm <https://arxiv.org/abs/2505.16932>`_, 2025.
    Ahn et al., `Dion: Distributed Orthonormalized Updates
    <https://arxiv.org/abs/2504.05295>`_, 2025.
  """
  if x.ndim < 2:
    raise ValueError(
      f"newton_schulz needs an array of rank >= 2 (..., m, n); got shape {x.shape}."
    )
  if preconditioning not in ("frobenius", "spectral", "aol", "schatten"):
    raise ValueError(f"Unknown preconditioning={preconditioning!r}.")
  _check_eps(eps)
  rows, preset_safety = resolve_coeffs(coeffs, steps)
  safety = preset_safety if safety is None else safety
  in_dtype = x.dtype
  if not jnp.issubdtype(in_dtype, jnp.floating):
    raise ValueError(f"newton_schulz needs a floating-point array; got {in_dtype}.")
  compute_dtype = jnp.dtype(dtype) if dtype is not None else in_dtype
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  x = x.astype(compute_dtype)

  if preconditioning in ("frobenius", "spectral"):
    if preconditioning == "frobenius":
      norm = jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) * safety
    else:
      norm = jnp.linalg.norm(x.astype(jnp.float32), ord=2, axis=(-2, -1))
      norm = norm[..., None, None].astype(compute_dtype) * safety
    x = _safe_divide(x, norm + eps)
    first = None
  else:
    first = _precondition_first_step(x, preconditioning, eps)

  coeff_rows = jnp.asarray(rows, dtype=compute_dtype)
  if first is not None:
    x = _ns_step(first[0], first[1], coeff_rows[0])
    coeff_rows = coeff_rows[1:]
  if unroll:
    for i in range(coeff_rows.shape[0]):
      x = _ns_step(x, _gram(x), coeff_rows[i])
  elif coeff_rows.shape[0]:
    x, _ = jax.lax.scan(lambda x, r: (_ns_step(x, _gram(x), r), None), x, coeff_rows)

  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(in_dtype)


def polar_svd(x: jax.Array, rtol: float | None = None) -> jax.Array:
  r"""The exact polar factor of each trailing matrix, via the SVD.

  For ``X = U S V^\top`` returns ``U \,\mathrm{diag}(s_i > \tau)\, V^\top``
  with ``tau = rtol * max_i s_i``: the partial isometry that Newton–Schulz
  converges to (zero singular values stay zero, so the zero matrix maps to
  zero). Computed in float32 (or float64 where enabled) and returned in the
  dtype of ``x``.

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

  The coefficients are validated here, at construction, not at trace time.
  """
  resolve_coeffs(coeffs, steps)
  _check_eps(eps)
  return functools.partial(
    newton_schulz, coeffs=coeffs, steps=steps, eps=eps, dtype=dtype, **kwargs
  )
