"""QK-clip against Kimi K2's rule (tests/reference_recipes.py), alone and after
an optimizer over many steps, with fused, per-head and grouped-query kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from optax_orth._src.qk_clip import QKClipSlice, QKClipState, qk_clip
from tests import reference_numpy as ref
from tests import reference_recipes as rr

D, HEADS = 16, 4
TAU = 1.0


def _fused_targets(d=D, heads=HEADS, layer="attn"):
  return {
    f"{layer}/qkv/kernel": (
      QKClipSlice(layer, heads, axis=1, start=0, stop=d),
      QKClipSlice(layer, heads, axis=1, start=d, stop=2 * d),
    )
  }


def _params(seed=0, scale=0.6):
  rng = np.random.default_rng(seed)
  return {
    "attn": {"qkv": {"kernel": scale * rng.standard_normal((D, 3 * D))}},
    "mlp": {"kernel": 0.1 * rng.standard_normal((D, 2 * D))},
  }


def _as_jax(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _logits(params, x):
  w = np.asarray(params["attn"]["qkv"]["kernel"], np.float64)
  return rr.max_logits(x, w[:, :D], w[:, D : 2 * D], HEADS)


def test_clip_matches_numpy_and_leaves_the_rest_alone():
  params = _as_jax(_params())
  rng = np.random.default_rng(1)
  updates = jax.tree.map(
    lambda p: 0.01 * jnp.asarray(rng.standard_normal(p.shape)), params
  )
  updates = _as_jax(updates)
  s_max = np.asarray([0.5, 3.0, 1.0, 10.0])  # heads 1 and 3 above TAU
  tx = qk_clip(_fused_targets(), TAU)
  out, state = jax.jit(tx.update)(
    updates, tx.init(params), params, max_logits={"attn": jnp.asarray(s_max)}
  )
  new = np.asarray(params["attn"]["qkv"]["kernel"] + out["attn"]["qkv"]["kernel"])
  moved = np.asarray(params["attn"]["qkv"]["kernel"] + updates["attn"]["qkv"]["kernel"])
  wq, wk = rr.qk_clip(moved[:, :D], moved[:, D : 2 * D], s_max, TAU, HEADS)
  np.testing.assert_allclose(new[:, :D], wq, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new[:, D : 2 * D], wk, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
    out["attn"]["qkv"]["kernel"][:, 2 * D :],
    updates["attn"]["qkv"]["kernel"][:, 2 * D :],
  )
  np.testing.assert_array_equal(out["mlp"]["kernel"], updates["mlp"]["kernel"])
  assert isinstance(state, QKClipState)
  np.testing.assert_allclose(state.scale["attn"], np.minimum(1, TAU / s_max), rtol=1e-6)


def test_clipped_heads_land_on_the_threshold():
  """With no optimizer step, the clipped weights' largest logit is exactly tau."""
  params = _as_jax(_params(scale=1.0))
  x = np.random.default_rng(2).standard_normal((2, 8, D))
  before = _logits(params, x)
  tau = float(np.median(before))
  tx = qk_clip(_fused_targets(), tau)
  zeros = jax.tree.map(jnp.zeros_like, params)
  out, _ = tx.update(zeros, tx.init(params), params, max_logits={"attn": before})
  after = _logits(optax.apply_updates(params, out), x)
  want = np.where(before > tau, tau, before)
  np.testing.assert_allclose(after, want, rtol=1e-5)


