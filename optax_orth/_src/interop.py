"""Implementation of :mod:`optax_orth.interop`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonState

from optax_orth._src import adam, transforms


def _convert(state: Any, types: tuple, fn) -> Any:
  found = transforms.find_states(state, types)
  if not found:
    names = " or ".join(t.__name__ for t in types)
    raise ValueError(f"the state holds no {names}; is it a muon state?")
  return jax.tree.map(
    lambda x: fn(x) if isinstance(x, types) else x,
    state,
    is_leaf=lambda x: isinstance(x, types),
  )


def muon_state_from_optax(state: optax.OptState) -> optax.OptState:
  """An ``optax.contrib.muon`` state as the state of :func:`optax_orth.muon`.

  Args:
    state: a state of ``optax.contrib.muon`` (arrays, or restored from a
      checkpoint), for the same parameters.

  Returns:
    The state that ``optax_orth.muon`` with the same arguments continues
    from: the next update equals optax's to float32 precision.
  """

  def one(x):
    if isinstance(x, MuonState):
      return transforms.OrthogonalizeMomentumState(count=x.count, mu=x.mu)
    return adam.ScaleByAdamState(x.count, x.mu, jax.tree.map(jnp.sqrt, x.nu))

  return _convert(state, (MuonState, optax.ScaleByAdamState), one)


def muon_state_to_optax(
  state: optax.OptState,
  ns_coeffs: Sequence[float] | Sequence[Sequence[float]] = (3.4445, -4.7750, 2.0315),
) -> optax.OptState:
  """A state of :func:`optax_orth.muon` as the state of ``optax.contrib.muon``.

  Args:
    state: a state of ``optax_orth.muon``.
    ns_coeffs: the Newton–Schulz coefficients that optax keeps in its state
      (the rows its ``init`` would store for the optimizer's arguments).

  Returns:
    The state that ``optax.contrib.muon`` with the same arguments continues
    from.
  """

  def one(x):
    if isinstance(x, transforms.OrthogonalizeMomentumState):
      return MuonState(count=x.count, mu=x.mu, ns_coeffs=jnp.asarray(ns_coeffs))
    return optax.ScaleByAdamState(x.count, x.mu, jax.tree.map(jnp.square, x.rms))

  return _convert(
    state, (transforms.OrthogonalizeMomentumState, adam.ScaleByAdamState), one
  )
