r"""RMS alignment: rescale each matrix's update to a fixed root-mean-square.

AdaMuon (Si et al., 2025) ends its direction with

.. math::
  U \leftarrow \frac{r \sqrt{\text{fan\_in} \cdot \text{fan\_out}}}
    {\|U\|_F + \epsilon}\, U,

which gives every matrix's update the RMS ``r`` (``0.2``, the RMS of a typical
Adam update), so that Adam's learning rates and schedules carry over.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from optax_orth._src import transforms, validation
from optax_orth._src.routing import DimensionNumbersSpec


def scale_to_rms(
  target_rms: float = 0.2,
  eps: float = 1e-8,
  *,
  weight_dimension_numbers: DimensionNumbersSpec = None,
) -> optax.GradientTransformation:
  r"""Rescales each matrix of the updates to the RMS ``target_rms``.

  Per matrix ``U`` (``fan_in x fan_out``; each slice of a stacked leaf and each
  block of a split leaf on its own):
  ``U <- target_rms * sqrt(fan_in * fan_out) / (||U||_F + eps) * U``, computed
  in the wider of float32 and the leaf's dtype and returned in the leaf's
  dtype. A zero matrix stays zero.

  Args:
    target_rms: the RMS ``r`` of the result (positive).
    eps: non-negative term added to ``||U||_F``.
    weight_dimension_numbers: a dimension-numbers spec (``None``: the default
      routing).

  Returns:
    A stateless ``optax.GradientTransformation``.

  References:
    Si, Zhang and Shen, `AdaMuon: Adaptive Muon Optimizer
    <https://arxiv.org/abs/2507.11005>`_, 2025 (RMS-aligned rescaling; the
    released ``Chongjie-Si/AdaMuon`` code's ``sqrt(min(m, n)) / ||U||`` times
    ``0.2 sqrt(max(m, n))`` is the same factor).
  """
  validation.check_hyperparameters({"target_rms": target_rms, "eps": eps})
  where = "scale_to_rms"

  def one(lay, x):
    m = lay.to_matrices(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    norm = jnp.linalg.norm(m, axis=(-2, -1), keepdims=True)
    m = m * (target_rms * (lay.fan_in * lay.fan_out) ** 0.5 / (norm + eps))
    return lay.from_matrices(m).astype(x.dtype)

  def update_fn(updates, state, params=None):
    del params
    return transforms.map_matrices(weight_dimension_numbers, where, one, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