def test_muon_then_clip_matches_numpy_over_many_steps():
  """MuonClip: Muon's step, then the clip from this step's forward pass."""
  spec = {"attn": {"qkv": {"kernel": DN()}}, "mlp": {"kernel": DN()}}
  tx = optax.chain(
    optax_orth.muon(0.05, muon_weight_dimension_numbers=spec),
    qk_clip(_fused_targets(), 2.0),
  )
  params = _as_jax(_params(scale=1.0))
  theirs = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  rules = {n: ref.Muon(0.05) for n in ("attn", "mlp")}
  rng = np.random.default_rng(3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  clipped = 0
  for _ in range(15):
    x = rng.standard_normal((2, 8, D))
    g = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    s_ours, s_theirs = _logits(params, x), _logits(theirs, x)
    clipped += int(np.sum(s_theirs > 2.0))
    u, state = update(g, state, params, max_logits={"attn": s_ours})
    params = optax.apply_updates(params, u)
    w = rules["attn"].step(theirs["attn"]["qkv"]["kernel"], g["attn"]["qkv"]["kernel"])
    w[:, :D], w[:, D : 2 * D] = rr.qk_clip(
      w[:, :D], w[:, D : 2 * D], s_theirs, 2.0, HEADS
    )
    theirs = {
      "attn": {"qkv": {"kernel": w}},
      "mlp": {"kernel": rules["mlp"].step(theirs["mlp"]["kernel"], g["mlp"]["kernel"])},
    }
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(theirs), strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  assert clipped > 0


def test_per_head_kernel_and_grouped_query_keys():
  """``(d, heads, head_dim)`` kernels (axis=1) and GQA keys shared by 2 heads."""
  rng = np.random.default_rng(4)
  params = _as_jax(
    {"q": rng.standard_normal((D, 4, 3)), "k": rng.standard_normal((D, 2, 3))}
  )
  targets = {"q": QKClipSlice("l", 4, axis=1), "k": QKClipSlice("l", 2, axis=1)}
  s_max = jnp.asarray([[4.0, 1.0, 0.5, 0.5], [1.0, 0.5, 0.5, 16.0]])  # (batch, heads)
  tx = qk_clip(targets, TAU)
  zeros = jax.tree.map(jnp.zeros_like, params)
  out, _ = tx.update(zeros, tx.init(params), params, max_logits={"l": s_max})
  new = optax.apply_updates(params, out)
  gamma = np.asarray([0.25, 1.0, 1.0, 1 / 16])
  np.testing.assert_allclose(
    new["q"], params["q"] * np.sqrt(gamma)[None, :, None], rtol=1e-6
  )
  kv_gamma = np.asarray([0.25, 1 / 16])  # the smaller gamma of each query pair
  np.testing.assert_allclose(
    new["k"], params["k"] * np.sqrt(kv_gamma)[None, :, None], rtol=1e-6
  )


def test_scan_stacked_kernel_with_a_callable_target():
  """Targets may be a callable of the parameters; stacked layers take one
  ``(layers, heads)`` logit array each and per-layer slices."""
  rng = np.random.default_rng(5)
  params = _as_jax({"layer0": {"qkv": rng.standard_normal((D, 3 * D))}})
  targets = lambda p: {
    "layer0/qkv": (
      QKClipSlice("layer0", HEADS, axis=1, stop=D),
      QKClipSlice("layer0", HEADS, axis=1, start=D, stop=2 * D),
    )
  }
  tx = qk_clip(targets, TAU)
  zeros = jax.tree.map(jnp.zeros_like, params)
  s_max = jnp.asarray([2.0, 0.5, 0.5, 0.5])
  out, _ = tx.update(zeros, tx.init(params), params, max_logits={"layer0": s_max})
  new = np.asarray(params["layer0"]["qkv"] + out["layer0"]["qkv"])
  hd = D // HEADS
  np.testing.assert_allclose(
    new[:, :hd], np.asarray(params["layer0"]["qkv"])[:, :hd] * np.sqrt(0.5), rtol=1e-6
  )


def test_errors_name_the_problem():
  params = _as_jax(_params())
  tx = qk_clip(_fused_targets(), TAU)
  state = tx.init(params)
  with pytest.raises(ValueError, match="max_logits"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="no entry for layer 'attn'"):
    tx.update(params, state, params, max_logits={"other": jnp.ones(HEADS)})
  with pytest.raises(ValueError, match="heads"):
    tx.update(params, state, params, max_logits={"attn": jnp.ones(3)})
  with pytest.raises(ValueError, match="not a leaf"):
    qk_clip({"attn/qkv": QKClipSlice("attn", HEADS)}).init(params)
  with pytest.raises(ValueError, match="equal heads"):
    qk_clip({"attn/qkv/kernel": QKClipSlice("attn", 5, axis=1)}).init(params)
  with pytest.raises(ValueError, match="threshold"):
    qk_clip(_fused_targets(), 0.0)


def test_chain_passes_max_logits_through_other_blocks():
  """optax.chain hands the extra argument to qk_clip and not to the others."""
  params = _as_jax(_params())
  tx = optax.chain(optax.sgd(0.1), qk_clip(_fused_targets(), TAU))
  out, _ = tx.update(
    params, tx.init(params), params, max_logits={"attn": jnp.ones(HEADS)}
  )
  np.testing.assert_allclose(
    out["mlp"]["kernel"], -0.1 * params["mlp"]["kernel"], rtol=1e-6
  )
