"""route_by_model on real Flax layouts: tables by hand, updates against NumPy.

For each model: the routing table equals a hand-written one; each
orthogonalized kernel's Muon update is, layer by layer (and head by head),
our NumPy Muon on that layer's matrix, reshaped here by hand; every Adam leaf's
update is ``optax.adamw``'s.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from tests.helpers import pure
from tests.routing_check import (
  abstract_nnx,
  check_updates,
  random_like,
  reshaped,
  rows,
)
from tests.routing_models import TOKENS, ScannedTransformer

L, D, H, HD, FF, V = 3, 8, 2, 4, 16, 20
LR = 0.05


# Models -----------------------------------------------------------------------


class ConvNet(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.norm = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
    self.conv2 = nnx.Conv(4, 6, (3, 3), use_bias=False, rngs=rngs)
    self.fc = nnx.Linear(6, 5, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.conv1(x)))
    return self.fc(self.conv2(x).mean(axis=(1, 2)))


class GeneralNet(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.LinearGeneral(D, (H, HD), rngs=rngs)
    self.heads = nnx.Einsum("bthd,hde->bthe", (H, HD, 6), rngs=rngs)
    self.merge = nnx.LinearGeneral((H, 6), D, axis=(-2, -1), rngs=rngs)
    self.lm = nnx.Einsum("btd,dv->btv", (D, V), (V,), rngs=rngs)

  def __call__(self, x):
    return self.lm(self.merge(self.heads(self.proj(x))))


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=H, name="attn")(y, y)
    y = nn.Dense(FF, name="up")(nn.LayerNorm(name="ln2")(x))
    return x + nn.Dense(D, name="down")(nn.gelu(y)), None


class LinenTransformer(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, D, name="embed")(tokens)
    stack = nn.scan(
      LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=L
    )
    x, _ = stack(name="blocks")(x, None)
    return nn.Dense(V, name="out")(nn.LayerNorm(name="ln")(x))


# The scan-stacked NNX transformer ------------------------------------------------


HEAD = (
  "output head (dot_general: fan-in axis 0, fan-out axis 1; its output reaches "
  "the model's output)"
)
ADD, MUL = "elementwise only (add)", "elementwise only (mul)"


def _attention_rows(prefix, per_head):
  """The rows of a (layers, ...) stacked attention block, MHA's layout."""
  out = {}
  for name in ("query", "key", "value", "out"):
    if name == "out":
      kshape, mats = "(3, 2, 4, 8)", "6 x 4 x 8" if per_head else "3 x 8 x 8"
      axes = (
        "fan-in axis 2, fan-out axis 3, batch axis 0 1"
        if per_head
        else ("fan-in axis 1 2, fan-out axis 3, batch axis 0")
      )
    else:
      kshape, mats = "(3, 8, 2, 4)", "6 x 8 x 4" if per_head else "3 x 8 x 8"
      axes = (
        "fan-in axis 1, fan-out axis 3, batch axis 0 2"
        if per_head
        else ("fan-in axis 1, fan-out axis 2 3, batch axis 0")
      )
    why = f"dot_general: {axes}" + (", per head" if per_head else "")
    out[f"{prefix}/{name}/kernel"] = (kshape, "orthogonal", mats, why)
    bshape = "(3, 8)" if name == "out" else "(3, 2, 4)"
    out[f"{prefix}/{name}/bias"] = (bshape, "adam", "-", ADD)
  return out


