r"""Cautious weight decay: decay only where the update already shrinks the weight.

Decoupled weight decay adds ``lambda K`` to every coordinate of the update
``u``. Cautious weight decay (Chen et al., 2025) adds it only where ``u`` and
the weight ``K`` have the same sign, that is where the step ``-eta u`` already
moves the weight toward zero:

.. math::
  u \leftarrow u + \lambda\, \mathbb{1}[u \odot K \ge 0] \odot K,

so the decay never fights the optimizer's own direction. It needs no new
hyperparameter. :func:`add_cautious_weight_decay` is the drop-in replacement
of ``optax.add_decayed_weights``; :func:`cautious_mask` is the indicator, which
:func:`optax_orth.scale_by_norm_adaptive` uses for NAMO's adaptive decay.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_orth._src import validation


def cautious_mask(direction: jax.Array, weight: jax.Array) -> jax.Array:
  """``1[direction * weight >= 0]`` as ``weight``'s dtype (the paper's indicator).

  ``direction`` is the update *before* the (negative) learning rate: where it
  has the sign of ``weight``, the step ``-lr * direction`` moves the weight
  toward zero. Where the product is zero the weight is either zero (so the
  decay adds nothing) or the direction is, as in the paper and Dion. For
  complex entries the condition is ``Re(conj(direction) * weight) >= 0``.
  """
  prod = jnp.conj(direction) * weight  # real part: <u, K> per complex entry
  return (jnp.real(prod) >= 0).astype(weight.dtype)


class AddCautiousWeightDecayState(NamedTuple):
  """State of :func:`add_cautious_weight_decay`: the step count (for schedules)."""

  count: jax.typing.ArrayLike


def add_cautious_weight_decay(
  weight_decay: optax.ScalarOrSchedule = 0.0,
  mask: Any = None,
) -> optax.GradientTransformation:
  r"""Adds ``weight_decay * K`` where the update and the parameter agree in sign.

  For updates ``u`` and parameters ``K``, element-wise:

  .. math::
    u \leftarrow u + \lambda\, \mathbb{1}[u \odot K \ge 0] \odot K.

  A drop-in for ``optax.add_decayed_weights`` (same arguments, same place in
  a chain: before ``scale_by_learning_rate``, so that ``u`` is the direction
  the step subtracts). With a mask that is all ``True`` and parameters whose
  signs every update shares, it is ``add_decayed_weights``.

  Args:
    weight_decay: ``lambda``, a non-negative float or an optax schedule of the
      step count.
    mask: ``None``, or a tree (or prefix) of booleans, or a callable of the
      parameters returning one, as in ``optax.add_decayed_weights``: ``True``
      where the decay applies.

  Returns:
    An ``optax.GradientTransformation``; it needs ``params`` in ``update``.

  References:
    Chen et al., `Cautious Weight Decay <https://arxiv.org/abs/2510.12402>`_,
    2025 (Algorithm 1, ``x <- x - eta (u + lambda 1[u x >= 0] x)``); Dion's
    ``cautious_wd`` (``microsoft/dion``, ``dion/muon.py``, checked at commit
    ``0a059a4``) and modded-nanogpt (``train_gpt.py`` at ``f411b3d``, where
    the decay rate is ``wd * lr``: see ``docs/recipes.md``) use the same
    mask.
  """
  validation.check_hyperparameters({"weight_decay": weight_decay})

  def init_fn(params):
    del params
    return AddCautiousWeightDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_cautious_weight_decay needs params in update.")
    count = optax.safe_increment(state.count)
    if isinstance(weight_decay, int | float) and weight_decay == 0:
      return updates, AddCautiousWeightDecayState(count)
    wd = validation.at_step(weight_decay, state.count)

    def one(u, k):
      if u is None:
        return None
      return (u + wd * cautious_mask(u, k) * k).astype(u.dtype)

    updates = jax.tree.map(one, updates, params, is_leaf=lambda x: x is None)
    return updates, AddCautiousWeightDecayState(count)

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)
