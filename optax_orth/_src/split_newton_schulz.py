r"""Newton–Schulz on a matrix whose columns are split over a group of devices.

The owner scheme (``sharding.py``) gives each device whole matrices. When a
shape group has fewer matrices than devices, or a count that does not divide
evenly among them, whole-matrix owners leave devices idle. Here one ``r x c``
matrix (``r <= c``) is instead held by a group of ``g`` devices, device ``j``
holding the column block ``X_j`` (``r x c/g``), and the iteration runs on the
blocks with ``r x r`` collectives only, every product exact:

* the Gram matrix ``A = X X^H = sum_j X_j X_j^H`` is a reduce-scatter of the
  local Gram matrices, leaving device ``j`` the ``j``-th block of ``r / g``
  rows of ``A``;
* every ``r x r`` product is formed by rows, ``(M N)_j = M_j N``, after an
  all-gather of ``N`` in the operand dtype (the dtype a product reads it in
  anyway, so the gathered copy changes no bit of the product);
* elementwise steps (``b A + c A^2``, ``a I + ...``) are local to the rows;
* ``X_j <- a X_j + B X_j`` (plain) or ``X_j <- Q X_j`` (Gram form) is local.

The normalization needs two scalars per matrix: ``max |X|`` (the power-of-two
prescale) and ``||X||_F^2``, a ``pmax`` and a ``psum``. Per device and step
this is ``1/g`` of the FLOPs of :func:`optax_orth.newton_schulz` on the whole
matrix (except the per-row elementwise work, which is also split), and the
collectives move ``r^2`` elements per device and product: per plain step a
reduce-scatter of ``A`` (carry dtype) and all-gathers of ``A`` and ``B``
(operand dtype); per Gram segment of ``m`` steps one reduce-scatter and
``3 m - 2`` all-gathers (2 for ``m = 1``). :func:`split_bytes` states it exactly.

Zero rows and columns padded onto ``X`` (so that ``g`` divides ``r`` and
``c``) stay zero through every step, so padding is exact.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_orth._src import orthogonalizers as orth_lib


class SplitOptions(NamedTuple):
  """The options of a Newton–Schulz orthogonalizer that the split path runs."""

  rows: np.ndarray  # (steps, 3) coefficient rows
  safety: float
  eps: float
  dtype: Any
  method: str  # "auto", "plain" or "gram"
  restart: int | None


def split_options(orthogonalizer: Any) -> SplitOptions | None:
  """The options of ``orthogonalizer`` if the split path can run it, else None.

  Splittable: an orthogonalizer from ``make_newton_schulz`` (or
  ``functools.partial(newton_schulz, ...)``) with Frobenius preconditioning
  and a static number of steps. Any other function is run whole.
  """
  if not isinstance(orthogonalizer, functools.partial):
    return None
  if orthogonalizer.func is not orth_lib.newton_schulz or orthogonalizer.args:
    return None
  kw = dict(orthogonalizer.keywords)
  if kw.get("preconditioning", "frobenius") != "frobenius":
    return None
  coeffs, steps = kw.get("coeffs", "standard"), kw.get("steps")
  if orth_lib._traced_steps(coeffs, steps)[1] is not None:
    return None
  if any(isinstance(v, jax.Array) for v in (coeffs, steps, kw.get("eps"))):
    return None
  rows, safety = orth_lib.resolve_coeffs(coeffs, steps)
  if kw.get("safety") is not None:
    safety = kw["safety"]
  return SplitOptions(
    rows=np.asarray(rows),
    safety=float(safety),
    eps=float(kw.get("eps", 1e-7)),
    dtype=kw.get("dtype"),
    method=kw.get("method", "auto"),
    restart=kw.get("restart"),
  )


def resolved_method(opts: SplitOptions, r: int, c: int, in_dtype) -> tuple[str, int]:
  """The method and restart :func:`optax_orth.newton_schulz` uses on ``r x c``."""
  arith = orth_lib._arith(in_dtype, opts.dtype)
  restart = opts.restart or orth_lib.default_restart(arith.operand)
  sym = orth_lib._resolve_symmetric(None, arith.low_precision)
  method = opts.method
  if method == "auto":
    gram = orth_lib._gram_saves_work(r, c, len(opts.rows), restart, sym)
    method = "gram" if gram else "plain"
  return method, restart


def split_flops(opts: SplitOptions, r: int, c: int, g: int, in_dtype) -> float:
  """FLOPs per device of one ``r x c`` matrix split over ``g`` devices."""
  method, restart = resolved_method(opts, r, c, in_dtype)
  rp, cp = -(-r // g) * g, -(-c // g) * g
  dtype = orth_lib._arith(in_dtype, opts.dtype).operand
  flops = orth_lib.newton_schulz_flops(
    (rp, cp), len(opts.rows), method=method,  # pyright: ignore[reportArgumentType]
    restart=restart, dtype=dtype,
  )  # fmt: skip
  return flops.total / g


def split_bytes(opts: SplitOptions, r: int, c: int, g: int, in_dtype) -> float:
  """Bytes one device sends for one matrix split over ``g`` devices.

  A reduce-scatter or all-gather of an ``r x r`` array of ``b``-byte elements
  sends ``(g - 1) / g * r^2 * b`` bytes per device: per plain step one
  reduce-scatter (carry dtype) and two all-gathers (operand dtype); per Gram
  segment of ``m`` steps one reduce-scatter and ``3 m - 2`` all-gathers (2
  for ``m = 1``).
  """
  if g == 1:
    return 0.0
  method, restart = resolved_method(opts, r, c, in_dtype)
  arith = orth_lib._arith(in_dtype, opts.dtype)
  rp = -(-r // g) * g
  unit = (g - 1) / g * rp * rp
  steps = len(opts.rows)
  if method == "plain":
    per = steps * (arith.carry.itemsize + 2 * arith.operand.itemsize)
  else:
    segments = range(0, steps, restart)
    gathers = lambda m: 2 if m == 1 else 3 * m - 2
    per = sum(
      arith.carry.itemsize + gathers(min(restart, steps - s)) * arith.operand.itemsize
      for s in segments
    )
  return unit * per


def split_newton_schulz(
  x: jax.Array,
  opts: SplitOptions,
  method: str,
  restart: int,
  axis: Any,
  position: jax.Array,
) -> jax.Array:
  """Newton–Schulz on the local column blocks ``x`` (``(..., r, c / g)``).

  Runs inside ``shard_map``; ``axis`` names the mesh axes of the group that
  holds one matrix, ``position`` (a scalar) is this device's position in it,
  and ``r`` is a multiple of the group's size. ``method`` and ``restart`` are
  those :func:`resolved_method` gives for the whole matrix. Returns the local
  blocks of the result, in ``x``'s dtype.
  """
  in_dtype = x.dtype
  arith = orth_lib._arith(in_dtype, opts.dtype)
  sym = orth_lib._resolve_symmetric(None, arith.low_precision)
  g = jax.lax.psum(1, axis)
  r = x.shape[-2]
  rb = r // g
  mdim = x.ndim - 2

  def gather(m):  # rows (..., r/g, r) -> (..., r, r), in the operand dtype
    return jax.lax.all_gather(m.astype(arith.operand), axis, axis=mdim, tiled=True)

  def gram_rows(x):
    local = orth_lib._gram(x, arith, sym.gram)
    return jax.lax.psum_scatter(local, axis, scatter_dimension=mdim, tiled=True)

  start = position * rb
  eye_rows = (jnp.arange(rb)[:, None] + start == jnp.arange(r)[None, :]).astype(
    arith.carry
  )

  # Normalization, as orthogonalizers._normalize ("frobenius").
  wide = jnp.promote_types(in_dtype, jnp.float32)
  amax = jax.lax.pmax(jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True), axis)
  scale = orth_lib.power_of_two_from_amax(amax, in_dtype)
  scaled = x.astype(wide) * scale.astype(wide)
  sq = jnp.sum(jnp.real(scaled * jnp.conj(scaled)), axis=(-2, -1), keepdims=True)
  norm = jnp.sqrt(jax.lax.psum(sq, axis))
  denom = norm * opts.safety + opts.eps * scale
  if not arith.low_precision:
    x = orth_lib._safe_divide(scaled, denom).astype(arith.operand)
  else:
    inv = jnp.where(denom > 0, scale / jnp.where(denom > 0, denom, 1), 0)
    x = (x.astype(wide) * inv.astype(wide)).astype(arith.operand)

  rows = [tuple(float(v) for v in row) for row in opts.rows]
  n = len(rows)
  dot = functools.partial(orth_lib._dot, arith=arith)
  if method == "plain":
    for i, row in enumerate(rows):
      a_rows = gram_rows(x)
      b_rows = row[1] * a_rows + row[2] * dot(a_rows, gather(a_rows))
      y = row[0] * x.astype(arith.carry) + dot(gather(b_rows), x)
      x = y if i == n - 1 else y.astype(arith.operand)
    return x.astype(in_dtype)

  def poly(r_rows, r_full, row):
    return (row[1] * r_rows + row[2] * dot(r_rows, r_full)) + row[0] * eye_rows

  for s in range(0, n, restart):
    if s:
      x = x.astype(arith.operand)
    seg = rows[s : s + restart]
    r_rows = gram_rows(x)
    r_full = gather(r_rows)
    p_rows = poly(r_rows, r_full, seg[0])
    q_rows, q_full = p_rows, None
    for row in seg[1:]:
      p_full = gather(p_rows)
      q_full = p_full if q_full is None else gather(q_rows)
      r_rows = dot(dot(p_rows, r_full), p_full)
      r_full = gather(r_rows)
      p_rows = poly(r_rows, r_full, row)
      q_rows = dot(p_rows, q_full)
    x = dot(gather(q_rows), x)
  return x.astype(in_dtype)