def _transformer_expected(per_head: bool):
  rows = _attention_rows("blocks/attn", per_head)
  for name, (i, o) in {"up": (D, FF), "down": (FF, D)}.items():
    why = "dot_general: fan-in axis 1, fan-out axis 2, batch axis 0"
    rows[f"blocks/{name}/kernel"] = (
      f"(3, {i}, {o})",
      "orthogonal",
      f"3 x {i} x {o}",
      why,
    )
    rows[f"blocks/{name}/bias"] = (f"(3, {o})", "adam", "-", ADD)
  for ln in ("blocks/ln1", "blocks/ln2"):
    rows[f"{ln}/bias"] = ("(3, 8)", "adam", "-", ADD)
    rows[f"{ln}/scale"] = ("(3, 8)", "adam", "-", MUL)
  rows["ln/bias"] = ("(8,)", "adam", "-", ADD)
  rows["ln/scale"] = ("(8,)", "adam", "-", MUL)
  rows["embed/embedding"] = ("(20, 8)", "adam", "-", "gather (an embedding lookup)")
  rows["out/kernel"] = ("(8, 20)", "adam", "-", HEAD)
  rows["out/bias"] = ("(20,)", "adam", "-", ADD)
  return rows


@pytest.mark.parametrize("per_head", [False, True])
def test_scanned_nnx_transformer(per_head):
  model, state, params = abstract_nnx(lambda: ScannedTransformer(nnx.Rngs(0)))
  spec = optax_orth.route_by_model(model, TOKENS, per_head=per_head)
  expected = _transformer_expected(per_head)
  assert rows(state, spec) == expected
  assert rows(pure(state), spec) == expected
  assert rows(nnx.to_pure_dict(state), spec) == expected

  if per_head:  # (L, D, H, HD): L*H matrices, layer-major, then head
    qkv = (
      lambda x: np.stack([x[i, :, h, :] for i in range(L) for h in range(H)]),
      lambda m: m.reshape(L, H, D, HD).transpose(0, 2, 1, 3),
    )
    out = (
      lambda x: np.stack([x[i, h] for i in range(L) for h in range(H)]),
      lambda m: m.reshape(L, H, HD, D),
    )
  else:  # one (D, H*HD) matrix per layer, one (H*HD, D) for out
    qkv, out = reshaped(D, H * HD), reshaped(H * HD, D)
  stacked = (lambda x: x, lambda m: m)
  matrices = {f"blocks/attn/{n}/kernel": qkv for n in ("query", "key", "value")}
  matrices |= {"blocks/attn/out/kernel": out}
  matrices |= {"blocks/up/kernel": stacked, "blocks/down/kernel": stacked}
  check_updates(params, spec, matrices)


def test_scanned_nnx_transformer_overrides_and_nnx_optimizer():
  model, state, params = abstract_nnx(lambda: ScannedTransformer(nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)  # concrete weights, without the initializers' compiles
  with pytest.raises(ValueError, match="example inputs"):
    optax_orth.route_by_model(model)  # nothing to trace
  spec = optax_orth.route_by_model(model, TOKENS, overrides={r"^out/kernel$": DN(0, 1)})
  state = nnx.state(model, nnx.Param)
  expected = _transformer_expected(False)
  expected["out/kernel"] = (
    "(8, 20)",
    "orthogonal",
    "1 x 8 x 20",
    "override '^out/kernel$'",
  )
  assert rows(state, spec) == expected
  # nnx.Optimizer initializes on the nnx.State and updates with pure arrays.
  with WarningsAsErrors():
    optimizer = nnx.Optimizer(
      model, optax_orth.namo_d(1e-2, weight_dimension_numbers=spec), wrt=nnx.Param
    )
    grads = random_like(nnx.state(model, nnx.Param), seed=0)
    before = pure(nnx.state(model, nnx.Param))
    nnx.jit(lambda m, o, g: o.update(m, g))(model, optimizer, grads)
  after = pure(nnx.state(model, nnx.Param))
  plain = pure(grads)
  adamw = optax.adamw(1e-2)
  adam = adamw.update(plain, adamw.init(plain), before)[0]
  kernel = after["blocks"]["up"]["kernel"] - before["blocks"]["up"]["kernel"]
  assert np.all(np.isfinite(kernel)) and np.any(kernel != 0)
  assert not np.allclose(kernel, adam["blocks"]["up"]["kernel"], atol=1e-3)


class WarningsAsErrors:
  """No RoutingWarning inside (route_by_model explains every leaf)."""

  def __enter__(self):
    import warnings

    self._ctx = warnings.catch_warnings()
    self._ctx.__enter__()
    warnings.simplefilter("error", optax_orth.RoutingWarning)

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)


