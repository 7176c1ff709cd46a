"""Routing read from what the model computes.

:func:`route_by_model` traces one forward pass to a jaxpr (abstract inputs;
nothing is computed) and interprets it abstractly: each traced value carries,
per axis, the digits of the parameter axes it came from (``_Atom``), moved
along by layout operations, ``scan``/``while``/``cond`` and calls. Each use
of a parameter is recorded (a ``dot_general`` or convolution with the role of
each digit, a ``gather``, an elementwise use, a slice of its output that
enters another product, an attention batch axis), and ``_read_leaf`` turns
a leaf's uses into its dimension numbers. Output heads are the projections
whose output reaches the model's output without another projection or a
residual sum in between. ``docs/routing.md`` gives the table of readings.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax.contrib import MuonDimensionNumbers

from optax_orth._src import routing
from optax_orth._src.routing import Decision, SplitDimensionNumbers

try:  # jax >= 0.4.30
  from jax.extend.core import ClosedJaxpr, Jaxpr, Literal
except ImportError:  # pragma: no cover
  from jax.core import ClosedJaxpr, Jaxpr, Literal  # pyright: ignore

HEAD, BLANK = -1, -2  # atom sources that are not a leaf


class _Atom(NamedTuple):
  """One digit of a leaf axis, as an axis of a traced value carries it.

  Index ``i`` along leaf axis ``axis`` has the digit ``(i // stride) % size``;
  the value holds digits ``lo <= digit < hi`` of it. ``src`` is the leaf's
  number, ``HEAD`` for an attention head axis, ``BLANK`` for anything else.
  """

  src: int
  axis: int
  stride: int
  size: int
  lo: int
  hi: int

  @property
  def extent(self) -> int:
    return self.hi - self.lo


def _blank(n: int) -> tuple[_Atom, ...]:
  return () if n == 1 else (_Atom(BLANK, 0, 1, n, 0, n),)


def _split_atom(a: _Atom, inner: int) -> tuple[_Atom, _Atom] | None:
  """``a`` as (outer, inner) digits, the inner of extent ``inner``."""
  if a.src == BLANK:
    return _Atom(BLANK, 0, 1, a.extent // inner, 0, a.extent // inner), _blank(inner)[0]
  if a.size % inner or a.lo % inner or a.hi % inner:
    return None
  outer = _Atom(
    a.src, a.axis, a.stride * inner, a.size // inner, a.lo // inner, a.hi // inner
  )
  return outer, _Atom(a.src, a.axis, a.stride, inner, 0, inner)


def _regroup(atoms: list[_Atom], sizes: Sequence[int]):
  """``atoms`` (outer to inner) cut into groups of the given extents, or
  ``None`` when a digit would have to be cut unevenly."""
  atoms, out = [a for a in atoms if a.extent != 1], []
  for n in sizes:
    group, need = [], n
    while need > 1:
      if not atoms:
        return None
      a = atoms.pop(0)
      if need % a.extent == 0:
        group.append(a)
        need //= a.extent
      elif a.extent % need == 0:
        pair = _split_atom(a, a.extent // need)
        if pair is None:
          return None
        group.append(pair[0])
        atoms.insert(0, pair[1])
        need = 1
      else:
        return None
    out.append(tuple(group))
  return out if not atoms else None


class _Info(NamedTuple):
  """What the reader knows of one traced value."""

  leaf: int | None = None  # the value is this leaf, moved by layout ops only
  axes: tuple | None = None  # per axis, its atoms (None: all blank)
  fixed: tuple = ()  # leaf digits selected away (an index, a scan slice)
  act: bool = False  # depends on the model's inputs
  param: bool = False  # depends on a parameter
  flags: frozenset = frozenset()  # projections whose output reaches it directly
  ids: bool = False  # a one-hot: integer inputs compared (eq), moved by layout


_CONST = _Info()
_LAYOUT = {
  "convert_element_type",
  "copy",
  "copy_p",
  "reduce_precision",
  "rev",
  "optimization_barrier",
}
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class _Use(NamedTuple):
  kind: str  # "dot", "conv", "gather", "elementwise", "opaque", "range", "head"
  roles: tuple = ()  # ((atom, role), ...) for dot / conv; (atom,) for range / head
  what: str = ""  # the primitive, or a note


class _Reader:
  """Abstract interpretation of a jaxpr: each value's :class:`_Info`, and the
  uses of each parameter leaf."""

  def __init__(self, n_leaves: int):
    self.uses: list[set[_Use]] = [set() for _ in range(n_leaves)]
    self.feeds: set[int] = set()  # projections whose output another consumes

  # Helpers -----------------------------------------------------------------

  def _axes(self, info: _Info, var) -> list[tuple[_Atom, ...]]:
    shape = tuple(getattr(var.aval, "shape", ()))
    if info.axes is None or len(info.axes) != len(shape):
      return [_blank(n) for n in shape]
    return list(info.axes)

  def _note(self, info: _Info, kind: str, what: str) -> None:
    if info.leaf is not None:
      self.uses[info.leaf].add(_Use(kind, (), what))

  def _consume(self, info: _Info, var) -> None:
    """A computed value enters a product: where it holds a slice of a leaf's
    output (a block of a fused projection), that slice is a block."""
    if info.leaf is not None:
      return
    for a in [*itertools.chain(*self._axes(info, var)), *info.fixed]:
      if a.src >= 0 and a.extent < a.size:
        self.uses[a.src].add(_Use("range", (a,), "slice"))

  # The walk ----------------------------------------------------------------

  def run(self, jaxpr, infos: Sequence[_Info], consts=None) -> list[_Info]:
    if isinstance(jaxpr, ClosedJaxpr):
      jaxpr = jaxpr.jaxpr
    env: dict = {}
    read = lambda v: _CONST if isinstance(v, Literal) else env.get(v, _CONST)
    for v, info in zip(jaxpr.invars, infos, strict=True):
      env[v] = info
    for eqn in jaxpr.eqns:
      outs = self.eqn(eqn, [read(v) for v in eqn.invars])
      for v, o in zip(eqn.outvars, outs, strict=True):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins: list[_Info]) -> list[_Info]:
    name = eqn.primitive.name
    method = getattr(self, f"_p_{name}", None)
    if method is not None:
      return method(eqn, ins)
    if name in _LAYOUT:
      return [
        self._moved(ins[i], self._axes(ins[i], v))
        for i, v in enumerate(eqn.invars[: len(eqn.outvars)])
      ]
    for key in _CALL_PARAMS:
      sub = eqn.params.get(key)
      if isinstance(sub, ClosedJaxpr | Jaxpr):
        return self._call(eqn, sub, ins)
    return self._generic(eqn, ins)

  def _moved(self, info: _Info, axes, fixed=()) -> _Info:
    return info._replace(axes=tuple(axes), fixed=info.fixed + tuple(fixed))

  def _call(self, eqn, sub, ins):
    inner = sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub
    if len(inner.invars) != len(ins):
      return self._generic(eqn, ins)
    same = all(
      getattr(a.aval, "shape", None) == getattr(b.aval, "shape", None)
      for a, b in zip(inner.invars, eqn.invars, strict=True)
    )
    ins = ins if same else [i._replace(axes=None) for i in ins]
    outs = self.run(inner, ins)
    if len(outs) != len(eqn.outvars):
      return self._generic(eqn, ins)
    return outs

  def _generic(self, eqn, ins: list[_Info]) -> list[_Info]:
    """Elementwise operations, reductions and everything not listed: the
    result depends on all inputs; a leaf in it is used elementwise."""
    name = eqn.primitive.name
    act = any(i.act for i in ins)
    param = any(i.param for i in ins)
    flags = frozenset().union(*(i.flags for i in ins))
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    out_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
    shape_kept = len(out_shapes) == 1 and all(
      s == ()
      or (
        len(s) == len(out_shapes[0])
        and all(a in (1, b) for a, b in zip(s, out_shapes[0], strict=True))
      )
      for s in shapes
    )
    if name in ("add", "sub", "add_any") and len(ins) == 2:
      a, b = ins
      if a.param and b.param and a.act and b.act and a.flags != b.flags:
        flags = frozenset()  # a residual stream: the sum of two computed values
    full = [
      i
      for i, s in zip(ins, shapes, strict=True)
      if i.leaf is not None and s == out_shapes[0]
    ]
    if not act and full and shape_kept:
      # a leaf changed elementwise (a scale, a weight norm): still that leaf,
      # the one whose own axes the result has; any other is used elementwise
      own = lambda i: sum(a.src == i.leaf for ax in (i.axes or ()) for a in ax)
      src = max(full, key=own)
      for i in ins:
        if i.leaf is not None and i.leaf != src.leaf:
          self._note(i, "elementwise", name)
      return [src._replace(param=True)]
    kind = (
      "elementwise" if (shape_kept or name.startswith(("reduce_", "arg"))) else "opaque"
    )
    for i in ins:
      self._note(i, kind, name)
    axes = None
    if shape_kept:
      carriers = [
        (i, v)
        for i, v, s in zip(ins, eqn.invars, shapes, strict=True)
        if s == out_shapes[0] and i.axes is not None and i.leaf is None
      ]
      if carriers and not (
        name in ("add", "sub", "add_any") and not flags and len(carriers) > 1
      ):
        axes = tuple(self._axes(*carriers[0]))
    elif len(out_shapes) == 1 and "axes" in eqn.params and ins[0].axes is not None:
      drop = set(eqn.params["axes"])
      kept = [
        a for k, a in enumerate(self._axes(ins[0], eqn.invars[0])) if k not in drop
      ]
      axes = tuple(kept) if len(kept) == len(out_shapes[0]) else None
    ids = (  # a comparison of token ids: a one-hot
      name == "eq"
      and act
      and not param
      and all(
        jnp.issubdtype(v.aval.dtype, jnp.integer)
        for i, v in zip(ins, eqn.invars, strict=True)
        if i.act
      )
    )
    return [_Info(None, axes, (), act, param, flags, ids) for _ in eqn.outvars]

  # Layout ------------------------------------------------------------------

  def _p_transpose(self, eqn, ins):
    axes = self._axes(ins[0], eqn.invars[0])
    return [self._moved(ins[0], [axes[p] for p in eqn.params["permutation"]])]

  def _reshape_to(self, info, var, shape):
    axes = self._axes(info, var)
    flat = [a for ax in axes for a in ax]
    fixed = [a for a in flat if a.extent == 1 and a.src >= 0]
    groups = _regroup(flat, shape)
    if groups is None:
      self._note(info, "opaque", "reshape that cuts a digit unevenly")
      return info._replace(leaf=None, axes=None)
    return self._moved(info, groups, fixed)

  def _p_reshape(self, eqn, ins):
    shape = tuple(eqn.outvars[0].aval.shape)
    return [self._reshape_to(ins[0], eqn.invars[0], shape)]

  def _p_squeeze(self, eqn, ins):
    shape = tuple(eqn.outvars[0].aval.shape)
    return [self._reshape_to(ins[0], eqn.invars[0], shape)]

  def _p_expand_dims(self, eqn, ins):
    return self._p_squeeze(eqn, ins)

  def _p_broadcast_in_dim(self, eqn, ins):
    info, shape = ins[0], tuple(eqn.params["shape"])
    axes = self._axes(info, eqn.invars[0])
    out = [_blank(n) for n in shape]
    fixed = []
    for k, d in enumerate(eqn.params["broadcast_dimensions"]):
      if eqn.invars[0].aval.shape[k] == shape[d]:
        out[d] = axes[k]
      else:
        fixed += [a for a in axes[k] if a.src >= 0]
    return [self._moved(info, out, fixed)]

  def _sliced(self, info, var, bounds):
    """``info`` with each axis restricted to ``bounds[k] = (start, stop)``."""
    axes, new = self._axes(info, var), []
    for ax, (start, stop), n in zip(axes, bounds, var.aval.shape, strict=True):
      if (start, stop) == (0, n):
        new.append(ax)
        continue
      inner = math.prod(a.extent for a in ax[1:])
      if not ax or start % inner or stop % inner:
        self._note(info, "opaque", "slice across digits")
        return info._replace(leaf=None, axes=None)
      a = ax[0]
      a = a._replace(lo=a.lo + start // inner, hi=a.lo + stop // inner)
      new.append((a, *ax[1:]))
    return self._moved(info, new)

  def _p_slice(self, eqn, ins):
    if eqn.params.get("strides") not in (None, (1,) * len(eqn.params["start_indices"])):
      return self._generic(eqn, ins)
    bounds = list(
      zip(eqn.params["start_indices"], eqn.params["limit_indices"], strict=True)
    )
    return [self._sliced(ins[0], eqn.invars[0], bounds)]

  def _p_split(self, eqn, ins):
    axis, outs, start = eqn.params["axis"], [], 0
    shape = eqn.invars[0].aval.shape
    for size in eqn.params["sizes"]:
      bounds = [(0, n) for n in shape]
      bounds[axis] = (start, start + size)
      outs.append(self._sliced(ins[0], eqn.invars[0], bounds))
      start += size
    return outs

  def _p_dynamic_slice(self, eqn, ins):
    """An index chosen at run time (a loop over stacked layers): the digits of
    an axis sliced to one element are batch digits."""
    info, var = ins[0], eqn.invars[0]
    by_data = any(i.act for i in ins[1:])
    sizes = eqn.params["slice_sizes"]
    if info.leaf is not None and by_data and not _selects_matrices(var, sizes):
      return self._p_gather(eqn, ins)  # a row chosen by the data: a lookup
    axes, new, fixed = self._axes(info, var), [], []
    for ax, size, n in zip(
      axes, eqn.params["slice_sizes"], var.aval.shape, strict=True
    ):
      if size == n:
        new.append(ax)
      elif size == 1:
        fixed += [a for a in ax if a.src >= 0]
        new.append(())
      else:
        self._note(info, "opaque", "dynamic_slice")
        return [info._replace(leaf=None, axes=None)]
    out = self._moved(info, new, fixed)
    if info.leaf is not None:  # whole matrices of a stacked leaf: still the leaf
      return [out]
    return [out._replace(act=out.act or by_data)]

  def _p_concatenate(self, eqn, ins):
    for i in ins:
      self._note(i, "opaque", "concatenate")
    out = self._generic_blank(eqn, ins)[0]
    axes = [self._axes(i, v) for i, v in zip(ins, eqn.invars, strict=True)]
    dim = eqn.params["dimension"]
    keep = [
      axes[0][k] if k != dim and all(a[k] == axes[0][k] for a in axes) else None
      for k in range(len(axes[0]))
    ]
    shape = eqn.outvars[0].aval.shape
    return [
      out._replace(
        axes=tuple(a if a is not None else _blank(shape[k]) for k, a in enumerate(keep))
      )
    ]

  def _generic_blank(self, eqn, ins):
    return [
      _Info(
        None,
        None,
        (),
        any(i.act for i in ins),
        any(i.param for i in ins),
        frozenset().union(*(i.flags for i in ins)),
      )
    ]

  def _p_gather(self, eqn, ins):
    table, var = ins[0], eqn.invars[0]
    dn = eqn.params.get("dimension_numbers")
    if table.leaf is not None and hasattr(dn, "offset_dims"):
      gone = {*dn.collapsed_slice_dims, *getattr(dn, "operand_batching_dims", ())}
      kept = [d for d in range(var.aval.ndim) if d not in gone]
      sizes = eqn.params["slice_sizes"]
      if _selects_matrices(var, sizes, kept):
        # whole matrices picked by the data (an MoE's top-k experts): the
        # picked axes are batch axes, the matrices' own axes carry on
        axes = self._axes(table, var)
        out = [_blank(n) for n in eqn.outvars[0].aval.shape]
        for o, d in zip(dn.offset_dims, kept, strict=True):
          out[o] = axes[d] if sizes[d] == var.aval.shape[d] else ()
        fixed = [a for d in gone for a in axes[d] if a.src >= 0]
        return [self._moved(table, out, fixed)]
    if table.leaf is not None:
      self.uses[table.leaf].add(_Use("gather", (), "gather"))
      return [_Info(None, None, (), True, True, frozenset())]
    return self._generic_blank(eqn, ins)

  # Products ------------------------------------------------------------------

  def _record(
    self,
    w: _Info,
    var,
    contract,
    batch,
    what,
    other=None,
    ovar=None,
    ocontract=(),
  ):
    axes = self._axes(w, var)
    roles = []
    for k, ax in enumerate(axes):
      role = "in" if k in contract else "batch" if k in batch else "out"
      roles += [(a, "batch" if a.extent == 1 else role) for a in ax if a.src >= 0]
    roles += [(a, "batch") for a in w.fixed]
    assert w.leaf is not None  # only leaves' values are recorded
    self.uses[w.leaf].add(_Use(what, tuple(roles), what))
    if other is not None:  # attention heads met in the contraction
      oaxes = self._axes(other, ovar)
      for k, ok in zip(contract, ocontract, strict=True):
        self._heads_met(list(axes[k]), list(oaxes[ok]))

  def _heads_met(self, mine: list[_Atom], theirs: list[_Atom]) -> None:
    """Marks the digits of ``mine`` aligned with head digits of ``theirs``."""
    if not any(a.src == HEAD for a in theirs):
      return
    groups = _regroup(list(mine), [a.extent for a in theirs if a.extent != 1])
    if groups is None:
      return
    for group, a in zip(groups, [a for a in theirs if a.extent != 1], strict=True):
      if a.src == HEAD:
        for g in group:
          if g.src >= 0:
            self.uses[g.src].add(_Use("head", (g,), "head"))

  def _p_dot_general(self, eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    lv, rv = eqn.invars
    weights = [i for i in (lhs, rhs) if i.leaf is not None and not i.act]
    sides = ((lhs, lv, lc, lb, rhs, rv, rc), (rhs, rv, rc, rb, lhs, lv, lc))
    for w, wv, wc, wb, other, ov, oc in sides:
      if w.leaf is None or w.act:
        continue
      if other.ids:  # a product with a one-hot of token ids: a lookup
        self.uses[w.leaf].add(_Use("gather", (), "one-hot dot_general"))
      else:
        self._record(
          w, wv, wc, wb, "dot", other if other.leaf is None else None, ov, oc
        )
    self._consume(lhs, lv)
    self._consume(rhs, rv)
    la, ra = self._axes(lhs, lv), self._axes(rhs, rv)
    attention = not weights and lhs.act and rhs.act and lhs.param and rhs.param
    out_batch = []
    for i, j in zip(lb, rb, strict=True):
      atoms = la[i] if any(a.src != BLANK for a in la[i]) else ra[j]
      if attention and any(a.src >= 0 for a in la[i] + ra[j]):
        for a in la[i] + ra[j]:
          if a.src >= 0:
            self.uses[a.src].add(_Use("head", (a,), "head"))
        atoms = (_Atom(HEAD, 0, 1, lv.aval.shape[i], 0, lv.aval.shape[i]),)
      out_batch.append(atoms)
    free = lambda axes, c, b: [
      ax for k, ax in enumerate(axes) if k not in c and k not in b
    ]
    axes = (*out_batch, *free(la, lc, lb), *free(ra, rc, rb))
    for i in (lhs, rhs):
      if i.leaf is None or i.act:
        self.feeds |= i.flags
    flags = frozenset(w.leaf for w in weights)
    act = lhs.act or rhs.act
    return [_Info(None, axes, (), act, True, flags if act else frozenset())]

  def _p_conv_general_dilated(self, eqn, ins):
    lhs, rhs = ins
    dn = eqn.params["dimension_numbers"]
    out_dim, in_dim, *spatial = dn.rhs_spec
    groups = eqn.params.get("feature_group_count", 1)
    groups *= eqn.params.get("batch_group_count", 1)
    if rhs.leaf is not None and not rhs.act:
      shape = eqn.invars[1].aval.shape
      if groups > 1 and shape[in_dim] == 1:
        self.uses[rhs.leaf].add(_Use("depthwise", (), "conv_general_dilated"))
      else:
        self._record(rhs, eqn.invars[1], (in_dim, *spatial), (), "conv")
        if groups > 1:
          for a in self._axes(rhs, eqn.invars[1])[out_dim][:1]:
            step = a.extent // groups if a.extent % groups == 0 else 0
            for g in range(groups if step else 0):
              piece = a._replace(lo=a.lo + g * step, hi=a.lo + (g + 1) * step)
              self.uses[rhs.leaf].add(_Use("range", (piece,), "feature groups"))
    self.feeds |= lhs.flags
    self._consume(lhs, eqn.invars[0])
    flags = frozenset([rhs.leaf]) if rhs.leaf is not None and lhs.act else frozenset()
    return [_Info(None, None, (), lhs.act, True, flags)]

  # Control flow -------------------------------------------------------------

  def _loop(self, body, consts, carry, xs=(), consts_body=None):
    """Runs ``body`` until the carry's info stops changing."""
    outs = []
    for _ in range(4):
      outs = self.run(body, [*consts, *carry, *xs])
      new = [_merge(c, o) for c, o in zip(carry, outs, strict=False)]
      if new == list(carry):
        break
      carry = new
    return carry, outs[len(carry) :]

  def _p_scan(self, eqn, ins):
    nc, ncar = eqn.params["num_consts"], eqn.params["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc : nc + ncar], ins[nc + ncar :]
    sliced = []
    for info, var in zip(xs, eqn.invars[nc + ncar :], strict=True):
      axes = self._axes(info, var)
      fixed = [a for a in axes[0] if a.src >= 0] if axes else []
      sliced.append(
        info._replace(axes=tuple(axes[1:]), fixed=info.fixed + tuple(fixed))
      )
    carry, ys = self._loop(eqn.params["jaxpr"], consts, carry, sliced)
    stacked = [
      y._replace(
        leaf=None,
        axes=None if y.axes is None else (_blank(eqn.params["length"]), *y.axes),
      )
      for y in ys
    ]
    return [*carry, *stacked]

  def _p_while(self, eqn, ins):
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    consts, carry = ins[cn : cn + bn], ins[cn + bn :]
    carry, _ = self._loop(eqn.params["body_jaxpr"], consts, carry)
    return carry

  def _p_cond(self, eqn, ins):
    outs = None
    for branch in eqn.params["branches"]:
      got = self.run(branch, ins[1:])
      outs = (
        got if outs is None else [_merge(a, b) for a, b in zip(outs, got, strict=True)]
      )
    return outs


def _selects_matrices(var, sizes, kept=None) -> bool:
  """A slice that keeps two or more whole axes (of size > 1) of the operand
  selects matrices, not rows; every other kept axis is sliced to size 1."""
  shape = var.aval.shape
  kept = range(len(shape)) if kept is None else kept
  whole = [d for d in kept if sizes[d] == shape[d] > 1]
  return len(whole) >= 2 and all(sizes[d] in (1, shape[d]) for d in kept)


def _merge(a: _Info, b: _Info) -> _Info:
  return _Info(
    a.leaf if a.leaf == b.leaf else None,
    a.axes if a.axes == b.axes else None,
    a.fixed if a.fixed == b.fixed else (),
    a.act or b.act,
    a.param or b.param,
    a.flags | b.flags,
  )


# From uses to dimension numbers ------------------------------------------------


def _readings(roles) -> str:
  return ", ".join(f"{r} axis {ax}" for r, ax in roles)


class _Reading(NamedTuple):
  dimension_numbers: Any
  why: str
  problem: str = ""  # a warning: the leaf could not be read unambiguously


def _digits(shape, atoms: Sequence[_Atom]):
  """The finest digits of each leaf axis that every atom's bounds respect:
  ``{axis: [(stride, size), ...] outer to inner}``, or ``None``."""
  marks = {ax: {1, n} for ax, n in enumerate(shape)}
  cuts: dict = {}
  for a in atoms:
    marks[a.axis] |= {a.stride, a.stride * a.size}
    if a.extent != a.size:
      cuts.setdefault((a.axis, a.stride, a.size), {0, a.size}).update((a.lo, a.hi))
  for (axis, stride, _), points in cuts.items():
    pieces = {q - p for p, q in itertools.pairwise(sorted(points))}
    if len(pieces) == 1:  # equal blocks: a digit of their own
      marks[axis].add(stride * pieces.pop())
  out = {}
  for ax in range(len(shape)):
    places = sorted(marks[ax])
    if any(q % p for p, q in itertools.pairwise(places)):
      return None
    out[ax] = [(p, q // p) for p, q in reversed(list(itertools.pairwise(places)))]
  return out


def _covered(a: _Atom, digits) -> list[tuple[int, int]]:
  return [
    (a.axis, k)
    for k, (s, n) in enumerate(digits[a.axis])
    if a.stride <= s < a.stride * a.size
  ]


def _read_leaf(shape, uses: set[_Use], per_head: bool) -> _Reading:
  """The dimension numbers of one leaf from its uses."""
  kinds = {u.kind for u in uses}
  mats = [u for u in uses if u.kind in ("dot", "conv")]
  ops = sorted({u.what for u in uses if u.kind in ("elementwise", "opaque")})
  if "gather" in kinds:
    tied = ", also a dot_general (a tied output head)" if mats else ""
    how = min(u.what for u in uses if u.kind == "gather")  # "gather" first
    return _Reading(None, f"{how} (an embedding lookup){tied}")
  if "depthwise" in kinds:
    return _Reading(
      None, "conv_general_dilated, depthwise (one input channel per group)"
    )
  if not mats:
    if "opaque" in kinds:
      why = f"used only through {', '.join(ops)}"
      if sum(d > 1 for d in shape) < 2:  # a vector (a learned token): no matrix
        return _Reading(None, why + ", a vector")
      return _Reading(None, why, "its uses do not show its matrices")
    if not uses:
      return _Reading(
        None, "not used by the traced call", "it is not used by the traced call"
      )
    return _Reading(None, f"elementwise only ({', '.join(ops)})")
  atoms = [a for u in mats for a, _ in u.roles] + [
    u.roles[0] for u in uses if u.kind in ("range", "head")
  ]
  digits = _digits(shape, atoms)
  if digits is None:
    return _Reading(
      None,
      "its uses cut its axes inconsistently",
      "its uses cut its axes inconsistently",
    )
  roles: dict = {}
  bounds: dict = {}
  heads: set = set()
  readings, aligned = [], True
  for u in sorted(mats):
    reading = {"in": set(), "out": set(), "batch": set()}
    for a, role in u.roles:
      for d in _covered(a, digits):
        roles.setdefault(d, set()).add(role)
        reading[role].add(d[0])
      aligned &= _bound(a, digits, bounds)
    readings.append(
      tuple((r, tuple(sorted(reading[r]))) for r in ("in", "out") if reading[r])
    )
  for u in uses:
    if u.kind == "range":
      aligned &= _bound(u.roles[0], digits, bounds)
    elif u.kind == "head":
      heads |= set(_covered(u.roles[0], digits))
  if not aligned:
    return _Reading(
      None, "its blocks are cut unevenly", "its uses cut its axes inconsistently"
    )
  readings = sorted(set(readings))
  if any(
    len(r - {"batch"}) > 1 or (len(r) > 1 and "batch" in r) for r in roles.values()
  ):
    a, b = readings[0], readings[-1]
    return _Reading(
      None,
      "used in incompatible ways",
      f"it is used as ({_readings(a)}) and as ({_readings(b)})",
    )
  view, kinds_, split = [], [], None
  for ax in range(len(shape)):
    for k, (_, n) in enumerate(digits[ax]):
      role = next(iter(roles.get((ax, k), {"batch"})))
      if per_head and (ax, k) in heads and role in ("in", "out"):
        role = "batch"
      cuts = sorted(bounds.get((ax, k), set()) | {0, n})
      pieces = [q - p for p, q in itertools.pairwise(cuts)]
      if len(pieces) > 1 and max(pieces) == 1:
        role = "batch"  # every index its own matrix
      if len(pieces) > 1 and role != "batch":
        if len(set(pieces)) == 1:
          view += [len(pieces), pieces[0]]
          kinds_ += [("batch", ax, True), (role, ax, False)]
          continue
        if split is not None:
          return _Reading(
            None, "blocks along two axes", "its blocks are cut along two axes"
          )
        split = (len(view), tuple(pieces))
      view.append(n)
      kinds_.append((role, ax, len(pieces) > 1 and role == "batch"))
  view, kinds_, split = _merged(view, kinds_, split)
  view = [int(n) for n in view]
  split = None if split is None else (split[0], tuple(int(p) for p in split[1]))
  red = tuple(k for k, (r, _, _) in enumerate(kinds_) if r == "in")
  out = tuple(k for k, (r, _, _) in enumerate(kinds_) if r == "out")
  op = "conv_general_dilated" if any(u.kind == "conv" for u in mats) else "dot_general"
  if not red or not out:
    return _Reading(None, f"{op} with no {'fan-in' if not red else 'fan-out'} axis")
  why = _why(op, shape, view, kinds_, split, per_head and bool(heads))
  one = lambda axes: axes[0] if len(axes) == 1 else axes
  if tuple(view) == tuple(shape) and split is None:
    return _Reading(MuonDimensionNumbers(one(red), one(out)), why)
  sizes, axis = (split[1], split[0]) if split else (None, None)
  if out == (axis,):
    axis = None  # the default: the output axis
  if tuple(view) == tuple(shape):
    return _Reading(SplitDimensionNumbers(one(red), one(out), sizes, None, axis), why)
  return _Reading(
    SplitDimensionNumbers(one(red), one(out), sizes, None, axis, tuple(view)), why
  )


def _bound(a: _Atom, digits, bounds) -> bool:
  """Records the cut points of ``a``'s range on its outermost digit; ``False``
  when the range does not fall on that digit's boundaries."""
  if a.extent == a.size:
    return True
  ax, k = _covered(a, digits)[0]
  unit = digits[ax][k][0] // a.stride
  if a.lo % unit or a.hi % unit:
    return False
  bounds.setdefault((ax, k), set()).update((a.lo // unit, a.hi // unit))
  return True


def _merged(view, kinds_, split):
  """Adjacent digits of one leaf axis with one role, not cut, become one axis."""
  out_v, out_k, new_split = [], [], None
  for k, (n, kind) in enumerate(zip(view, kinds_, strict=True)):
    cut = split is not None and split[0] == k
    if (
      out_k
      and not cut
      and not (split is not None and split[0] == k - 1)
      and out_k[-1][:2] == kind[:2]
      and not out_k[-1][2]
      and not kind[2]
    ):
      out_v[-1] *= n
      continue
    if cut and split is not None:
      new_split = (len(out_v), split[1])
    out_v.append(n)
    out_k.append(kind)
  return out_v, out_k, new_split


def _why(op, shape, view, kinds_, split, per_head) -> str:
  axes = lambda role: sorted({ax for r, ax, _ in kinds_ if r == role})
  fmt = lambda xs: " ".join(map(str, xs))
  ins, outs = axes("in"), axes("out")
  why = f"{op}: fan-in axis {fmt(ins)}, fan-out axis {fmt(outs)}"
  if min(ins) > max(outs):
    why += " (stored out, in)"
  batch = [ax for ax in axes("batch") if ax not in ins + outs]
  if batch:
    why += f", batch axis {fmt(batch)}"
  if split is not None:
    why += f", blocks {'+'.join(map(str, split[1]))}"
  cut = [
    n for n, (r, ax, c) in zip(view, kinds_, strict=True) if c and ax in ins + outs
  ]
  if cut:
    why += f", {math.prod(cut)} blocks"
  return why + (", per head" if per_head else "")


# Models ---------------------------------------------------------------------------


def _as_function(model, params, call_kwargs, rngs, inputs):
  """``(fn, params, rest)`` with ``fn(params, rest, *inputs)`` the model's
  forward pass; ``rest`` is the model's other state (RNG counts, statistics)."""
  flax = sys.modules.get("flax")
  nnx = sys.modules.get("flax.nnx")
  linen = sys.modules.get("flax.linen")
  if nnx is not None and isinstance(model, nnx.Module):
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    fn = lambda p, r, *x: nnx.merge(graphdef, p, r)(*x, **call_kwargs)
    return fn, state if params is None else params, rest
  if linen is not None and isinstance(model, linen.Module):
    if params is None:
      rngs = jax.random.key(0) if rngs is None else rngs
      params = jax.eval_shape(lambda: model.init(rngs, *inputs, **call_kwargs))
    variables = dict(params) if isinstance(params, Mapping) else params
    if not (isinstance(variables, Mapping) and "params" in variables):
      variables = {"params": params}
    others = {k: v for k, v in variables.items() if k != "params"}

    def fn(p, r, *x):
      return model.apply({**r, "params": p}, *x, **call_kwargs)

    return fn, variables["params"], others
  module = getattr(model, "module", None)
  if flax is not None and linen is not None and isinstance(module, linen.Module):
    # a Hugging Face Flax model: the wrapper's __call__ takes params=
    fn = lambda p, r, *x: model(*x, params=p, **call_kwargs)
    return fn, model.params if params is None else params, ()
  eqx = sys.modules.get("equinox")
  if eqx is not None and isinstance(model, eqx.Module):
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    fn = lambda p, r, *x: eqx.combine(p, static)(*x, **call_kwargs)
    return fn, arrays if params is None else params, ()
  if callable(model) and params is not None:
    return (lambda p, r, *x: model(p, *x, **call_kwargs)), params, ()
  raise TypeError(
    "route_by_model takes a Flax NNX or Linen module, a Hugging Face Flax model, "
    "an Equinox module, or a function fn(params, *inputs) with params=; got "
    f"{type(model).__name__}. For a parameter tree alone use route_by_path."
  )


def _override_text(name: str, dn) -> str:
  return f"overrides={{{('^' + re.escape(name) + '$')!r}: {dn!r}}}"


def read_model(fn, params, rest, inputs, per_head: bool):
  """``({leaf name: _Reading}, whether any attention product was found)``."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [routing.leaf_name(p) for p, _ in flat]
  shapes = [tuple(jnp.shape(x)) for _, x in flat]
  closed = jax.make_jaxpr(fn)(params, rest, *inputs)
  n_rest = len(jax.tree.leaves(rest))
  n = len(flat)
  if len(closed.jaxpr.invars) < n:
    raise ValueError("route_by_model: the traced call does not take every parameter.")
  reader = _Reader(n)
  leaf_infos = [
    _Info(
      i,
      tuple(() if d == 1 else (_Atom(i, a, 1, d, 0, d),) for a, d in enumerate(s)),
      (),
      False,
      True,
    )
    for i, s in enumerate(shapes)
  ]
  n_in = len(closed.jaxpr.invars) - n - n_rest
  inputs = [_CONST] * n_rest + [_Info(act=True)] * n_in
  outs = reader.run(closed.jaxpr, [*leaf_infos, *inputs])
  heads = frozenset().union(*(o.flags for o in outs))
  readings = {}
  for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
    r = _read_leaf(shape, reader.uses[i], per_head)
    mats = any(u.kind in ("dot", "conv") for u in reader.uses[i])
    lookup = any(u.kind == "gather" for u in reader.uses[i])
    if i in heads and mats and not lookup and not r.problem:
      if i in reader.feeds and r.dimension_numbers is not None:
        r = r._replace(
          why=r.why + "; also reaches the output directly",
          problem="its output reaches the model's output directly and also "
          "feeds another projection or attention, so it is both a hidden layer "
          f"and an output head (kept orthogonal; {_override_text(name, None)} "
          "sends it to Adam as a head)",
        )
      else:
        r = _Reading(
          None, f"output head ({r.why}; its output reaches the model's output)"
        )
    readings[name] = r
  found_heads = any(u.kind == "head" for uses in reader.uses for u in uses)
  return readings, found_heads


class ModelRouting(routing.Routing):
  """The routing of :func:`route_by_model`: a decision per parameter name.

  Attributes:
    decisions: ``{leaf name: Decision}`` for every parameter of the model.
  """

  label = "route_by_model"
  advice = (
    "Give route_by_model(...) overrides={pattern: dimension numbers or None} "
    "for these leaves; optax_orth.routing_table(params, spec) shows every leaf "
    "and why."
  )

  def __init__(self, decisions: dict[str, Decision], overrides, strict: bool):
    self.decisions = decisions
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    self.overrides = [(re.compile(p), dn) for p, dn in items]
    self.strict = bool(strict)
    self._fallback = routing.route_by_path()

  def patterns(self) -> Sequence[str]:
    return [p.pattern for p, _ in self.overrides]

  def decide(self, name: str, x: Any) -> Decision:
    for pattern, dn in self.overrides:
      if pattern.search(name):
        return Decision(dn, f"override {pattern.pattern!r}")
    found = self.decisions.get(name)
    if found is None and name.startswith("params/"):
      found = self.decisions.get(name[len("params/") :])
    if found is not None:
      return found
    fallback = self._fallback.decide(name, x)
    return fallback._replace(why=f"not in the model; {fallback.why}", guessed=True)


def route_by_model(
  model: Any,
  *example_inputs: Any,
  params: Any = None,
  per_head: bool = False,
  overrides: Mapping[str, MuonDimensionNumbers | SplitDimensionNumbers | None]
  | Sequence[tuple[str, Any]] = (),
  strict: bool = False,
  rngs: Any = None,
  **call_kwargs: Any,
) -> ModelRouting:
  r"""A dimension-numbers spec read from what the model computes.

  Traces one call of the model, ``model(*example_inputs, **call_kwargs)``, to
  a jaxpr (abstract inputs such as ``jax.ShapeDtypeStruct`` suffice; nothing
  is computed and no parameter-sized buffer is allocated) and reads every
  parameter's matrices from the operations that use it: the axes a
  ``dot_general`` contracts are its fan-in, its free axes the fan-out, the
  axes a ``scan`` slices or a dot batches are batch axes; a convolution
  kernel's input features and window are its fan-in; a table read by a
  ``gather`` (an embedding), a leaf used only elementwise (bias, norm scale)
  and every output head go to the Adam fallback. See the module docstring
  and ``docs/routing.md`` for every reading.

  Pass the result as ``weight_dimension_numbers=`` (``namo``, ``namo_d``,
  ``normuon``, ``adamuon``) or ``muon_weight_dimension_numbers=`` (``muon``).
  It fits the parameters however they are held: ``nnx.state(model,
  nnx.Param)`` and its pure dict, a Linen ``params`` dict or the variables
  around it, a Hugging Face model's ``params``, an Equinox module's arrays.

  Nothing is decided silently: a leaf used in two incompatible ways, one whose
  uses do not show its matrices, one the traced call does not use, and a
  projection that is both a hidden layer and an output head each get a
  :class:`~optax_orth.RoutingWarning` here that names the leaf and the
  ``overrides`` entry that settles it (``strict=True``: a ``ValueError``).

  Args:
    model: a Flax NNX module; a Linen module (``params=`` its variables, or
      none to initialize it abstractly); a Hugging Face Flax model (the
      wrapper, or its ``module`` with ``params=model.params``); an Equinox
      module; or a function ``fn(params, *inputs)`` with ``params=``.
    *example_inputs: the inputs of one call (arrays or
      ``jax.ShapeDtypeStruct``).
    params: the parameter tree the call reads (see ``model``); for NNX,
      Hugging Face and Equinox models it is taken from the model.
    per_head: one matrix per attention head: every axis of a projection that
      the attention products batch over (the heads of ``q``, ``k``, ``v``,
      and the heads the output projection contracts) becomes a batch axis.
    overrides: ``{pattern: MuonDimensionNumbers, SplitDimensionNumbers or
      None}``, searched (``re.search``) in each leaf name before anything
      else; ``None`` sends the leaf to Adam. A pattern that matches no leaf
      is reported.
    strict: raise a ``ValueError`` instead of each warning.
    rngs: Linen only, without ``params``: the key for the abstract ``init``
      (default ``jax.random.key(0)``).
    **call_kwargs: keyword arguments of the call (``deterministic=True``...).

  Returns:
    A :class:`ModelRouting`, a callable spec; ``routing_table(params, spec)``
    shows every leaf, its matrices and why.

  Raises:
    TypeError: for an object that is none of the above.
    ValueError: without example inputs, or with ``strict=True`` for any of
      the warnings above.
  """
  if not example_inputs:
    raise ValueError(
      "route_by_model reads the model from one traced call: pass example inputs, "
      "route_by_model(model, x) (jax.ShapeDtypeStruct((batch, seq), jnp.int32) "
      "is enough; nothing is computed)."
    )
  fn, tree, rest = _as_function(model, params, call_kwargs, rngs, example_inputs)
  readings, found_heads = read_model(fn, tree, rest, example_inputs, per_head)
  decisions = {}
  for name, r in readings.items():
    decisions[name] = Decision(r.dimension_numbers, r.why)
    if r.problem and not any(re.search(p, name) for p in _patterns(overrides)):
      message = (
        f"route_by_model: leaf {name!r}: {r.problem}; routed to "
        f"{'Adam' if r.dimension_numbers is None else 'the orthogonal branch'}. "
        f"To choose, pass {_override_text(name, r.dimension_numbers)}, with the "
        "dimension numbers that fit it (None: Adam)."
      )
      if strict:
        raise ValueError(message + " (strict=True makes this an error.)")
      warnings.warn(message, routing.RoutingWarning, stacklevel=2)
  if per_head and not found_heads:
    message = (
      "route_by_model(per_head=True): the traced call has no attention product "
      "(a dot_general of two computed values with a batch axis from a "
      "projection), so no leaf is split into heads."
    )
    if strict:
      raise ValueError(message)
    warnings.warn(message, routing.RoutingWarning, stacklevel=2)
  return ModelRouting(decisions, overrides, strict)


def _patterns(overrides) -> list[str]:
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  return [p for p, _ in items]
