"""Fused and multi-head leaves (SplitDimensionNumbers) against NumPy, per block."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from optax_orth import SplitDimensionNumbers as SplitDN
from optax_orth._src.routing import Parts, from_matrix_list, to_matrix_list
from optax_orth._src.transforms import find_states
from optax_orth.layout import label_tree
from tests import reference_numpy as ref
from tests import reference_split as ref_split

STEPS = 12
# Non-square blocks, tall and wide, stacked and not, GQA sizes, per head.
SHAPES = {
  "qkv": (12, 12 + 4 + 4),  # fused GQA query/key/value: q = 12, k = v = 4
  "stack": (3, 8, 6 + 10),  # scan-stacked fused kernel: blocks 8x6 and 8x10
  "heads": (8, 4 * 3),  # fused query kernel, 4 heads of 3
  "out": (4 * 3, 8),  # fused output kernel, per head on its reduction axis
  "plain": (6, 10),
}
DIMS = {
  "qkv": SplitDN(0, 1, split_sizes=(12, 4, 4)),
  "stack": SplitDN(1, 2, split_sizes=(6, 10)),
  "heads": SplitDN(0, 1, heads=4),
  "out": SplitDN(0, 1, heads=4, split_axis=0),
  "plain": DN(0, 1),
}


def _reference_rule(name, make_rule):
  """The NumPy rule of one matrix of each leaf (reference_split)."""
  return {
    "qkv": lambda: ref_split.Split(make_rule, (12, 4, 4)),
    "stack": lambda: ref_split.Split(make_rule, (6, 10)),
    "heads": lambda: ref_split.heads(make_rule, 4, 12),
    "out": lambda: ref_split.heads(make_rule, 4, 12, axis=0),
    "plain": make_rule,
  }[name]


def _gradients(steps, seed=0):
  """Gradients with a very different scale per column (so per block)."""
  rng = np.random.default_rng(seed)
  scale = {n: np.exp(rng.uniform(-2, 2, s[-1:])) for n, s in SHAPES.items()}
  return [
    {
      n: (rng.standard_normal(s) * scale[n]).astype(np.float32)
      for n, s in SHAPES.items()
    }
    for _ in range(steps)
  ]


def _params(seed=1):
  rng = np.random.default_rng(seed)
  return {
    n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()
  }


def _run(tx, params, grads):
  state, update = tx.init(params), jax.jit(tx.update)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree.map(np.asarray, params), state


def _run_reference(make_rule, params, grads):
  params = {n: np.asarray(p, np.float64) for n, p in params.items()}
  rules = {
    n: [_reference_rule(n, make_rule)() for _ in range(p.shape[0])]
    if p.ndim == 3
    else _reference_rule(n, make_rule)()
    for n, p in params.items()
  }
  for g in grads:
    for n, p in params.items():
      gn = g[n].astype(np.float64)
      if p.ndim == 3:
        params[n] = np.stack([r.step(p[b], gn[b]) for b, r in enumerate(rules[n])])
      else:
        params[n] = rules[n].step(p, gn)
  return params


CASES = {
  "muon": (
    lambda dims: optax_orth.muon(
      0.02, weight_decay=0.1, muon_weight_dimension_numbers=dims
    ),
    functools.partial(ref.Muon, 0.02, eps=1e-8, wd=0.1),
  ),
  "namo": (
    lambda dims: optax_orth.namo(0.01, weight_dimension_numbers=dims),
    functools.partial(ref.Namo, 0.01),
  ),
  "namo_d": (
    lambda dims: optax_orth.namo_d(0.01, weight_dimension_numbers=dims),
    functools.partial(ref.Namo, 0.01, diagonal=True),
  ),
  "normuon": (
    lambda dims: optax_orth.normuon(
      0.02, weight_decay=0.1, weight_dimension_numbers=dims
    ),
    functools.partial(ref.NorMuon, 0.02, wd=0.1),
  ),
}


class SpecificationTest(parameterized.TestCase):
  @parameterized.parameters(*CASES)
  def test_each_block_is_its_own_matrix(self, name):
    make_tx, make_rule = CASES[name]
    params, grads = _params(), _gradients(STEPS)
    ours, _ = _run(make_tx(DIMS), params, grads)
    theirs = _run_reference(make_rule, params, grads)
    for n in SHAPES:
      np.testing.assert_allclose(ours[n], theirs[n], rtol=2e-4, atol=2e-5, err_msg=n)

  @parameterized.parameters("namo_d", "normuon")
  def test_fused_is_not_the_whole_matrix(self, name):
    """The test can tell: treating the fused leaf as one matrix differs."""
    make_tx, _ = CASES[name]
    params, grads = _params(), _gradients(4)
    whole = dict(DIMS, qkv=DN(0, 1), stack=DN(1, 2))
    split, _ = _run(make_tx(DIMS), params, grads)
    fused, _ = _run(make_tx(whole), params, grads)
    assert np.abs(split["qkv"] - fused["qkv"]).max() > 1e-3
    assert np.abs(split["stack"] - fused["stack"]).max() > 1e-3

  def test_split_leaf_equals_its_blocks_as_leaves(self):
    """A GQA kernel split by sizes gives its blocks' updates, bit for bit."""
    params, grads = _params(), _gradients(STEPS)
    cut = lambda t: dict(zip("qkv", np.split(t["qkv"], [12, 16], axis=1), strict=True))
    tx = optax_orth.namo_d(0.01, weight_dimension_numbers={"qkv": DIMS["qkv"]})
    ours, _ = _run(tx, {"qkv": params["qkv"]}, [{"qkv": g["qkv"]} for g in grads])
    tx = optax_orth.namo_d(0.01, weight_dimension_numbers=DN(0, 1))
    blocks, _ = _run(tx, cut(params), [cut(g) for g in grads])
    joined = np.concatenate([blocks[c] for c in "qkv"], axis=1)
    np.testing.assert_allclose(ours["qkv"], joined, rtol=1e-6, atol=1e-7)


