"""Gradient transformations: the composable blocks of the optimizers.

Data flow. :func:`orthogonalize_momentum` turns gradients ``G`` into the
orthogonalized momentum ``O = NS(Mt)``. With ``statistics=True`` it emits, for
each matrix leaf, a :class:`MatrixUpdate` instead of a bare array: ``O`` plus
the per-input-feature squared norms of ``G`` and ``Mt``, which are all that
NAMO and NAMO-D need of them (one vector per matrix, never a copy of the
momentum). Later blocks read and refine that record:

* :func:`scale_by_neuron_rms` normalizes ``direction`` per neuron (NorMuon);
* :func:`scale_by_norm_adaptive` sets ``step_size``, NAMO's adaptive ``d``;
* :func:`clamp_diagonal` clamps ``step_size`` toward its mean (NAMO-D);
* :func:`scale_by_capped_step` multiplies in the learning rate, applies NAMO's
  caps and weight decay, and returns plain arrays again.

Blocks that work on a direction (:func:`scale_by_neuron_rms`,
:func:`scale_by_shape`) accept both bare arrays and :class:`MatrixUpdate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_orth import orthogonalizers as orth_lib
from optax_orth import sharding as sharding_lib
from optax_orth.routing import (
  DimensionNumbersSpec,
  MatrixLayout,
  leaf_dimension_numbers,
  matrix_layout,
  path_str,
)


class MatrixUpdate(NamedTuple):
  """The record that the NAMO-family blocks pass along, one per matrix leaf.

  Attributes:
    direction: the update direction, in the leaf's shape (``O = NS(Mt)``).
    grad_sq_norms: ``||G[i, :]||^2`` per input feature ``i``, float32, shape
      ``(batch, fan_in)``.
    momentum_sq_norms: ``||Mt[i, :]||^2`` per input feature, float32, shape
      ``(batch, fan_in)``.
    step_size: ``None`` until :func:`scale_by_norm_adaptive` sets it: the
      step size ``d`` per matrix ``(batch, 1)`` or per input feature
      ``(batch, fan_in)``, float32, without the learning rate.
  """

  direction: jax.Array
  grad_sq_norms: jax.Array
  momentum_sq_norms: jax.Array
  step_size: jax.Array | None = None


def _is_update(x) -> bool:
  return isinstance(x, MatrixUpdate)


def _check_unit_interval(name: str, value, closed_right: bool = False) -> None:
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # traced (inject_hyperparams): checked by the user's own schedule
  ok = 0 <= v <= 1 if closed_right else 0 <= v < 1
  if not ok:
    interval = "[0, 1]" if closed_right else "[0, 1)"
    raise ValueError(f"{name} must be in {interval}; got {name}={value}.")


def _check_non_negative(name: str, value) -> None:
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not v >= 0:
    raise ValueError(f"{name} must be non-negative; got {name}={value}.")


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _check_matches_state(updates, reference, where: str) -> None:
  """Raises a ValueError naming the leaf where updates and state disagree.

  ``reference`` is a tree shaped like the parameters that the state was
  initialized with; the tree structures and every leaf's shape must match.

  ``optax.MaskedNode`` leaves (the other branch of a partition) are compared
  by position only. Runs at trace time; costs nothing under ``jax.jit``.
  """
  ref, ref_def = jax.tree_util.tree_flatten_with_path(reference, is_leaf=_is_masked)
  upd, upd_def = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_masked)
  if upd_def != ref_def:
    ref_paths = {path_str(p) for p, _ in ref}
    upd_paths = {path_str(p) for p, _ in upd}
    missing, extra = sorted(ref_paths - upd_paths), sorted(upd_paths - ref_paths)
    parts = [f"missing from the updates: {missing}"] if missing else []
    parts += [f"unexpected in the updates: {extra}"] if extra else []
    detail = "; ".join(parts) or f"containers differ: {upd_def} vs {ref_def}"
    raise ValueError(
      f"{where}: the updates do not have the tree structure of the parameters "
      f"the optimizer state was initialized with ({detail})."
    )
  for (path, u), (_, r) in zip(upd, ref, strict=True):
    if _is_masked(u) or _is_masked(r) or jnp.shape(u) == jnp.shape(r):
      continue
    raise ValueError(
      f"{where}: leaf {path_str(path)!r} has shape {tuple(jnp.shape(u))}, but "
      f"the optimizer state was initialized for shape {tuple(jnp.shape(r))}; "
      "call init again after changing a parameter's shape."
    )


def _layouts(spec: DimensionNumbersSpec, tree, is_leaf=None):
  """(path, leaf, layout) for every array (or MatrixUpdate) leaf of tree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  # A callable spec (route_by_path) sees the directions, not MatrixUpdate fields.
  arrays = jax.tree.map(
    lambda x: x.direction if _is_update(x) else x, tree, is_leaf=_is_update
  )
  dims = leaf_dimension_numbers(spec, arrays)
  out = []
  for (path, x), dn in zip(flat, dims, strict=True):
    name = path_str(path)
    shape = x.direction.shape if _is_update(x) else jnp.shape(x)
    out.append((name, x, matrix_layout(shape, dn, name)))
  return out, treedef


