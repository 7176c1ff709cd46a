"""route_by_model on real Flax layouts: tables by hand, updates against NumPy.

For each model: the routing table equals a hand-written one; each
orthogonalized kernel's Muon update is, layer by layer (and head by head),
our NumPy Muon on that layer's matrix, reshaped here by hand; every Adam leaf's
update is ``optax.adamw``'s.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
# (einsum_dimension_numbers removed: the reader reads the dot itself)
from tests import reference_numpy as ref

L, D, H, HD, FF, V = 3, 8, 2, 4, 16, 20
LR = 0.05
TOKENS = jnp.zeros((2, 5), jnp.int32)


# Models -----------------------------------------------------------------------


class Block(nnx.Module):
  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=H, in_features=D, decode=False, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, FF, rngs=rngs)
    self.down = nnx.Linear(FF, D, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class ScannedTransformer(nnx.Module):
  """Flax's scan-over-layers pattern: layers made by nnx.vmap, run by nnx.scan."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)

    self.blocks = create(rngs)
    self.ln = nnx.LayerNorm(D, rngs=rngs)
    self.out = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return self.out(self.ln(forward(self.embed(tokens), self.blocks)))


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


# Helpers ----------------------------------------------------------------------


def _rows(params, spec):
  """The routing table as ``{path: (shape, branch, matrices, why)}``."""
  lines = optax_orth.routing_table(params, spec).splitlines()
  assert lines[0] == (
    "| path | shape | branch | matrices (batch x fan_in x fan_out) | why |"
  )
  cells = lambda line: re.split(r"(?<!\\)\|", line.strip("|"))
  rows = [[c.strip().replace("\\|", "|") for c in cells(line)] for line in lines[2:]]
  return {r[0]: tuple(r[1:]) for r in rows}


def _random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x)), jnp.float32), tree
  )


def _flat(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {optax_orth.routing.leaf_name(p): np.asarray(x) for p, x in flat}


def _muon_updates(params, spec, steps=2):
  """Muon's updates (and the gradients) for ``steps`` random gradients."""
  tx = optax_orth.muon(LR, muon_weight_dimension_numbers=spec)
  state, out = tx.init(params), []
  for t in range(steps):
    grads = _random_like(params, seed=t)
    updates, state = jax.jit(tx.update)(grads, state, params)
    out.append((_flat(grads), _flat(updates)))
  return out


def _adamw_updates(params, steps=2):
  """optax.adamw with muon's Adam fallback settings, on every leaf."""
  tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, nesterov=True)
  state, out = tx.init(params), []
  for t in range(steps):
    updates, state = tx.update(_random_like(params, seed=t), state, params)
    out.append(_flat(updates))
  return out


def _check_updates(params, spec, matrices):
  """``matrices[name]``: NumPy ``leaf -> list of matrices`` and its inverse,
  written by hand for each orthogonalized leaf; every other leaf is Adam's."""
  ours, adam = _muon_updates(params, spec), _adamw_updates(params)
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


def _reshaped(*mat_shape):
  """A leaf as a stack of matrices of ``mat_shape`` by a plain reshape (the
  leading axes the batch), and back."""
  holder = {}

  def to(x):
    holder["shape"] = x.shape
    return x.reshape(-1, *mat_shape)

  return to, lambda m: m.reshape(holder["shape"])


# The scan-stacked NNX transformer ------------------------------------------------


def _transformer_expected(per_head: bool, out_kernel: str):
  qkv = "6 x 8 x 4" if per_head else "3 x 8 x 8"
  ph = ", per head" if per_head else ""
  rows = {}
  for name in ("query", "key", "value", "out"):
    kind = f"MultiHeadAttention.{name}"
    kshape = "(3, 2, 4, 8)" if name == "out" else "(3, 8, 2, 4)"
    mats = ("6 x 4 x 8" if per_head else "3 x 8 x 8") if name == "out" else qkv
    rows[f"blocks/attn/{name}/kernel"] = (
      kshape,
      "orthogonal",
      mats,
      f"{kind} kernel{ph}, 1 stacked axis",
    )
    bshape = "(3, 8)" if name == "out" else "(3, 2, 4)"
    rows[f"blocks/attn/{name}/bias"] = (bshape, "adam", "-", f"{kind} bias")
  for name, (i, o) in {"up": (D, FF), "down": (FF, D)}.items():
    rows[f"blocks/{name}/kernel"] = (
      f"(3, {i}, {o})",
      "orthogonal",
      f"3 x {i} x {o}",
      "Linear kernel, 1 stacked axis",
    )
    rows[f"blocks/{name}/bias"] = (f"(3, {o})", "adam", "-", "Linear bias")
  for ln in ("blocks/ln1", "blocks/ln2"):
    for p in ("bias", "scale"):
      rows[f"{ln}/{p}"] = ("(3, 8)", "adam", "-", f"LayerNorm {p}")
  rows["ln/bias"] = ("(8,)", "adam", "-", "LayerNorm bias")
  rows["ln/scale"] = ("(8,)", "adam", "-", "LayerNorm scale")
  rows["embed/embedding"] = ("(20, 8)", "adam", "-", "Embed embedding")
  rows["out/kernel"] = ("(8, 20)", *out_kernel.split(" | "))
  head = ", output head (last projection to the output)"
  rows["out/bias"] = (
    "(20,)",
    "adam",
    "-",
    "Linear bias" + (head if "head" in out_kernel else ""),
  )
  return rows