class StateTest(parameterized.TestCase):
  def test_per_block_state_of_every_block(self):
    params, grads = _params(), _gradients(2)
    tx = optax_orth.scale_by_norm_adaptive(
      optax.chain(
        optax_orth.orthogonalize_momentum(
          statistics=True, weight_dimension_numbers=DIMS
        ),
        optax_orth.scale_by_neuron_rms(weight_dimension_numbers=DIMS),
      ),
      0.01,
      granularity="input_feature",
      step_size_transform=optax_orth.clamp_diagonal(0.75),
      weight_dimension_numbers=DIMS,
    )
    _, state = _run(tx, params, grads)
    d = state.step_size
    assert isinstance(d["qkv"], Parts)
    assert [x.shape for x in d["qkv"]] == [(1, 12)] * 3
    assert [x.shape for x in d["stack"]] == [(3, 8), (3, 8)]
    assert d["heads"].shape == (4, 8) and d["out"].shape == (4, 3)
    nu = find_states(state, optax_orth.ScaleByNeuronRmsState)[0].nu
    assert [x.shape for x in nu["qkv"]] == [(1, 12), (1, 4), (1, 4)]
    assert [x.shape for x in nu["stack"]] == [(3, 6), (3, 10)]
    # NAMO-D's clamp toward each block's own mean of the raw step sizes.
    for block, raw in zip(d["qkv"], state.raw_step_size["qkv"], strict=True):
      m = np.mean(np.asarray(raw), axis=-1, keepdims=True)
      np.testing.assert_allclose(block, np.clip(raw, 0.75 * m, m / 0.75), rtol=1e-6)

  def test_diagnostics_one_value_per_block(self):
    params, grads = _params(), _gradients(2)
    tx = optax_orth.diagnostics.with_diagnostics(
      optax_orth.namo_d(0.01, weight_dimension_numbers=DIMS),
      weight_dimension_numbers=DIMS,
    )
    _, state = _run(tx, params, grads)
    metrics = state.metrics
    assert metrics["update_rms"]["qkv"].shape == (3,)
    assert metrics["update_rms"]["stack"].shape == (6,)
    assert metrics["update_rms"]["heads"].shape == (4,)
    assert metrics["step_size"]["qkv"].shape == (3,)
    assert metrics["clamped_fraction"]["stack"].shape == (6,)
    tx = optax_orth.diagnostics.with_diagnostics(
      optax_orth.normuon(0.01, weight_dimension_numbers=DIMS),
      weight_dimension_numbers=DIMS,
    )
    _, state = _run(tx, params, grads)
    assert state.metrics["neuron_rms_cv"]["qkv"].shape == (3,)


