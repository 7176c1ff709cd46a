"""Parameter routing: which leaves are matrices, and how to see them as matrices.

Dimension numbers follow ``optax.contrib.MuonDimensionNumbers``: for a leaf of
any rank, ``reduction_axis`` are the axes summed over in ``x @ K`` (fan-in),
``output_axis`` the output axes (fan-out), and every other axis is a batch
axis. A leaf is reshaped to ``(batch, fan_in, fan_out)`` and each of the
``batch`` matrices is handled on its own.

A *spec* for a tree of parameters is one of

* ``None``: the package's default routing, :func:`default_routing` (the same
  everywhere: in every block, optimizer, table and diagnostic). The one
  exception is :func:`optax_orth.muon`, whose ``None`` is ``optax.contrib.muon``'s
  rule for parity, named :func:`optax_rule` (every 2-D leaf is a matrix);
* a ``MuonDimensionNumbers``: the same numbers for every leaf;
* a tree (or tree prefix) of ``MuonDimensionNumbers``,
  :class:`SplitDimensionNumbers` or ``None`` (``None``: the leaf is not a
  matrix and goes to the Adam fallback in the aliases);
* a callable from the parameters to such a tree, such as :func:`route_by_path`
  or :func:`optax_orth.route_by_model`.

A fused leaf (a QKV kernel ``(d, q + k + v)``, an attention kernel whose
output axis holds the heads) is several matrices: :class:`SplitDimensionNumbers`
cuts it along one axis into blocks of given sizes (a :class:`MatrixLayout`
with one layout per block) or into equal heads (a :class:`MatrixLayout`
whose heads axis is a batch axis), and every block orthogonalizes, scales and
keeps statistics for each block on its own.

A spec tree is matched to the parameters by key path, not by container type:
lists and tuples, an ``nnx.State`` and its pure dict, and NNX's trailing
``value`` of each ``Variable`` are all the same to it, and an entry that
matches no parameter is an error that names it.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

DimensionNumbersSpec = MuonDimensionNumbers | Any | Callable[[Any], Any] | None

DEFAULT_DIMENSION_NUMBERS = MuonDimensionNumbers(reduction_axis=0, output_axis=1)

#: Names of output heads (searched in the ``/``-joined leaf path). The first
#: group matches a module of that name anywhere above the leaf; the second
#: only as the leaf itself or the module that directly holds it
#: (``decoder/kernel``, not an encoder-decoder's ``decoder/layers_0/...``).
#: ``fc`` is not one: it names GPT-2's and many MLPs' hidden layer as often as
#: a ResNet's classifier; :func:`optax_orth.route_by_model` finds such a head
#: from what the model computes.
HEAD_PATTERNS: tuple[str, ...] = (
  r"(^|/)(lm_head|head|output_head|readout)(/|$)",
  r"(^|/)(classifier|cls_head|logits|decoder|unembed)(/[^/]+)?$",
)

#: Path patterns (regular expressions, searched in the ``/``-joined key path)
#: that :func:`route_by_path` sends to the Adam fallback by default: token and
#: position embeddings and the output head (:data:`HEAD_PATTERNS`), as in the
#: NAMO and NorMuon references, and biases and norm scales, which are 2-D when
#: stacked over layers. Every leaf of rank < 2 goes there regardless.
DEFAULT_ADAM_PATTERNS: tuple[str, ...] = (
  r"embed",
  r"(^|/)(wte|wpe|tok_emb|pos_emb)(/|$)",
  *HEAD_PATTERNS,
  r"(^|/)(bias|scale)(/|$)",
)

#: Leaf names that mark a 2-D leaf as a layer's weight matrix (Flax's
#: ``kernel``, PyTorch-style ``weight``, Haiku's ``w``): :func:`route_by_path`
#: routes such a leaf by name and shape, any other 2-D leaf by its shape alone
#: (which the default routing reports).
MATRIX_NAMES: tuple[str, ...] = ("kernel", "weight", "w")


class RoutingWarning(UserWarning):
  """A leaf routed by a guess (its shape alone), or a rule that matched nothing."""


class SplitDimensionNumbers(NamedTuple):
  r"""Dimension numbers of a fused leaf: blocks along one axis, each its own matrix.

  ``reduction_axis`` and ``output_axis`` are those of the whole leaf, as in
  ``MuonDimensionNumbers``; the leaf is then cut along ``split_axis`` (one of
  them, by default the output axis) and every block is orthogonalized,
  scaled and normalized as a matrix of its own:

  * ``split_sizes=(q, k, v)``: blocks of these sizes, in order (a fused QKV
    kernel ``(d, q + k + v)``, GQA's ``k = v < q`` included; a fused
    gate/up kernel ``(d, 2 ff)``). Blocks of different shapes are grouped
    by shape for the orthogonalizer; a block's state for the leaf is a
    :class:`Parts`, one entry per block.
  * ``heads=H``: ``H`` equal blocks, the per-head form of an attention
    kernel stored fused: ``(d, H hd)`` query/key/value kernels, or
    ``(H hd, d)`` output kernels with ``split_axis=0``. The axis is
    reshaped to ``(H, hd)`` and the head axis becomes a batch axis, as
    ``MuonDimensionNumbers(0, 2)`` does for a Flax ``(d, H, hd)`` kernel.

  Examples (``DN`` is ``MuonDimensionNumbers``)::

    SplitDimensionNumbers(0, 1, split_sizes=(d, d, d))   # GPT-2 c_attn (d, 3d)
    SplitDimensionNumbers(1, 2, split_sizes=(q, kv, kv)) # (layers, d, q+2kv)
    SplitDimensionNumbers(0, 1, heads=3 * H)             # fused QKV, per head
    SplitDimensionNumbers(0, 1, heads=H, split_axis=0)   # (H hd, d) per head

  Attributes:
    reduction_axis: an axis or a tuple of axes (fan-in).
    output_axis: an axis or a tuple of axes (fan-out).
    split_sizes: a tuple of positive sizes that sum to the dimension of
      ``split_axis``; or ``None``.
    heads: a positive number of equal blocks that divides it; or ``None``.
      Exactly one of ``split_sizes`` and ``heads`` is given.
    split_axis: the axis to cut, one of the reduction or output axes;
      ``None``: the output axis (which must then be a single axis).
    view: ``None``, or a shape with the leaf's number of elements that the
      leaf is first reshaped to (row-major); every axis above then refers
      to the view. With a view, ``split_sizes`` and ``heads`` may both be
      ``None`` (no cut). This is how :func:`optax_orth.route_by_model` states
      an interleaved layout: Bloom's fused QKV kernel ``(d, H * 3 * hd)`` is
      ``SplitDimensionNumbers(0, (1, 3), view=(d, H, 3, hd))``, three
      ``(d, H * hd)`` matrices whose columns interleave in the leaf.
  """

  reduction_axis: int | tuple[int, ...] = 0
  output_axis: int | tuple[int, ...] = 1
  split_sizes: tuple[int, ...] | None = None
  heads: int | None = None
  split_axis: int | None = None
  view: tuple[int, ...] | None = None


#: The dimension-numbers types a spec tree holds (besides ``None``).
DIMENSION_NUMBERS_TYPES = (MuonDimensionNumbers, SplitDimensionNumbers)


@jax.tree_util.register_pytree_with_keys_class
class Parts(tuple):
  """One entry per block of a split leaf (a pytree node, keys ``0, 1, ...``).

  A block's state for a leaf that a :class:`MatrixLayout` cuts into blocks of
  different shapes is a ``Parts`` of per-block arrays, each what the block
  keeps for one matrix stack (for example ``(batch, fan_in)``).
  """

  def tree_flatten_with_keys(self):
    keys = [jax.tree_util.SequenceKey(i) for i in range(len(self))]
    return list(zip(keys, self, strict=True)), None

  def tree_flatten(self):
    return tuple(self), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(children)

  def __repr__(self) -> str:
    return f"Parts({tuple.__repr__(self)})"


class MatrixLayout(NamedTuple):
  """How one leaf is viewed as stacks of ``(fan_in, fan_out)`` matrices.

  A leaf is one stack or, cut by :class:`SplitDimensionNumbers` with
  ``split_sizes``, one stack per block (:attr:`blocks`). Every block of the
  package reaches the matrices the same way: :meth:`map_parts` calls
  ``fn(part, x_part, ...)`` once per stack, ``part`` that stack's layout
  (the leaf's own when it is not cut), and joins the results.

  Attributes:
    shape: the leaf's shape.
    perm: transposition that orders the axes (of ``view``, if given) as
      (batch, reduction, output); ``()`` for a leaf cut into blocks.
    batch: number of matrices (over all blocks).
    fan_in: product of the reduction dimensions (``0`` when cut into blocks).
    fan_out: product of the output dimensions (``0`` when cut into blocks).
    view: ``None``, or the shape the leaf is first reshaped to (an axis cut
      into heads, or into the digits of an interleaved layout); ``perm``,
      ``axis`` and the blocks then refer to its axes.
    axis: the axis that is cut into blocks, or ``None``.
    blocks: the layout of each block (a slice of the leaf, or of its view);
      ``()`` for a leaf that is one stack.
  """

  shape: tuple[int, ...]
  perm: tuple[int, ...]
  batch: int
  fan_in: int
  fan_out: int
  view: tuple[int, ...] | None = None
  axis: int | None = None
  blocks: tuple[MatrixLayout, ...] = ()

  @property
  def parts(self) -> tuple[MatrixLayout, ...]:
    """The layout of each stack: :attr:`blocks`, or ``(self,)``."""
    return self.blocks or (self,)

  @property
  def sizes(self) -> tuple[int, ...]:
    """The blocks' sizes along :attr:`axis` (``()`` for one stack)."""
    if not self.blocks:
      return ()
    assert self.axis is not None  # set whenever blocks are
    return tuple(b.shape[self.axis] for b in self.blocks)

  def _one_stack(self) -> None:
    if self.blocks:
      raise TypeError(
        f"a leaf of shape {self.shape} cut into blocks {self.sizes} along axis "
        f"{self.axis} (SplitDimensionNumbers) is one stack of matrices per "
        "block: use layout.map_parts(fn, x) (or to_matrix_list / "
        "from_matrix_list), with fn(part_layout, x_part)."
      )

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """``x`` (the leaf's shape) to ``(batch, fan_in, fan_out)``. A leaf cut
    into blocks is one stack per block: it raises (use :meth:`map_parts`)."""
    self._one_stack()
    if self.view is not None:
      x = x.reshape(self.view)
    return jnp.transpose(x, self.perm).reshape(self.batch, self.fan_in, self.fan_out)

  def from_matrices(self, y: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_matrices`."""
    self._one_stack()
    base = self.shape if self.view is None else self.view
    permuted = tuple(base[i] for i in self.perm)
    inverse = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
    return jnp.transpose(y.reshape(permuted), inverse).reshape(self.shape)

  def split(self, x: jax.Array) -> list[jax.Array]:
    """The leaf's blocks (``[x]`` for one stack)."""
    if not self.blocks:
      return [x]
    offsets = list(itertools.accumulate(self.sizes))[:-1]
    x = x if self.view is None else x.reshape(self.view)
    assert self.axis is not None  # set whenever blocks are
    return list(jnp.split(x, offsets, axis=self.axis))

  def join(self, xs: Sequence[jax.Array]) -> jax.Array:
    """Inverse of :meth:`split`."""
    if not self.blocks:
      (x,) = xs
      return x
    return jnp.concatenate(list(xs), axis=self.axis).reshape(self.shape)

  def _per_part(self, a: Any) -> list:
    n = len(self.blocks)
    if isinstance(a, Parts):
      if len(a) != n:
        raise ValueError(f"expected {n} parts for a leaf of shape {self.shape}.")
      return list(a)
    if a is None or jnp.ndim(a) == 0:
      return [a] * n
    if tuple(jnp.shape(a)) == self.shape:
      return self.split(a)
    raise ValueError(
      f"an argument of shape {tuple(jnp.shape(a))} for a split leaf of shape "
      f"{self.shape}: expected the leaf's shape, a scalar or Parts."
    )

  def each(self, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(part, *args_of_part)`` per stack: the result itself for a leaf
    that is one stack, a :class:`Parts` of results for a cut leaf.

    Each argument is a leaf-shaped array (split into blocks), a
    :class:`Parts` (one entry per block), a scalar or ``None`` (passed to
    every block).
    """
    if not self.blocks:
      return fn(self, *args)
    cols = [self._per_part(a) for a in args]
    return Parts(fn(p, *(c[i] for c in cols)) for i, p in enumerate(self.blocks))

  def map_parts(self, fn: Callable[..., Any], *args: Any) -> Any:
    """:meth:`each`, with the blocks of ``fn``'s (first) result joined.

    ``fn(part, ...)`` returns an array shaped like the block, or a tuple
    whose first entry is; for a cut leaf the rest come back as
    :class:`Parts`.
    """
    out = self.each(fn, *args)
    if not self.blocks:
      return out
    if not isinstance(out[0], tuple):
      return self.join(out)
    firsts = self.join([r[0] for r in out])
    return (firsts, *(Parts(r[k] for r in out) for k in range(1, len(out[0]))))

  def describe(self) -> str:
    """``"batch x fan_in x fan_out"`` per stack, joined by ``+``, as
    :func:`routing_table` prints it."""
    return " + ".join(f"{p.batch} x {p.fan_in} x {p.fan_out}" for p in self.parts)


def to_matrix_list(
  layouts: Sequence[MatrixLayout], leaves: Sequence[jax.Array]
) -> list:
  """The ``(batch, fan_in, fan_out)`` stacks of every leaf, in order (one per
  block of a leaf cut into blocks)."""
  return [
    part.to_matrices(x)
    for lay, leaf in zip(layouts, leaves, strict=True)
    for part, x in zip(lay.parts, lay.split(leaf), strict=True)
  ]


def from_matrix_list(layouts: Sequence[MatrixLayout], matrices: Sequence[jax.Array]):
  """Inverse of :func:`to_matrix_list`: one leaf-shaped array per layout."""
  it = iter(matrices)
  return [
    lay.join([part.from_matrices(next(it)) for part in lay.parts]) for lay in layouts
  ]


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """The names in a JAX key path (dict keys, attributes, indices), as strings."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return tuple(parts)


def path_str(path: Sequence[Any]) -> str:
  """A ``/``-joined string for a JAX key path (dict keys, attributes, indices)."""
  return "/".join(path_names(path))


def _routing_names(path: Sequence[Any]) -> tuple[str, ...]:
  """:func:`path_names` without NNX's trailing ``Variable`` attribute ``value``."""
  path = tuple(path)
  last = path[-1] if path else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":  # pyright: ignore[reportOptionalMemberAccess]
    path = path[:-1]
  return path_names(path)


def leaf_name(path: Sequence[Any]) -> str:
  """The name routing rules see: the ``/``-joined key path of a leaf, without
  the trailing ``value`` of an NNX ``Variable``.

  ``nnx.state(model, nnx.Param)`` (what ``nnx.Optimizer`` initializes with)
  and its pure form (what it updates with) give the same names, for example
  ``blocks/0/kernel``, as a Linen params dict does.
  """
  return "/".join(_routing_names(path))


def _python_ints(value):
  """NumPy integers (scalars, arrays, or inside tuples) as Python ints, so that
  ``heads=np.int64(3)`` means what ``heads=3`` does; anything else as is."""
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
    return int(value) if value.ndim == 0 else tuple(int(v) for v in value.ravel())
  if isinstance(value, tuple | list):
    return tuple(_python_ints(v) for v in value)
  return value


def _axes(value, ndim: int, what: str, where: str) -> tuple[int, ...]:
  axes = (value,) if isinstance(value, int) else tuple(value)
  if not axes:
    raise ValueError(f"{where}: {what} is empty.")
  for ax in axes:
    if not isinstance(ax, int) or not -ndim <= ax < ndim:
      raise ValueError(
        f"{where}: {what}={value} is out of range for a leaf of rank {ndim}."
      )
  normalized = tuple(ax % ndim for ax in axes)
  if len(set(normalized)) != len(normalized):
    raise ValueError(f"{where}: {what}={value} repeats an axis.")
  return normalized


def matrix_layout(
  shape: Sequence[int],
  dimension_numbers: MuonDimensionNumbers
  | SplitDimensionNumbers
  | None = DEFAULT_DIMENSION_NUMBERS,
  path: str = "",
) -> MatrixLayout:
  """The layout of a leaf, with validation.

  Args:
    shape: the leaf's shape.
    dimension_numbers: the leaf's ``MuonDimensionNumbers`` (default: a 2-D
      ``(fan_in, fan_out)`` matrix) or :class:`SplitDimensionNumbers`.
      ``None`` marks a leaf that the routing sends to the Adam fallback: it
      has no matrix layout, and is an error.
    path: the leaf's path, used in error messages.

  Returns:
    A :class:`MatrixLayout`, cut into blocks for :class:`SplitDimensionNumbers`
    with more than one ``split_sizes``.

  Raises:
    ValueError: naming the leaf, for rank < 2 leaves, ``None``, axes out of
      range, repeated, or shared between reduction and output, and split
      sizes or heads that do not fit the split axis.
  """
  shape = tuple(int(d) for d in shape)
  where = f"leaf {path!r} with shape {shape}" if path else f"leaf with shape {shape}"
  if dimension_numbers is None:
    raise ValueError(
      f"{where}: the routing marks it as not a matrix (dimension numbers "
      "None, the Adam fallback's), but it reached a block that orthogonalizes "
      "or rescales matrices. Route it with optax.partition / label_tree, or "
      "give it MuonDimensionNumbers."
    )
  if len(shape) < 2:
    raise ValueError(
      f"{where}: orthogonalization needs a leaf of rank >= 2. Send it to the "
      "Adam fallback (dimension numbers None, or rank < 2 leaves are routed "
      "there by route_by_path)."
    )
  if not isinstance(dimension_numbers, DIMENSION_NUMBERS_TYPES):
    raise ValueError(
      f"{where}: expected MuonDimensionNumbers, SplitDimensionNumbers or None, "
      f"got {dimension_numbers!r}."
    )
  fields = map(_python_ints, dimension_numbers)
  dimension_numbers = type(dimension_numbers)(*fields)  # pyright: ignore[reportArgumentType]
  view = getattr(dimension_numbers, "view", None)
  if view is not None:
    view = _view(shape, view, dimension_numbers, where)
  red, out = _reduction_output(view or shape, dimension_numbers, where)
  if isinstance(dimension_numbers, SplitDimensionNumbers):
    return _split_layout(shape, red, out, dimension_numbers, where, view)
  return _layout(shape, red, out)


def _view(shape, view, dn, where: str) -> tuple[int, ...]:
  view = tuple(view) if isinstance(view, Sequence) else None
  if (
    view is None
    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in view)
    or math.prod(view) != math.prod(shape)
  ):
    raise ValueError(
      f"{where}: view={dn.view!r} must be a shape of positive ints with the "
      f"leaf's {math.prod(shape)} elements."
    )
  if dn.heads is not None:
    raise ValueError(f"{where}: give heads or view, not both (a view can hold heads).")
  return view


def _reduction_output(shape, dn, where: str):
  ndim = len(shape)
  red = _axes(dn.reduction_axis, ndim, "reduction_axis", where)
  out = _axes(dn.output_axis, ndim, "output_axis", where)
  if set(red) & set(out):
    raise ValueError(f"{where}: reduction_axis {red} and output_axis {out} overlap.")
  return red, out


def _layout(shape, red, out, view=None) -> MatrixLayout:
  base = shape if view is None else view
  batch = tuple(ax for ax in range(len(base)) if ax not in red and ax not in out)
  prod = lambda axes: math.prod(base[a] for a in axes)
  return MatrixLayout(shape, batch + red + out, prod(batch), prod(red), prod(out), view)


def _split_axis(shape, red, out, dn: SplitDimensionNumbers, where: str) -> int:
  if dn.split_axis is None:
    if len(out) != 1:
      raise ValueError(
        f"{where}: SplitDimensionNumbers without split_axis cuts the output "
        f"axis, but output_axis is {out}; give split_axis."
      )
    return out[0]
  if not isinstance(dn.split_axis, int):
    raise ValueError(f"{where}: split_axis={dn.split_axis!r} must be one axis.")
  (axis,) = _axes(dn.split_axis, len(shape), "split_axis", where)
  if axis not in red + out:
    raise ValueError(
      f"{where}: split_axis {dn.split_axis} is a batch axis; it must be one "
      f"of the reduction axes {red} or output axes {out}."
    )
  return axis


def _split_layout(shape, red, out, dn: SplitDimensionNumbers, where: str, view=None):
  """The layout of a leaf cut by :class:`SplitDimensionNumbers`."""
  if view is not None and dn.split_sizes is None:
    return _layout(shape, red, out, view)
  base, shape = shape, (view or shape)
  axis = _split_axis(shape, red, out, dn, where)
  if (dn.split_sizes is None) == (dn.heads is None):
    raise ValueError(
      f"{where}: SplitDimensionNumbers needs exactly one of split_sizes and "
      f"heads; got {dn!r}."
    )
  size = shape[axis]
  if dn.heads is not None:
    heads = dn.heads
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
      raise ValueError(f"{where}: heads={heads!r} must be a positive int.")
    if size % heads:
      raise ValueError(
        f"{where}: heads={heads} does not divide axis {axis} of size {size}."
      )
    view = (*shape[:axis], heads, size // heads, *shape[axis + 1 :])
    move = lambda axes: tuple(a + (a >= axis) for a in axes)
    return _layout(shape, move(red), move(out), view)
  sizes = dn.split_sizes
  sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes or ())
  bad = [s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or s < 1]
  if not sizes or bad or sum(sizes) != size:
    raise ValueError(
      f"{where}: split_sizes={dn.split_sizes!r} must be positive ints that "
      f"sum to axis {axis}'s size {size}."
    )
  if len(sizes) == 1:
    return _layout(base, red, out, view)
  blocks = tuple(
    _layout((*shape[:axis], s, *shape[axis + 1 :]), red, out) for s in sizes
  )
  return MatrixLayout(base, (), sum(b.batch for b in blocks), 0, 0, view, axis, blocks)


class Decision(NamedTuple):
  """Where a routing sends one leaf, and why.

  Attributes:
    dimension_numbers: the leaf's ``MuonDimensionNumbers``, or ``None`` for
      the Adam fallback.
    why: the reason, as :func:`routing_table` prints it (the rule, name
      pattern, operation or shape that decided).
    guessed: ``True`` when nothing but the leaf's shape decided (a 2-D leaf
      with no matrix name, a rank >= 3 leaf no rule covers): reported by a
      :class:`RoutingWarning`, or an error with ``strict=True``.
  """

  dimension_numbers: MuonDimensionNumbers | None
  why: str
  guessed: bool = False


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


_MAX_LISTED = 12


def _listing(lines: list[str]) -> str:
  shown = [f"  {line}" for line in lines[:_MAX_LISTED]]
  if len(lines) > _MAX_LISTED:
    shown.append(f"  ... and {len(lines) - _MAX_LISTED} more")
  return "\n".join(shown)


def _library_dirs() -> tuple[str, ...]:
  dirs = [os.path.dirname(__file__), os.path.dirname(optax.__file__)]
  dirs.append(os.path.dirname(jax.__file__))
  flax = sys.modules.get("flax")
  if flax is not None and getattr(flax, "__file__", None):
    dirs.append(os.path.dirname(str(flax.__file__)))
  return tuple(dirs)


def _caller_stacklevel() -> int:
  """The ``stacklevel`` (for the caller of this function) of the first frame
  outside optax_orth, optax, jax and flax: the user's ``tx.init`` line."""
  dirs, level = _library_dirs(), 1
  frame = sys._getframe(1)
  while frame is not None and frame.f_code.co_filename.startswith(dirs):
    frame, level = frame.f_back, level + 1
  return level


class Routing:
  """Base of the callable specs that can say why: :func:`route_by_path`,
  :func:`optax_orth.route_by_model` and :func:`optax_rule`.

  Calling it on a parameter tree returns the tree of ``MuonDimensionNumbers``
  or ``None``; :meth:`explain` returns the :class:`Decision` of every leaf.
  Leaves routed by a guess, and user patterns that match no leaf, are
  reported once per routing (a :class:`RoutingWarning`), or raise a
  ``ValueError`` when ``strict`` is set. A routing is called at ``init`` and
  again at each trace of ``update``, on the whole tree and on each branch's
  part of it; the report is made once, and unmatched patterns are only
  checked on the whole tree.
  """

  strict: bool = False
  label: str = "routing"
  #: the last line of a report: what settles the leaves it names.
  advice: str = (
    "Pass weight_dimension_numbers=optax_orth.route_by_model(model, *inputs) "
    "(it reads each layer's layout from what the model computes on example "
    "inputs), or rules to route_by_path; optax_orth.routing_table(params, "
    "spec) shows every leaf and why."
  )

  def decide(self, name: str, x: Any) -> Decision:
    """The :class:`Decision` for the leaf ``x`` named ``name`` (see
    :func:`leaf_name`)."""
    raise NotImplementedError

  def patterns(self) -> Sequence[str]:
    """The user's patterns, each of which should match some leaf."""
    return ()

  def explain(self, params: Any) -> list[tuple[str, Decision]]:
    """``(leaf name, decision)`` for every leaf of ``params``, in flatten
    order, without reporting anything."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(leaf_name(p), self.decide(leaf_name(p), x)) for p, x in flat]

  def __call__(self, params: Any) -> Any:
    if isinstance(params, jax.Array) and jnp.issubdtype(params.dtype, jnp.integer):
      raise ValueError(
        f"a {self.label} spec was called with a step count: under "
        "optax.inject_hyperparams, pass static_args=('weight_dimension_numbers',)"
        " (or 'muon_weight_dimension_numbers') so it is not taken for a schedule."
      )
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    decisions = self.explain(params)
    whole = not any(_is_masked(x) for x in jax.tree.leaves(params, is_leaf=_is_masked))
    self._report(decisions, [x for _, x in flat], whole)
    return jax.tree.unflatten(treedef, [d.dimension_numbers for _, d in decisions])

  def _report(self, decisions, leaves, whole: bool) -> None:
    guessed = [
      f"{name} {tuple(jnp.shape(x))}: {d.why} -> "
      + ("adam" if d.dimension_numbers is None else "orthogonal")
      for (name, d), x in zip(decisions, leaves, strict=True)
      if d.guessed
    ]
    names = [name for name, _ in decisions]
    unmatched = []
    if whole:
      unmatched = [
        p for p in self.patterns() if not any(re.search(p, n) for n in names)
      ]
    keys = {line.split(" ", 1)[0] for line in guessed} | {
      f"pattern:{p}" for p in unmatched
    }
    reported = self.__dict__.setdefault("_reported", set())
    if not keys or (keys <= reported and not self.strict):
      return
    parts = []
    if guessed:
      parts.append(
        f"{len(guessed)} leaves were routed by their shape alone:\n" + _listing(guessed)
      )
    if unmatched:
      example = ", ".join(repr(n) for n in names[:3])
      parts.append(
        f"{len(unmatched)} patterns match no leaf (leaf names look like "
        f"{example}):\n" + _listing([repr(p) for p in unmatched])
      )
    message = f"optax_orth {self.label}: " + "\n".join(parts) + "\n" + self.advice
    if self.strict:
      raise ValueError(message + " (strict=True makes this an error.)")
    reported |= keys
    warnings.warn(message, RoutingWarning, stacklevel=_caller_stacklevel())


class PathRouting(Routing):
  """The routing of :func:`route_by_path`; see there."""

  def __init__(self, rules, adam_patterns, strict: bool, label: str):
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    for pattern, dn in items:
      if dn is not None and not isinstance(dn, DIMENSION_NUMBERS_TYPES):
        raise ValueError(
          f"route_by_path: rule {pattern!r} maps to {dn!r}; expected "
          "MuonDimensionNumbers, SplitDimensionNumbers or None (Adam)."
        )
    self.rules = [(re.compile(p), dn) for p, dn in items]
    self.adam_patterns = [re.compile(p) for p in adam_patterns]
    self.strict = bool(strict)
    self.label = label

  def patterns(self) -> Sequence[str]:
    return [p.pattern for p, _ in self.rules]

  def decide(self, name: str, x: Any) -> Decision:
    ndim = jnp.ndim(x)
    if ndim < 2:
      return Decision(None, f"rank {ndim}")
    for pattern in self.adam_patterns:
      if pattern.search(name):
        return Decision(None, f"name pattern {pattern.pattern!r}")
    for pattern, dn in self.rules:
      if pattern.search(name):
        return Decision(dn, f"rule {pattern.pattern!r}")
    last = name.rsplit("/", 1)[-1]
    if ndim == 2 and last in MATRIX_NAMES:
      return Decision(DEFAULT_DIMENSION_NUMBERS, f"2-D {last!r}")
    if ndim == 2:
      return Decision(DEFAULT_DIMENSION_NUMBERS, "2-D, shape only", guessed=True)
    return Decision(None, f"rank {ndim}, no rule", guessed=True)


class _OptaxRule(Routing):
  """``optax.contrib.muon``'s routing: every 2-D leaf is a ``(fan_in, fan_out)``
  matrix, every other leaf goes to the Adam fallback. ``muon``'s default.

  It routes exactly as optax does; it reports (once) the rank >= 3 leaves it
  sends to Adam and the 2-D leaves it orthogonalizes although their names
  say embedding, head, bias or norm scale (:data:`DEFAULT_ADAM_PATTERNS`).
  """

  label = "muon's default routing (optax.contrib.muon's rule)"
  advice = (
    "Pass muon(..., muon_weight_dimension_numbers=optax_orth.route_by_model("
    "model, *inputs)) (it reads each layer's layout from what the model "
    "computes on example inputs), or optax_orth.route_by_path(rules); "
    "optax_orth.routing_table(params, spec) shows every leaf and why."
  )

  def decide(self, name: str, x: Any) -> Decision:
    ndim = jnp.ndim(x)
    if ndim != 2:
      return Decision(None, f"rank {ndim} (optax rule)", guessed=ndim > 2)
    named = next((p for p in DEFAULT_ADAM_PATTERNS if re.search(p, name)), None)
    if named is not None:
      return Decision(
        DEFAULT_DIMENSION_NUMBERS, f"2-D (optax rule; name {named!r})", guessed=True
      )
    return Decision(DEFAULT_DIMENSION_NUMBERS, "2-D (optax rule)")


optax_rule = _OptaxRule()


def default_routing() -> Callable[[Any], Any]:
  """The spec that ``None`` stands for everywhere: :func:`route_by_path` ``()``."""
  return _DEFAULT_ROUTING


def resolve_spec(spec: DimensionNumbersSpec) -> DimensionNumbersSpec:
  """``spec``, with ``None`` replaced by :func:`default_routing`."""
  return default_routing() if spec is None else spec


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, DIMENSION_NUMBERS_TYPES)


def _spec_entries(spec: Any) -> dict[tuple[str, ...], MuonDimensionNumbers | None]:
  entries = {}
  for path, dn in jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_spec_leaf)[0]:
    if not _is_spec_leaf(dn):
      raise ValueError(
        f"weight_dimension_numbers: the entry at {path_str(path)!r} is {dn!r}; "
        "a spec tree holds MuonDimensionNumbers, SplitDimensionNumbers or None "
        "(Adam)."
      )
    entries[_routing_names(path)] = dn
  return entries


def _find_entry(entries: dict, names: tuple[str, ...]):
  for k in range(len(names), -1, -1):
    if names[:k] in entries:
      return names[:k]
  return None


def _mismatch_error(missing, unused, entries) -> ValueError:
  """Names the parameter leaves without an entry and the unused entries."""
  fmt = lambda names: "/".join(names) or "<root>"
  unused_names = [fmt(k) for k in unused]
  lines = []
  for names, x in missing[:_MAX_LISTED]:
    close = difflib.get_close_matches(fmt(names), unused_names, n=1, cutoff=0.5)
    hint = f"; did the entry {close[0]!r} mean it?" if close else ""
    lines.append(f"leaf {fmt(names)!r} {tuple(jnp.shape(x))} has no entry{hint}")
  if unused_names:
    lines.append(f"entries that match no parameter: {unused_names[:_MAX_LISTED]}")
  if not missing:
    lines.append(f"the spec's entries: {[fmt(k) for k in entries][:_MAX_LISTED]}")
  return ValueError(
    "weight_dimension_numbers does not fit the parameters:\n"
    + _listing(lines)
    + "\n(spec trees are matched to the parameters by key path.)"
  )


def _match_spec_tree(spec: Any, tree: Any, is_leaf) -> list:
  """One entry of the spec tree (a tree prefix) per leaf of ``tree``."""
  entries = _spec_entries(spec)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  out, missing, used = [], [], set()
  for path, x in flat:
    key = _find_entry(entries, _routing_names(path))
    if key is None:
      missing.append((_routing_names(path), x))
      continue
    used.add(key)
    out.append(entries[key])
  unused = [k for k in entries if k not in used]
  if unused:
    # Entries for None leaves or for the other branch's (masked) leaves are fine.
    empty = [
      _routing_names(p)
      for p, x in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or _is_masked(x)
      )[0]
      if x is None or _is_masked(x)
    ]
    fits = lambda k, e: e[: len(k)] == k or k[: len(e)] == e
    unused = [k for k in unused if not any(fits(k, e) for e in empty)]
  if missing or unused:
    raise _mismatch_error(missing, unused, entries)
  return out


def leaf_dimension_numbers(
  spec: DimensionNumbersSpec, tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> list[MuonDimensionNumbers | SplitDimensionNumbers | None]:
  """Resolves a spec to one entry per leaf of ``tree`` (in flatten order).

  ``None`` (the spec) is :func:`default_routing`; a ``None`` inside a spec
  tree (or returned by a callable spec) marks a non-matrix leaf. A spec tree
  (or a callable's result) is matched by key path (see :func:`leaf_name`), so
  lists and tuples, ``nnx.State`` and pure dicts are interchangeable.

  Raises:
    ValueError: naming each leaf without an entry and each entry (a typo'd
      key) that matches no leaf.
  """
  spec = resolve_spec(spec)
  if callable(spec) and not isinstance(spec, DIMENSION_NUMBERS_TYPES):
    spec = spec(tree)
  if isinstance(spec, DIMENSION_NUMBERS_TYPES):
    return [spec] * len(jax.tree.leaves(tree, is_leaf=is_leaf))
  return _match_spec_tree(spec, tree, is_leaf)


def label_tree(
  params: Any,
  spec: DimensionNumbersSpec,
  matrix_label: str = "orthogonal",
  other_label: str = "adam",
) -> Any:
  """Labels each leaf of ``params`` for ``optax.partition``.

  A leaf is a matrix where the resolved spec is not ``None`` (``spec=None``
  is :func:`default_routing`; pass :func:`optax_rule` for optax's rule).

  Args:
    params: the parameter tree (or its updates).
    spec: a dimension-numbers spec, as the optimizer's
      ``weight_dimension_numbers``.
    matrix_label: the label of the matrix leaves.
    other_label: the label of every other leaf.

  Returns:
    A tree like ``params`` of labels.

  Raises:
    ValueError: naming the leaf, for non-floating-point parameters, and for
      matrix leaves whose dimension numbers do not fit them.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  dims = leaf_dimension_numbers(spec, params)
  labels = []
  for (path, x), dn in zip(flat, dims, strict=True):
    name = path_str(path)
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      raise ValueError(
        f"leaf {name!r} has dtype {jnp.result_type(x)}; optax_orth optimizers "
        "need floating-point parameters (filter integer state out of the "
        "optimized tree)."
      )
    if dn is not None:
      matrix_layout(jnp.shape(x), dn, name)
    labels.append(matrix_label if dn is not None else other_label)
  return jax.tree.unflatten(treedef, labels)


def route_by_path(
  rules: Mapping[str, MuonDimensionNumbers | None]
  | Sequence[tuple[str, MuonDimensionNumbers | None]] = (),
  adam_patterns: Sequence[str] = DEFAULT_ADAM_PATTERNS,
  *,
  strict: bool = False,
) -> PathRouting:
  r"""A path-based dimension-numbers spec: embeddings, head, vectors to Adam.

  The returned callable maps a parameter tree (a Linen ``params`` dict, an NNX
  ``nnx.State`` or its pure dict, lists, tuples, any pytree) to a tree of
  ``MuonDimensionNumbers`` or ``None``. For each leaf, with ``name`` its
  :func:`leaf_name` (the ``/``-joined key path without NNX's trailing
  ``value``, for example ``"blocks/0/attn/qkv/kernel"``):

  1. if the leaf has rank < 2, or a pattern in ``adam_patterns`` is found in
     ``name`` (``re.search``): ``None`` (Adam fallback);
  2. else the dimension numbers (or ``None``) of the first rule whose pattern
     is found in ``name``;
  3. else, for a 2-D leaf, ``MuonDimensionNumbers(0, 1)``; a leaf of rank > 2
     with no rule goes to Adam.

  Nothing is routed silently: a 2-D leaf whose name is not one of
  :data:`MATRIX_NAMES` (routed by its shape alone), a rank >= 3 leaf that no
  rule covers, and a rule that matches no leaf are reported once, at the
  optimizer's ``init``, by a :class:`RoutingWarning` that names them;
  ``strict=True`` makes that a ``ValueError``. For models, prefer
  :func:`optax_orth.route_by_model`, which reads each layer's layout. Use
  :func:`routing_table` to see the result and its reasons.

  Args:
    rules: ``{pattern: MuonDimensionNumbers, SplitDimensionNumbers or
      None}`` for stacked, multi-head, fused or convolution leaves, for
      example ``{r"layers/.*/kernel$": MuonDimensionNumbers(1, 2)}`` for a
      ``(layers, fan_in, fan_out)`` scan stack, or
      ``{r"attn/qkv/kernel$": SplitDimensionNumbers(0, 1, split_sizes=(d, d,
      d))}`` for a fused QKV kernel.
    adam_patterns: patterns of leaves sent to Adam whatever their rank
      (default :data:`DEFAULT_ADAM_PATTERNS`).
    strict: raise instead of warning.

  Returns:
    A callable usable as ``weight_dimension_numbers`` (or
    ``muon_weight_dimension_numbers``) in every optimizer of this package.
  """
  return PathRouting(rules, adam_patterns, strict, "route_by_path")


def _reasons(spec: DimensionNumbersSpec, params: Any) -> list[str]:
  if isinstance(spec, Routing):
    return [d.why for _, d in spec.explain(params)]
  n = len(jax.tree.leaves(params))
  if isinstance(spec, DIMENSION_NUMBERS_TYPES):
    return ["one spec for every leaf"] * n
  if callable(spec):
    return [f"callable {getattr(spec, '__name__', type(spec).__name__)}"] * n
  return ["spec tree"] * n


def routing_table(
  params: Any, weight_dimension_numbers: DimensionNumbersSpec = None
) -> str:
  """A markdown table of where each leaf goes, how it is reshaped, and why.

  Columns: the leaf's :func:`leaf_name`, its shape, its branch
  (``orthogonal`` or ``adam``), its matrices (``batch x fan_in x fan_out``),
  and why (the rule, name pattern, operation or shape that decided it;
  see :class:`Decision`).

  Args:
    params: the parameter tree.
    weight_dimension_numbers: the spec the optimizer is given (``None``:
      the default routing).

  Returns:
    The table, one row per leaf.
  """
  spec = resolve_spec(weight_dimension_numbers)
  labels = jax.tree.leaves(label_tree(params, spec))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  dims = leaf_dimension_numbers(spec, params)
  lines = [
    "| path | shape | branch | matrices (batch x fan_in x fan_out) | why |",
    "|---|---|---|---|---|",
  ]
  rows = zip(flat, labels, dims, _reasons(spec, params), strict=True)
  for (path, x), label, dn, why in rows:
    mats = "-"
    if label == "orthogonal":
      mats = matrix_layout(jnp.shape(x), dn).describe()
    shape = tuple(jnp.shape(x))
    why = why.replace("|", "\\|")  # a pattern's alternatives, escaped
    lines.append(f"| {leaf_name(path)} | {shape} | {label} | {mats} | {why} |")
  return "\n".join(lines)


_DEFAULT_ROUTING = PathRouting(
  (), DEFAULT_ADAM_PATTERNS, False, "default routing (route_by_path())"
)