@pytest.mark.parametrize("per_head", [False, True])
def test_scanned_nnx_transformer(per_head):
  model = ScannedTransformer(nnx.Rngs(0))
  spec = optax_orth.route_by_model(model, TOKENS, per_head=per_head)
  state = nnx.state(model, nnx.Param)
  head = "adam | - | Linear kernel, output head (last projection to the output)"
  expected = _transformer_expected(per_head, head)
  assert _rows(state, spec) == expected
  assert _rows(nnx.as_pure(state), spec) == expected
  assert _rows(nnx.to_pure_dict(state), spec) == expected

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
    qkv, out = _reshaped(D, H * HD), _reshaped(H * HD, D)
  stacked = (lambda x: x, lambda m: m)
  matrices = {f"blocks/attn/{n}/kernel": qkv for n in ("query", "key", "value")}
  matrices |= {"blocks/attn/out/kernel": out}
  matrices |= {"blocks/up/kernel": stacked, "blocks/down/kernel": stacked}
  _check_updates(nnx.as_pure(state), spec, matrices)


def test_scanned_nnx_transformer_without_inputs_and_in_nnx_optimizer():
  model = ScannedTransformer(nnx.Rngs(0))
  spec = optax_orth.route_by_model(model)  # no inputs: no head by call order
  state = nnx.state(model, nnx.Param)
  expected = _transformer_expected(False, "orthogonal | 1 x 8 x 20 | Linear kernel")
  assert _rows(state, spec) == expected
  spec = optax_orth.route_by_model(model, head=r"^out/")
  assert _rows(state, spec)["out/kernel"][1:] == (
    "adam",
    "-",
    "Linear kernel, output head (name 'out')",
  )
  # nnx.Optimizer initializes on the nnx.State and updates with pure arrays.
  with WarningsAsErrors():
    optimizer = nnx.Optimizer(
      model, optax_orth.namo_d(1e-2, weight_dimension_numbers=spec), wrt=nnx.Param
    )
    grads = _random_like(nnx.state(model, nnx.Param), seed=0)
    updates = optimizer.update(model, grads)
  pure = nnx.as_pure(grads)
  adamw = optax.adamw(1e-2)
  adam = adamw.update(pure, adamw.init(pure), pure)[0]
  kernel = updates["blocks"]["up"]["kernel"]
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


def test_nnx_conv_net():
  model = ConvNet(nnx.Rngs(0))
  x = jnp.zeros((2, 6, 6, 3))
  spec = optax_orth.route_by_model(model, x)  # fc: the last projection
  state = nnx.state(model, nnx.Param)
  head = "output head (last projection to the output)"
  assert _rows(state, spec) == {
    "conv1/bias": ("(4,)", "adam", "-", "Conv bias"),
    "conv1/kernel": ("(3, 3, 3, 4)", "orthogonal", "1 x 27 x 4", "Conv kernel"),
    "conv2/kernel": ("(3, 3, 4, 6)", "orthogonal", "1 x 36 x 6", "Conv kernel"),
    "fc/bias": ("(5,)", "adam", "-", f"Linear bias, {head}"),
    "fc/kernel": ("(6, 5)", "adam", "-", f"Linear kernel, {head}"),
    "norm/bias": ("(4,)", "adam", "-", "GroupNorm bias"),
    "norm/scale": ("(4,)", "adam", "-", "GroupNorm scale"),
  }
  by_name = optax_orth.route_by_model(model, head="fc")
  assert (
    _rows(state, by_name)["fc/kernel"][3] == "Linear kernel, output head (name 'fc')"
  )
  matrices = {"conv1/kernel": _reshaped(27, 4), "conv2/kernel": _reshaped(36, 6)}
  _check_updates(nnx.as_pure(state), spec, matrices)


def test_nnx_linear_general_and_einsum():
  model = GeneralNet(nnx.Rngs(0))
  spec = optax_orth.route_by_model(model, jnp.zeros((2, 5, D)))
  state = nnx.state(model, nnx.Param)
  head = ", output head (last projection to the output)"
  assert _rows(state, spec) == {
    "heads/kernel": ("(2, 4, 6)", "orthogonal", "2 x 4 x 6", "Einsum kernel"),
    "lm/bias": ("(20,)", "adam", "-", "Einsum bias" + head),
    "lm/kernel": ("(8, 20)", "adam", "-", "Einsum kernel" + head),
    "merge/bias": ("(8,)", "adam", "-", "LinearGeneral bias"),
    "merge/kernel": ("(2, 6, 8)", "orthogonal", "1 x 12 x 8", "LinearGeneral kernel"),
    "proj/bias": ("(2, 4)", "adam", "-", "LinearGeneral bias"),
    "proj/kernel": ("(8, 2, 4)", "orthogonal", "1 x 8 x 8", "LinearGeneral kernel"),
  }
  matrices = {
    "heads/kernel": (lambda x: x, lambda m: m),  # one (4, 6) matrix per head
    "merge/kernel": _reshaped(12, D),
    "proj/kernel": _reshaped(D, H * HD),
  }
  _check_updates(nnx.as_pure(state), spec, matrices)


