r"""QK-clip (MuonClip, Kimi K2): cap each attention head's largest logit.

After the optimizer's step, for every attention head ``h`` whose largest
pre-softmax logit ``S_h = max_{i,j} q_i^h . k_j^h`` (measured in this step's
forward pass) exceeds the threshold ``tau``, the head's query and key weights
are rescaled so that the same logit would be exactly ``tau``:

.. math::
  \gamma_h = \min(1, \tau / S_h), \qquad
  W_q^h \leftarrow \gamma_h^{\alpha} W_q^h, \qquad
  W_k^h \leftarrow \gamma_h^{1 - \alpha} W_k^h,

with ``alpha = 1/2`` (both by ``sqrt(gamma)``), so that ``q . k`` scales by
``gamma``. Heads below the threshold are left alone. For multi-head latent
attention Kimi K2 scales the rotary query part by ``gamma`` and leaves the
shared rotary key alone: give those slices ``exponent=1`` and no entry.

The block is an optax transformation placed *after* the optimizer; it takes
the logits through optax's extra arguments::

  tx = optax.chain(optax_orth.muon(...), optax_orth.qk_clip(targets, 100.0))
  updates, state = tx.update(grads, state, params, max_logits=max_logits)

and returns the update ``K' - K`` that lands on the clipped weights ``K'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_orth._src import validation
from optax_orth._src.routing import leaf_name


class QKClipSlice(NamedTuple):
  """Where one attention layer's query (or key) heads sit in a kernel leaf.

  Along ``axis`` of the leaf, the range ``[start, stop)`` holds ``num_heads``
  equal, contiguous blocks, head ``h`` being the ``h``-th block (a fused QKV
  kernel ``(d, 3 d)``: queries ``[0, d)``, keys ``[d, 2 d)``; a per-head kernel
  ``(d, heads, head_dim)``: ``axis=1``, blocks of size one).

  Attributes:
    layer: the key of this layer in ``max_logits``.
    num_heads: heads in the range. Fewer than the layer's query heads (keys
      under grouped-query attention) means each block serves
      ``query_heads / num_heads`` consecutive query heads, and it is scaled
      for the largest logit of its group.
    axis: the axis of the leaf that holds the heads.
    start: first index of the range along ``axis``.
    stop: end of the range (``None``: the end of the axis).
    exponent: ``alpha``: the block is scaled by ``gamma ** exponent``
      (``0.5`` for queries and keys alike).
  """

  layer: str
  num_heads: int
  axis: int = -1
  start: int = 0
  stop: int | None = None
  exponent: float = 0.5


class QKClipState(NamedTuple):
  """State of :func:`qk_clip`.

  Attributes:
    scale: per layer, ``gamma`` of each query head at the last step (``1``
      where the head was under the threshold or its logit was not finite).
    nonfinite_count: per layer, int32, for each query head the number of
      steps whose ``max_logits`` was not finite (``nan`` or ``+-inf``); those
      steps leave the head's weights as the optimizer moved them.
  """

  scale: dict[str, jax.Array]
  nonfinite_count: dict[str, jax.Array]


Targets = Mapping[str, QKClipSlice | Sequence[QKClipSlice]]


def _targets_of(targets: Targets | Callable[[Any], Targets], params) -> dict:
  raw = targets(params) if callable(targets) else targets
  out = {}
  for name, slices in raw.items():
    slices = (slices,) if isinstance(slices, QKClipSlice) else tuple(slices)
    for s in slices:
      if not isinstance(s, QKClipSlice):
        raise ValueError(f"qk_clip: target {name!r} holds a {type(s).__name__}.")
    out[name] = slices
  return out


def _query_heads(targets: dict) -> dict[str, int]:
  heads: dict[str, int] = {}
  for slices in targets.values():
    for s in slices:
      heads[s.layer] = max(heads.get(s.layer, 0), s.num_heads)
  return heads


def _check_slice(name: str, shape: tuple, s: QKClipSlice, query_heads: int) -> None:
  axis = s.axis % len(shape) if shape else 0
  stop = shape[axis] if s.stop is None else s.stop
  if not shape or not 0 <= s.start < stop <= shape[axis]:
    raise ValueError(
      f"qk_clip: leaf {name!r} of shape {shape}: the range [{s.start}, {stop}) "
      f"is not inside axis {s.axis}."
    )
  if s.num_heads < 1 or (stop - s.start) % s.num_heads or query_heads % s.num_heads:
    raise ValueError(
      f"qk_clip: leaf {name!r}: the range [{s.start}, {stop}) of axis {s.axis} "
      f"does not split into {s.num_heads} equal heads that divide the layer's "
      f"{query_heads} query heads."
    )


def _head_scale(s_max: jax.Array, threshold) -> jax.Array:
  """``gamma = min(1, tau / S)`` per head; ``1`` for ``S <= tau`` and for a
  non-finite ``S`` (a ``+inf`` would zero the head for good, a ``nan`` says
  nothing about it)."""
  clip = jnp.isfinite(s_max) & (s_max > threshold)
  return jnp.where(clip, threshold / jnp.where(clip, s_max, 1.0), 1.0)


def _factor(shape: tuple, s: QKClipSlice, gamma: jax.Array) -> jax.Array:
  """Multiplier along ``s.axis`` (ones outside the slice), broadcastable."""
  axis = s.axis % len(shape)
  stop = shape[axis] if s.stop is None else s.stop
  groups = gamma.reshape(s.num_heads, -1).min(axis=1)  # the largest logit's gamma
  per_head = groups**s.exponent
  block = (stop - s.start) // s.num_heads
  inner = jnp.repeat(per_head, block)
  ones = jnp.ones((shape[axis],), inner.dtype)
  vec = ones.at[s.start : stop].set(inner)
  return vec.reshape([-1 if i == axis else 1 for i in range(len(shape))])


def qk_clip(
  targets: Targets | Callable[[Any], Targets],
  threshold: float = 100.0,
) -> optax.GradientTransformationExtraArgs:
  r"""MuonClip's QK-clip, as the last transformation of a chain.

  With ``K`` the parameters and ``u`` the updates it receives, it returns
  ``u' = K' - K`` where ``K'`` is ``K + u`` with, for every head of every
  target slice, the head's block multiplied by ``gamma_h ** exponent`` and
  ``gamma_h = min(1, threshold / S_h)``; ``S_h`` is the largest attention logit
  of head ``h`` in this step's forward pass, passed as the extra argument
  ``max_logits`` (a mapping from layer name to an array whose last axis is the
  query heads; leading axes, such as a batch axis, are maximized over).
  A head whose ``S_h`` is not finite (``nan``, ``+-inf``: a diverged or fully
  masked forward pass) is left unchanged at that step and counted in the
  state's ``nonfinite_count``.

  Args:
    targets: a mapping from leaf names (the ``/``-joined key path, as
      :func:`optax_orth.routing_table` prints them) to a
      :class:`QKClipSlice` or a sequence of them (a fused QKV kernel has a
      query and a key slice), or a callable of the parameters returning one.
    threshold: ``tau``, positive (Kimi K2: ``100``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and ``max_logits``. Its state (:class:`QKClipState`) keeps the ``gamma``
    it applied.

  References:
    Kimi Team, `Kimi K2: Open Agentic Intelligence
    <https://arxiv.org/abs/2507.20534>`_, 2025 (Algorithm 1, MuonClip);
    MaxText's ``use_qk_clip`` / ``qk_clip_threshold``.
  """
  validation.check_positive("threshold", threshold)
  where = "qk_clip"

  def resolve(params):
    found = _targets_of(targets, params)
    heads = _query_heads(found)
    leaves = {
      leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    for name, slices in found.items():
      if name not in leaves:
        raise ValueError(
          f"{where}: target {name!r} is not a leaf of the parameters; leaves "
          f"look like {sorted(leaves)[:3]}."
        )
      for s in slices:
        _check_slice(name, tuple(jnp.shape(leaves[name])), s, heads[s.layer])
    return found, heads

  def init_fn(params):
    _, heads = resolve(params)
    return QKClipState(
      scale={k: jnp.ones((n,), jnp.float32) for k, n in heads.items()},
      nonfinite_count={k: jnp.zeros((n,), jnp.int32) for k, n in heads.items()},
    )

  def update_fn(updates, state, params=None, *, max_logits=None, **extra_args):
    del extra_args
    if params is None or max_logits is None:
      raise ValueError(
        f"{where} needs params and the extra argument max_logits in update: "
        "tx.update(grads, state, params, max_logits={layer: per-head maxima})."
      )
    found, heads = resolve(params)
    gammas, counts = {}, {}
    for layer, n in heads.items():
      if layer not in max_logits:
        raise ValueError(f"{where}: max_logits has no entry for layer {layer!r}.")
      s_max = jnp.asarray(max_logits[layer], jnp.float32)
      s_max = s_max.reshape(-1, s_max.shape[-1]).max(axis=0) if s_max.ndim else s_max
      if s_max.shape != (n,):
        raise ValueError(
          f"{where}: max_logits[{layer!r}] has {s_max.shape[-1:]} heads on its "
          f"last axis; the targets give {n} query heads."
        )
      gammas[layer] = _head_scale(s_max, threshold)
      counts[layer] = state.nonfinite_count[layer] + (~jnp.isfinite(s_max)).astype(
        jnp.int32
      )

    def one(path, u, k):
      slices = found.get(leaf_name(path))
      if slices is None:
        return u
      f = 1.0
      for s in slices:
        f = f * _factor(jnp.shape(k), s, gammas[s.layer])
      # u + (f - 1)(K + u): exactly u where f = 1.
      return (u + (f - 1) * (k + u)).astype(u.dtype)

    out = jax.tree_util.tree_map_with_path(one, updates, params)
    return out, QKClipState(scale=gammas, nonfinite_count=counts)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
