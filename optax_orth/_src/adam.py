r"""The AdamW fallback for the leaves that are not matrices, overflow-safe.

``optax.adamw`` keeps the second moment ``nu = EMA(g^2)``. For ``|g|`` above
about ``1.8e19`` the square overflows float32 to ``inf``; the update is then
``m / inf = 0`` and, because ``b2 * inf = inf``, that leaf never trains again,
silently. :func:`scale_by_adam` keeps the square root of the second moment
instead, ``r = sqrt(nu)``, updated without ever forming ``g^2``:

.. math::
  r_t = M \sqrt{b_2 (r_{t-1} / M)^2 + (1 - b_2) (|g_t| / M)^2},
  \qquad M = \max(r_{t-1}, |g_t|),

which is finite for every finite gradient. In the normal range it equals
``sqrt(nu)`` to float32 rounding, so the updates equal ``optax.adamw``'s.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_orth._src import validation


class ScaleByAdamState(NamedTuple):
  """State of :func:`scale_by_adam`.

  Attributes:
    count: int32, number of updates so far.
    mu: the first moment, like the parameters.
    rms: ``sqrt(nu)``, the square root of Adam's second moment (real, like
      the parameters). ``optax.adamw``'s ``nu`` is ``rms ** 2``.
  """

  count: jax.typing.ArrayLike
  mu: optax.Updates
  rms: optax.Updates


def _rms_update(r: jax.Array, g: jax.Array, b2) -> jax.Array:
  a = jnp.abs(g).astype(r.dtype)
  m = jnp.maximum(r, a)
  safe = jnp.where(m > 0, m, 1)
  return m * jnp.sqrt(b2 * jnp.square(r / safe) + (1 - b2) * jnp.square(a / safe))


def scale_by_adam(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: jax.typing.DTypeLike | None = None,
  *,
  nesterov: bool = False,
) -> optax.GradientTransformation:
  r"""Adam's scaling, as ``optax.scale_by_adam``, without float32 overflow.

  .. math::
    m_t = b_1 m_{t-1} + (1 - b_1) g_t, \qquad r_t = \sqrt{b_2 r_{t-1}^2
    + (1 - b_2) |g_t|^2}, \qquad u_t = \frac{\hat m_t}{\sqrt{r_t^2 / (1 -
    b_2^t) + \epsilon_{root}} + \epsilon},

  with ``\hat m_t = m_t / (1 - b_1^t)`` (or optax's Nesterov form), ``r_t``
  computed as in the module docstring and the square root by ``hypot``, so
  nothing overflows for finite gradients.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: non-negative term added to the denominator.
    eps_root: non-negative term added inside the square root.
    mu_dtype: dtype of the first moment (``None``: the parameters').
    nesterov: Nesterov momentum, as ``optax.scale_by_adam(nesterov=True)``.

  Returns:
    An ``optax.GradientTransformation`` with :class:`ScaleByAdamState`.

  References:
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014.
  """
  validation.check_hyperparameters(locals())

  def init_fn(params):
    return ScaleByAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      rms=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.real(p).dtype), params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    rms = jax.tree.map(lambda r, g: _rms_update(r, g, b2), state.rms, updates)
    count_inc = optax.safe_increment(state.count)
    if nesterov:
      mu_hat = jax.tree.map(
        lambda m, g: b1 * m + (1 - b1) * g,
        optax.tree.bias_correction(mu, b1, optax.safe_increment(count_inc)),
        optax.tree.bias_correction(updates, b1, count_inc),
      )
    else:
      mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    root = jnp.sqrt(1 - b2 ** jnp.asarray(count_inc, jnp.float32))

    def scale(m, r):
      denom = r / root.astype(r.dtype)
      if not (isinstance(eps_root, int | float) and eps_root == 0):
        denom = jnp.hypot(denom, jnp.sqrt(jnp.asarray(eps_root, r.dtype)))
      return m / (denom + eps)

    out = jax.tree.map(scale, mu_hat, rms)
    return out, ScaleByAdamState(count_inc, optax.tree.cast(mu, mu_dtype), rms)

  return optax.GradientTransformation(init_fn, update_fn)


def adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: jax.typing.DTypeLike | None = None,
  weight_decay: float = 1e-4,
  mask: Any = None,
  *,
  nesterov: bool = False,
) -> optax.GradientTransformation:
  """``optax.adamw`` with :func:`scale_by_adam`: the optimizers' fallback.

  ``chain(scale_by_adam(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``, the composition of
  ``optax.adamw``, with the same arguments and, in the normal range, the same
  updates to float32 precision.

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator.
    eps_root: added inside the square root.
    mu_dtype: dtype of the first moment.
    weight_decay: decoupled weight decay (times the learning rate).
    mask: mask (or callable) for the weight decay, as in optax.
    nesterov: Nesterov momentum.

  Returns:
    An ``optax.GradientTransformation``.
  """
  return optax.chain(
    scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )
