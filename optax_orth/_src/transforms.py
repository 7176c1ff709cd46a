"""Gradient transformations: the composable blocks of the optimizers.

Data flow. Every block takes and returns ``updates`` with the structure and
shapes of the parameters, so any optax transformation can sit between two of
them and acts on exactly what optax defines it on. A block's own statistics
live in its state:

* :func:`orthogonalize_momentum` turns gradients ``G`` into the orthogonalized
  momentum ``O = orth(Mt)``; with ``statistics=True`` its state also keeps, for
  the step just taken, the per-input-feature squared norms of ``G`` and ``Mt``
  (:class:`MomentumStatistics`, one vector per matrix).
* :func:`scale_by_neuron_rms` (NorMuon) and :func:`scale_by_shape` rescale a
  direction.
* :func:`scale_by_norm_adaptive` is the whole NAMO / NAMO-D rule. It wraps the
  transformation that makes the direction (``direction=``, a chain that
  contains ``orthogonalize_momentum(statistics=True)``), finds that block's
  statistics in the inner state by type, forms the adaptive step size ``d``,
  lets a step-size transformation such as :func:`clamp_diagonal` refine it,
  and applies the learning rate, NAMO's caps and weight decay. The step size
  it applied is in its state, where diagnostics read it.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_orth._src import orthogonalizers as orth_lib
from optax_orth._src import sharding as sharding_lib
from optax_orth._src import validation
from optax_orth._src import weight_decay as wd_lib
from optax_orth._src.routing import (
  DimensionNumbersSpec,
  MatrixLayout,
  Parts,
  from_matrix_list,
  leaf_dimension_numbers,
  matrix_layout,
  path_str,
  to_matrix_list,
)

_is_parts = lambda x: isinstance(x, Parts)  # a split leaf's per-block state


def leaf_layouts(spec: DimensionNumbersSpec, tree, where: str):
  """(path, leaf, layout) for every array leaf of ``tree``, and its treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  dims = leaf_dimension_numbers(spec, tree)
  out = []
  for (path, x), dn in zip(flat, dims, strict=True):
    name = path_str(path)
    if not hasattr(x, "shape"):
      raise ValueError(
        f"{where}: leaf {name!r} of the updates is a {type(x).__name__}, not an "
        "array shaped like its parameter."
      )
    out.append((name, x, matrix_layout(jnp.shape(x), dn, name)))
  return out, treedef


def map_matrices(
  spec: DimensionNumbersSpec, where: str, fn, tree, *others, outputs: int = 1
):
  """``fn(part, x, *args)`` on every matrix stack of every leaf of ``tree``.

  The one per-matrix loop of the package: each leaf's layout (from ``spec``)
  calls ``fn`` once per stack (:meth:`~optax_orth.MatrixLayout.map_parts`),
  ``x`` the leaf (or its block) and ``args`` the matching entries of
  ``others``, trees with ``tree``'s leaves (a split leaf's state a
  :class:`~optax_orth.layout.Parts`). Returns a tree like ``tree``, or
  ``outputs`` trees when ``fn`` returns that many values: the first like
  ``tree``, the others (per-matrix state) without its ``Variable`` wrappers.
  """
  entries, treedef = leaf_layouts(spec, tree, where)
  cols = [jax.tree.leaves(o, is_leaf=_is_parts) for o in others]
  for col in cols:
    if len(col) != len(entries):
      raise ValueError(
        f"{where}: the updates have {len(entries)} matrix leaves but the state "
        f"or parameters {len(col)}; call init with the parameters these "
        "updates are for."
      )
  outs = [
    lay.map_parts(fn, x, *(c[i] for c in cols)) for i, (_, x, lay) in enumerate(entries)
  ]
  if outputs == 1:
    return jax.tree.unflatten(treedef, outs)
  # The further outputs are per-matrix state: built as init builds state,
  # without the parameters' Variable annotations.
  state_def = sharding_lib.plain_treedef(tree)
  states = [
    jax.tree.unflatten(state_def, [o[k] for o in outs]) for k in range(1, outputs)
  ]
  return (jax.tree.unflatten(treedef, [o[0] for o in outs]), *states)


def stat_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
  """The dtype of the statistics of a leaf: the wider of float32 and its own.

  Real for complex leaves (``complex128`` gives ``float64``).
  """
  return jnp.promote_types(jnp.finfo(jnp.dtype(dtype)).dtype, jnp.float32)


