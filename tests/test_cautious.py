"""The aliases' ``cautious_weight_decay=`` option and :func:`optax_orth.adamuon`
against their NumPy statements (tests/reference_recipes.py), over many steps
on wide, tall and stacked leaves, and the cautious AdamW fallback."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_orth
from tests import helpers as h
from tests import reference_recipes as rr
from tests.helpers import DIMS

STEPS = 20

CASES = {
  "muon": (
    lambda: optax_orth.muon(
      0.02, weight_decay=0.5, cautious_weight_decay=True,
      muon_weight_dimension_numbers=DIMS,
    ),
    functools.partial(rr.CautiousMuon, 0.02, wd=0.5),
  ),
  "namo": (
    lambda: optax_orth.namo(
      0.05, weight_decay=0.5, cautious_weight_decay=True,
      weight_dimension_numbers=DIMS,
    ),
    functools.partial(rr.CautiousNamo, 0.05, wd=0.5),
  ),
  "namo_d": (
    lambda: optax_orth.namo_d(
      0.05, weight_decay=0.5, cautious_weight_decay=True,
      weight_dimension_numbers=DIMS,
    ),
    functools.partial(rr.CautiousNamo, 0.05, wd=0.5, diagonal=True),
  ),
  "normuon": (
    lambda: optax_orth.normuon(
      0.02, weight_decay=0.5, cautious_weight_decay=True,
      weight_dimension_numbers=DIMS,
    ),
    None,
  ),
  "adamuon": (
    lambda: optax_orth.adamuon(3e-3, weight_dimension_numbers=DIMS),
    functools.partial(rr.AdaMuon, 3e-3, wd=0.01),
  ),
  "adamuon_no_sign_cwd": (
    lambda: optax_orth.adamuon(
      3e-3, weight_decay=0.5, sign_momentum=False, cautious_weight_decay=True,
      weight_dimension_numbers=DIMS,
    ),
    functools.partial(rr.AdaMuon, 3e-3, wd=0.5, sign=False, cwd=True),
  ),
}  # fmt: skip


class _CautiousNorMuon(rr.NorMuonAxis):
  """NorMuon's released rule with the decay made cautious."""

  def __init__(self):
    super().__init__(0.02, "fan_out", wd=0.5)

  def step(self, k, g):
    b1 = self.b1
    self.m = (1 - b1) * g if self.m is None else b1 * self.m + (1 - b1) * g
    o = self.normalize(rr.ref.ns((1 - b1) * g + b1 * self.m))
    o = o * np.sqrt(max(1, k.shape[1] / k.shape[0]))
    return k - self.lr * (o + self.wd * rr.cautious(o, k) * k)


@pytest.mark.parametrize("name", sorted(CASES))
def test_alias_matches_numpy(name):
  make_tx, make_rule = CASES[name]
  grads = h.scaled_gradients(STEPS, seed=7)
  params = h.initial_params()
  ours = h.run_optax(make_tx(), params, grads)
  theirs = h.run_reference(make_rule or _CautiousNorMuon, params, grads)
  if name == "adamuon":  # no cautious mask: exact to float32
    h.assert_trajectories_close(ours, theirs)
  else:
    rr.assert_close_up_to_mask_flips(ours, theirs)


def test_cautious_decay_differs_from_plain_decay():
  grads = h.scaled_gradients(3, seed=1)
  params = h.initial_params()
  plain = h.run_optax(optax_orth.namo(weight_dimension_numbers=DIMS), params, grads)
  cautious = h.run_optax(
    optax_orth.namo(weight_dimension_numbers=DIMS, cautious_weight_decay=True),
    params,
    grads,
  )
  assert not np.allclose(plain[-1]["wide"], cautious[-1]["wide"])


@pytest.mark.parametrize("factory", ["muon", "namo", "normuon", "adamuon"])
def test_adam_fallback_is_cautious(factory):
  """The fallback's decay: AdamW's ``u + lambda 1[u K >= 0] K``, checked
  against optax's scale_by_adam on the embedding and the bias."""
  rng = np.random.default_rng(0)
  params = {
    "embed": {"embedding": jnp.asarray(rng.standard_normal((20, 8)), jnp.float32)},
    "mlp": {"kernel": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)},
    "bias": jnp.asarray(rng.standard_normal(12), jnp.float32),
  }
  kw = {"adam_learning_rate": 0.01, "adam_weight_decay": 0.5}
  if factory == "muon":
    kw["muon_weight_dimension_numbers"] = optax_orth.route_by_path()
    adam = optax.scale_by_adam(0.9, 0.999, nesterov=True)
  else:
    adam = optax.scale_by_adam(0.9, 0.95)
  tx = getattr(optax_orth, factory)(0.01, cautious_weight_decay=True, **kw)
  state, adam_state = tx.init(params), adam.init(params)
  leaves = lambda t: [t["embed"]["embedding"], t["bias"]]
  for _ in range(4):
    g = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params
    )
    u, state = jax.jit(tx.update)(g, state, params)
    a, adam_state = adam.update(g, adam_state)
    for got, d, k in zip(leaves(u), leaves(a), leaves(params), strict=True):
      d, k = np.asarray(d), np.asarray(k)
      want = -0.01 * (d + 0.5 * rr.cautious(d, k) * k)
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    params = optax.apply_updates(params, u)


def test_adamuon_update_rms_and_validation():
  params = h.initial_params()
  tx = optax_orth.adamuon(1.0, weight_decay=0.0, weight_dimension_numbers=DIMS)
  u, _ = tx.update(h.scaled_gradients(1)[0], tx.init(params), params)
  x = np.asarray(u["stacked"])
  rms = np.sqrt(np.mean(x * x, axis=(1, 2)))
  np.testing.assert_allclose(rms, 0.2, rtol=1e-4)
  for name, value in (("b2", 1.0), ("weight_decay", -1.0), ("target_rms", 0.0)):
    with pytest.raises(ValueError, match=name):
      optax_orth.adamuon(1e-3, **{name: value})