class LayoutTest(parameterized.TestCase):
  def test_split_layout_round_trip(self):
    x = jnp.arange(3 * 8 * 16, dtype=jnp.float32).reshape(3, 8, 16)
    lay = optax_orth.layout.matrix_layout(x.shape, DIMS["stack"])
    assert lay.sizes == (6, 10) and lay.axis == 2 and lay.batch == 6
    mats = to_matrix_list([lay], [x])
    assert [m.shape for m in mats] == [(3, 8, 6), (3, 8, 10)]
    np.testing.assert_array_equal(mats[1], x[:, :, 6:])
    np.testing.assert_array_equal(from_matrix_list([lay], mats)[0], x)
    with pytest.raises(TypeError, match="map_parts"):
      lay.to_matrices(x)

  @parameterized.parameters(
    ((8, 12), SplitDN(0, 1, heads=4), (4, 8, 3), np.s_[:, 0:3], np.s_[:, 3:6]),
    ((12, 8), SplitDN(0, 1, heads=4, split_axis=0), (4, 3, 8), np.s_[0:3], np.s_[3:6]),
    ((2, 6, 12), SplitDN(1, 2, heads=3), (6, 6, 4), np.s_[0, :, :4], np.s_[0, :, 4:8]),
  )
  def test_heads_view(self, shape, dn, mats_shape, head0, head1):
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    lay = optax_orth.layout.matrix_layout(shape, dn)
    m = lay.to_matrices(x)
    assert m.shape == mats_shape
    np.testing.assert_array_equal(m[0], x[head0])
    np.testing.assert_array_equal(m[1], x[head1])
    np.testing.assert_array_equal(lay.from_matrices(m), x)

  @parameterized.parameters(
    (SplitDN(0, 1, split_sizes=(4, 4)), "sum to"),
    (SplitDN(0, 1, split_sizes=(12, 0)), "positive ints"),
    (SplitDN(0, 1, heads=5), "does not divide"),
    (SplitDN(0, 1), "exactly one"),
    (SplitDN(0, 1, split_sizes=(6, 6), heads=2), "exactly one"),
    (SplitDN(1, 2, heads=2, split_axis=0), "batch axis"),
    (SplitDN(0, (1, 2), heads=2), "give split_axis"),
  )
  def test_errors_name_the_leaf(self, dn, match):
    shape = (3, 8, 12) if "axis" in match else (8, 12)
    with pytest.raises(ValueError, match=match):
      label_tree({"attn": {"qkv": jnp.zeros(shape)}}, {"attn": {"qkv": dn}})
    with pytest.raises(ValueError, match="'attn/qkv'"):
      optax_orth.namo_d(weight_dimension_numbers=dn).init(
        {"attn": {"qkv": jnp.zeros(shape)}}
      )

  def test_routing_table_and_route_by_path(self):
    params = {
      "blocks": {"attn": {"qkv": {"kernel": jnp.zeros((2, 16, 24))}}},
      "mlp": {"kernel": jnp.zeros((16, 32))},
    }
    spec = optax_orth.route_by_path(
      {r"attn/qkv/kernel": SplitDN(1, 2, split_sizes=(16, 4, 4))}, strict=True
    )
    table = optax_orth.routing_table(params, spec)
    assert (
      "| blocks/attn/qkv/kernel | (2, 16, 24) | orthogonal "
      "| 2 x 16 x 16 + 2 x 16 x 4 + 2 x 16 x 4 |" in table
    )
    assert "| mlp/kernel | (16, 32) | orthogonal | 1 x 16 x 32 |" in table
    with pytest.raises(ValueError, match="SplitDimensionNumbers"):
      optax_orth.route_by_path({"qkv": (16, 4, 4)})

  def test_state_shardings_replicate_per_block_vectors(self):
    mesh = jax.make_mesh((1,), ("fsdp",))
    params = _params()
    sh = {
      k: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) for k in params
    }
    tx = optax_orth.namo_d(0.01, weight_dimension_numbers=DIMS)
    state_sh = optax_orth.state_shardings(tx, params, sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    assert isinstance(
      find_states(state, optax_orth.ScaleByNormAdaptiveState)[0].nu["qkv"],
      Parts,
    )


def test_owner_scheme_on_eight_devices_matches_one_device(tmp_path):
  """Split and per-head leaves under OwnerSharding on 8 simulated devices."""
  root = Path(__file__).resolve().parents[1]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp_path / "split.json"
  proc = subprocess.run(
    [sys.executable, "-m", "tests._split_sharding_worker", str(out)],
    cwd=root, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())
  assert set(result) == {"muon", "namo_d", "normuon"}
  for name, r in result.items():
    assert r["diff"] <= 1e-5, (name, r)
    assert r["kept_sharding"], (name, r)
    assert r["all_to_all"] >= 2, (name, r)  # in and out of the owners


def test_route_by_model_reads_or_is_told_a_fused_layer():
  from flax import nnx

  class Attn(nnx.Module):
    def __init__(self, sliced, rngs):
      self.sliced = sliced
      self.qkv = nnx.Linear(16, 16 + 4 + 4, use_bias=False, rngs=rngs)
      self.out = nnx.Linear(16 if sliced else 24, 16, use_bias=False, rngs=rngs)
      self.head = nnx.Linear(16, 2, use_bias=False, rngs=rngs)

    def __call__(self, x):
      y = self.qkv(x)
      if self.sliced:  # q, k, v of unequal widths: the reader finds the blocks
        q, k, v = y[..., :16], y[..., 16:20], y[..., 20:]
        logits = jnp.einsum("bi,bj->bij", q, k)
        y = jnp.einsum("bij,bj->bi", logits, v)
      return self.head(self.out(y))

  x = jnp.zeros((2, 16))
  read = optax_orth.route_by_model(Attn(True, nnx.Rngs(0)), x, strict=True)
  assert read.decisions["qkv/kernel"].dimension_numbers == SplitDN(
    0, 1, split_sizes=(16, 4, 4)
  )
  model = Attn(False, nnx.Rngs(0))  # used whole: one matrix unless told
  assert optax_orth.route_by_model(model, x).decisions[
    "qkv/kernel"
  ].dimension_numbers == optax_orth.MuonDimensionNumbers(0, 1)
  spec = optax_orth.route_by_model(
    model,
    x,
    overrides={r"qkv/kernel": SplitDN(0, 1, split_sizes=(16, 4, 4))},
    strict=True,
  )
  table = optax_orth.routing_table(nnx.state(model, nnx.Param), spec)
  assert (
    "| qkv/kernel | (16, 24) | orthogonal | 1 x 16 x 16 + 1 x 16 x 4 + 1 x 16 x 4 |"
    in table
  )
  optimizer = nnx.Optimizer(
    model, optax_orth.namo_d(1e-2, weight_dimension_numbers=spec), wrt=nnx.Param
  )
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