def test_einsum_dimension_numbers():
  assert einsum_dimension_numbers("bti,ihd->bthd") == DN(0, (1, 2))
  assert einsum_dimension_numbers("bthd,hde->bthe") == DN(1, 2)
  assert einsum_dimension_numbers("...d,dv->...v") == DN(0, 1)
  assert einsum_dimension_numbers("bd,d->b") is None  # a vector, not a matrix


def test_linen_transformer_with_scan_and_dense_general_attention():
  model = LinenTransformer()
  spec = optax_orth.route_by_model(model, TOKENS)
  params = model.init(jax.random.key(0), TOKENS)["params"]
  attn, kind = "blocks/attn", "MultiHeadDotProductAttention"
  rows = {}
  for name in ("query", "key", "value", "out"):
    shape = "(3, 2, 4, 8)" if name == "out" else "(3, 8, 2, 4)"
    why = f"{kind}.{name} kernel, 1 stacked axis"
    rows[f"{attn}/{name}/kernel"] = (shape, "orthogonal", "3 x 8 x 8", why)
    bshape = "(3, 8)" if name == "out" else "(3, 2, 4)"
    rows[f"{attn}/{name}/bias"] = (bshape, "adam", "-", f"{kind}.{name} bias")
  for name, (i, o) in {"up": (D, FF), "down": (FF, D)}.items():
    why = "Dense kernel, 1 stacked axis"
    rows[f"blocks/{name}/kernel"] = (
      f"(3, {i}, {o})",
      "orthogonal",
      f"3 x {i} x {o}",
      why,
    )
    rows[f"blocks/{name}/bias"] = (f"(3, {o})", "adam", "-", "Dense bias")
  for ln in ("blocks/ln1", "blocks/ln2"):
    for p in ("bias", "scale"):
      rows[f"{ln}/{p}"] = ("(3, 8)", "adam", "-", f"LayerNorm {p}")
  rows |= {
    "embed/embedding": ("(20, 8)", "adam", "-", "Embed embedding"),
    "ln/bias": ("(8,)", "adam", "-", "LayerNorm bias"),
    "ln/scale": ("(8,)", "adam", "-", "LayerNorm scale"),
    "out/bias": (
      "(20,)",
      "adam",
      "-",
      "Dense bias, output head (last projection to the output)",
    ),
    "out/kernel": (
      "(8, 20)",
      "adam",
      "-",
      "Dense kernel, output head (last projection to the output)",
    ),
  }
  assert _rows(params, spec) == rows
  # The variables dict around params routes the same.
  variables = {"params": params}
  assert _rows(variables, spec) == {f"params/{k}": v for k, v in rows.items()}
  qkv, out = _reshaped(D, H * HD), _reshaped(H * HD, D)
  stacked = (lambda x: x, lambda m: m)
  matrices = {f"{attn}/{n}/kernel": qkv for n in ("query", "key", "value")}
  matrices |= {f"{attn}/out/kernel": out}
  matrices |= {"blocks/up/kernel": stacked, "blocks/down/kernel": stacked}
  _check_updates(params, spec, matrices)
  per_head = optax_orth.route_by_model(model, TOKENS, per_head=True)
  assert _rows(params, per_head)[f"{attn}/query/kernel"][2] == "6 x 8 x 4"


def test_linen_needs_sample_inputs_and_other_objects_are_refused():
  with pytest.raises(ValueError, match="sample inputs"):
    optax_orth.route_by_model(LinenTransformer())
  with pytest.raises(TypeError, match="route_by_path"):
    optax_orth.route_by_model({"w": jnp.zeros((2, 2))})


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
  assert _rows(params, spec) == {
    "0/0": ("(6, 12)", "orthogonal", "1 x 6 x 12", "rule '/0$'"),
    "0/1": ("(12,)", "adam", "-", "rank 1"),
    "1/0": ("(12, 10)", "orthogonal", "1 x 12 x 10", "rule '/0$'"),
    "1/1": ("(10,)", "adam", "-", "rank 1"),
    "2/0": ("(10, 3)", "adam", "-", "rule '^2/0$'"),
    "2/1": ("(3,)", "adam", "-", "rank 1"),
  }
  identity = (lambda x: x[None], lambda m: m[0])
  _check_updates(params, spec, {"0/0": identity, "1/0": identity})


@pytest.mark.parametrize(
  "make", [optax_orth.namo, optax_orth.namo_d, optax_orth.normuon, optax_orth.muon]
)
def test_lists_give_the_same_updates_as_tuples(make):
  tx = make(0.02) if make is optax_orth.muon else make()
  updates = []
  for container in (tuple, list):
    params = _mlp(container)
    grads = _random_like(params, seed=3)
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