_F32_MAX = float(jnp.finfo(jnp.float32).max)


def _row_sq_norms(x: jax.Array, layout: MatrixLayout) -> jax.Array:
  m = layout.to_matrices(x.astype(jnp.float32))
  return jnp.sum(m * m, axis=-1)


def _norm_adaptive_correction(count: jax.Array, b1, b2) -> jax.Array:
  """NAMO's bias correction ``sqrt(1 - b2^t) / (1 - b1^t + 1e-12)``."""
  t = count.astype(jnp.float32)
  return jnp.sqrt(1 - b2**t) / (1 - b1**t + 1e-12)


def _norm_adaptive_step(correction, m2, nu, eps) -> jax.Array:
  """``d = correction * ||Mt|| / (sqrt(v) + eps)`` from ``||Mt||^2`` and ``v``.

  Squared norms of entries above ~1e19 overflow float32: ``m2`` (and ``v``, by
  its caller) saturate at float32's max so that ``d`` stays finite.
  """
  return correction * jnp.sqrt(jnp.minimum(m2, _F32_MAX)) / (jnp.sqrt(nu) + eps)


def _clamp_toward_mean(d: jax.Array, c) -> jax.Array:
  """NAMO-D's ``clip(d, c m, m / c)`` per matrix (``m`` the mean over ``-1``).

  A no-op unless ``0 < c <= 1`` and ``m`` is finite and positive.
  """
  m = jnp.mean(d, axis=-1, keepdims=True)
  active = (m > 0) & jnp.isfinite(m) & (c > 0) & (c <= 1)
  safe_c = jnp.where((c > 0) & (c <= 1), c, 1.0)
  return jnp.where(active, jnp.clip(d, safe_c * m, m / safe_c), d)


def _learning_rate(learning_rate, count):
  return learning_rate(count) if callable(learning_rate) else learning_rate


# ---------------------------------------------------------------------------
# Orthogonalized momentum.


def orthogonalize_grouped(
  matrices: list[jax.Array],
  orthogonalizer: orth_lib.Orthogonalizer,
  sharding: sharding_lib.OwnerSharding | None = None,
) -> list[jax.Array]:
  """Orthogonalizes ``(batch, m, n)`` stacks with one call per shape.

  Tall stacks are transposed so that ``m <= n``, stacks of one shape and
  dtype are concatenated along the batch axis and orthogonalized together,
  and the results are split and transposed back. The orthogonalizer must
  commute with transposition, as every polar approximation does. With
  ``sharding`` (an :class:`optax_orth.OwnerSharding`), each group is
  distributed over the mesh so that every matrix is orthogonalized whole on
  one device, see :func:`optax_orth.sharding.owner_orthogonalize`.
  """
  groups: dict[tuple, list[tuple[int, bool]]] = {}
  for i, x in enumerate(matrices):
    tall = x.shape[1] > x.shape[2]
    key = (min(x.shape[1:]), max(x.shape[1:]), x.dtype)
    groups.setdefault(key, []).append((i, tall))
  out: list[jax.Array] = [None] * len(matrices)  # type: ignore[list-item]
  swap = lambda x, tall: jnp.swapaxes(x, 1, 2) if tall else x
  for members in groups.values():
    xs = [swap(matrices[i], tall) for i, tall in members]
    if sharding is not None:
      ys = sharding_lib.owner_orthogonalize(xs, orthogonalizer, sharding)
      for (i, tall), y in zip(members, ys, strict=True):
        out[i] = swap(y, tall)
      continue
    ys = orthogonalizer(jnp.concatenate(xs) if len(xs) > 1 else xs[0])
    offset = 0
    for (i, tall), x in zip(members, xs, strict=True):
      out[i] = swap(ys[offset : offset + x.shape[0]], tall)
      offset += x.shape[0]
  return out


