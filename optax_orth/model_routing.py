"""Routing that reads the model: each Flax layer's own layout, as dimension numbers.

:func:`route_by_model` looks at a Flax NNX model's modules (or traces a Linen
module's ``init``) and returns a spec that every optimizer of this package
takes. For each parameter it knows which axes are the layer's fan-in, which
its fan-out, and which are batch axes (the layer axis that ``nnx.vmap``,
``nnx.scan`` or ``nn.scan`` adds, so each layer is orthogonalized on its own):

========================  =====================================================
layer                     matrices
========================  =====================================================
``Linear`` / ``Dense``    ``(in, out)``
``LinearGeneral`` /       the ``in_features`` (``axis``) axes by the
``DenseGeneral``          ``out_features`` axes; ``batch_axis`` / ``batch_dims``
                          are batch axes
``Einsum``                from the einsum string: kernel axes shared with the
                          input only are fan-in, with the output only fan-out,
                          with both batch
``MultiHeadAttention``    query/key/value ``(in, H*hd)``, out ``(H*hd, out)``;
                          ``per_head=True``: one ``(in, hd)`` / ``(hd, out)``
                          matrix per head
``Conv``                  ``(kh*kw*in, out)``
``Embed``, norms, biases  Adam
the output head           Adam: a projection named as in
                          :data:`optax_orth.routing.HEAD_PATTERNS`, or, given
                          sample inputs, the last projection to the model's
                          output (a tied ``Embed.attend`` is the embedding's)
========================  =====================================================

Parameters of other modules are routed as :func:`optax_orth.route_by_path`
would, and reported when only their shape decided.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from optax.contrib import MuonDimensionNumbers

from optax_orth import routing
from optax_orth.routing import Decision

DN = MuonDimensionNumbers
_QKV = ("query", "key", "value")


class _Param(NamedTuple):
  """One parameter of a known layer, before any stacking axes."""

  dimension_numbers: MuonDimensionNumbers | None
  shape: tuple[int, ...] | None  # the layer's own shape (None: not checked)
  why: str


class _Layer(NamedTuple):
  """A known layer: its kind (for the why column) and its parameters."""

  kind: str
  params: dict[str, _Param]
  projection: bool  # a candidate for the output head


def _tuple(axes) -> tuple[int, ...]:
  return (axes,) if isinstance(axes, int) else tuple(axes)


def _dn(red, out) -> MuonDimensionNumbers:
  red, out = _tuple(red), _tuple(out)
  return DN(red[0] if len(red) == 1 else red, out[0] if len(out) == 1 else out)


def _general(n_batch: int, n_in: int, n_out: int) -> MuonDimensionNumbers:
  """``batch + in + out`` axes, as ``LinearGeneral`` / ``DenseGeneral`` lay out."""
  red = range(n_batch, n_batch + n_in)
  return _dn(tuple(red), tuple(range(n_batch + n_in, n_batch + n_in + n_out)))


def einsum_dimension_numbers(einsum_str: str) -> MuonDimensionNumbers | None:
  """The kernel's dimension numbers for an ``Einsum(input, kernel)`` layer.

  A kernel axis whose letter is in the input only is a fan-in axis, in the
  output only a fan-out axis, in both a batch axis (for example a per-head
  ``"bhi,hio->bho"``). ``None`` when the kernel has no fan-in or no fan-out
  axis, or an axis summed out on its own.

  Example: ``einsum_dimension_numbers("bti,ihd->bthd")`` is
  ``MuonDimensionNumbers(0, (1, 2))``.
  """
  spec = einsum_str.replace(" ", "").replace("...", "")
  lhs, out = spec.split("->")
  inp, ker = lhs.split(",")
  red, fan_out = [], []
  for i, c in enumerate(ker):
    if c in inp and c not in out:
      red.append(i)
    elif c in out and c not in inp:
      fan_out.append(i)
    elif c not in inp and c not in out:
      return None
  return _dn(red, fan_out) if red and fan_out else None


def _kernel_layer(kind, dn, shape, projection=True, why=None) -> _Layer:
  why = why or (f"{kind} kernel" if dn is not None else f"{kind} kernel (no matrix)")
  params = {
    "kernel": _Param(dn, shape, why),
    "bias": _Param(None, None, f"{kind} bias"),
  }
  return _Layer(kind, params, projection)


def _adam_layer(kind: str, names: Sequence[str]) -> _Layer:
  return _Layer(kind, {n: _Param(None, None, f"{kind} {n}") for n in names}, False)


def _per_head(layer: _Layer, child: str, parent: str, per_head: bool) -> _Layer:
  """A ``LinearGeneral`` / ``DenseGeneral`` child of an attention module."""
  kind = f"{parent}.{child}"
  kernel = layer.params["kernel"]
  dn = kernel.dimension_numbers
  if dn is not None and per_head and child in _QKV and len(_tuple(dn.output_axis)) > 1:
    dn = _dn(dn.reduction_axis, _tuple(dn.output_axis)[1:])
  elif dn is not None and per_head and child == "out":
    dn = _dn(_tuple(dn.reduction_axis)[1:], dn.output_axis)
  why = f"{kind} kernel" + (", per head" if per_head else "")
  return _kernel_layer(kind, dn, kernel.shape, projection=False, why=why)


# Flax NNX ---------------------------------------------------------------------

_NNX_NORMS = tuple(
  getattr(nnx, n)
  for n in ("LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm", "InstanceNorm")
  if hasattr(nnx, n)
)
_NNX_PROJECTIONS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)


def _nnx_layer(module) -> _Layer | None:
  kind = type(module).__name__
  if isinstance(module, nnx.Linear):
    shape = (module.in_features, module.out_features)
    return _kernel_layer(kind, DN(0, 1), shape)
  if isinstance(module, nnx.LinearGeneral):
    batch = tuple(module.batch_axis.values())
    ins, outs = tuple(module.in_features), tuple(module.out_features)
    dn = _general(len(batch), len(ins), len(outs))
    return _kernel_layer(kind, dn, (*batch, *ins, *outs))
  if isinstance(module, nnx.Einsum):
    dn = einsum_dimension_numbers(module.einsum_str)
    return _kernel_layer(kind, dn, tuple(module.kernel_shape))
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    shape = tuple(module.kernel_shape)
    return _kernel_layer(kind, _dn(tuple(range(len(shape) - 1)), len(shape) - 1), shape)
  if isinstance(module, nnx.Embed):
    return _adam_layer(kind, ["embedding"])
  if isinstance(module, _NNX_NORMS):
    return _adam_layer(kind, ["scale", "bias"])
  return None


def _nnx_layers(model, per_head: bool) -> tuple[dict[str, _Layer], dict[str, str]]:
  """Known layers and every module's type name, by ``/``-joined module path."""
  modules = {
    "/".join(map(str, path)): node
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Module)
  }
  layers = {}
  for path, module in modules.items():
    layer = _nnx_layer(module)
    parent_path, _, child = path.rpartition("/")
    parent = modules.get(parent_path) if path else None
    if layer is not None and isinstance(parent, nnx.MultiHeadAttention):
      layer = _per_head(layer, child, type(parent).__name__, per_head)
    if layer is not None:
      layers[path] = layer
  return layers, {p: type(m).__name__ for p, m in modules.items()}


def _patched(classes_methods, record):
  """Wraps each ``(class, method)`` defined on that class to call ``record``."""
  originals = []
  for cls, method in classes_methods:
    if method not in cls.__dict__:
      continue
    orig = cls.__dict__[method]

    def wrapper(self, *args, __orig=orig, __method=method, **kwargs):
      out = __orig(self, *args, **kwargs)
      record(self, __method, out)
      return out

    originals.append((cls, method, orig))
    setattr(cls, method, wrapper)
  return originals


def _nnx_calls(model, inputs, kwargs) -> tuple[list[tuple[str, str, Any]], Any]:
  """``(module path, method, output shapes)`` of each projection call, in order,
  and the model's output shapes, from one abstract call (``nnx.eval_shape``)."""
  ids: dict[int, str] = {}
  calls: list[tuple[int, str, Any]] = []
  record = lambda m, method, out: calls.append(
    (id(m), method, jax.tree.map(jnp.shape, out))
  )

  def run(m, *args):
    for path, node in nnx.iter_graph(m):
      if isinstance(node, nnx.Module):
        ids[id(node)] = "/".join(map(str, path))
    return m(*args, **kwargs)

  targets = [(c, "__call__") for c in (*_NNX_PROJECTIONS, nnx.ConvTranspose)]
  originals = _patched([*targets, (nnx.Embed, "attend")], record)
  try:
    out = nnx.eval_shape(run, model, *inputs)
  finally:
    for cls, method, orig in originals:
      setattr(cls, method, orig)
  known = [(ids[i], method, shapes) for i, method, shapes in calls if i in ids]
  return known, jax.tree.map(jnp.shape, out)


