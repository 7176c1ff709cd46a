"""Trajectories of an optax transformation and of a NumPy rule, side by side.

Shared by the tests that compare an optimizer with a NumPy statement of its
rule over many steps.
"""

import jax
import numpy as np
import optax


def run_optax(tx, params, grads, jit=True):
  """The parameters after each step of ``tx`` on ``grads``, as NumPy trees."""
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  trajectory = []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(jax.tree.map(np.asarray, params))
  return trajectory


def run_reference(make_rule, params, grads):
  """Runs one NumPy rule per matrix (per batch element for stacked leaves),
  in float64; ``params`` and each of ``grads`` are dicts of leaves."""
  params = {n: np.asarray(p, np.float64) for n, p in params.items()}
  rules = {
    n: [make_rule() for _ in range(p.shape[0])] if p.ndim == 3 else make_rule()
    for n, p in params.items()
  }
  trajectory = []
  for g in grads:
    new = {}
    for n, p in params.items():
      gn = np.asarray(g[n], np.float64)
      if p.ndim == 3:
        new[n] = np.stack([rules[n][b].step(p[b], gn[b]) for b in range(p.shape[0])])
      else:
        new[n] = rules[n].step(p, gn)
    params = new
    trajectory.append(params)
  return trajectory
