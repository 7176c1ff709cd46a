"""Each recipe against its peer's own rule, 20 steps on every kind of leaf.

The NumPy statements (``tests/reference_recipes.py``) are written from each
peer's released file, named there with the commit it was read at: AdaMuon's
current release and its first upload, Levanter's MuonH, modded-nanogpt's
NorMuon under a learning-rate schedule, Dion's Muon with cautious weight decay,
and Kimi K2's QK-clip after Muon. Leaves are wide, tall, square and stacked
(scan-style ``(layers, fan_in, fan_out)``), in float32 against float64.
"""

import jax
import numpy as np
import optax
import pytest

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from tests import helpers as h
from tests import reference_numpy as ref
from tests import reference_recipes as rr

STEPS, SHAPES, DIMS = h.PEER_STEPS, h.PEER_SHAPES, h.PEER_DIMS


def _params():
  return h.initial_params(1, SHAPES)


def _grads():
  return h.scaled_gradients(STEPS, 0, SHAPES, spread=1.0)


def _assert_close(ours, theirs, rtol=2e-4, atol=2e-5):
  for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
    for n in SHAPES:
      np.testing.assert_allclose(
        a[n], b[n], rtol=rtol, atol=atol, err_msg=f"step {step}, leaf {n}"
      )


def _compare(tx, make_rule, cautious=False):
  params, grads = _params(), _grads()
  ours, theirs = (
    h.run_optax(tx, params, grads),
    h.run_reference(make_rule, params, grads),
  )
  if cautious:  # the mask 1[u K >= 0] may flip where u rounds to zero
    rr.assert_close_up_to_mask_flips(ours, theirs)
  else:
    _assert_close(ours, theirs)
  moved = max(np.max(np.abs(ours[-1][n] - params[n])) for n in SHAPES)
  assert moved > 1e-3  # the trajectories went somewhere


def test_adamuon_default_is_the_current_release():
  tx = optax_orth.adamuon(3e-3, weight_dimension_numbers=DIMS)
  _compare(tx, lambda: rr.AdaMuon(3e-3, wd=0.01))


def test_adamuon_options_give_the_first_upload():
  tx = optax_orth.adamuon(
    3e-3,
    sign_momentum=False,
    b2=0.999,
    second_moment_bias_correction=True,
    weight_dimension_numbers=DIMS,
  )
  _compare(tx, lambda: rr.AdaMuon(3e-3, b2=0.999, sign=False, bias2=True, wd=0.01))


def test_adamuon_releases_differ():
  """The two releases are different rules: the test above could fail."""
  params, grads = _params(), _grads()
  a = h.run_optax(
    optax_orth.adamuon(3e-3, weight_dimension_numbers=DIMS), params, grads
  )
  b = h.run_reference(
    lambda: rr.AdaMuon(3e-3, b2=0.999, sign=False, bias2=True), params, grads
  )
  assert max(np.max(np.abs(a[-1][n] - b[-1][n])) for n in SHAPES) > 1e-3


def test_muonh_recipe_is_levanters_rule_under_a_schedule():
  lr = optax.linear_schedule(0.05, 0.01, STEPS)
  tx = optax.chain(
    optax_orth.orthogonalize_momentum(
      0.95, ns_coeffs="dion", eps=1e-8, weight_dimension_numbers=DIMS
    ),
    optax_orth.scale_by_hyperball(lr, weight_dimension_numbers=DIMS),
  )
  _compare(tx, lambda: rr.MuonH(lambda t: float(lr(t))))


def test_muonh_with_the_standard_rows_is_not_levanters():
  tx = optax.chain(
    optax_orth.orthogonalize_momentum(0.95, weight_dimension_numbers=DIMS),
    optax_orth.scale_by_hyperball(0.05, weight_dimension_numbers=DIMS),
  )
  with pytest.raises(AssertionError):
    _compare(tx, lambda: rr.MuonH(0.05))


def test_modded_nanogpt_normuon_recipe_under_a_schedule():
  lr = optax.linear_schedule(0.05, 0.005, STEPS)
  rule = lambda: rr.ModdedNorMuon(lambda t: float(lr(t)), wd=1.2)
  _compare(h.modded_normuon(lr, 1.2, DIMS), rule, cautious=True)
  with pytest.raises(AssertionError):  # the former order is another rule
    _compare(h.modded_normuon(lr, 1.2, DIMS, order="former"), rule, cautious=True)


@pytest.mark.parametrize("nesterov", [False, True])
def test_dion_cautious_weight_decay(nesterov):
  ratio = {n: np.sqrt(s[-1] / s[-2]) for n, s in SHAPES.items()}  # Dion's lr adjust
  tx = optax.chain(
    optax_orth.orthogonalize_momentum(
      0.95, nesterov=nesterov, ns_coeffs="dion", eps=1e-8, weight_dimension_numbers=DIMS
    ),
    optax.stateless(lambda u, p: jax.tree.map(lambda r, x: r * x, ratio, u)),
    optax_orth.add_cautious_weight_decay(0.5),
    optax.scale_by_learning_rate(0.02),
  )
  _compare(tx, lambda: rr.DionCautiousMuon(0.02, 0.5, nesterov=nesterov), cautious=True)


QK_D = {"wide": 16, "tall": 48, "square": 32}  # the model width; heads * hd = 32
HEADS, TAU = 4, 1.5


def test_qk_clip_after_muon_is_kimi_k2s_rule():
  """Per layer: Muon's step on the query and key kernels ``(d, 32)``, then
  Kimi K2's clip from this step's logits, on wide, tall and square kernels."""
  rng = np.random.default_rng(4)
  params = {
    n: {r: (0.6 * rng.standard_normal((d, 32))).astype(np.float32) for r in "qk"}
    for n, d in QK_D.items()
  }
  targets = {
    f"{n}/{r}": optax_orth.QKClipSlice(n, HEADS, axis=1) for n in QK_D for r in "qk"
  }
  tx = optax.chain(
    optax_orth.muon(
      0.05, muon_weight_dimension_numbers=jax.tree.map(lambda _: DN(), params)
    ),
    optax_orth.qk_clip(targets, TAU),
  )
  theirs = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  rules = jax.tree.map(lambda _: ref.Muon(0.05), params)
  state, update = tx.init(params), jax.jit(tx.update)
  clipped = dict.fromkeys(QK_D, 0)
  for _ in range(STEPS):
    xs = {n: rng.standard_normal((2, 8, d)) for n, d in QK_D.items()}
    g = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    s_ours = {
      n: rr.max_logits(
        xs[n], np.asarray(params[n]["q"]), np.asarray(params[n]["k"]), HEADS
      )
      for n in QK_D
    }
    s_theirs = {
      n: rr.max_logits(xs[n], theirs[n]["q"], theirs[n]["k"], HEADS) for n in QK_D
    }
    u, state = update(g, state, params, max_logits=s_ours)
    params = optax.apply_updates(params, u)
    for n in QK_D:
      clipped[n] += int(np.sum(s_theirs[n] > TAU))
      q, k = (rules[n][r].step(theirs[n][r], np.float64(g[n][r])) for r in "qk")
      theirs[n]["q"], theirs[n]["k"] = rr.qk_clip(q, k, s_theirs[n], TAU, HEADS)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(theirs), strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  assert all(c > 0 for c in clipped.values()), clipped
