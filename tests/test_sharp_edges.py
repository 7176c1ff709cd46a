"""Edges found by probing: one test each.

Overflow in the hyperball step, non-finite logits in QK-clip, NumPy integers
in dimension numbers, ``optax.inject_hyperparams`` without ``static_args``,
the momentum's bias correction given once, and AdaMuon's scale-free sign.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from optax_orth import SplitDimensionNumbers as SplitDN
from tests import helpers as h


def _normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("lr", [1e19, 1e30, 3e38])
@pytest.mark.parametrize("weight_scale", [1.0, 1e30])
def test_hyperball_keeps_the_norm_for_any_finite_learning_rate(lr, weight_scale):
  params = {"w": weight_scale * _normal(0, 8, 12), "s": _normal(1, 2, 6, 10)}
  dims = {"w": DN(), "s": DN(1, 2)}
  tx = optax_orth.scale_by_hyperball(lr, weight_dimension_numbers=dims)
  state = tx.init(params)
  for step in range(3):
    grads = {"w": _normal(2 + step, 8, 12), "s": _normal(5 + step, 2, 6, 10)}
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    for name, before in params.items():
      after = new[name]
      assert bool(jnp.isfinite(after).all()), name
      norm = lambda x: np.linalg.norm(
        np.asarray(x, np.float64).reshape(-1, *x.shape[-2:]), axis=(1, 2)
      )
      np.testing.assert_allclose(norm(after), norm(before), rtol=1e-5, err_msg=name)
    params = new


def test_qk_clip_leaves_heads_with_non_finite_logits_and_counts_them():
  d, heads = 8, 4
  params = {"q": _normal(0, d, d), "k": _normal(1, d, d)}
  targets = {n: optax_orth.QKClipSlice("attn", heads, axis=1) for n in ("q", "k")}
  tx = optax_orth.qk_clip(targets, threshold=1.0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  np.testing.assert_array_equal(state.nonfinite_count["attn"], [0, 0, 0, 0])
  logits = jnp.asarray([jnp.inf, jnp.nan, 4.0, -jnp.inf])
  updates, state = jax.jit(tx.update)(zeros, state, params, max_logits={"attn": logits})
  new = optax.apply_updates(params, updates)
  hd = d // heads
  for n in ("q", "k"):
    before, after = np.asarray(params[n]), np.asarray(new[n])
    np.testing.assert_array_equal(after[:, : 2 * hd], before[:, : 2 * hd])  # inf, nan
    np.testing.assert_allclose(
      after[:, 2 * hd : 3 * hd], before[:, 2 * hd : 3 * hd] * 0.5
    )
    np.testing.assert_array_equal(after[:, 3 * hd :], before[:, 3 * hd :])  # -inf
  np.testing.assert_array_equal(state.scale["attn"], [1.0, 1.0, 0.25, 1.0])
  np.testing.assert_array_equal(state.nonfinite_count["attn"], [1, 1, 0, 1])
  # A NaN in one batch row of a (batch, heads) array counts for that head.
  batched = jnp.asarray([[0.5, 0.5, 0.5, 0.5], [jnp.nan, 0.5, 0.5, 0.5]])
  _, state = tx.update(zeros, state, params, max_logits={"attn": batched})
  np.testing.assert_array_equal(state.nonfinite_count["attn"], [2, 1, 0, 1])


@pytest.mark.parametrize(
  "numpy_spec, python_spec",
  [
    (SplitDN(np.int64(0), np.int64(1), heads=np.int64(3)), SplitDN(0, 1, heads=3)),
    (SplitDN(0, 1, split_sizes=np.array([4, 8])), SplitDN(0, 1, split_sizes=(4, 8))),
    (SplitDN(0, 1, split_sizes=(np.int32(4), 8)), SplitDN(0, 1, split_sizes=(4, 8))),
    (
      SplitDN(0, 1, heads=2, split_axis=np.int64(0)),
      SplitDN(0, 1, heads=2, split_axis=0),
    ),
    (
      SplitDN(0, (1, 2), view=(np.int64(6), 3, 4), split_sizes=None),
      SplitDN(0, (1, 2), view=(6, 3, 4)),
    ),
    (DN(np.int64(0), np.int64(1)), DN(0, 1)),
  ],
)
def test_dimension_numbers_take_numpy_integers(numpy_spec, python_spec):
  params = {"w": _normal(0, 6, 12)}
  grads = {"w": _normal(1, 6, 12)}
  out = []
  for spec in (numpy_spec, python_spec):
    tx = optax_orth.muon(0.1, muon_weight_dimension_numbers={"w": spec})
    out.append(tx.update(grads, tx.init(params), params)[0]["w"])
  np.testing.assert_array_equal(*out)


@pytest.mark.parametrize(
  "name, kwargs",
  [
    ("muon", {}),
    ("muon", {"ns_steps": 3}),
    ("namo", {"ns_steps": 4}),
    ("namo_d", {}),
    ("normuon", {"ns_steps": 5}),
    ("adamuon", {}),
  ],
)
def test_inject_hyperparams_needs_no_static_args(name, kwargs):
  factory = getattr(optax_orth, name)
  params = {"w": _normal(0, 8, 12), "b": jnp.zeros(12)}
  grads = {"w": _normal(1, 8, 12), "b": _normal(2, 12)}
  injected = optax.inject_hyperparams(factory)(learning_rate=0.01, **kwargs)
  plain = factory(0.01, **kwargs)
  s_inj, s_plain = injected.init(params), plain.init(params)
  for _ in range(3):
    u_inj, s_inj = jax.jit(injected.update)(grads, s_inj, params)
    u_plain, s_plain = plain.update(grads, s_plain, params)
  for a, b in zip(jax.tree.leaves(u_inj), jax.tree.leaves(u_plain), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_bias_correction_is_read_from_the_momentum_block():
  """``scale_by_norm_adaptive`` takes no ``b1``: the correction ``1 - beta^t``
  comes from the ``orthogonalize_momentum`` that owns ``beta``."""
  direction = lambda beta, **kw: optax_orth.orthogonalize_momentum(
    beta, statistics=True, **kw
  )
  with pytest.raises(TypeError, match="b1"):
    optax_orth.scale_by_norm_adaptive(direction(0.5), 1.0, b1=0.95)
  with pytest.raises(TypeError):  # the former positional b1 fails loudly
    optax_orth.scale_by_norm_adaptive(direction(0.5), 1.0, 0.95)
  params = {"w": _normal(0, 6, 10)}
  g = {"w": _normal(1, 6, 10)}
  b2, eps = 0.99, 1e-8
  for beta, kw, bias in [
    (0.5, {}, 0.5),
    (0.9, {}, 0.1),
    (0.5, {"bias_correction": True}, 1.0),
  ]:
    tx = optax_orth.scale_by_norm_adaptive(direction(beta, **kw), 1.0, b2=b2, eps=eps)
    _, state = tx.update(g, tx.init(params), params)
    gn = np.linalg.norm(np.asarray(g["w"], np.float64))
    if kw:  # optax's bias-corrected Nesterov direction at t = 1
      mt = (beta * (1 - beta) / (1 - beta**2) + 1) * gn
    else:  # Nesterov: beta (1 - beta) G + (1 - beta) G
      mt = (1 - beta) * (1 + beta) * gn
    want = np.sqrt(1 - b2) / (bias + 1e-12) * mt / (np.sqrt((1 - b2) * gn**2) + eps)
    np.testing.assert_allclose(state.raw_step_size["w"][0, 0], want, rtol=1e-5)
    stats = state.direction_state.statistics
    np.testing.assert_allclose(stats.momentum_bias, bias, rtol=1e-6)


def test_adamuon_step_does_not_shrink_with_the_gradient():
  """The sign of the momentum discards its scale: gradients of ``1e-30`` get
  the same step as gradients of ``1`` (stated in docs/reliability.md)."""
  params = {"w": _normal(0, 8, 12)}
  g = _normal(1, 8, 12)
  steps = []
  for scale in (1.0, 1e-30):
    tx = optax_orth.adamuon(1e-2, weight_decay=0.0)
    u, _ = tx.update({"w": scale * g}, tx.init(params), params)
    steps.append(np.asarray(u["w"]))
  np.testing.assert_allclose(steps[1], steps[0], rtol=1e-5)
  assert np.sqrt(np.mean(steps[0] ** 2)) == pytest.approx(1e-2 * 0.2, rel=1e-4)


def test_the_registry_holds_every_alias():
  """The tests' registry is the package's list; every public alias is in it."""
  import inspect

  aliases = {
    n
    for n in optax_orth.__all__
    if inspect.isfunction(getattr(optax_orth, n))
    and getattr(optax_orth, n).__module__ == "optax_orth._src.aliases"
  }
  assert aliases == set(h.NAMES), (aliases, h.NAMES)


@pytest.mark.parametrize("name", h.NAMES)
def test_help_documents_every_argument(name):
  """``help(optax_orth.NAME)`` has an ``Args:`` entry for every parameter
  (a derived alias such as ``namo_d`` included)."""
  import inspect
  import re

  factory = getattr(optax_orth, name)
  doc = inspect.getdoc(factory) or ""
  args = doc.split("Args:")[1].split("Returns:")[0]
  documented = set(re.findall(r"^  (\w+):", args, re.M))
  missing = [p for p in inspect.signature(factory).parameters if p not in documented]
  assert not missing, f"{name} does not document {missing}"


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_adamuon_does_not_absorb_a_non_finite_gradient(bad):
  """``sign(inf)`` is 1: without care, an infinite gradient would become an
  ordinary step. As in the other optimizers, the leaf's update is NaN (which
  ``optax.apply_if_finite`` sees), and the other leaves are untouched."""
  params = {"w": _normal(0, 8, 12), "v": _normal(1, 12, 6)}
  grads = {"w": _normal(2, 8, 12), "v": _normal(3, 12, 6)}
  tx = optax_orth.adamuon(1e-2)
  clean, _ = tx.update(grads, tx.init(params), params)
  grads["w"] = grads["w"].at[3, 4].set(bad)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert bool(jnp.isnan(updates["w"]).any())
  np.testing.assert_array_equal(updates["v"], clean["v"])


def test_every_public_function_documents_every_argument():
  import inspect
  import re

  missing = {}
  for name, f in h.public_objects().items():
    if not inspect.isfunction(f):
      continue
    doc = inspect.getdoc(f) or ""
    args = doc.split("Args:")[1].split("Returns:")[0] if "Args:" in doc else ""
    documented = set(re.findall(r"^\s+\**(\w+):", args, re.M))
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = [
      p for p, v in inspect.signature(f).parameters.items() if v.kind not in kinds
    ]
    if gaps := [p for p in params if p not in documented]:
      missing[name] = gaps
  assert not missing, missing
