"""Distributed orthogonalization: the "owner" scheme over a device mesh.

Under ``jax.jit`` with parameters and optimizer state sharded over a mesh
(FSDP), the compiler's automatic partitioning of Newton–Schulz either gathers
every matrix onto every device (``N``-fold redundant work) or keeps the
matrices sharded and all-reduces a Gram matrix at every step. The *owner*
scheme (NorMuon's and Dion's FSDP scheme, Megatron's "home rank") instead
assigns every whole matrix to exactly one device: an all-to-all brings it
there, that device alone orthogonalizes it, and a second all-to-all sends the
shards back. Per device this is ``1/N`` of the compute and about
``2 r c b (N - 1) / N^2`` bytes for an ``r x c`` matrix of ``b``-byte elements.

This module expresses the scheme with JAX's own machinery: the matrices of one
shape are laid out as a ``(N, Q, r, c)`` array whose first axis is constrained
(``jax.lax.with_sharding_constraint`` with a ``NamedSharding``) to be sharded
over the owner axes; the compiler inserts the all-to-alls. On ``Explicit``
mesh axes (sharding in types) the same runs inside ``jax.sharding.auto_axes``
and each result is returned in the sharding its input had. The layout is chosen so that
a stacked leaf whose batch axis is a multiple of ``N`` moves into place without
any extra reshuffling (its ``k``-th contiguous block of ``B / N`` matrices goes
to device ``k``), and the remaining matrices of all leaves of that shape are
pooled and padded with zero matrices to a multiple of ``N`` (Newton–Schulz maps
a zero matrix to zero, so padding is harmless and never produces NaN).

The scheme is on by default (``sharding="auto"`` in
:func:`optax_orth.orthogonalize_momentum` and every optimizer alias): when the
update is traced with a mesh in context (``jax.set_mesh(mesh)``), each group of
same-shape matrices is distributed over the mesh axes that shard it. On
``Explicit`` axes those are read from the arrays' types; ``Auto`` axes are not
visible at trace time, and every ``Auto`` axis of size greater than one is used.
``sharding=None`` turns the scheme off; ``sharding=OwnerSharding(mesh, axis)``
names the mesh and axes. Without a mesh in context, on one device, or on axes of
size one the scheme is a no-op, so the same code runs on one CPU, on simulated
devices, on several processes and on pods, and single-device results are
bit-identical with and without it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optax_orth._src import split_newton_schulz as split_lib
from optax_orth._src.routing import path_names


class OwnerSharding(NamedTuple):
  """Where the owner scheme distributes whole matrices.

  Attributes:
    mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``). ``None``: the mesh in
      context at trace time, set with ``jax.set_mesh(mesh)``; if there is
      none, the scheme is a no-op.
    axis: a mesh axis name or a tuple of names over which matrices are
      distributed (the data/FSDP axis, for example ``"fsdp"``). ``None``: every
      non-manual axis of the mesh, so that each matrix is orthogonalized on
      exactly one device of the whole mesh. With a tensor-parallel ``"model"``
      axis left out of ``axis``, each matrix is orthogonalized once per
      ``model`` group (replicated along it).
    split_min_flops: a matrix whose Newton–Schulz costs at least this many
      FLOPs (:func:`optax_orth.measure.newton_schulz_flops`) may be split over
      a group of devices when that balances the work better than whole
      matrices (see ``docs/scale.md``); ``None``: every matrix stays whole.
  """

  mesh: Any = None
  axis: str | tuple[str, ...] | None = None
  split_min_flops: float | None = 1e9  # AUTO_SPLIT_MIN_FLOPS


#: The default of every ``sharding=`` argument: the owner scheme over the axes
#: of the mesh in context that shard each group of matrices (see the module
#: docstring); a no-op without a mesh.
AUTO = "auto"

#: ``split_min_flops`` of ``sharding="auto"``: the default of
#: :class:`OwnerSharding`.
AUTO_SPLIT_MIN_FLOPS = 1e9

#: What a ``sharding=`` argument takes: ``"auto"``, ``None`` (off) or an
#: :class:`OwnerSharding`.
ShardingLike = OwnerSharding | str | None


def check_sharding(sharding: Any) -> None:
  """Raises ``ValueError`` unless ``sharding`` is ``"auto"``, ``None`` or an
  :class:`OwnerSharding`."""
  if sharding is None or sharding == AUTO or isinstance(sharding, OwnerSharding):
    return
  raise ValueError(
    'sharding must be "auto" (the default), None (off) or an '
    f"optax_orth.OwnerSharding; got {sharding!r}."
  )


def _axis_types(mesh) -> dict[str, Any]:
  return dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=False))


def _context_mesh(xs: Sequence[Any] = ()):
  """The mesh set with ``jax.set_mesh``, else the mesh in the types of ``xs``."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    return mesh
  for x in xs:
    sh = getattr(jax.typeof(x), "sharding", None)
    if isinstance(sh, NamedSharding) and not sh.mesh.empty:
      return sh.mesh
  return None