# Flax Linen -------------------------------------------------------------------

_LINEN_NORMS = tuple(
  getattr(nn, n)
  for n in ("LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm", "InstanceNorm")
  if hasattr(nn, n)
)
_LINEN_ATTENTION = (nn.MultiHeadDotProductAttention,)


class _LinenCall(NamedTuple):
  module: nn.Module
  method: str
  args: tuple
  kwargs: dict
  shapes: dict[str, tuple[int, ...]]  # the module's own parameters, one layer's
  out: Any


def _linen_layer(call: _LinenCall) -> _Layer | None:
  m, kind = call.module, type(call.module).__name__
  kernel = call.shapes.get("kernel")
  if isinstance(m, nn.Dense):
    return _kernel_layer(kind, DN(0, 1), kernel)
  if isinstance(m, nn.DenseGeneral) and kernel is not None:
    n_batch = len(_tuple(m.batch_dims))
    n_out = len(_tuple(m.features))
    return _kernel_layer(
      kind, _general(n_batch, len(kernel) - n_batch - n_out, n_out), kernel
    )
  if isinstance(m, nn.Einsum) and kernel is not None:
    einsum_str = m.einsum_str or call.kwargs.get("einsum_str") or call.args[1]
    return _kernel_layer(kind, einsum_dimension_numbers(einsum_str), kernel)
  if isinstance(m, (nn.Conv, nn.ConvTranspose)) and kernel is not None:
    n = len(kernel)
    return _kernel_layer(kind, _dn(tuple(range(n - 1)), n - 1), kernel)
  if isinstance(m, nn.Embed):
    return _adam_layer(kind, ["embedding"])
  if isinstance(m, _LINEN_NORMS):
    return _adam_layer(kind, list(call.shapes))
  return None


def _linen_trace(module, inputs, kwargs, rngs):
  """The first call of each module (by path), the order of the last calls,
  the model's output shapes and its variables' shapes (one abstract init)."""
  first: dict[str, _LinenCall] = {}
  order: list[tuple[str, str, Any]] = []

  def interceptor(next_fun, args, kw, context):
    out = next_fun(*args, **kw)
    if context.method_name not in ("__call__", "attend"):
      return out
    m = context.module
    path = "/".join(map(str, m.path))
    own = {
      k: tuple(jnp.shape(nn.meta.unbox(v)))  # nn.with_partitioning boxes
      for k, v in m.variables.get("params", {}).items()
      if not isinstance(v, Mapping)
    }
    shapes = jax.tree.map(jnp.shape, out)
    first.setdefault(path, _LinenCall(m, context.method_name, args, kw, own, shapes))
    order.append((path, context.method_name, shapes))
    return out

  rngs = jax.random.key(0) if rngs is None else rngs
  with nn.intercept_methods(interceptor):
    out, variables = jax.eval_shape(
      lambda: module.init_with_output(rngs, *inputs, **kwargs)
    )
  return first, order, out, variables