# The NNX conv net, LinearGeneral / Einsum model, Linen transformer ----------------

CONV = "conv_general_dilated: fan-in axis 0 1 2, fan-out axis 3"


def test_nnx_conv_net():
  model, state, params = abstract_nnx(lambda: ConvNet(nnx.Rngs(0)))
  spec = optax_orth.route_by_model(model, jnp.zeros((2, 6, 6, 3)))
  assert rows(state, spec) == {
    "conv1/bias": ("(4,)", "adam", "-", ADD),
    "conv1/kernel": ("(3, 3, 3, 4)", "orthogonal", "1 x 27 x 4", CONV),
    "conv2/kernel": ("(3, 3, 4, 6)", "orthogonal", "1 x 36 x 6", CONV),
    "fc/bias": ("(5,)", "adam", "-", ADD),
    "fc/kernel": ("(6, 5)", "adam", "-", HEAD),
    "norm/bias": ("(4,)", "adam", "-", ADD),
    "norm/scale": ("(4,)", "adam", "-", MUL),
  }
  matrices = {"conv1/kernel": reshaped(27, 4), "conv2/kernel": reshaped(36, 6)}
  check_updates(params, spec, matrices)


def test_nnx_linear_general_and_einsum():
  model, state, params = abstract_nnx(lambda: GeneralNet(nnx.Rngs(0)))
  spec = optax_orth.route_by_model(model, jnp.zeros((2, 5, D)))
  dot = "dot_general: fan-in axis"
  assert rows(state, spec) == {
    "heads/kernel": (
      "(2, 4, 6)",
      "orthogonal",
      "2 x 4 x 6",
      f"{dot} 1, fan-out axis 2, batch axis 0",
    ),
    "lm/bias": ("(20,)", "adam", "-", ADD),
    "lm/kernel": ("(8, 20)", "adam", "-", HEAD),
    "merge/bias": ("(8,)", "adam", "-", ADD),
    "merge/kernel": (
      "(2, 6, 8)",
      "orthogonal",
      "1 x 12 x 8",
      f"{dot} 0 1, fan-out axis 2",
    ),
    "proj/bias": ("(2, 4)", "adam", "-", ADD),
    "proj/kernel": (
      "(8, 2, 4)",
      "orthogonal",
      "1 x 8 x 8",
      f"{dot} 0, fan-out axis 1 2",
    ),
  }
  matrices = {
    "heads/kernel": (lambda x: x, lambda m: m),  # one (4, 6) matrix per head
    "merge/kernel": reshaped(12, D),
    "proj/kernel": reshaped(D, H * HD),
  }
  check_updates(params, spec, matrices)


@pytest.mark.parametrize(
  ("equation", "shape", "expected"),
  [
    ("bti,ihd->bthd", (8, 2, 4), DN(0, (1, 2))),
    ("bthd,hde->bthe", (2, 4, 6), DN(1, 2)),
    ("btd,vd->btv", (6, 8), DN(1, 0)),  # stored (out, in)
    ("btd,sndh->sbtnh", (3, 2, 8, 4), DN(2, (0, 1, 3))),  # s not split: no slice
  ],
)
def test_a_plain_function_is_read_from_its_einsum(equation, shape, expected):
  x = jnp.zeros((2, 5, 2, 4) if equation.startswith("bthd") else (2, 5, 8))
  y = jax.eval_shape(lambda w: jnp.einsum(equation, x, w), jnp.zeros(shape))
  params = {"w": jnp.zeros(shape), "out": jnp.zeros((y.shape[-1], 3))}

  def fn(params, x):
    y = jnp.einsum(equation, x, params["w"])
    return jnp.tanh(y) @ params["out"]  # a head after it, so w is hidden

  spec = optax_orth.route_by_model(fn, x, params=params)
  assert spec.decisions["w"].dimension_numbers == expected
  assert spec.decisions["out"].dimension_numbers is None  # the head


