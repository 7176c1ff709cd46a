r"""The hyperball step of MuonH / AdamH: every matrix keeps its Frobenius norm.

For a matrix ``K`` and a direction ``D`` (Muon's ``O``, Adam's ``m / sqrt(v)``),
the step is taken relative to the weight's norm and then projected back onto
the sphere of radius ``||K||``:

.. math::
  \tilde K = K - \eta\, \frac{\|K\|_F}{\|D\|_F}\, D, \qquad
  K' = \|K\|_F \frac{\tilde K}{\|\tilde K\|_F},

so ``eta`` is the fraction of ``||K||`` that the step moves before the
projection, and no weight decay is needed (the norm cannot grow). This is the
rule ``K' = ||K|| (K + s u) / ||K + s u||`` with ``u = -eta D`` and ``s u =
-eta ||K|| D / ||D||``, per matrix of each leaf (stacked leaves: per slice).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_orth._src import transforms, validation
from optax_orth._src.routing import DimensionNumbersSpec


class ScaleByHyperballState(NamedTuple):
  """State of :func:`scale_by_hyperball`: the step count (for schedules)."""

  count: jax.typing.ArrayLike


def _hyperball_step(lay, d, k, lr):
  """``K' - K`` for one block of a leaf, per matrix, in float32 or wider.

  Computed as ``K' = ||K|| w / ||w||`` with ``w = (K / ||K|| - lr D / ||D||) /
  max(1, lr)``: every term of ``w`` is at most 1 in size, so no norm
  overflows, whatever the (finite) learning rate or the weights' scale.
  """
  dt = jnp.promote_types(k.dtype, jnp.float32)
  dm, km = lay.to_matrices(d.astype(dt)), lay.to_matrices(k.astype(dt))
  k_norm, k_unit = _norm_and_unit(km)
  d_norm, d_unit = _norm_and_unit(dm)
  shrink = jnp.maximum(1.0, lr)
  w = k_unit / shrink - (lr / shrink) * d_unit
  w_norm, w_unit = _norm_and_unit(w)
  moved = jnp.where(w_norm > 0, k_norm * w_unit, 0.0)
  step = jnp.where(d_norm > 0, moved - km, 0.0)  # no direction: exactly no step
  return lay.from_matrices(step).astype(d.dtype)


def _norm_and_unit(x):
  """``(||x||, x / ||x||)`` per matrix, without overflow or underflow: ``x`` is
  first divided by its largest entry. ``(0, 0)`` for a zero matrix; the norm
  is ``inf`` only where the true norm exceeds the dtype's range."""
  big = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  safe = jnp.where(big > 0, big, 1)
  scaled = x / safe
  n = jnp.linalg.norm(scaled, axis=(-2, -1), keepdims=True)
  return n * big, jnp.where(n > 0, scaled / jnp.where(n > 0, n, 1), 0)


def scale_by_hyperball(
  learning_rate: optax.ScalarOrSchedule,
  *,
  weight_dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""The hyperball (MuonH / AdamH) step, in place of ``scale_by_learning_rate``.

  Takes a direction ``D`` shaped like the parameters and returns the update
  ``K' - K`` with, per matrix,

  .. math::
    \tilde K = K - \eta \frac{\|K\|_F}{\|D\|_F} D, \qquad
    K' = \|K\|_F\, \tilde K / \|\tilde K\|_F.

  It applies the learning rate itself (the relative step ``eta ||K|| / ||D||``
  needs ``D`` before the learning rate), so it ends a chain:
  ``chain(orthogonalize_momentum(), scale_by_hyperball(lr))`` is MuonH,
  ``chain(optax.scale_by_adam(), scale_by_hyperball(lr))`` AdamH. A zero
  direction gives a zero update; a zero matrix stays zero. Norms are taken in
  the wider of float32 and the leaf's dtype, and are overflow-safe:
  ``||K'|| = ||K||`` holds for any finite learning rate.

  Args:
    learning_rate: ``eta``, a float or an optax schedule: the step as a
      fraction of each matrix's norm (Levanter: ``sqrt(lr * weight_decay)``
      of the Muon run it replaces).
    weight_dimension_numbers: a dimension-numbers spec (``None``: the default
      routing); the norms are per matrix of each leaf.

  Returns:
    An ``optax.GradientTransformation``; it needs ``params`` in ``update``.

  References:
    MuonH / AdamH, Levanter (``src/levanter/optim/muonh.py``, ``adamh.py``,
    marin-community; ``scale_invariant_update`` checked at marin commit
    ``e8fe178``, whose Newton–Schulz rows are the ``"dion"`` preset), 2025.
  """
  validation.check_hyperparameters({"learning_rate": learning_rate})
  where = "scale_by_hyperball"

  def init_fn(params):
    del params
    return ScaleByHyperballState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(f"{where} needs params in update.")
    lr = validation.at_step(learning_rate, state.count)
    step = lambda p, d, k: _hyperball_step(p, d, k, lr)
    outs = transforms.map_matrices(
      weight_dimension_numbers, where, step, updates, params
    )
    return outs, ScaleByHyperballState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
