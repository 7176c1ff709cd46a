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
* a tree (or tree prefix) of ``MuonDimensionNumbers`` or ``None`` (``None``:
  the leaf is not a matrix and goes to the Adam fallback in the aliases);
* a callable from the parameters to such a tree, such as :func:`route_by_path`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax.contrib import MuonDimensionNumbers

DimensionNumbersSpec = MuonDimensionNumbers | Any | Callable[[Any], Any] | None

DEFAULT_DIMENSION_NUMBERS = MuonDimensionNumbers(reduction_axis=0, output_axis=1)

#: Path patterns (regular expressions, searched in the ``/``-joined key path)
#: that :func:`route_by_path` sends to the Adam fallback by default: token and
#: position embeddings and the output head, as in the NAMO and NorMuon
#: references, and biases and norm scales, which are 2-D when stacked over
#: layers. Every leaf of rank < 2 goes there regardless.
DEFAULT_ADAM_PATTERNS: tuple[str, ...] = (
  r"embed",
  r"(^|/)(wte|wpe|tok_emb|pos_emb)(/|$)",
  r"(^|/)(lm_head|head|output_head|readout)(/|$)",
  r"(^|/)(bias|scale)(/|$)",
)


class MatrixLayout(NamedTuple):
  """How one leaf is viewed as a stack of matrices.

  Attributes:
    shape: the leaf's shape.
    perm: transposition that orders the axes as (batch, reduction, output).
    batch: number of matrices.
    fan_in: product of the reduction dimensions.
    fan_out: product of the output dimensions.
  """

  shape: tuple[int, ...]
  perm: tuple[int, ...]
  batch: int
  fan_in: int
  fan_out: int

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """``x`` (the leaf's shape) to ``(batch, fan_in, fan_out)``."""
    return jnp.transpose(x, self.perm).reshape(self.batch, self.fan_in, self.fan_out)

  def from_matrices(self, y: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_matrices`."""
    permuted = tuple(self.shape[i] for i in self.perm)
    inverse = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
    return jnp.transpose(y.reshape(permuted), inverse)


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
  dimension_numbers: MuonDimensionNumbers | None = DEFAULT_DIMENSION_NUMBERS,
  path: str = "",
) -> MatrixLayout:
  """The :class:`MatrixLayout` of a leaf, with validation.

  Args:
    shape: the leaf's shape.
    dimension_numbers: the leaf's ``MuonDimensionNumbers`` (default: a 2-D
      ``(fan_in, fan_out)`` matrix). ``None`` marks a leaf that the routing
      sends to the Adam fallback: it has no matrix layout, and is an error.
    path: the leaf's path, used in error messages.

  Raises:
    ValueError: naming the leaf, for rank < 2 leaves, ``None``, axes out of
      range, repeated, or shared between reduction and output.
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
  if not isinstance(dimension_numbers, MuonDimensionNumbers):
    raise ValueError(
      f"{where}: expected MuonDimensionNumbers or None, got {dimension_numbers!r}."
    )
  ndim = len(shape)
  red = _axes(dimension_numbers.reduction_axis, ndim, "reduction_axis", where)
  out = _axes(dimension_numbers.output_axis, ndim, "output_axis", where)
  if set(red) & set(out):
    raise ValueError(f"{where}: reduction_axis {red} and output_axis {out} overlap.")
  batch = tuple(ax for ax in range(ndim) if ax not in red and ax not in out)
  prod = lambda axes: math.prod(shape[a] for a in axes)
  return MatrixLayout(shape, batch + red + out, prod(batch), prod(red), prod(out))


def optax_rule(params: Any) -> Any:
  """``optax.contrib.muon``'s routing: every 2-D leaf is a ``(fan_in, fan_out)``
  matrix, every other leaf goes to the Adam fallback. ``muon``'s default."""
  return jax.tree.map(
    lambda x: DEFAULT_DIMENSION_NUMBERS if jnp.ndim(x) == 2 else None, params
  )


def default_routing() -> Callable[[Any], Any]:
  """The spec that ``None`` stands for everywhere: :func:`route_by_path` ``()``."""
  return _DEFAULT_ROUTING


def resolve_spec(spec: DimensionNumbersSpec) -> DimensionNumbersSpec:
  """``spec``, with ``None`` replaced by :func:`default_routing`."""
  return default_routing() if spec is None else spec


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, MuonDimensionNumbers)


def leaf_dimension_numbers(
  spec: DimensionNumbersSpec, tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> list[MuonDimensionNumbers | None]:
  """Resolves a spec to one entry per leaf of ``tree`` (in flatten order).

  ``None`` (the spec) is :func:`default_routing`; a ``None`` inside a spec
  tree (or returned by a callable spec) marks a non-matrix leaf.
  """
  leaves = jax.tree.leaves(tree, is_leaf=is_leaf)
  spec = resolve_spec(spec)
  if callable(spec) and not isinstance(spec, MuonDimensionNumbers):
    spec = spec(tree)
  if isinstance(spec, MuonDimensionNumbers):
    return [spec] * len(leaves)
  nested = jax.tree.map(
    lambda dn, sub: [dn] * len(jax.tree.leaves(sub, is_leaf=is_leaf)),
    spec,
    tree,
    is_leaf=_is_spec_leaf,
  )
  out = [
    dn
    for group in jax.tree.leaves(nested, is_leaf=lambda x: isinstance(x, list))
    for dn in group
  ]
  assert len(out) == len(leaves)
  return out


def label_tree(
  params: Any,
  spec: DimensionNumbersSpec,
  matrix_label: str = "orthogonal",
  other_label: str = "adam",
) -> Any:
  """Labels each leaf of ``params`` for ``optax.partition``.

  A leaf is a matrix where the resolved spec is not ``None`` (``spec=None``
  is :func:`default_routing`; pass :func:`optax_rule` for optax's rule).

  Raises:
    ValueError: naming the leaf, for non-floating-point parameters, and for
      matrix leaves whose dimension numbers do not fit them.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  dims = leaf_dimension_numbers(spec, params)
  labels = []
  for (path, x), dn in zip(flat, dims, strict=True):
    name = path_str(path)
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
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
  rules: Mapping[str, MuonDimensionNumbers]
  | Sequence[tuple[str, MuonDimensionNumbers]] = (),
  adam_patterns: Sequence[str] = DEFAULT_ADAM_PATTERNS,
) -> Callable[[Any], Any]:
  r"""A path-based dimension-numbers spec: embeddings, head, vectors to Adam.

  The returned callable maps a parameter tree (a Linen ``params`` dict, an NNX
  ``nnx.State`` or its pure dict, any pytree) to a tree of
  ``MuonDimensionNumbers`` or ``None``. For each leaf, with ``path`` its
  ``/``-joined key path (for example ``"blocks/0/attn/qkv/kernel"``):

  1. if a pattern in ``adam_patterns`` is found in ``path``
     (``re.search``), or the leaf has rank < 2: ``None`` (Adam fallback);
  2. else the dimension numbers of the first rule whose pattern is found in
     ``path``;
  3. else, for a 2-D leaf, ``MuonDimensionNumbers(0, 1)``; a leaf of rank > 2
     with no rule goes to Adam.

  Use :func:`routing_table` to see the result on your model.

  Args:
    rules: ``{pattern: MuonDimensionNumbers}`` for stacked, multi-head or
      convolution leaves, for example
      ``{r"layers/.*/kernel": MuonDimensionNumbers(1, 2)}`` for a
      ``(layers, fan_in, fan_out)`` scan stack.
    adam_patterns: patterns of leaves sent to Adam whatever their rank.

  Returns:
    A callable usable as ``weight_dimension_numbers`` (or
    ``muon_weight_dimension_numbers``) in every optimizer of this package.
  """
  rule_items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  compiled_rules = [(re.compile(p), dn) for p, dn in rule_items]
  compiled_adam = [re.compile(p) for p in adam_patterns]

  def spec_fn(params):
    if isinstance(params, jax.Array) and jnp.issubdtype(params.dtype, jnp.integer):
      raise ValueError(
        "a route_by_path spec was called with a step count: under "
        "optax.inject_hyperparams, pass static_args=('weight_dimension_numbers',)"
        " (or 'muon_weight_dimension_numbers') so it is not taken for a schedule."
      )

    def one(path, x):
      name = path_str(path)
      if jnp.ndim(x) < 2 or any(p.search(name) for p in compiled_adam):
        return None
      for pattern, dn in compiled_rules:
        if pattern.search(name):
          return dn
      return DEFAULT_DIMENSION_NUMBERS if jnp.ndim(x) == 2 else None

    return jax.tree_util.tree_map_with_path(one, params)

  return spec_fn


def routing_table(
  params: Any, weight_dimension_numbers: DimensionNumbersSpec = None
) -> str:
  """A human-readable table of where each leaf goes and how it is reshaped."""
  labels = label_tree(params, weight_dimension_numbers)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  dims = leaf_dimension_numbers(weight_dimension_numbers, params)
  lines = [
    "| path | shape | branch | matrices (batch x fan_in x fan_out) |",
    "|---|---|---|---|",
  ]
  for (path, x), label, dn in zip(flat, jax.tree.leaves(labels), dims, strict=True):
    if label == "orthogonal":
      lay = matrix_layout(jnp.shape(x), dn)
      mats = f"{lay.batch} x {lay.fan_in} x {lay.fan_out}"
    else:
      mats = "-"
    lines.append(f"| {path_str(path)} | {tuple(jnp.shape(x))} | {label} | {mats} |")
  return "\n".join(lines)


_DEFAULT_ROUTING = route_by_path()