def abs_sq(x: jax.Array) -> jax.Array:
  """``|x|^2`` elementwise, real for complex ``x``."""
  if jnp.iscomplexobj(x):
    return jnp.square(x.real) + jnp.square(x.imag)
  return jnp.square(x)


def row_sq_norms(x: jax.Array, layout: MatrixLayout) -> jax.Array:
  """``||X[i, :]||^2`` per input feature of each matrix: ``(batch, fan_in)``.

  Computed in :func:`stat_dtype`; saturates at its largest finite value instead
  of overflowing to ``inf``.
  """
  if layout.blocks:  # one per block
    return layout.each(lambda part, xp: row_sq_norms(xp, part), x)
  dt = stat_dtype(x.dtype)
  m = layout.to_matrices(x)
  sq = abs_sq(m).astype(dt) if jnp.iscomplexobj(m) else abs_sq(m.astype(dt))
  return jnp.minimum(jnp.sum(sq, axis=-1), jnp.finfo(dt).max)


def _zeros_per_matrix(layout, dtype, width):
  """Zeros ``(batch, width(part))`` in :func:`stat_dtype` for each block of a
  leaf (a :class:`~optax_orth.layout.Parts` for a split leaf)."""
  dt = stat_dtype(dtype)
  return layout.each(lambda p: jnp.zeros((p.batch, width(p)), dt))


# ---------------------------------------------------------------------------
# Orthogonalized momentum.


def orthogonalize_grouped(
  matrices: list[jax.Array],
  orthogonalizer: orth_lib.Orthogonalizer,
  sharding: sharding_lib.ShardingLike = sharding_lib.AUTO,
) -> list[jax.Array]:
  """Orthogonalizes ``(batch, m, n)`` stacks with one call per shape.

  Tall stacks are transposed so that ``m <= n``, stacks of one shape,
  orientation and dtype are concatenated along the batch axis and
  orthogonalized together, and the results are split and transposed back.
  Tall and wide stacks of one shape stay in separate calls: concatenating a
  transposed stack with untransposed ones costs a copy that measured slower
  than the extra call (``docs/benchmarks.md``). The orthogonalizer must
  commute with transposition, as every polar approximation does. Under a
  device mesh (``sharding="auto"`` with a mesh in context, or an
  :class:`optax_orth.OwnerSharding`), each group is distributed over the mesh
  so that every matrix is orthogonalized whole on one device, and each result
  comes back in its input's layout, see
  ``owner_orthogonalize``. ``sharding=None``, no
  mesh, or one device: the plain grouped call.
  """
  groups: dict[tuple, list[int]] = {}
  for i, x in enumerate(matrices):
    groups.setdefault((x.shape[1:], x.dtype), []).append(i)
  out: list[jax.Array] = [None] * len(matrices)  # type: ignore[list-item]
  for (shape, _), members in groups.items():
    tall = shape[0] > shape[1]
    swap = orth_lib.materialized_transpose if tall else (lambda x: x)
    xs = [swap(matrices[i]) for i in members]
    ys = sharding_lib.owner_orthogonalize(
      xs, orthogonalizer, sharding, fan_in_rows=not tall
    )
    for i, y in zip(members, ys, strict=True):
      out[i] = swap(y)
  return sharding_lib.keep_layout(out, matrices, sharding)


class MomentumStatistics(NamedTuple):
  """What NAMO needs of one step of :func:`orthogonalize_momentum`.

  Attributes:
    grad_sq_norms: ``||G[i, :]||^2`` per input feature ``i`` of each matrix,
      shape ``(batch, fan_in)``, in :func:`stat_dtype`.
    momentum_sq_norms: ``||Mt[i, :]||^2`` of the direction that was
      orthogonalized, same shape.
    momentum_bias: the factor by which ``Mt`` still underestimates the
      gradients' scale: ``1 - beta^t`` of the block's own ``beta``, or ``1``
      where the block bias-corrects ``Mt`` itself (``bias_correction=True``);
      ``0`` before the first step. A scalar of the default float dtype.
  """

  grad_sq_norms: optax.Updates
  momentum_sq_norms: optax.Updates
  momentum_bias: jax.Array


class OrthogonalizeMomentumState(NamedTuple):
  """State of :func:`orthogonalize_momentum`.

  Attributes:
    count: int32, number of updates so far.
    mu: the momentum ``M``, like the parameters.
    statistics: ``None``, or with ``statistics=True`` the
      :class:`MomentumStatistics` of the last step (zeros before the first).
  """

  count: jax.typing.ArrayLike
  mu: optax.Updates
  statistics: MomentumStatistics | None = None


