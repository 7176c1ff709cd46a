"""Checks shared by the route_by_model tests: the routing table as a dict,
and each leaf's Muon update against our NumPy Muon on hand-reshaped matrices
(every other leaf against optax.adamw)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_orth
from optax_orth._src import routing as routing_lib
from tests import reference_numpy as ref
from tests.helpers import pure

LR = 0.05


# Helpers ----------------------------------------------------------------------


def rows(params, spec):
  """The routing table as ``{path: (shape, branch, matrices, why)}``."""
  lines = optax_orth.routing_table(params, spec).splitlines()
  assert lines[0] == (
    "| path | shape | branch | matrices (batch x fan_in x fan_out) | why |"
  )
  cells = lambda line: re.split(r"(?<!\\)\|", line.strip("|"))
  rows = [[c.strip().replace("\\|", "|") for c in cells(line)] for line in lines[2:]]
  return {r[0]: tuple(r[1:]) for r in rows}


def random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x)), jnp.float32), tree
  )


def flat(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {routing_lib.leaf_name(p): np.asarray(x) for p, x in flat}


def muon_updates(params, spec, steps=2):
  """Muon's updates (and the gradients) for ``steps`` random gradients."""
  tx = optax_orth.muon(LR, muon_weight_dimension_numbers=spec)
  state, out = tx.init(params), []
  for t in range(steps):
    grads = random_like(params, seed=t)
    updates, state = jax.jit(tx.update)(grads, state, params)
    out.append((flat(grads), flat(updates)))
  return out


def adamw_updates(params, steps=2):
  """optax.adamw with muon's Adam fallback settings, on every leaf."""
  tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, nesterov=True)
  state, out = tx.init(params), []
  for t in range(steps):
    updates, state = jax.jit(tx.update)(random_like(params, seed=t), state, params)
    out.append(flat(updates))
  return out


def check_updates(params, spec, matrices):
  """``matrices[name]``: NumPy ``leaf -> list of matrices`` and its inverse,
  written by hand for each orthogonalized leaf; every other leaf is Adam's."""
  ours, adam = muon_updates(params, spec), adamw_updates(params)
  refs = {}
  for t, (grads, updates) in enumerate(ours):
    for name, u in updates.items():
      if name not in matrices:
        np.testing.assert_allclose(u, adam[t][name], rtol=1e-5, atol=1e-7)
        continue
      to_mats, from_mats = matrices[name]
      gs = to_mats(grads[name].astype(np.float64))
      rules = refs.setdefault(name, [ref.Muon(LR) for _ in gs])
      steps = [r.step(np.zeros_like(g), g) for r, g in zip(rules, gs, strict=True)]
      expected = from_mats(np.stack(steps))
      scale = np.max(np.abs(expected))
      assert np.max(np.abs(u - expected)) <= 2e-3 * scale, (name, t)
  assert set(matrices) <= set(ours[0][1])


def reshaped(*mat_shape):
  """A leaf as a stack of matrices of ``mat_shape`` by a plain reshape (the
  leading axes the batch), and back."""
  holder = {}

  def to(x):
    holder["shape"] = x.shape
    return x.reshape(-1, *mat_shape)

  return to, lambda m: m.reshape(holder["shape"])


def viewed(view, perm, mat_shape):
  """A leaf as matrices of ``mat_shape``: reshaped to ``view``, its axes
  permuted by ``perm`` (the batch axes first), and back."""
  holder = {}
  inverse = np.argsort(perm)

  def to(x):
    holder["shape"] = x.shape
    return x.reshape(view).transpose(perm).reshape(-1, *mat_shape)

  def back(m):
    permuted = tuple(view[p] for p in perm)
    return m.reshape(permuted).transpose(inverse).reshape(holder["shape"])

  return to, back


def matrices_column(params, spec):
  """``{path: (branch, matrices)}``: the table without its why column."""
  return {k: v[1:3] for k, v in rows(params, spec).items()}


def abstract_nnx(make):
  """An NNX model built abstractly (``nnx.eval_shape``: no initializer runs
  or compiles), its ``nnx.Param`` state, and random parameters of its shapes
  (routing and the update checks need only the shapes)."""
  from flax import nnx

  model = nnx.eval_shape(make)
  state = nnx.state(model, nnx.Param)
  return model, state, random_like(pure(state), seed=9)