def spec_axes(x: Any) -> tuple[tuple[str, ...], ...]:
  """The mesh axes that shard each dimension of ``x``, read from its type.

  Empty tuples on ``Auto`` axes (where the layout is not in the type) and
  outside ``jax.jit`` for arrays without a ``NamedSharding``.
  """
  sh = getattr(jax.typeof(x), "sharding", None)
  out: list[tuple[str, ...]] = [() for _ in range(jnp.ndim(x))]
  if not isinstance(sh, NamedSharding):
    return tuple(out)
  for i, entry in enumerate(tuple(sh.spec)[: len(out)]):
    if isinstance(entry, str):
      out[i] = (entry,)
    elif isinstance(entry, tuple):
      out[i] = tuple(a for a in entry if isinstance(a, str))
  return tuple(out)


def _auto_axes(mesh, xs: Sequence[Any]) -> tuple[str, ...]:
  """``Explicit`` axes that shard some ``x``, and every ``Auto`` axis."""
  types = _axis_types(mesh)
  used = {a for x in xs for dim in spec_axes(x) for a in dim}
  return tuple(
    a
    for a in mesh.axis_names
    if (types.get(a) == AxisType.Explicit and a in used)
    or types.get(a, AxisType.Auto) == AxisType.Auto
  )


def owner_axes(
  sharding: ShardingLike, xs: Sequence[Any] = ()
) -> tuple[Any, tuple[str, ...], int]:
  """The mesh, the owner axis names and their total size ``N``.

  Args:
    sharding: ``"auto"``, ``None`` or an :class:`OwnerSharding`.
    xs: the arrays to distribute (for ``"auto"``: the axes that shard them on
      ``Explicit`` meshes are read from their types).

  Returns:
    ``(mesh, axes, N)``, or ``(None, (), 1)`` when the scheme is a no-op
    (``None``, no mesh, or owner axes of size one).

  Raises:
    ValueError: if ``sharding`` is none of the above, or names an axis that
      is not an axis of the mesh.
  """
  check_sharding(sharding)
  if sharding is None:
    return None, (), 1
  if sharding == AUTO:
    mesh = _context_mesh(xs)
    if mesh is None:
      return None, (), 1
    axes = _auto_axes(mesh, xs)
  else:
    assert isinstance(sharding, OwnerSharding)  # check_sharding
    mesh = sharding.mesh if sharding.mesh is not None else _context_mesh()
    if mesh is None or mesh.empty:
      return None, (), 1
    types = _axis_types(mesh)
    if sharding.axis is None:
      axes = tuple(a for a in mesh.axis_names if types.get(a) != AxisType.Manual)
    else:
      axes = (sharding.axis,) if isinstance(sharding.axis, str) else sharding.axis
      for a in axes:
        if a not in mesh.axis_names:
          raise ValueError(
            f"OwnerSharding axis {a!r} is not an axis of the mesh "
            f"(axes {tuple(mesh.axis_names)})."
          )
  axes = tuple(a for a in axes if mesh.shape[a] > 1)
  n = math.prod(mesh.shape[a] for a in axes)
  if n == 1:
    return None, (), 1
  return mesh, axes, n