def test_linen_transformer_with_scan_and_dense_general_attention():
  model = LinenTransformer()
  spec = optax_orth.route_by_model(model, TOKENS)
  shapes = jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"]
  params = random_like(shapes, seed=9)
  attn = "blocks/attn"
  expected = _transformer_expected(False)
  assert rows(params, spec) == expected
  # The variables dict around params routes the same.
  variables = {"params": params}
  assert rows(variables, spec) == {f"params/{k}": v for k, v in expected.items()}
  qkv, out = reshaped(D, H * HD), reshaped(H * HD, D)
  stacked = (lambda x: x, lambda m: m)
  matrices = {f"{attn}/{n}/kernel": qkv for n in ("query", "key", "value")}
  matrices |= {f"{attn}/out/kernel": out}
  matrices |= {"blocks/up/kernel": stacked, "blocks/down/kernel": stacked}
  check_updates(params, spec, matrices)
  per_head = optax_orth.route_by_model(model, TOKENS, per_head=True)
  assert rows(params, per_head) == _transformer_expected(True)


def test_inputs_are_needed_and_other_objects_are_refused():
  with pytest.raises(ValueError, match="example inputs"):
    optax_orth.route_by_model(LinenTransformer())
  with pytest.raises(TypeError, match="route_by_path"):
    optax_orth.route_by_model({"w": jnp.zeros((2, 2))}, TOKENS)


# A list-of-tuples MLP (no model object: route_by_path) -----------------------------


def _mlp(container=tuple):
  rng = np.random.default_rng(0)
  sizes = [(6, 12), (12, 10), (10, 3)]
  return [
    container(
      (jnp.asarray(rng.standard_normal(s), jnp.float32), jnp.zeros(s[1], jnp.float32))
    )
    for s in sizes
  ]


def test_list_of_tuples_mlp():
  params = _mlp()
  spec = optax_orth.route_by_path([(r"^2/0$", None), (r"/0$", DN(0, 1))])
  assert rows(params, spec) == {
    "0/0": ("(6, 12)", "orthogonal", "1 x 6 x 12", "rule '/0$'"),
    "0/1": ("(12,)", "adam", "-", "rank 1"),
    "1/0": ("(12, 10)", "orthogonal", "1 x 12 x 10", "rule '/0$'"),
    "1/1": ("(10,)", "adam", "-", "rank 1"),
    "2/0": ("(10, 3)", "adam", "-", "rule '^2/0$'"),
    "2/1": ("(3,)", "adam", "-", "rank 1"),
  }
  identity = (lambda x: x[None], lambda m: m[0])
  check_updates(params, spec, {"0/0": identity, "1/0": identity})


@pytest.mark.parametrize(
  "make", [optax_orth.namo, optax_orth.namo_d, optax_orth.normuon, optax_orth.muon]
)
def test_lists_give_the_same_updates_as_tuples(make):
  tx = make(0.02) if make is optax_orth.muon else make()
  updates = []
  for container in (tuple, list):
    params = _mlp(container)
    grads = random_like(params, seed=3)
    with Quiet():  # the default warns: 0/0 and 1/0 are routed by shape alone
      state = tx.init(params)
    updates.append(jax.jit(tx.update)(grads, state, params)[0])
  assert isinstance(updates[1][0], list) and isinstance(updates[0][0], tuple)
  for a, b in zip(
    jax.tree.leaves(updates[0]), jax.tree.leaves(updates[1]), strict=True
  ):
    np.testing.assert_array_equal(a, b)


class Quiet:
  def __enter__(self):
    import warnings

    self._ctx = warnings.catch_warnings()
    self._ctx.__enter__()
    warnings.simplefilter("ignore", optax_orth.RoutingWarning)

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)
