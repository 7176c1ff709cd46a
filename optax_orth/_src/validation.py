"""Argument and tree validation shared by every module of the package.

Each check raises a ``ValueError`` that names the offending argument or leaf.
Hyperparameters that are traced (under ``optax.inject_hyperparams``) cannot be
inspected at construction and are left to the user's schedule.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_orth._src.routing import path_str


def _concrete(value) -> float | None:
  """``value`` as a Python float, or ``None`` when it is traced or not a number."""
  if callable(value):
    return None
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def at_step(value, count):
  """A constant-or-schedule argument's value at the step ``count``.

  Schedules (callables) are evaluated at ``count``; constants are returned as
  they are. The one place that tells the two apart at update time, as
  :func:`check_learning_rate` does at construction.
  """
  return value(count) if callable(value) else value


def check_unit_interval(name: str, value, closed_right: bool = False) -> None:
  """``value`` in ``[0, 1)`` (or ``[0, 1]`` with ``closed_right``)."""
  v = _concrete(value)
  if v is None:
    return
  ok = 0 <= v <= 1 if closed_right else 0 <= v < 1
  if not ok:
    interval = "[0, 1]" if closed_right else "[0, 1)"
    raise ValueError(f"{name} must be in {interval}; got {name}={value}.")


def check_non_negative(name: str, value) -> None:
  """``value >= 0`` and not NaN."""
  v = _concrete(value)
  if v is not None and not v >= 0:
    raise ValueError(f"{name} must be non-negative; got {name}={value}.")


def check_positive(name: str, value) -> None:
  """``value > 0`` and finite."""
  v = _concrete(value)
  if v is not None and not (v > 0 and math.isfinite(v)):
    raise ValueError(f"{name} must be positive and finite; got {name}={value}.")


def check_learning_rate(learning_rate, name: str = "learning_rate") -> None:
  """A constant learning rate must be finite and non-negative.

  A negative constant would make every step point uphill, so it is refused;
  schedules (callables) and traced values are not inspected.
  """
  v = _concrete(learning_rate)
  if v is not None and not (math.isfinite(v) and v >= 0):
    raise ValueError(
      f"{name} must be a finite, non-negative number or a schedule; got "
      f"{name}={learning_rate}."
    )


def static_or_traced_int(name: str, value):
  """``(static, traced)``: ``value`` as a Python int (a concrete integer array
  is read), or, for a traced integer scalar, ``(None, value)``.

  ``optax.inject_hyperparams`` turns every numeric argument into an array and
  passes it traced under ``jit``; a step count that arrives so is run as a
  loop of traced length by the blocks that accept one.
  """
  if isinstance(value, jax.Array | np.ndarray):
    if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f"{name} must be a positive int; got an array {value!r}.")
    if isinstance(value, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
      return None, value
    value = int(value)
  return value, None


def check_positive_int(name: str, value, optional: bool = False) -> None:
  """``value`` is a positive ``int`` (or ``None`` when ``optional``); an integer
  array is checked by value, a traced one (``optax.inject_hyperparams``) is
  accepted (its concrete value was checked when ``init`` ran)."""
  if value is None and optional:
    return
  value, traced = static_or_traced_int(name, value)
  if traced is not None:
    return
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{name} must be a positive int; got {name}={value!r}.")


def check_float_dtype(name: str, dtype) -> None:
  """``dtype`` is ``None`` or a floating-point (or complex) dtype."""
  if dtype is None:
    return
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"{name} must be a dtype; got {name}={dtype!r}.") from None
  if not jnp.issubdtype(dt, jnp.inexact):
    raise ValueError(
      f"{name} must be a floating-point dtype; got {name}={dt.name}, which "
      "would truncate the values it holds."
    )


_UNIT = ("beta", "b1", "b2", "adam_b1", "adam_b2")
_NON_NEGATIVE = (
  "eps",
  "ns_eps",
  "adam_eps",
  "adam_eps_root",
  "eps_root",
  "weight_decay",
  "adam_weight_decay",
  "scale_coeff",
  "clamp",
)
_POSITIVE = ("consistent_rms", "target_rms")
_LEARNING_RATES = ("learning_rate", "adam_learning_rate")
_DTYPES = ("mu_dtype", "ns_dtype")


def check_hyperparameters(arguments: dict[str, Any]) -> None:
  """Checks every hyperparameter in ``arguments`` (an alias's ``locals()``).

  One rule per name: decays in ``[0, 1)``; epsilons, weight decays, the
  clamp and ``scale_coeff`` non-negative; ``consistent_rms`` and
  ``target_rms`` positive; constant learning rates finite and non-negative;
  ``ns_steps`` a positive int; dtypes floating. ``None`` (an unset option)
  and names without a rule are skipped.
  """
  for name, value in arguments.items():
    if value is None:
      continue
    if name in _UNIT:
      check_unit_interval(name, value)
    elif name in _NON_NEGATIVE:
      check_non_negative(name, value)
    elif name in _POSITIVE:
      check_positive(name, value)
    elif name in _LEARNING_RATES:
      check_learning_rate(value, name)
    elif name in _DTYPES:
      check_float_dtype(name, value)
    elif name == "ns_steps":
      check_positive_int(name, value)


def check_choice(name: str, value, choices: tuple) -> None:
  """``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}; got {name}={value!r}.")


def is_masked(x) -> bool:
  """Whether ``x`` is an ``optax.MaskedNode`` (the other branch of a partition)."""
  return isinstance(x, optax.MaskedNode)


def check_matches_state(updates: Any, reference: Any, where: str) -> None:
  """Raises a ValueError naming the leaf where updates and state disagree.

  ``reference`` is a tree shaped like the parameters that the state was
  initialized with; the tree structures and every leaf's shape must match.
  ``optax.MaskedNode`` leaves (the other branch of a partition) are compared
  by position only. Runs at trace time; costs nothing under ``jax.jit``.
  """
  ref, ref_def = jax.tree_util.tree_flatten_with_path(reference, is_leaf=is_masked)
  upd, upd_def = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_masked)
  if upd_def != ref_def:
    ref_paths = {path_str(p) for p, _ in ref}
    upd_paths = {path_str(p) for p, _ in upd}
    missing, extra = sorted(ref_paths - upd_paths), sorted(upd_paths - ref_paths)
    parts = [f"missing from the updates: {missing}"] if missing else []
    parts += [f"unexpected in the updates: {extra}"] if extra else []
    detail = "; ".join(parts) or f"containers differ: {upd_def} vs {ref_def}"
    raise ValueError(
      f"{where}: the updates do not have the tree structure of the parameters "
      f"the optimizer state was initialized with ({detail})."
    )
  for (path, u), (_, r) in zip(upd, ref, strict=True):
    if is_masked(u) or is_masked(r) or jnp.shape(u) == jnp.shape(r):
      continue
    raise ValueError(
      f"{where}: leaf {path_str(path)!r} has shape {tuple(jnp.shape(u))}, but "
      f"the optimizer state was initialized for shape {tuple(jnp.shape(r))}; "
      "call init again after changing a parameter's shape."
    )