def _constrain(x: jax.Array, mesh, axes: tuple[str, ...]) -> jax.Array:
  """Shards axis 0 of ``x`` over ``axes``; every other axis replicated."""
  spec = P(axes if len(axes) != 1 else axes[0], *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _staged(x: jax.Array, mesh, axes: tuple[str, ...], inbound: bool) -> jax.Array:
  """Moves axis 0 of ``x`` onto (``inbound``) or off the owner axes, one at a time.

  With several owner axes, ``x`` of shape ``(N, ...)`` is viewed as
  ``(N_1, ..., N_k, ...)`` and constrained in ``k`` stages: inbound, stage
  ``j`` shards the last ``j`` of those dimensions over the last ``j`` axes
  and leaves the rest of the array to the compiler (``UNCONSTRAINED``), so
  that each stage is a one-axis all-to-all instead of a gather over the whole
  mesh; outbound, the same stages in reverse. One axis: ``x`` unchanged
  (inbound it is then constrained by the caller).
  """
  k = len(axes)
  if k == 1:
    return x
  sizes = [mesh.shape[a] for a in axes]
  y = x.reshape(*sizes, *x.shape[1:])
  free = [P.UNCONSTRAINED] * (x.ndim - 1)
  stages = range(1, k) if inbound else range(k - 1, 0, -1)
  for j in stages:
    spec = P(*([None] * (k - j)), *axes[k - j :], *free)
    y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
  return y.reshape(x.shape)


def owner_orthogonalize(
  members: Sequence[jax.Array],
  orthogonalizer: Callable[[jax.Array], jax.Array],
  sharding: ShardingLike = AUTO,
  fan_in_rows: bool = True,
) -> list[jax.Array]:
  """Orthogonalizes same-shape ``(B_k, r, c)`` stacks, each matrix on one owner.

  With ``N`` the size of the owner axes (:func:`owner_axes`), each member is
  split into an aligned part (its first ``N * (B_k // N)`` matrices, reshaped
  to ``(N, B_k // N, r, c)``) and a remainder; the remainders of all members
  are pooled and padded with zero matrices to a multiple of ``N``. The pieces
  are concatenated into one ``(N, Q, r, c)`` array sharded over the owner axes
  on its first axis, so that device ``k`` holds ``Q`` whole matrices, and the
  orthogonalizer runs once on the ``(N * Q, r, c)`` view. Each member's slice
  is then handed back; on ``Explicit`` axes in the sharding its input had.
  Where that leaves devices idle (fewer matrices than devices, or a count
  that does not divide evenly), a Newton–Schulz orthogonalizer may instead
  split each matrix over a group of devices (``plan_group``,
  ``_split_owner``).

  With the scheme off (``None``, no mesh, owner axes of size one) this is
  ``orthogonalizer(concatenate(members))`` split back; on ``Explicit`` axes
  that shard the members it runs under the compiler's automatic partitioning
  (``jax.sharding.auto_axes``), each result in its input's sharding.

  Args:
    members: arrays of one shape ``(r, c)`` per matrix and one dtype.
    orthogonalizer: a function from ``(batch, r, c)`` arrays to arrays of
      the same shape.
    sharding: ``"auto"``, ``None`` or an :class:`OwnerSharding`.
    fan_in_rows: whether the rows of the members are their fan-in axis (they
      were not transposed), which FSDP shards: on ``Auto`` axes, where the
      layout is not in the types, the split path then takes the members as
      sharded on their rows. On ``Explicit`` axes the types say.

  Returns:
    The orthogonalized members, in order.
  """
  mesh, axes, n = owner_axes(sharding, members)
  if any(spec_axes(x)[1:] != ((), ()) for x in members):  # layout in the types
    rows = all(spec_axes(x)[1] for x in members)
  else:
    rows = fan_in_rows
  min_flops = (
    sharding.split_min_flops
    if isinstance(sharding, OwnerSharding)
    else AUTO_SPLIT_MIN_FLOPS
  )
  ambient = _context_mesh(members)
  explicit = () if ambient is None else _explicit_axes(ambient)
  sharded = any(dim for x in members for dim in spec_axes(x))
  if not explicit or (mesh is None and not sharded):
    if mesh is None:
      return _plain(list(members), orthogonalizer)
    return _owner(list(members), orthogonalizer, mesh, axes, n, min_flops, rows)

  # Explicit axes: run under the compiler's automatic partitioning and return
  # every member in the sharding it came with.
  def run(xs):
    if mesh is None:
      return _plain(list(xs), orthogonalizer)
    ctx = jax.sharding.get_abstract_mesh()
    if not _SHARD_MAP_IN_AUTO_AXES:  # jax < 0.8: whole matrices, compiler's moves
      return _owner(list(xs), orthogonalizer, ctx, axes, n, None, rows, False)
    return _owner(list(xs), orthogonalizer, ctx, axes, n, min_flops, rows)

  fn = jax.sharding.auto_axes(
    run, axes=explicit, out_sharding=[jax.typeof(x).sharding for x in members]
  )
  call: Any = fn  # auto_axes's stub does not give the wrapped signature
  if not jax.sharding.get_abstract_mesh().empty:
    return list(call(tuple(members)))
  with jax.sharding.use_abstract_mesh(ambient):  # pyright: ignore[reportArgumentType]
    return list(call(tuple(members)))


def _explicit_axes(mesh) -> tuple[str, ...]:
  types = _axis_types(mesh)
  return tuple(a for a in mesh.axis_names if types.get(a) == AxisType.Explicit)


def _plain(members, orthogonalizer):
  sizes = [int(x.shape[0]) for x in members]
  ys = orthogonalizer(jnp.concatenate(members) if len(members) > 1 else members[0])
  return list(jnp.split(ys, np.cumsum(sizes)[:-1].tolist())) if sizes[1:] else [ys]


def keep_layout(
  xs: Sequence[jax.Array], likes: Sequence[jax.Array], sharding: ShardingLike = AUTO
) -> list[jax.Array]:
  """Ties each ``x`` to the sharding of ``like`` (``shard_alike``), if sharded.

  :func:`optax_orth.orthogonalize_momentum` ties the orthogonalizer's input
  (the Nesterov combination of momentum and gradient) to the momentum's
  layout, so that the compiler computes it where the momentum lives instead
  of moving both operands to the owners (which doubles the inbound traffic),
  and ``orthogonalize_grouped`` ties each result
  to its input, so that it comes back in the input's layout without
  ``out_shardings`` (and without collective-permutes). A no-op when the
  scheme is off, and on ``Explicit`` axes (where the layout is in the types).
  """
  mesh, _, _ = owner_axes(sharding, likes)
  if mesh is None or _explicit_axes(mesh):
    return list(xs)
  return [shard_alike(x, y)[0] for x, y in zip(xs, likes, strict=True)]


def keep_state_layout(new: Any, old: Any, sharding: ShardingLike = AUTO) -> Any:
  """Ties every leaf of a new state to the same leaf of the old one.

  The old state is usually an input of the jitted step, whose sharding is
  fixed; tied to it (``shard_alike``), the new state keeps that layout
  instead of taking one from the owner scheme's ``shard_map`` (which lays
  matrices out as the scheme assumes FSDP shards them, and would otherwise
  move unpinned outputs to that layout). A no-op where :func:`keep_layout`
  is one.
  """
  news, treedef = jax.tree.flatten(new)
  olds = jax.tree.leaves(old)
  if len(olds) != len(news):
    return new
  pairs = [
    i for i, (a, b) in enumerate(zip(news, olds, strict=True))
    if jnp.shape(a) == jnp.shape(b) and jnp.ndim(a)
  ]  # fmt: skip
  tied = keep_layout([news[i] for i in pairs], [olds[i] for i in pairs], sharding)
  for i, x in zip(pairs, tied, strict=True):
    news[i] = x
  return jax.tree.unflatten(treedef, news)


def owner_layouts(layouts: Sequence[Any], leaves: Sequence[jax.Array], sharding):
  """Matrix layouts whose batch axes put the sharded ones first.

  A leaf ``(layers, experts, fan_in, fan_out)`` with the expert axis sharded
  (expert parallelism) is viewed as ``(experts * layers, fan_in, fan_out)``
  matrices instead of ``(layers * experts, ...)``: the contiguous block of
  matrices that the owner scheme gives device ``k`` is then exactly the
  experts device ``k`` already holds, and nothing moves. The sharded batch
  axes are read from the types on ``Explicit`` axes; on ``Auto`` axes the
  innermost batch axis whose size is a multiple of ``N`` goes first. Only the
  order of the matrices changes (each is orthogonalized on its own), so the
  results are the same. The layouts are unchanged when the scheme is off.
  """
  mesh, axes, n = owner_axes(sharding, leaves)
  if mesh is None:
    return list(layouts)
  out = []
  for lay, x in zip(layouts, leaves, strict=True):
    dims = spec_axes(x)
    if not lay.blocks:
      out.append(_sharded_first(lay, dims, axes, n))
    else:  # blocks of the leaf, each with the leaf's rank
      blocks = tuple(_sharded_first(p, dims, axes, n) for p in lay.blocks)
      out.append(lay._replace(blocks=blocks))
  return out


def _sharded_first(lay, dims, axes, n):
  """``lay`` (a ``MatrixLayout``) with its sharded batch axes moved first."""
  if lay.view is not None:  # an axis cut into heads: left as it is
    return lay
  base = tuple(lay.shape)
  if len(dims) != len(base):
    return lay
  permuted = [base[i] for i in lay.perm]
  nb = max(
    (k for k in range(len(permuted) - 1) if math.prod(permuted[:k]) == lay.batch),
    default=0,
  )
  if nb < 2:
    return lay
  batch = list(lay.perm[:nb])
  known = any(dims[i] for i in range(len(base)))
  if known:
    key = lambda j: 0 if any(a in axes for a in dims[batch[j]]) else 1
  else:
    key = lambda j: (0, -j) if base[batch[j]] % n == 0 else (1, j)
  order = sorted(range(nb), key=key)
  if order == list(range(nb)):
    return lay
  return lay._replace(perm=tuple(batch[j] for j in order) + tuple(lay.perm[nb:]))


# The split path's shard_map over a re-cut mesh inside jax.sharding.auto_axes
# (Explicit axes) needs jax >= 0.8, where use_abstract_mesh is public; 0.7
# rejects the result's sharding.
_SHARD_MAP_IN_AUTO_AXES = hasattr(jax.sharding, "use_abstract_mesh")


def _owner(members, orthogonalizer, mesh, axes, n, min_flops, rows=False, direct=True):
  plan = _split_plan(members, orthogonalizer, mesh, axes, n, min_flops)
  if plan is not None:
    return _split_owner(members, mesh, axes, n, plan, rows)
  c = int(members[0].shape[2])
  tall_direct = direct and len(axes) == 1 and not rows and c % n == 0
  if tall_direct and _concrete_mesh(mesh) is not None:
    # Transposed (tall) stacks, FSDP-sharded on their columns over one owner
    # axis: the explicit all-to-all of the split path with groups of one
    # device. (Left to the compiler, a stacked tall leaf was gathered whole,
    # measured on a Mixtral-shaped tree in benchmarks/bench_scale.py.)
    whole = _SplitPlan(None, "", 0, 1, 0, 1)
    return _split_owner(members, mesh, axes, n, whole, rows, orthogonalizer)
  sizes = [int(x.shape[0]) for x in members]
  r, c = members[0].shape[1:]
  blocks, rests = [], []
  for x, b in zip(members, sizes, strict=True):
    q = b // n
    if q:
      blocks.append(x[: q * n].reshape(n, q, r, c))
    rests.append(x[q * n :])
  rest = jnp.concatenate(rests) if len(rests) > 1 else rests[0]
  n_rest = int(rest.shape[0])
  pad = (-n_rest) % n
  if n_rest:
    rest = jnp.concatenate([rest, jnp.zeros((pad, r, c), rest.dtype)]) if pad else rest
    blocks.append(rest.reshape(n, -1, r, c))
  group = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
  group = _constrain(_staged(group, mesh, axes, True), mesh, axes)
  q_total = int(group.shape[1])
  ys = orthogonalizer(_constrain(group.reshape(n * q_total, r, c), mesh, axes))
  ys = _constrain(ys, mesh, axes).reshape(n, q_total, r, c)
  rest_ys = _staged(ys[:, q_total - (n_rest + pad) // n :], mesh, axes, False)
  rest_ys = rest_ys.reshape(-1, r, c)
  outs = []
  offset, rest_offset = 0, 0
  for b in sizes:
    q = b // n
    parts = []
    if q:
      part = _constrain(ys[:, offset : offset + q], mesh, axes)
      part = _staged(part, mesh, axes, False)
      parts.append(part.reshape(q * n, r, c))
      offset += q
    if b - q * n:
      parts.append(rest_ys[rest_offset : rest_offset + b - q * n])
      rest_offset += b - q * n
    outs.append(jnp.concatenate(parts) if len(parts) > 1 else parts[0])
  return outs


# ---------------------------------------------------------------------------
# Matrices split over groups of devices.


class _SplitPlan(NamedTuple):
  opts: Any  # split_newton_schulz.SplitOptions
  method: str
  restart: int
  g: int  # devices per matrix
  axis_index: int  # the owner axis whose trailing factor ``d`` ends the group
  d: int


def _divisors(k: int) -> list[int]:
  return [d for d in range(1, k + 1) if k % d == 0]


def split_groups(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
  """The device-group sizes ``g > 1`` that the split path can use.

  The owner index of a device runs over the owner axes in order (major to
  minor). The ``g`` devices that share a matrix are those whose indices
  differ only in a leading factor of it: all of the first ``i`` owner axes
  and a divisor ``d`` of axis ``i``'s size, so that a group is strided
  across the mesh. A parameter sharded over the owner axes then reaches the
  pieces, and comes back, through all-to-alls among devices of one position
  in their groups (with a contiguous group, a matrix's column blocks would
  sit on neighbouring devices and the compiler would add permutes). Returns
  ``(g, i, d)`` by increasing ``g``.
  """
  out: dict[int, tuple[int, int, int]] = {}
  leading = 1
  for i, size in enumerate(sizes):
    for d in _divisors(size):
      if d * leading > 1:
        out.setdefault(d * leading, (d * leading, i, d))
    leading *= size
  return sorted(out.values())


def device_flops(m: int, n: int, g: int, piece_flops: float) -> float:
  """Per-device FLOPs of ``m`` matrices over ``n`` devices, ``g`` per matrix."""
  return math.ceil(m * g / n) * piece_flops


def _split_plan(members, orthogonalizer, mesh, axes, n, min_flops):
  """How to split a shape group over groups of devices; None: whole matrices."""
  if min_flops is None or _concrete_mesh(mesh) is None:
    return None
  if not hasattr(jax, "shard_map"):  # pragma: no cover - jax < 0.7
    return None
  opts = split_lib.split_options(orthogonalizer)
  if opts is None:
    return None
  m = sum(int(x.shape[0]) for x in members)
  r, c = (int(d) for d in members[0].shape[1:])
  sizes = [int(mesh.shape[a]) for a in axes]
  return plan_group(opts, m, r, c, members[0].dtype, sizes, min_flops)


def plan_group(opts, m, r, c, dtype, sizes, min_flops=AUTO_SPLIT_MIN_FLOPS):
  """The split of ``m`` matrices ``r x c`` over owner axes of ``sizes``.

  Chooses the group size ``g`` that gives the fewest Newton–Schulz FLOPs per
  device, ``ceil(m g / N)`` pieces of ``1/g`` of a matrix each (``g = 1``:
  whole matrices), preferring the smaller ``g`` unless a larger one saves
  more than 1%. Returns a ``_SplitPlan``, or ``None`` for whole matrices
  (also when ``r > c``, or a matrix costs less than ``min_flops``).
  """
  if r > c or r < 2:
    return None
  whole = split_lib.split_flops(opts, r, c, 1, dtype)
  if whole < min_flops:
    return None
  n = math.prod(sizes)
  best, plan = device_flops(m, n, 1, whole), None
  for g, i, d in split_groups(sizes):
    if g > r:
      break
    cost = device_flops(m, n, g, split_lib.split_flops(opts, r, c, g, dtype))
    if cost < 0.99 * best:
      method, restart = split_lib.resolved_method(opts, r, c, dtype)
      best, plan = cost, _SplitPlan(opts, method, restart, g, i, d)
  return plan


def _split_mesh(mesh, axes, plan: _SplitPlan):
  """The mesh with owner axis ``i`` cut into ``(d, size / d)``, and names.

  Returns ``(sub_mesh, group_names, outer_names)``: ``group_names`` (the first
  ``i`` owner axes and the cut's ``d``) span the ``g`` devices that hold one
  matrix, ``outer_names`` (the rest of the owner axes) index the groups, and
  ``(*group_names, *outer_names)`` flattened in order index the same devices
  as ``axes`` do on ``mesh``.
  """
  a = axes[plan.axis_index]
  inner, outer = f"{a}__split", f"{a}__owner"
  names, shape, types = [], [], []
  kinds = _axis_types(mesh)
  for name in mesh.axis_names:
    size = int(mesh.shape[name])
    kind = kinds.get(name, AxisType.Auto)
    kind = AxisType.Auto if kind == AxisType.Explicit else kind
    if name == a:
      names += [inner, outer]
      shape += [plan.d, size // plan.d]
      types += [kind, kind]
    else:
      names.append(name)
      shape.append(size)
      types.append(kind)
  group = (*axes[: plan.axis_index], inner)
  rest = (outer, *axes[plan.axis_index + 1 :])
  concrete = _concrete_mesh(mesh)
  assert concrete is not None  # _split_plan checked
  devices = concrete.devices.reshape(shape)
  sub = jax.sharding.Mesh(devices, tuple(names), axis_types=tuple(types))
  return sub, group, rest


def _use_abstract_mesh(mesh):
  """``jax.sharding.use_abstract_mesh`` (public from jax 0.8; private before)."""
  use = getattr(jax.sharding, "use_abstract_mesh", None)
  if use is None:  # pragma: no cover - jax < 0.8
    from jax._src.mesh import use_abstract_mesh as use
  return use(mesh)


def _concrete_mesh(mesh):
  """``mesh`` with its devices: itself, or the concrete mesh in context.

  ``shard_map`` over a mesh other than the one in context lowers its
  collectives with that mesh's devices, so the split path needs them. Under
  ``jax.set_mesh`` the trace sees only the abstract mesh; the concrete one is
  read from JAX's context (``None`` where it is not available, and the split
  path is then not taken).
  """
  if isinstance(mesh, jax.sharding.Mesh):
    return mesh
  try:
    from jax._src.mesh import get_concrete_mesh
  except ImportError:  # pragma: no cover - depends on the JAX version
    return None
  concrete = get_concrete_mesh()
  if concrete is None or concrete.empty:
    return None
  if tuple(concrete.axis_names) != tuple(mesh.axis_names) or tuple(
    concrete.devices.shape
  ) != tuple(mesh.shape[a] for a in mesh.axis_names):
    return None
  return concrete


def _split_owner(
  members, mesh, axes, n, plan: _SplitPlan, rows: bool = False, whole=None
):
  """Orthogonalizes ``(B_k, r, c)`` stacks, each matrix over ``g`` devices.

  With ``P = N / g`` device groups, the matrices are arranged as in
  :func:`_owner` with ``P`` in place of ``N`` (each member's first
  ``P (B_k // P)`` matrices as a ``(P, B_k // P)`` block, the remainders
  pooled and padded with zero matrices) into a ``(P, Q, r, c)`` array, padded
  with zero rows and columns to multiples of ``g``. Device ``j P + p``
  (``split_groups``) orthogonalizes column block ``j`` of the ``Q`` matrices
  of group ``p`` with ``split_newton_schulz``, in ``shard_map``, its
  collectives over the ``g`` devices of a group. Each member's results are
  sliced from the unsharded ``Q`` axis.

  The matrices reach the pieces inside the ``shard_map``, from one of two
  layouts that FSDP gives (the compiler brings the members to it, at no cost
  when they are already so sharded):

  * columns over the owner devices (``N`` divides ``c``; members whose fan-in
    axis is their columns, ``rows=False``): device ``j P + p`` holds column
    block ``j P + p``, so column block ``j`` of the split is the blocks of
    devices ``j P + p'``, and one all-to-all among them each way moves it;
  * rows over the owner devices (``N`` divides ``r``; ``rows=True``, or the
    columns do not divide; ``rows=True`` whose rows do not divide takes the
    columns): one all-to-all over all owner devices each way,
    each device sending every other its rows of that device's column block.

  Otherwise the array is constrained to an ``(N, Q, r, c / g)`` layout and the
  compiler moves it. ``whole``: an orthogonalizer to run on whole matrices
  (``g = 1``) instead of the split iteration.
  """
  g = plan.g
  groups = n // g
  sizes = [int(x.shape[0]) for x in members]
  r, c = (int(d) for d in members[0].shape[1:])
  rp, cp = -(-r // g) * g, -(-c // g) * g
  blocks, rests = [], []
  for x, b in zip(members, sizes, strict=True):
    q = b // groups
    if q:
      blocks.append(x[: q * groups].reshape(groups, q, r, c))
    rests.append(x[q * groups :])
  rest = jnp.concatenate(rests) if len(rests) > 1 else rests[0]
  n_rest = int(rest.shape[0])
  if n_rest:
    rest = jnp.pad(rest, ((0, (-n_rest) % groups), (0, 0), (0, 0)))
    blocks.append(rest.reshape(groups, -1, r, c))
  x = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
  q_total = int(x.shape[1])
  cg = cp // g
  sub, group, outer = _split_mesh(mesh, axes, plan)
  everyone = (*group, *outer)  # the owner devices, in the order of ``axes``
  # Each device's position in its group (lax.axis_index does not lower for a
  # shard_map mesh other than the one in context).
  position = jnp.arange(g, dtype=jnp.int32)
  if whole is not None:  # g = 1: whole matrices, any orthogonalizer
    ns = lambda x, pos: whole(x)
  else:
    ns = lambda x, pos: split_lib.split_newton_schulz(
      x, plan.opts, plan.method, plan.restart, group, pos
    )
  compiler_moved = False  # the third layout below: the compiler moves pieces
  if c % n == 0 and (not rows or r % n):  # columns over the owner devices
    x = jnp.pad(x, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
    in_spec = out_spec = P(None, None, None, everyone)

    def local(block, pos):  # (P, Q, r, c / N): column block j P + p
      # Column block j (c / g) is the blocks of the P devices j P + p'.
      b = jax.lax.all_to_all(block, outer, 0, 3, tiled=True)
      y = ns(b[0], pos[0])[None]
      return jax.lax.all_to_all(y, outer, 3, 0, tiled=True)

  elif r % n == 0:  # rows over the owner devices
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, cp - c)))
    in_spec = out_spec = P(None, None, everyone, None)

    def local(block, pos):  # (P, Q, r / N, c): this device's rows
      rb = r // n
      b = block.reshape(groups, q_total, rb, g, cg).transpose(3, 0, 1, 2, 4)
      b = b.reshape(n, q_total, rb, cg)  # to device j P + p: its column block
      b = jax.lax.all_to_all(b, everyone, 0, 0, tiled=True)  # rows by sender
      b = b.transpose(1, 0, 2, 3).reshape(q_total, r, cg)
      y = ns(b, pos[0]).reshape(q_total, n, rb, cg).transpose(1, 0, 2, 3)
      y = jax.lax.all_to_all(y, everyone, 0, 0, tiled=True)  # blocks by sender
      y = y.reshape(g, groups, q_total, rb, cg).transpose(1, 2, 3, 0, 4)
      return y.reshape(groups, q_total, rb, cp)

  else:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, rp - r), (0, cp - c)))
    # Device j P + p holds column block j of group p's matrices.
    x = x.reshape(groups, q_total, rp, g, cg).transpose(3, 0, 1, 2, 4)
    x = x.reshape(n, q_total, rp, cg)
    x = _constrain(_staged(x, mesh, axes, True), mesh, axes)
    # In and out: (N, Q, r, c / g) over all owner devices (the layout the
    # one-axis stages of _staged reach, and one that the mesh outside can
    # name: a result sharded over the cut axes would reach the jit's outputs
    # with a layout JAX cannot state on the original mesh).
    in_spec = out_spec = P(everyone)
    local = lambda block, pos: ns(block[0], pos[0])[None]
    compiler_moved = True

  run = jax.shard_map(local, mesh=sub, in_specs=(in_spec, P(group)), out_specs=out_spec)
  context = jax.sharding.get_abstract_mesh()
  if context is not None and not context.empty:
    with _use_abstract_mesh(sub.abstract_mesh):
      y = run(x, position)
  else:
    y = run(x, position)
  if compiler_moved:  # back from device j P + p to (P, Q, r, c)
    y = _staged(_constrain(y, mesh, axes), mesh, axes, False)
    y = y.reshape(g, groups, q_total, rp, cg).transpose(1, 2, 3, 0, 4)
    y = y.reshape(groups, q_total, rp, cp)
  y = y[:, :, :r, :c]
  n_pool = -(-n_rest // groups) if n_rest else 0
  pool = y[:, q_total - n_pool :].reshape(-1, r, c) if n_rest else None
  outs, offset, rest_offset = [], 0, 0
  for b in sizes:
    q = b // groups
    parts = []
    if q:
      parts.append(y[:, offset : offset + q].reshape(q * groups, r, c))
      offset += q
    if b - q * groups:
      assert pool is not None
      parts.append(pool[rest_offset : rest_offset + b - q * groups])
      rest_offset += b - q * groups
    outs.append(jnp.concatenate(parts) if len(parts) > 1 else parts[0])
  return outs


def plain_values(tree: Any) -> Any:
  """``tree`` with its Flax ``Variable`` nodes replaced by their values.

  A ``Variable`` is recognized by its ``get_metadata`` method (flax >= 0.12);
  other trees are unchanged.
  """
  is_var = lambda x: callable(getattr(type(x), "get_metadata", None))
  # get_value() from flax 0.12.1; 0.12.0 has only .value (deprecated since).
  value = lambda x: x.get_value() if hasattr(x, "get_value") else x.value
  return jax.tree.map(lambda x: value(x) if is_var(x) else x, tree, is_leaf=is_var)


def plain_treedef(tree: Any) -> Any:
  """The treedef of ``tree`` with its Flax ``Variable`` nodes replaced by values.

  For optimizer-state leaves that are not shaped like their parameter (the
  per-matrix statistics of NAMO, NAMO-D and NorMuon): unflattened with the
  parameters' own treedef, each would be a ``Variable`` carrying the
  parameter's sharding annotation, which ``nnx.Optimizer`` applies to it (and
  fails on, for example ``P("fsdp", None)`` on a ``(1, fan_in)`` array).
  """
  return jax.tree.structure(plain_values(tree))


# ---------------------------------------------------------------------------
# Shardings of the optimizer state.


def state_shardings(
  tx_or_state: Any,
  params: Any,
  param_shardings: Any,
  *,
  mesh: Any = None,
) -> Any:
  """The shardings of an optimizer state, from the parameters' shardings.

  For ``jax.jit(..., out_shardings=...)`` (and ``in_shardings``) of a train
  step. The state's shapes come from ``jax.eval_shape(tx.init, params)``. A
  state leaf that mirrors a parameter (same shape, and its key path ends with
  the parameter's key path, as the momentum and Adam moments do) gets that
  parameter's sharding; every other leaf (step counts, the small per-matrix
  vectors of NAMO, NAMO-D and NorMuon, which hold ``O(fan)`` values per
  matrix) is replicated over the mesh.

  Args:
    tx_or_state: an ``optax.GradientTransformation`` or a state (or a tree of
      ``jax.ShapeDtypeStruct``) already computed.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    param_shardings: a tree like ``params`` of ``jax.sharding.Sharding``.
    mesh: the mesh for replicated leaves; ``None``: the mesh of the first
      ``NamedSharding`` in ``param_shardings``.

  Returns:
    A tree of ``jax.sharding.Sharding`` with the structure of the state.

  Raises:
    ValueError: if no mesh can be found for the replicated leaves.
  """
  if hasattr(tx_or_state, "init") and callable(tx_or_state.init):
    state = jax.eval_shape(tx_or_state.init, params)
  else:
    state = tx_or_state
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree.leaves(
    param_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
  )
  if len(flat_shardings) != len(flat_params):
    raise ValueError(
      f"param_shardings has {len(flat_shardings)} leaves but params has "
      f"{len(flat_params)}; they must have the same structure."
    )
  if mesh is None:
    mesh = next((s.mesh for s in flat_shardings if isinstance(s, NamedSharding)), None)
  if mesh is None:
    raise ValueError(
      "state_shardings: no NamedSharding in param_shardings; pass mesh=."
    )
  replicated = NamedSharding(mesh, P())
  by_path = {
    path_names(path): (tuple(jnp.shape(x)), s)
    for (path, x), s in zip(flat_params, flat_shardings, strict=True)
  }
  lengths = sorted({len(k) for k in by_path}, reverse=True)

  def one(path, leaf):
    names = path_names(path)
    shape = tuple(jnp.shape(leaf))
    for k in lengths:
      if k <= len(names) and k > 0:
        hit = by_path.get(names[-k:])
        if hit is not None and hit[0] == shape:
          return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, state)


# ---------------------------------------------------------------------------
# Reading collectives out of compiled HLO.

_COLLECTIVES = (
  "all-to-all",
  "all-gather",
  "all-reduce",
  "reduce-scatter",
  "collective-permute",
)
_DTYPE_BYTES = {
  "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
  "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")


def _type_bytes(type_str: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(type_str):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(attrs: str, default: int) -> int:
  m = re.search(r"replica_groups=\{(\{[0-9,]*\})", attrs)
  if m:
    return max(1, len([d for d in m.group(1).strip("{}").split(",") if d]))
  m = re.search(r"replica_groups=\[([0-9]+),([0-9]+)\]", attrs)
  if m:
    return int(m.group(2))
  m = re.search(
    r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\S*)?\s*\{([^}]*)\}",
    attrs,
  )
  if m:
    sizes = dict(re.findall(r"'?([\w]+)'?=([0-9]+)", m.group(1)))
    names = re.findall(r"'?([\w]+)'?", m.group(2))
    return math.prod(int(sizes.get(a, 1)) for a in names) or default
  return default


def hlo_collective_bytes(hlo_text: str, num_devices: int) -> dict[str, dict]:
  """Counts the collectives of a compiled (SPMD-partitioned) HLO module.

  For each kind (all-to-all, all-gather, all-reduce, reduce-scatter,
  collective-permute): the number of ops, the operand bytes per device, and
  an estimate of the bytes each device sends over the network with the usual
  algorithms in a group of ``g`` devices: all-to-all and reduce-scatter
  ``(g - 1) / g`` of the operand, all-gather ``(g - 1)`` times the operand,
  all-reduce ``2 (g - 1) / g`` (ring), collective-permute the operand.

  Args:
    hlo_text: ``jax.jit(f).lower(...).compile().as_text()``.
    num_devices: the default group size when the HLO does not name one.

  Returns:
    ``{kind: {"count": int, "operand_bytes": int, "moved_bytes": float}}``
    plus ``"total"``.
  """
  types: dict[str, str] = {}
  lines = hlo_text.splitlines()
  parsed = []
  for line in lines:
    m = _INSTR.match(line)
    if m:
      name, type_str, op, rest = m.groups()
      types[name] = type_str
      parsed.append((name, type_str, op, rest))
    else:
      p = re.match(r"^\s*%?([\w.\-]+):\s*(\S.*?)[,)]", line)
      if p:
        types[p.group(1)] = p.group(2)
  out = {k: {"count": 0, "operand_bytes": 0, "moved_bytes": 0.0} for k in _COLLECTIVES}
  for _, _, op, rest in parsed:
    kind = op[: -len("-start")] if op.endswith("-start") else op
    if kind not in _COLLECTIVES:
      continue
    depth, end = 1, 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        end = i
        break
    operands = re.findall(r"%?([\w.\-]+)", rest[:end])
    nbytes = sum(_type_bytes(types.get(o, "")) for o in operands)
    g = _group_size(rest[end:], num_devices)
    factor = {
      "all-to-all": (g - 1) / g,
      "reduce-scatter": (g - 1) / g,
      "all-gather": g - 1,
      "all-reduce": 2 * (g - 1) / g,
      "collective-permute": 1.0,
    }[kind]
    out[kind]["count"] += 1
    out[kind]["operand_bytes"] += nbytes
    out[kind]["moved_bytes"] += factor * nbytes
  out["total"] = {
    key: sum(v[key] for v in out.values())
    for key in ("count", "operand_bytes", "moved_bytes")
  }
  return out