def _linen_layers(first, per_head: bool) -> tuple[dict[str, _Layer], dict[str, str]]:
  layers = {}
  for path, call in first.items():
    layer = _linen_layer(call)
    parent_path, _, child = path.rpartition("/")
    parent = first.get(parent_path) if path else None
    if (
      layer is not None
      and parent is not None
      and isinstance(parent.module, _LINEN_ATTENTION)
    ):
      layer = _per_head(layer, child, type(parent.module).__name__, per_head)
    if layer is not None:
      layers[path] = layer
  return layers, {p: type(c.module).__name__ for p, c in first.items()}


# The routing -------------------------------------------------------------------


def _stacked(dn, own: tuple[int, ...], shape: tuple[int, ...]):
  """``dn`` for one layer of shape ``own``, moved to the stored ``shape`` whose
  extra axes (added by ``vmap`` / ``scan``) are batch axes; ``None`` if
  ``own`` is not ``shape`` with some axes removed."""
  extra = len(shape) - len(own)
  if extra < 0:
    return None, 0
  for added in itertools.combinations(range(len(shape)), extra):
    kept = [i for i in range(len(shape)) if i not in added]
    if tuple(shape[i] for i in kept) == tuple(own):
      move = lambda axes, k=kept: tuple(k[a % len(own)] for a in _tuple(axes))
      return _dn(move(dn.reduction_axis), move(dn.output_axis)), extra
  return None, 0


def _head_paths(layers, calls, out_shapes, head) -> dict[str, str]:
  """``{module path: why}`` of the layers that are the output head."""
  if head is None:
    return {}
  patterns = routing.HEAD_PATTERNS if head == "auto" else head
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  found = {
    path: f"output head (name {path.rsplit('/', 1)[-1]!r})"
    for path, layer in layers.items()
    if layer.projection and any(re.search(p, f"{path}/kernel") for p in patterns)
  }
  if head != "auto" or calls is None:
    return found
  outputs = {tuple(s) for s in jax.tree.leaves(out_shapes, is_leaf=_is_shape)}
  for path, method, shapes in reversed(calls):
    layer = layers.get(path)
    produced = {tuple(s) for s in jax.tree.leaves(shapes, is_leaf=_is_shape)}
    if layer is None or not produced & outputs:
      continue
    if method == "attend":
      return found  # a tied head: the embedding is already Adam's
    if layer.projection:
      found.setdefault(path, "output head (last projection to the output)")
      return found
  return found


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


class ModelRouting(routing.Routing):
  """The routing of :func:`route_by_model`: a decision per parameter name.

  Attributes:
    decisions: ``{leaf name: Decision}`` for every parameter of the model.
  """

  label = "route_by_model"

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


def _decisions(leaves, layers, kinds, heads) -> dict[str, Decision]:
  """One :class:`Decision` per ``(name, shape)`` parameter leaf."""
  fallback = routing.route_by_path()
  out = {}
  for name, shape in leaves:
    owner, _, param = name.rpartition("/")
    layer = layers.get(owner)
    known = layer.params.get(param) if layer is not None else None
    if known is None:
      d = fallback.decide(name, jax.ShapeDtypeStruct(shape, jnp.float32))
      kind = kinds.get(owner, "no module")
      out[name] = d._replace(why=f"{kind} (not a known layer): {d.why}")
      continue
    dn, why = known.dimension_numbers, known.why
    if owner in heads:
      dn, why = None, f"{why}, {heads[owner]}"
    elif dn is not None and known.shape is not None:
      dn, extra = _stacked(dn, known.shape, shape)
      if dn is None:
        d = fallback.decide(name, jax.ShapeDtypeStruct(shape, jnp.float32))
        why = f"{why}: shape {shape} is not the layer's {known.shape}; {d.why}"
        out[name] = Decision(d.dimension_numbers, why, guessed=True)
        continue
      if extra:
        why += f", {extra} stacked {'axis' if extra == 1 else 'axes'}"
    out[name] = Decision(dn, why)
  return out


def _param_leaves(tree) -> list[tuple[str, tuple[int, ...]]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(routing.leaf_name(p), tuple(jnp.shape(x))) for p, x in flat]