def _zero_statistics(entries, params) -> MomentumStatistics:
  """Zero :class:`MomentumStatistics`, without the parameters' ``Variable``
  annotations (their shardings do not fit ``(batch, fan_in)`` arrays)."""
  zeros = [_zeros_per_matrix(lay, x.dtype, lambda p: p.fan_in) for _, x, lay in entries]
  tree = jax.tree.unflatten(sharding_lib.plain_treedef(params), zeros)
  return MomentumStatistics(
    grad_sq_norms=tree,
    momentum_sq_norms=tree,
    momentum_bias=jnp.zeros([], jnp.result_type(float)),
  )


def _momentum_direction(updates, mu, count_inc, beta, nesterov, bias_correction):
  """``Mt``: the (optionally Nesterov, optionally bias-corrected) momentum."""
  if bias_correction:
    if nesterov:
      return jax.tree.map(
        lambda m, g: beta * m + (1 - beta) * g,
        optax.tree.bias_correction(mu, beta, optax.safe_increment(count_inc)),
        optax.tree.bias_correction(updates, beta, count_inc),
      )
    return optax.tree.bias_correction(mu, beta, count_inc)
  if nesterov:
    return jax.tree.map(lambda m, g: (1 - beta) * g + beta * m, mu, updates)
  return mu