class OrthogonalizeMomentumState(NamedTuple):
  """State of :func:`orthogonalize_momentum`."""

  count: jax.Array  # int32, number of updates so far
  mu: optax.Updates  # the momentum M, like the parameters


def orthogonalize_momentum(
  beta: float = 0.95,
  *,
  nesterov: bool = True,
  bias_correction: bool = False,
  mu_dtype: jax.typing.DTypeLike | None = None,
  ns_coeffs: orth_lib.CoeffsLike = "standard",
  ns_steps: int | None = 5,
  eps: float = 1e-7,
  ns_dtype: jax.typing.DTypeLike | None = None,
  preconditioning: orth_lib.Preconditioning = "frobenius",
  orthogonalizer: orth_lib.Orthogonalizer | None = None,
  adaptive: bool = False,
  statistics: bool = False,
  weight_dimension_numbers: DimensionNumbersSpec = None,
  sharding: sharding_lib.OwnerSharding | None = None,
) -> optax.GradientTransformation:
  r"""Momentum followed by orthogonalization of each matrix.

  .. math::
    M_t = \beta M_{t-1} + (1 - \beta) G_t, \qquad
    \tilde M_t = \begin{cases} \beta M_t + (1 - \beta) G_t & \text{Nesterov}
    \\ M_t & \text{otherwise} \end{cases}, \qquad
    O_t = \mathrm{orth}(\tilde M_t),

  applied to every matrix of every leaf (leaves are reshaped to
  ``(batch, fan_in, fan_out)`` by their dimension numbers). With
  ``bias_correction=True`` the terms are bias-corrected exactly as in
  ``optax.contrib.scale_by_muon``: ``M_t / (1 - beta^t)`` without Nesterov,
  and ``beta M_t / (1 - beta^{t+1}) + (1 - beta) G_t / (1 - beta^t)`` with.

  Args:
    beta: momentum decay, in ``[0, 1)``.
    nesterov: use the Nesterov direction.
    bias_correction: bias-correct the direction (``optax.contrib.muon``
      does; the reference Muon, NAMO and NorMuon codes do not).
    mu_dtype: dtype of the momentum (``None``: the parameters').
    ns_coeffs: Newton–Schulz coefficients (a preset name or rows), see
      :func:`optax_orth.newton_schulz`.
    ns_steps: Newton–Schulz steps (``None``: the preset's or all rows).
    eps: Newton–Schulz normalization epsilon (non-negative).
    ns_dtype: compute dtype of Newton–Schulz (``None``: the leaf's).
    preconditioning: Newton–Schulz preconditioning.
    orthogonalizer: replaces Newton–Schulz: any function from
      ``(batch, fan_in, fan_out)`` arrays to arrays of the same shape, such as
      :func:`optax_orth.polar_svd`. The ``ns_*`` options are then unused.
    adaptive: multiply ``O`` by the dual norm ``<Mt, O>`` (summed over the
      leaf), as ``optax.contrib.muon(adaptive=True)``.
    statistics: emit :class:`MatrixUpdate` records instead of arrays, for
      :func:`scale_by_norm_adaptive`.
    weight_dimension_numbers: a dimension-numbers spec
      (see :mod:`optax_orth.routing`); ``None``: every leaf is a 2-D matrix.
    sharding: ``None``, or an :class:`optax_orth.OwnerSharding`: under
      ``jax.jit`` on a device mesh, every matrix is orthogonalized whole on
      one device of the owner axes (the "owner" scheme, see
      :mod:`optax_orth.sharding`). A no-op without a mesh.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.
  """
  _check_unit_interval("beta", beta)
  if orthogonalizer is None:
    orthogonalizer = orth_lib.make_newton_schulz(
      ns_coeffs, ns_steps, eps, ns_dtype, preconditioning=preconditioning
    )

  def init_fn(params):
    for name, x, _ in _layouts(weight_dimension_numbers, params)[0]:
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
          f"leaf {name!r} has dtype {x.dtype}; orthogonalize_momentum needs "
          "floating-point parameters."
        )
    return OrthogonalizeMomentumState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
    )

  def update_fn(updates, state, params=None):
    del params
    _check_matches_state(updates, state.mu, "orthogonalize_momentum")
    entries, treedef = _layouts(weight_dimension_numbers, updates)
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count_inc = optax.safe_increment(state.count)
    if bias_correction:
      if nesterov:
        mu_hat = jax.tree.map(
          lambda m, g: beta * m + (1 - beta) * g,
          optax.tree.bias_correction(mu, beta, optax.safe_increment(count_inc)),
          optax.tree.bias_correction(updates, beta, count_inc),
        )
      else:
        mu_hat = optax.tree.bias_correction(mu, beta, count_inc)
    elif nesterov:
      mu_hat = jax.tree.map(lambda m, g: (1 - beta) * g + beta * m, mu, updates)
    else:
      mu_hat = mu

    m_hats = jax.tree.leaves(mu_hat)
    if sharding is not None:
      m_hats = sharding_lib.keep_layout(m_hats, jax.tree.leaves(mu), sharding)
    orthogonal = orthogonalize_grouped(
      [lay.to_matrices(m) for (_, _, lay), m in zip(entries, m_hats, strict=True)],
      orthogonalizer,
      sharding,
    )
    outs = []
    for (_, g, layout), m_hat, o in zip(entries, m_hats, orthogonal, strict=True):
      o = layout.from_matrices(o)
      if adaptive:
        o = jnp.sum(m_hat * o) * o
      if statistics:
        o = MatrixUpdate(
          direction=o,
          grad_sq_norms=_row_sq_norms(g, layout),
          momentum_sq_norms=_row_sq_norms(m_hat, layout),
        )
      outs.append(o)
    new_updates = jax.tree.unflatten(treedef, outs)
    mu = optax.tree.cast(mu, mu_dtype)
    return new_updates, OrthogonalizeMomentumState(count=count_inc, mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Shape scaling.


def shape_scale(
  fan_in: int, fan_out: int, consistent_rms: jax.typing.ArrayLike | None = None
):
  """``sqrt(max(1, fan_out / fan_in))``, or ``c * sqrt(max(fan_in, fan_out))``."""
  if consistent_rms is None:
    return jnp.sqrt(jnp.maximum(1, fan_out / fan_in))
  return jnp.sqrt(jnp.maximum(fan_in, fan_out)) * consistent_rms


def _map_direction(fn: Callable[[jax.Array], jax.Array], x):
  if _is_update(x):
    return x._replace(direction=fn(x.direction))
  return fn(x)


def scale_by_shape(
  weight_dimension_numbers: DimensionNumbersSpec = None,
  consistent_rms: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformation:
  r"""Scales each matrix's update by a factor of its shape.

  * default: ``sqrt(max(1, fan_out / fan_in))`` (Jordan's width scaling,
    ``optax.contrib.muon``'s default, NorMuon's reference);
  * ``consistent_rms=c``: ``c * sqrt(max(fan_in, fan_out))``, which gives an
    orthogonal update the RMS ``c`` (Liu et al., 2025). It is also NAMO's
    shape factor, ``scale_coeff * sqrt(max(fan_in, fan_out))`` with
    ``scale_coeff = 0.2``; NAMO applies it inside a cap, see
    :func:`scale_by_capped_step`.

  Works on arrays and on the ``direction`` of :class:`MatrixUpdate` records.

  Args:
    weight_dimension_numbers: a dimension-numbers spec (``None``: 2-D leaves).
    consistent_rms: ``None`` for width scaling, or the target RMS.

  Returns:
    A stateless ``optax.GradientTransformation``.
  """

  def update_fn(updates, state, params=None):
    del params
    entries, treedef = _layouts(weight_dimension_numbers, updates, _is_update)
    outs = []
    for _, x, lay in entries:
      scale = shape_scale(lay.fan_in, lay.fan_out, consistent_rms)
      outs.append(_map_direction(lambda d, s=scale: (s * d).astype(d.dtype), x))
    return jax.tree.unflatten(treedef, outs), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ---------------------------------------------------------------------------
# NorMuon: per-neuron second moment.


class ScaleByNeuronRmsState(NamedTuple):
  """State of :func:`scale_by_neuron_rms`: ``nu``, float32 ``(batch, fan_out)``."""

  nu: optax.Updates


def scale_by_neuron_rms(
  b2: float = 0.95,
  eps: float = 1e-10,
  *,
  target_rms: float | None = None,
  weight_dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""NorMuon's per-neuron normalization of an orthogonalized update.

  For each matrix ``O`` (``fan_in x fan_out``; a neuron is a column ``j``):

  .. math::
    v_j \leftarrow b_2 v_j + (1 - b_2) \tfrac{1}{\text{fan\_in}}
    \textstyle\sum_i O_{ij}^2, \qquad
    \hat O_{:, j} = O_{:, j} / (\sqrt{v_j} + \epsilon),

  then, by default (the released code), ``\hat O \cdot ||O||_F / (||\hat O||_F
  + eps)`` keeps the pre-normalization Frobenius norm; with ``target_rms=r``
  (the paper's Algorithm 1, ``r = 0.2``) it returns
  ``\hat O \cdot r \sqrt{fan_in \cdot fan_out} / (||\hat O||_F + eps)``, whose
  RMS is ``r``. No bias correction, as in the references. Computed in float32
  and returned in the update's dtype. Works on arrays and on the ``direction``
  of :class:`MatrixUpdate` records.

  Args:
    b2: decay of the second moment, in ``[0, 1)``.
    eps: non-negative term added to the denominators.
    target_rms: ``None`` (norm-preserving) or the fixed RMS.
    weight_dimension_numbers: a dimension-numbers spec (``None``: 2-D leaves).

  Returns:
    An ``optax.GradientTransformation`` whose state holds one float32 value
    per neuron per matrix.

  References:
    Li et al., `NorMuon: Making Muon more efficient and scalable
    <https://arxiv.org/abs/2510.05491>`_, 2025.
  """
  _check_unit_interval("b2", b2)
  _check_non_negative("eps", eps)

  def init_fn(params):
    entries, treedef = _layouts(weight_dimension_numbers, params)
    nu = [jnp.zeros((lay.batch, lay.fan_out), jnp.float32) for _, _, lay in entries]
    return ScaleByNeuronRmsState(nu=jax.tree.unflatten(treedef, nu))

  def normalize(o, nu, lay):
    m = lay.to_matrices(o.astype(jnp.float32))
    n0 = jnp.linalg.norm(m, axis=(-2, -1), keepdims=True)
    nu = b2 * nu + (1 - b2) * jnp.mean(m * m, axis=-2)
    m = m / (jnp.sqrt(nu)[:, None, :] + eps)
    target = (
      n0 if target_rms is None else target_rms * (lay.fan_in * lay.fan_out) ** 0.5
    )
    m = m * (target / (jnp.linalg.norm(m, axis=(-2, -1), keepdims=True) + eps))
    return lay.from_matrices(m).astype(o.dtype), nu

  def update_fn(updates, state, params=None):
    del params
    entries, treedef = _layouts(weight_dimension_numbers, updates, _is_update)
    outs, nus = [], []
    for (_, x, lay), nu in zip(entries, jax.tree.leaves(state.nu), strict=True):
      o = x.direction if _is_update(x) else x
      o, nu = normalize(o, nu, lay)
      outs.append(x._replace(direction=o) if _is_update(x) else o)
      nus.append(nu)
    return jax.tree.unflatten(treedef, outs), ScaleByNeuronRmsState(
      nu=jax.tree.unflatten(treedef, nus)
    )

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# NAMO / NAMO-D: norm-based adaptive step size.


class ScaleByNormAdaptiveState(NamedTuple):
  """State of :func:`scale_by_norm_adaptive`.

  ``nu`` holds, per matrix leaf, the EMA of squared gradient norms, float32:
  shape ``(batch, 1)`` (one scalar per matrix) or ``(batch, fan_in)``.
  """

  count: jax.Array
  nu: optax.Updates


def scale_by_norm_adaptive(
  b1: float = 0.95,
  b2: float = 0.99,
  eps: float = 1e-8,
  *,
  granularity: Literal["matrix", "input_feature"] = "matrix",
  weight_dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""NAMO's adaptive step size, from the momentum and gradient norms.

  Takes the :class:`MatrixUpdate` records of
  ``orthogonalize_momentum(statistics=True)`` and sets their ``step_size``.
  With ``granularity="matrix"`` (NAMO), per matrix:

  .. math::
    v_t = b_2 v_{t-1} + (1 - b_2) \|G_t\|_F^2, \qquad
    d_t = \frac{\sqrt{1 - b_2^t}}{1 - b_1^t + 10^{-12}}
          \frac{\|\tilde M_t\|_F}{\sqrt{v_t} + \epsilon}.

  With ``granularity="input_feature"`` (NAMO-D), the same per input feature
  ``i`` (a row of the Flax kernel), with ``||G[i, :]||`` and
  ``||Mt[i, :]||``. The learning rate multiplies ``d`` later, in
  :func:`scale_by_capped_step` (NAMO's ``alpha = lr * d``). If the record
  already carries a step size the two multiply.

  Args:
    b1: decay of the momentum that ``Mt`` came from (bias correction only).
    b2: decay of the squared-norm EMA, in ``[0, 1)``.
    eps: non-negative term added to ``sqrt(v)``.
    granularity: ``"matrix"`` or ``"input_feature"``.
    weight_dimension_numbers: a dimension-numbers spec (``None``: 2-D leaves).

  Returns:
    An ``optax.GradientTransformation``; state: one float32 scalar (or one
    per input feature) per matrix, and a step count.

  References:
    Zhang, Liu and Schaeffer, `Adam Improves Muon: Adaptive Moment Estimation
    with Orthogonalized Momentum <https://arxiv.org/abs/2602.17080>`_, 2026;
    released code ``minxin-zhg/namo``.
  """
  _check_unit_interval("b1", b1)
  _check_unit_interval("b2", b2)
  _check_non_negative("eps", eps)
  if granularity not in ("matrix", "input_feature"):
    raise ValueError(
      f"granularity must be 'matrix' or 'input_feature'; got {granularity!r}."
    )
  per_feature = granularity == "input_feature"

  def init_fn(params):
    entries, treedef = _layouts(weight_dimension_numbers, params)
    nu = [
      jnp.zeros((lay.batch, lay.fan_in if per_feature else 1), jnp.float32)
      for _, _, lay in entries
    ]
    return ScaleByNormAdaptiveState(
      count=jnp.zeros([], jnp.int32), nu=jax.tree.unflatten(treedef, nu)
    )

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_update)
    count = optax.safe_increment(state.count)
    correction = _norm_adaptive_correction(count, b1, b2)
    outs, nus = [], []
    for (path, u), nu in zip(leaves, jax.tree.leaves(state.nu), strict=True):
      if not _is_update(u):
        raise ValueError(
          f"leaf {path_str(path)!r}: scale_by_norm_adaptive needs the "
          "MatrixUpdate records of orthogonalize_momentum(statistics=True); "
          f"got {type(u).__name__}."
        )
      g2, m2 = u.grad_sq_norms, u.momentum_sq_norms
      if not per_feature:
        g2, m2 = g2.sum(-1, keepdims=True), m2.sum(-1, keepdims=True)
      # Squared norms of |G| > ~1e19 overflow float32: saturate them (and v)
      # at float32's max so that d stays finite instead of inf / inf.
      nu = jnp.minimum(b2 * nu + (1 - b2) * jnp.minimum(g2, _F32_MAX), _F32_MAX)
      d = _norm_adaptive_step(correction, m2, nu, eps)
      outs.append(u._replace(step_size=d if u.step_size is None else u.step_size * d))
      nus.append(nu)
    return jax.tree.unflatten(treedef, outs), ScaleByNormAdaptiveState(
      count=count, nu=jax.tree.unflatten(treedef, nus)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def clamp_diagonal(c: float = 0.75) -> optax.GradientTransformation:
  r"""NAMO-D's clamp of the diagonal step sizes toward their mean.

  For each matrix, with ``m = mean_i d_i`` over its input features:
  ``d_i <- clip(d_i, c m, m / c)`` when ``0 < c <= 1`` and ``m`` is finite
  and positive; otherwise ``d`` is left as it is. ``c = 1`` gives every row the
  mean; ``c = 0`` or ``c > 1`` disables the clamp. For stacked leaves the mean
  is per matrix. Works on :class:`MatrixUpdate` records with a step size.

  Args:
    c: the clamp (non-negative). Reference default ``0.75``.

  Returns:
    A stateless ``optax.GradientTransformation``.

  References:
    Zhang, Liu and Schaeffer, `Adam Improves Muon: Adaptive Moment Estimation
    with Orthogonalized Momentum <https://arxiv.org/abs/2602.17080>`_, 2026.
  """
  _check_non_negative("c", c)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_update)
    outs = []
    for path, u in leaves:
      if not _is_update(u) or u.step_size is None:
        raise ValueError(
          f"leaf {path_str(path)!r}: clamp_diagonal needs MatrixUpdate records "
          "with a step size; put scale_by_norm_adaptive before it."
        )
      outs.append(u._replace(step_size=_clamp_toward_mean(u.step_size, c)))
    return jax.tree.unflatten(treedef, outs), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


class ScaleByCappedStepState(NamedTuple):
  """State of :func:`scale_by_capped_step`: the step count for schedules."""

  count: jax.Array


def scale_by_capped_step(
  learning_rate: optax.ScalarOrSchedule,
  *,
  scale_coeff: float = 0.2,
  weight_decay: float = 0.0,
  weight_decay_mode: Literal["adaptive", "decoupled"] = "adaptive",
  weight_dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""Applies NAMO's capped step and weight decay; returns plain updates.

  With ``alpha = lr * d`` (``d`` from :func:`scale_by_norm_adaptive`, one per
  matrix or per input feature ``i``) and
  ``s = scale_coeff * sqrt(max(fan_in, fan_out))``, the update of a kernel
  ``K`` is

  .. math::
    \Delta K_{i,:} = -\min(\alpha_i s, 1)\, O_{i,:}
      - \min(\lambda \min(\alpha_i, 1), 1)\, K_{i,:}

  in the default ``weight_decay_mode="adaptive"`` (the reference: decay
  scaled by ``alpha``; the outer ``min`` is NAMO-D's ``max(0, .)`` and only
  matters for ``lambda > 1``), or with ``-lr * lambda * K`` as the decay term
  in ``"decoupled"`` mode (standard decoupled weight decay).

  Args:
    learning_rate: a float or an optax schedule of the step count.
    scale_coeff: NAMO's shape coefficient (``0.2`` in the reference).
    weight_decay: ``lambda``, non-negative. Needs ``params`` in ``update``.
    weight_decay_mode: ``"adaptive"`` or ``"decoupled"``.
    weight_dimension_numbers: a dimension-numbers spec (``None``: 2-D leaves).

  Returns:
    An ``optax.GradientTransformation``; its updates are plain arrays.

  References:
    Zhang, Liu and Schaeffer, `Adam Improves Muon: Adaptive Moment Estimation
    with Orthogonalized Momentum <https://arxiv.org/abs/2602.17080>`_, 2026.
  """
  _check_non_negative("weight_decay", weight_decay)
  _check_non_negative("scale_coeff", scale_coeff)
  if weight_decay_mode not in ("adaptive", "decoupled"):
    raise ValueError(
      f"weight_decay_mode must be 'adaptive' or 'decoupled'; got {weight_decay_mode!r}."
    )

  def init_fn(params):
    del params
    return ScaleByCappedStepState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    entries, treedef = _layouts(weight_dimension_numbers, updates, _is_update)
    decays = not (isinstance(weight_decay, int | float) and weight_decay == 0)
    if decays and params is None:
      raise ValueError("scale_by_capped_step with weight_decay needs params.")
    param_leaves = jax.tree.leaves(params) if decays else [None] * len(entries)
    lr = _learning_rate(learning_rate, state.count)
    outs = []
    for (name, u, lay), p in zip(entries, param_leaves, strict=True):
      if not _is_update(u) or u.step_size is None:
        raise ValueError(
          f"leaf {name!r}: scale_by_capped_step needs MatrixUpdate records with "
          "a step size; put scale_by_norm_adaptive before it."
        )
      alpha = (lr * u.step_size)[:, :, None]
      s = scale_coeff * max(lay.fan_in, lay.fan_out) ** 0.5
      o = lay.to_matrices(u.direction.astype(jnp.float32))
      delta = -jnp.minimum(alpha * s, 1.0) * o
      if decays:
        k = lay.to_matrices(p.astype(jnp.float32))
        if weight_decay_mode == "adaptive":
          shrink = jnp.minimum(weight_decay * jnp.minimum(alpha, 1.0), 1.0)
        else:
          shrink = lr * weight_decay
        delta = delta - shrink * k
      outs.append(lay.from_matrices(delta).astype(u.direction.dtype))
    return jax.tree.unflatten(treedef, outs), ScaleByCappedStepState(
      count=optax.safe_increment(state.count)
    )

  return optax.GradientTransformation(init_fn, update_fn)