def route_by_model(
  model: nnx.Module | nn.Module,
  *sample_inputs: Any,
  per_head: bool = False,
  head: str | Sequence[str] | None = "auto",
  overrides: Mapping[str, MuonDimensionNumbers | None]
  | Sequence[tuple[str, MuonDimensionNumbers | None]] = (),
  strict: bool = False,
  rngs: Any = None,
  **call_kwargs: Any,
) -> ModelRouting:
  r"""A dimension-numbers spec read from the model's own layers.

  Pass it as ``weight_dimension_numbers=`` (``namo``, ``namo_d``,
  ``normuon``) or ``muon_weight_dimension_numbers=`` (``muon``). It fits the
  model's parameters however they are held: ``nnx.state(model, nnx.Param)``
  (what ``nnx.Optimizer`` initializes with), its pure dict, a Linen
  ``params`` dict (or the variables dict around it).

  For Flax NNX, the layers are read from the module graph; ``sample_inputs``
  are optional and only used, in one abstract call (``nnx.eval_shape``), to
  find the output head as the last projection to the model's output. For
  Linen, ``model`` is the (unbound) module and ``sample_inputs`` (required)
  are passed to ``model.init`` under ``jax.eval_shape``, which is traced
  with Flax's method interceptors to read each layer's type and its own
  (unstacked) parameter shapes, ``nn.scan`` stacks included. Nothing is
  computed on real data. See the module docstring for the layouts.

  Args:
    model: an ``nnx.Module`` or a ``flax.linen.Module``.
    *sample_inputs: inputs for one call of the model (abstract values are
      fine); required for Linen.
    per_head: orthogonalize each attention head's query/key/value and output
      matrix on its own, instead of one ``(in, heads*head_dim)`` matrix.
    head: ``"auto"``: the output head is a projection whose path matches
      :data:`optax_orth.routing.HEAD_PATTERNS`, or, with sample inputs, the
      last projection whose output is the model's (a tied ``Embed.attend``
      keeps the embedding's Adam); a pattern or patterns of head module
      paths; ``None``: no head.
    overrides: ``{pattern: MuonDimensionNumbers or None}`` searched in each
      leaf name before anything else (``None`` sends it to Adam); a pattern
      that matches no leaf is reported.
    strict: raise, instead of warning, for leaves routed by shape alone (a
      parameter of an unknown module or not in the model) and for unmatched
      overrides.
    rngs: Linen only: the ``rngs`` for ``init`` (default ``jax.random.key(0)``).
    **call_kwargs: keyword arguments for the model call (``train=False``...).

  Returns:
    A :class:`ModelRouting`, a callable spec; ``routing_table(params, spec)``
    shows every leaf, its matrices and why.

  Raises:
    TypeError: if ``model`` is not a Flax module.
    ValueError: for a Linen module without sample inputs.
  """
  if isinstance(model, nnx.Module):
    layers, kinds = _nnx_layers(model, per_head)
    calls, out = (None, None)
    if sample_inputs and head == "auto":
      calls, out = _nnx_calls(model, sample_inputs, call_kwargs)
    leaves = _param_leaves(nnx.state(model, nnx.Param))
  elif isinstance(model, nn.Module):
    if not sample_inputs:
      raise ValueError(
        "route_by_model: a Linen module needs sample inputs, "
        "route_by_model(module, x), to trace its init."
      )
    first, calls, out, variables = _linen_trace(model, sample_inputs, call_kwargs, rngs)
    layers, kinds = _linen_layers(first, per_head)
    out = jax.tree.map(lambda s: tuple(s.shape), out)
    leaves = _param_leaves(variables.get("params", {}))
  else:
    raise TypeError(
      "route_by_model takes a flax.nnx.Module or a flax.linen.Module; got "
      f"{type(model).__name__}. For a plain parameter tree use route_by_path."
    )
  heads = _head_paths(layers, calls, out, head)
  return ModelRouting(_decisions(leaves, layers, kinds, heads), overrides, strict)
