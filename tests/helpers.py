"""What the tests share: the optimizer registry, tolerances, trajectories.

* ``OPTIMIZERS`` is read from the package's own list of aliases
  (``optax_orth._src.aliases.ALIASES``): a new alias gets every shared input
  and reliability test without editing a test file.
* ``run_optax`` / ``run_reference`` give the parameters after each step of an
  optax transformation and of a NumPy rule (``tests/reference_numpy.py``),
  ``assert_trajectories_close`` compares them at ``RTOL`` / ``ATOL``.
* ``SHAPES`` / ``DIMS``: wide, tall and stacked leaves, with their dimension
  numbers, and the gradients and parameters the trajectory tests use.
"""

from __future__ import annotations

import inspect
import types

import jax
import numpy as np
import optax

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from optax_orth._src.aliases import ALIASES
from optax_orth._src.sharding import plain_values

# ---------------------------------------------------------------------------
# The registry.

OPTIMIZERS = dict(ALIASES)
NAMES = sorted(OPTIMIZERS)
#: The learning rate an alias is built with when it has no default.
DEFAULT_LEARNING_RATE = 0.02


def make(name: str, *args, **kwargs) -> optax.GradientTransformation:
  """``OPTIMIZERS[name](...)``, at ``DEFAULT_LEARNING_RATE`` if it needs one."""
  fn = OPTIMIZERS[name]
  lr = inspect.signature(fn).parameters["learning_rate"]
  if not args and "learning_rate" not in kwargs and lr.default is lr.empty:
    kwargs["learning_rate"] = DEFAULT_LEARNING_RATE
  return fn(*args, **kwargs)


def public_objects() -> dict:
  """Every public name: ``__all__``, each namespace (a module) replaced by its
  own names as ``namespace.name``."""
  public = {}
  for name in optax_orth.__all__:
    obj = getattr(optax_orth, name)
    if isinstance(obj, types.ModuleType):
      public |= {f"{name}.{n}": v for n, v in vars(obj).items() if n[0] != "_"}
    else:
      public[name] = obj
  return public


# ---------------------------------------------------------------------------
# Tolerances: float32 updates against float64 NumPy rules over 20-30 steps.

RTOL = 2e-4
ATOL = 2e-5

# ---------------------------------------------------------------------------
# Leaves and gradients.

SHAPES = {"wide": (32, 48), "tall": (48, 32), "stacked": (4, 24, 40)}
DIMS = {"wide": DN(), "tall": DN(), "stacked": DN(1, 2)}
#: The peers' tests (tests/test_peers.py, benchmarks/peer_gaps.py) add a
#: square leaf.
PEER_SHAPES = {
  "wide": (24, 40),
  "tall": (40, 24),
  "square": (32, 32),
  "stacked": (3, 16, 28),
}
PEER_DIMS = {"wide": DN(), "tall": DN(), "square": DN(), "stacked": DN(1, 2)}
PEER_STEPS = 20


def scaled_gradients(steps, seed=0, shapes=SHAPES, spread=2.0):
  """Gradients with a fixed, leaf-specific scale per row and per column, each
  ``exp(uniform(-spread, spread))``."""
  rng = np.random.default_rng(seed)
  scales = {
    name: (
      np.exp(rng.uniform(-spread, spread, (*shape[:-1], 1))),
      np.exp(rng.uniform(-spread, spread, (1,) * (len(shape) - 1) + shape[-1:])),
    )
    for name, shape in shapes.items()
  }
  return [
    {
      name: (rs * rng.standard_normal(shapes[name]) * cs).astype(np.float32)
      for name, (rs, cs) in scales.items()
    }
    for _ in range(steps)
  ]


def initial_params(seed=1, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  return {
    n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()
  }


# ---------------------------------------------------------------------------
# Trajectories.


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


def assert_trajectories_close(ours, theirs, rtol=RTOL, atol=ATOL):
  assert len(ours) == len(theirs)
  for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
    for name in a:
      np.testing.assert_allclose(
        a[name], b[name], rtol=rtol, atol=atol, err_msg=f"step {step}, leaf {name}"
      )


# ---------------------------------------------------------------------------
# Trees.


#: ``tree`` with Flax ``Variable`` nodes replaced by their values (as
#: ``nnx.as_pure`` of flax >= 0.12.7 does), on every supported flax.
pure = plain_values


# ---------------------------------------------------------------------------
# Recipes built from the public blocks, shared by tests and benchmarks.


def modded_normuon(lr, wd, dims, order="modded"):
  """modded-nanogpt's NorMuon (``train_gpt.py`` at ``f411b3d``) from the blocks;
  ``order="former"``: the decay after the shape factor, at the rate ``wd``."""
  blocks = [
    optax_orth.orthogonalize_momentum(
      0.95, ns_coeffs="polar_express", eps=1e-6, weight_dimension_numbers=dims
    ),
    optax_orth.scale_by_neuron_rms(0.9, axis="larger", weight_dimension_numbers=dims),
    optax_orth.add_cautious_weight_decay(lambda t: wd * lr(t)),
    optax_orth.scale_by_shape(dims),
    optax.scale_by_learning_rate(lr),
  ]
  if order != "modded":
    blocks[2:4] = [blocks[3], optax_orth.add_cautious_weight_decay(wd)]
  return optax.chain(*blocks)