def _momentum_bias(beta, count, bias_corrected: bool) -> jax.Array:
  """``1 - beta^t`` (``1`` for a bias-corrected ``Mt``), a scalar of the
  default float dtype (float64 under ``jax_enable_x64``)."""
  dt = jnp.result_type(float)
  if bias_corrected:
    return jnp.ones([], dt)
  return 1 - jnp.asarray(beta, dt) ** count.astype(dt)


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
  sharding: sharding_lib.ShardingLike = sharding_lib.AUTO,
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
  The updates it returns are the arrays ``O_t``, shaped like the parameters.

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
    statistics: also keep, in the state, the :class:`MomentumStatistics` of
      each step (with this block's bias ``1 - beta^t``), which
      :func:`scale_by_norm_adaptive` reads.
    weight_dimension_numbers: a dimension-numbers spec (see
      :mod:`optax_orth.routing`; ``None``: the default routing). Every leaf
      this block sees must be a matrix under it.
    sharding: where each matrix is orthogonalized (the "owner" scheme, see
      :mod:`optax_orth.sharding`): ``"auto"`` (the default): with a mesh in
      context (``jax.set_mesh``) each matrix is orthogonalized whole on one
      device of the mesh axes that shard its group, and its result comes back
      in its input's layout; ``None``: off (the compiler's automatic
      partitioning); an :class:`optax_orth.OwnerSharding`: the named mesh and
      axes. A no-op without a mesh and on one device.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.
  """
  validation.check_hyperparameters(locals())
  sharding_lib.check_sharding(sharding)
  if orthogonalizer is None:
    orthogonalizer = orth_lib.make_newton_schulz(
      ns_coeffs, ns_steps, eps, ns_dtype, preconditioning=preconditioning
    )
  where = "orthogonalize_momentum"

  def init_fn(params):
    entries, _ = leaf_layouts(weight_dimension_numbers, params, where)
    for name, x, _ in entries:
      if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise ValueError(
          f"leaf {name!r} has dtype {x.dtype}; orthogonalize_momentum needs "
          "floating-point (or complex) parameters."
        )
    return OrthogonalizeMomentumState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      statistics=_zero_statistics(entries, params) if statistics else None,
    )

  def update_fn(updates, state, params=None):
    del params
    validation.check_matches_state(updates, state.mu, where)
    entries, treedef = leaf_layouts(weight_dimension_numbers, updates, where)
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count_inc = optax.safe_increment(state.count)
    mu_hat = _momentum_direction(
      updates, mu, count_inc, beta, nesterov, bias_correction
    )
    m_hats = jax.tree.leaves(mu_hat)
    m_hats = sharding_lib.keep_layout(m_hats, jax.tree.leaves(state.mu), sharding)
    layouts = [lay for _, _, lay in entries]
    # Under a mesh: sharded batch axes first (expert parallelism stays put).
    views = sharding_lib.owner_layouts(layouts, m_hats, sharding)
    orthogonal = orthogonalize_grouped(
      to_matrix_list(views, m_hats), orthogonalizer, sharding
    )
    outs = from_matrix_list(views, orthogonal)
    outs = sharding_lib.keep_layout(outs, jax.tree.leaves(state.mu), sharding)
    if adaptive:  # the dual norm <Mt, O> per leaf, or per block of a split leaf
      dual = lambda _, m, o: jnp.sum(jnp.conj(m) * o) * o
      outs = [
        lay.map_parts(dual, m, o)
        for lay, m, o in zip(layouts, m_hats, outs, strict=True)
      ]
    stats = None
    if statistics:  # built as init builds them: without Variable annotations
      stat_def = sharding_lib.plain_treedef(updates)
      stats = MomentumStatistics(
        grad_sq_norms=jax.tree.unflatten(
          stat_def, [row_sq_norms(g, lay) for _, g, lay in entries]
        ),
        momentum_sq_norms=jax.tree.unflatten(
          stat_def,
          [row_sq_norms(m, lay) for lay, m in zip(layouts, m_hats, strict=True)],
        ),
        momentum_bias=_momentum_bias(beta, count_inc, bias_correction),
      )
    new_state = OrthogonalizeMomentumState(
      count=count_inc, mu=optax.tree.cast(mu, mu_dtype), statistics=stats
    )
    new_state = sharding_lib.keep_state_layout(new_state, state, sharding)
    return jax.tree.unflatten(treedef, outs), new_state

  # optax's OptState alias does not spell a None field (``statistics``), which
  # is a valid pytree.
  return optax.GradientTransformation(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


# ---------------------------------------------------------------------------
# Shape scaling.


def shape_scale(
  fan_in: int, fan_out: int, consistent_rms: jax.typing.ArrayLike | None = None
):
  """``sqrt(max(1, fan_out / fan_in))``, or ``c * sqrt(max(fan_in, fan_out))``.

  ``1`` for an empty matrix (``fan_in = 0``), whose update is empty anyway.

  Args:
    fan_in: the matrix's input size.
    fan_out: its output size.
    consistent_rms: ``None`` for width scaling, or the target RMS ``c``.
  """
  if consistent_rms is None:
    return jnp.sqrt(jnp.maximum(1, fan_out / max(fan_in, 1)))
  return jnp.sqrt(jnp.maximum(fan_in, fan_out)) * consistent_rms


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
    :func:`scale_by_norm_adaptive`.

  Args:
    weight_dimension_numbers: a dimension-numbers spec (``None``: the
      default routing).
    consistent_rms: ``None`` for width scaling, or the target RMS.

  Returns:
    A stateless ``optax.GradientTransformation``.
  """
  validation.check_hyperparameters(locals())

  def scale(p, x):  # p: the layout of one matrix stack (one block of a leaf)
    return (shape_scale(p.fan_in, p.fan_out, consistent_rms) * x).astype(x.dtype)

  def update_fn(updates, state, params=None):
    del params
    return map_matrices(
      weight_dimension_numbers, "scale_by_shape", scale, updates
    ), state

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
  axis: Literal["fan_out", "fan_in", "larger"] = "fan_out",
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
  and returned in the update's dtype. With ``axis="fan_in"`` the second moment
  is kept per input feature ``i`` (the mean runs over ``j``) instead; with
  ``"larger"``, along the larger of the two axes (per neuron unless
  ``fan_in > fan_out``), as modded-nanogpt's NorMuon does
  (``_apply_normuon_variance_reduction`` in ``train_gpt.py``, checked at
  commit ``f411b3d``; its whole rule is a recipe in ``docs/recipes.md``).

  Args:
    b2: decay of the second moment, in ``[0, 1)``.
    eps: non-negative term added to the denominators.
    target_rms: ``None`` (norm-preserving) or the fixed RMS (positive).
    axis: which axis keeps the statistics: ``"fan_out"`` (per neuron, the
      paper), ``"fan_in"`` or ``"larger"`` (modded-nanogpt).
    weight_dimension_numbers: a dimension-numbers spec (``None``: the
      default routing).

  Returns:
    An ``optax.GradientTransformation`` whose state holds one float32 value
    per neuron per matrix.

  References:
    Li et al., `NorMuon: Making Muon more efficient and scalable
    <https://arxiv.org/abs/2510.05491>`_, 2025.
  """
  validation.check_hyperparameters(locals())
  validation.check_choice("axis", axis, ("fan_out", "fan_in", "larger"))
  where = "scale_by_neuron_rms"
  by_row = lambda p: axis == "fan_in" or (axis == "larger" and p.fan_in > p.fan_out)

  def init_fn(params):
    entries, _ = leaf_layouts(weight_dimension_numbers, params, where)
    size = lambda p: p.fan_in if by_row(p) else p.fan_out
    nu = [_zeros_per_matrix(lay, x.dtype, size) for _, x, lay in entries]
    treedef = sharding_lib.plain_treedef(params)  # no Variable annotations
    return ScaleByNeuronRmsState(nu=jax.tree.unflatten(treedef, nu))

  def normalize(o, nu, lay):
    m = lay.to_matrices(o.astype(jnp.promote_types(o.dtype, nu.dtype)))
    n0 = jnp.linalg.norm(m, axis=(-2, -1), keepdims=True)
    red = -1 if by_row(lay) else -2  # the axis the mean runs over
    nu = b2 * nu + (1 - b2) * jnp.mean(abs_sq(m), axis=red)
    m = m / (jnp.expand_dims(jnp.sqrt(nu), red) + eps)
    target = (
      n0 if target_rms is None else target_rms * (lay.fan_in * lay.fan_out) ** 0.5
    )
    m = m * (target / (jnp.linalg.norm(m, axis=(-2, -1), keepdims=True) + eps))
    out = lay.from_matrices(m).astype(o.dtype)
    # Under a mesh, the result in its input's layout: left free, the compiler
    # may gather the owners' results whole to form the statistics (an MoE
    # stack on a 2-D mesh: 2.3x the owner scheme's bytes, benchmarks/
    # bench_scale.py).
    return sharding_lib.keep_layout([out], [o])[0], nu

  def update_fn(updates, state, params=None):
    del params
    fn = lambda p, o, v: normalize(o, v, p)
    out, nu = map_matrices(
      weight_dimension_numbers, where, fn, updates, state.nu, outputs=2
    )
    return out, sharding_lib.keep_state_layout(ScaleByNeuronRmsState(nu=nu), state)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# NAMO / NAMO-D: norm-based adaptive step size.


def _check_step_size_call(where: str, extra_args: dict) -> None:
  if not extra_args.get("matrix_step_sizes", False):
    raise ValueError(
      f"{where} transforms NAMO's step sizes, not parameter updates: pass it "
      "as scale_by_norm_adaptive(..., step_size_transform=...), not in a chain "
      "of updates."
    )


def clamp_diagonal(c: float = 0.75) -> optax.GradientTransformationExtraArgs:
  r"""NAMO-D's clamp of the diagonal step sizes toward their mean.

  A transformation of the tree of step sizes that
  :func:`scale_by_norm_adaptive` forms (one ``(batch, fan_in)`` array per
  matrix leaf), passed as its ``step_size_transform``. For each matrix, with
  ``m = mean_i d_i`` over its input features:
  ``d_i <- clip(d_i, c m, m / c)`` when ``0 < c <= 1`` and ``m`` is finite
  and positive; otherwise ``d`` is left as it is. ``c = 1`` gives every row the
  mean; ``c = 0`` or ``c > 1`` disables the clamp. Placed in a chain of
  parameter updates it raises a ``ValueError``.

  Args:
    c: the clamp (non-negative). Reference default ``0.75``.

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs``.

  References:
    Zhang, Liu and Schaeffer, `Adam Improves Muon: Adaptive Moment Estimation
    with Orthogonalized Momentum <https://arxiv.org/abs/2602.17080>`_, 2026.
  """
  validation.check_non_negative("c", c)

  def clamp(d):
    m = jnp.mean(d, axis=-1, keepdims=True)
    active = (m > 0) & jnp.isfinite(m) & (c > 0) & (c <= 1)
    safe_c = jnp.where((c > 0) & (c <= 1), c, 1.0)
    return jnp.where(active, jnp.clip(d, safe_c * m, m / safe_c), d)

  def update_fn(updates, state, params=None, **extra_args):
    del params  # the updates are NAMO-D's step sizes d_i, not a gradient
    _check_step_size_call("clamp_diagonal", extra_args)
    return jax.tree.map(clamp, updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


class ScaleByNormAdaptiveState(NamedTuple):
  """State of :func:`scale_by_norm_adaptive`.

  Per matrix leaf, arrays of shape ``(batch, 1)`` (one per matrix) or
  ``(batch, fan_in)`` (one per input feature), in :func:`stat_dtype`:

  Attributes:
    count: int32, number of updates so far.
    nu: the EMA ``v`` of squared gradient norms.
    step_size: the step size ``d`` applied at the last step (after the
      step-size transformation, without the learning rate).
    raw_step_size: ``d`` before the step-size transformation.
    learning_rate: the learning rate of the last step; NAMO's
      ``alpha = learning_rate * step_size``.
    direction_state: the state of the ``direction`` transformation.
    step_size_state: the state of the step-size transformation.
  """

  count: jax.typing.ArrayLike
  nu: optax.Updates
  step_size: optax.Updates
  raw_step_size: optax.Updates
  learning_rate: jax.Array
  direction_state: optax.OptState
  step_size_state: optax.OptState


def find_states(tree: Any, cls: type | tuple[type, ...]) -> list:
  """Every state of type ``cls`` nested anywhere in ``tree``, in tree order."""
  is_cls = lambda x: isinstance(x, cls)
  return [x for x in jax.tree.leaves(tree, is_leaf=is_cls) if is_cls(x)]


def _statistics_of(direction_state) -> MomentumStatistics:
  found = [
    s.statistics
    for s in find_states(direction_state, OrthogonalizeMomentumState)
    if s.statistics is not None
  ]
  if len(found) != 1:
    raise ValueError(
      "scale_by_norm_adaptive: its direction transformation must contain "
      "exactly one orthogonalize_momentum(statistics=True); found "
      f"{len(found)}."
    )
  return found[0]


def _norm_adaptive_step_sizes(stats, nu_tree, count, b2, eps, per_feature):
  """NAMO's ``(v_t, d_t)`` per matrix leaf, from the momentum statistics.

  ``v = b2 v + (1 - b2) ||G||^2`` and ``d = sqrt(1 - b2^t) / (1 - b1^t +
  1e-12) * ||Mt|| / (sqrt(v) + eps)``, with ``1 - b1^t`` the momentum's own
  bias (``stats.momentum_bias``), summed over the input features when
  ``per_feature`` is false. Squared norms saturate at the dtype's largest
  value, so that ``d`` stays finite instead of ``inf / inf``.
  """

  def one(g2, m2, nu):
    t = count.astype(nu.dtype)
    bias = stats.momentum_bias.astype(nu.dtype)
    correction = jnp.sqrt(1 - b2**t) / (bias + 1e-12)
    big = jnp.finfo(nu.dtype).max
    if not per_feature:
      g2, m2 = g2.sum(-1, keepdims=True), m2.sum(-1, keepdims=True)
    nu = jnp.minimum(b2 * nu + (1 - b2) * jnp.minimum(g2, big), big)
    d = correction * jnp.sqrt(jnp.minimum(m2, big)) / (jnp.sqrt(nu) + eps)
    return nu, d.astype(nu.dtype)

  nus, treedef = jax.tree.flatten(nu_tree)
  pairs = [
    one(g2, m2, nu)
    for g2, m2, nu in zip(
      jax.tree.leaves(stats.grad_sq_norms),
      jax.tree.leaves(stats.momentum_sq_norms),
      nus,
      strict=True,
    )
  ]
  return (
    jax.tree.unflatten(treedef, [p[0] for p in pairs]),
    jax.tree.unflatten(treedef, [p[1] for p in pairs]),
  )


def _check_norm_adaptive_state(state, entries, granularity: str) -> None:
  """The state is a :class:`ScaleByNormAdaptiveState` of this granularity."""
  where = "scale_by_norm_adaptive"
  if not isinstance(state, ScaleByNormAdaptiveState):
    raise ValueError(
      f"{where}: expected a ScaleByNormAdaptiveState, got "
      f"{type(state).__name__}; pass the state that init returned (called "
      "init first?)."
    )
  per_feature = granularity == "input_feature"
  nus = jax.tree.leaves(state.nu, is_leaf=_is_parts)
  for (name, _, lay), nu in zip(entries, nus, strict=True):
    want = lay.each(lambda p: (p.batch, p.fan_in if per_feature else 1))
    got = jax.tree.map(jnp.shape, nu)
    if got != want:
      raise ValueError(
        f"{where}: leaf {name!r} has a second moment of shape {got}, but "
        f"granularity={granularity!r} keeps {want}; pass the state that this "
        "optimizer's init returned (called init first?)."
      )


def _check_step_sizes(d, raw) -> None:
  flat_d = jax.tree.leaves(d)
  for (path, r), x in zip(
    jax.tree_util.tree_flatten_with_path(raw)[0], flat_d, strict=False
  ):
    if jnp.shape(x) != jnp.shape(r):
      raise ValueError(
        f"scale_by_norm_adaptive: step_size_transform returned shape "
        f"{jnp.shape(x)} for leaf {path_str(path)!r}; it must return step sizes "
        f"of the shapes it receives, here {jnp.shape(r)}."
      )
  if len(flat_d) != len(jax.tree.leaves(raw)):
    raise ValueError(
      "scale_by_norm_adaptive: step_size_transform changed the tree of step sizes."
    )


def _capped_step(
  o, k, alpha, lay, scale_coeff, decay, weight_decay_mode, lr, cautious=False
):
  """NAMO's ``-min(alpha s, 1) O - shrink K`` for one leaf, in the leaf's shape;
  with ``cautious``, the decay only where ``O K >= 0``."""
  alpha = alpha[:, :, None]
  s = scale_coeff * max(lay.fan_in, lay.fan_out) ** 0.5
  dt = jnp.promote_types(o.dtype, alpha.dtype)  # complex leaves stay complex
  om = lay.to_matrices(o.astype(dt))
  delta = -jnp.minimum(alpha * s, 1.0) * om
  if k is not None:
    if weight_decay_mode == "adaptive":
      shrink = jnp.minimum(decay * jnp.minimum(alpha, 1.0), 1.0)
    else:
      shrink = lr * decay
    km = lay.to_matrices(k.astype(dt))
    if cautious:
      km = km * wd_lib.cautious_mask(om, km)
    delta = delta - shrink * km
  return lay.from_matrices(delta).astype(o.dtype)


def scale_by_norm_adaptive(
  direction: optax.GradientTransformation,
  learning_rate: optax.ScalarOrSchedule,
  *,
  b2: float = 0.99,
  eps: float = 1e-8,
  granularity: Literal["matrix", "input_feature"] = "matrix",
  step_size_transform: optax.GradientTransformation | None = None,
  scale_coeff: float = 0.2,
  weight_decay: float = 0.0,
  weight_decay_mode: Literal["adaptive", "decoupled"] = "adaptive",
  cautious_weight_decay: bool = False,
  weight_dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""NAMO's adaptive step: ``direction``'s output times ``lr * d``, capped.

  ``direction`` makes the direction ``O`` from the gradients, and must contain
  ``orthogonalize_momentum(beta, statistics=True)`` (any optax blocks may come
  after it, for example :func:`scale_by_neuron_rms`). Per matrix
  (``granularity="matrix"``, NAMO) or per input feature ``i`` (a row of the
  Flax kernel, ``"input_feature"``, NAMO-D), with ``G`` and ``Mt`` the
  gradient and the momentum direction that block saw:

  .. math::
    v_t = b_2 v_{t-1} + (1 - b_2) \|G_t\|^2, \qquad
    d_t = \frac{\sqrt{1 - b_2^t}}{1 - b_1^t + 10^{-12}}
          \frac{\|\tilde M_t\|}{\sqrt{v_t} + \epsilon},

  where ``1 - b_1^t`` is the bias of the momentum, read from the statistics of
  that block (``b_1`` is its ``beta``, so the two cannot disagree; a block
  with ``bias_correction=True`` reports ``1``), then ``d <-
  step_size_transform(d)`` (NAMO-D: :func:`clamp_diagonal`), and
  with ``alpha = lr * d`` and ``s = scale_coeff * sqrt(max(fan_in,
  fan_out))`` the update of a kernel ``K`` is

  .. math::
    \Delta K_{i,:} = -\min(\alpha_i s, 1)\, O_{i,:}
      - \min(\lambda \min(\alpha_i, 1), 1)\, K_{i,:}

  in the default ``weight_decay_mode="adaptive"`` (the reference: decay
  scaled by ``alpha``; the outer ``min`` is NAMO-D's ``max(0, .)``), or with
  ``-lr * lambda * K`` as the decay term in ``"decoupled"`` mode. Norms and
  step sizes are computed in the wider of float32 and the leaf's dtype, and
  squared norms saturate at its largest value, so ``d`` stays finite. The
  updates are plain arrays shaped like the parameters.

  Args:
    direction: the transformation that makes ``O`` (see above).
    learning_rate: a float or an optax schedule of the step count.
    b2: decay of the squared-norm EMA, in ``[0, 1)``.
    eps: non-negative term added to ``sqrt(v)``.
    granularity: ``"matrix"`` or ``"input_feature"``.
    step_size_transform: ``None``, or a transformation of the tree of step
      sizes (``(batch, 1)`` or ``(batch, fan_in)`` arrays), such as
      :func:`clamp_diagonal` or any optax transformation of arrays. It is
      called with the extra argument ``matrix_step_sizes=True``.
    scale_coeff: NAMO's shape coefficient (``0.2`` in the reference).
    weight_decay: ``lambda``, non-negative. Needs ``params`` in ``update``.
    weight_decay_mode: ``"adaptive"`` or ``"decoupled"``.
    cautious_weight_decay: decay only where ``O K >= 0`` (where the step
      already shrinks the weight; Chen et al., `Cautious Weight Decay
      <https://arxiv.org/abs/2510.12402>`_, 2025), see
      :func:`optax_orth.add_cautious_weight_decay`.
    weight_dimension_numbers: a dimension-numbers spec (``None``: the
      default routing), the same as ``direction``'s.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state
    (:class:`ScaleByNormAdaptiveState`) holds the step sizes it applied.

  References:
    Zhang, Liu and Schaeffer, `Adam Improves Muon: Adaptive Moment Estimation
    with Orthogonalized Momentum <https://arxiv.org/abs/2602.17080>`_, 2026;
    released code ``minxin-zhg/namo``.
  """
  validation.check_hyperparameters(locals())
  validation.check_choice("granularity", granularity, ("matrix", "input_feature"))
  validation.check_choice(
    "weight_decay_mode", weight_decay_mode, ("adaptive", "decoupled")
  )
  direction = optax.with_extra_args_support(direction)
  step_tx = optax.with_extra_args_support(step_size_transform or optax.identity())
  per_feature = granularity == "input_feature"
  decays = not (isinstance(weight_decay, int | float) and weight_decay == 0)
  where = "scale_by_norm_adaptive"

  def init_fn(params):
    entries, _ = leaf_layouts(weight_dimension_numbers, params, where)
    width = lambda p: p.fan_in if per_feature else 1
    zeros = [_zeros_per_matrix(lay, x.dtype, width) for _, x, lay in entries]
    # Without the parameters' Variable annotations (their shardings).
    zeros = jax.tree.unflatten(sharding_lib.plain_treedef(params), zeros)
    direction_state = direction.init(params)
    _statistics_of(direction_state)
    return ScaleByNormAdaptiveState(
      count=jnp.zeros([], jnp.int32),
      nu=zeros,
      step_size=zeros,
      raw_step_size=zeros,
      learning_rate=jnp.zeros([], jnp.float32),
      direction_state=direction_state,
      step_size_state=step_tx.init(zeros),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if decays and params is None:
      raise ValueError(f"{where} with weight_decay needs params in update.")
    entries = leaf_layouts(weight_dimension_numbers, updates, where)[0]
    _check_norm_adaptive_state(state, entries, granularity)
    o_tree, direction_state = direction.update(
      updates, state.direction_state, params, **extra_args
    )
    count = optax.safe_increment(state.count)
    nu, raw = _norm_adaptive_step_sizes(
      _statistics_of(direction_state), state.nu, count, b2, eps, per_feature
    )
    d, step_state = step_tx.update(
      raw, state.step_size_state, None, matrix_step_sizes=True
    )
    _check_step_sizes(d, raw)
    # Under a mesh: this block's state in the layouts it came in with (the
    # direction's state is kept by the direction; see keep_state_layout).
    nu, d, raw = sharding_lib.keep_state_layout(
      (nu, d, raw), (state.nu, state.step_size, state.raw_step_size)
    )
    lr = validation.at_step(learning_rate, state.count)
    caps = (scale_coeff, weight_decay, weight_decay_mode, lr, cautious_weight_decay)
    if decays:
      step = lambda p, o, alpha, k: _capped_step(o, k, lr * alpha, p, *caps)
      args = (d, params)
    else:
      step = lambda p, o, alpha: _capped_step(o, None, lr * alpha, p, *caps)
      args = (d,)
    out = map_matrices(weight_dimension_numbers, where, step, o_tree, *args)
    new_state = ScaleByNormAdaptiveState(
      count=count,
      nu=nu,
      step_size=d,
      raw_step_size=raw,
      learning_rate=jnp.asarray(lr, jnp.float32),
      direction_state=direction_state,
      step_size_state=step_state,
    )
    # Under a mesh: the updates in the layouts of the direction's.
    out = jax.tree.unflatten(
      jax.tree.structure(out),
      sharding_lib.keep_layout(jax.tree.leaves(out), jax.tree.leaves(o_tree)),
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
