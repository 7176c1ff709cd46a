"""route_by_model on model code nobody here wrote, and on layouts that class
tables misread: Hugging Face's Flax GPT-2 (kernels stored ``(out, in)``, a
fused c_attn), Llama (GQA, per head), a headless Llama trunk, Bloom (q, k, v
interleaved per head), GPT-Neo, an Equinox transformer, Einsum attention with
stacked k/v, recurrent nets, grouped and depthwise convolutions, two heads.

Each table is written here by hand; each orthogonalized leaf's Muon update is
our NumPy Muon on the matrices we cut from the leaf by hand, and every other
leaf's update is ``optax.adamw``'s.
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from optax_orth import SplitDimensionNumbers as SplitDN
from optax_orth._src import routing as routing_lib
from tests import routing_models as rm
from tests.routing_check import (
  abstract_nnx,
  check_updates,
  matrices_column,
  random_like,
  reshaped,
  rows,
  viewed,
)

transformers = pytest.importorskip("transformers")

IDS = jnp.zeros((1, 6), jnp.int32)
E, V = 32, 50  # the hidden size and vocabulary of the Hugging Face models
ORTH, ADAM = "orthogonal", ("adam", "-")
DOT = "dot_general: fan-in axis 0, fan-out axis 1"
TRANSPOSE = (lambda x: x.T[None], lambda m: m[0].T)  # one matrix stored (out, in)


def _abstract(make):
  model, _, params = abstract_nnx(make)
  return model, params


def _hugging_face(cls, config):
  """A Hugging Face Flax model without its random init, and random
  parameters of its shapes (passed to route_by_model as params=)."""
  model = cls(config, _do_init=False)
  init = lambda key: model.init_weights(key, model.input_shape)
  shapes = jax.eval_shape(init, jax.random.key(0))
  return model, random_like(shapes, seed=9)


def _same():
  return (lambda x: x[None], lambda m: m[0])


def _hidden(table, prefix, names, shapes):
  for name, shape in zip(names, shapes, strict=True):
    table[f"{prefix}{name}"] = (ORTH, shape)


# Hugging Face: GPT-2 --------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
  config = transformers.GPT2Config(
    n_layer=2, n_embd=E, n_head=4, vocab_size=V, n_positions=16
  )
  return transformers.FlaxGPT2LMHeadModel(config, seed=0)


def _gpt2_spec(params):
  """GPT-2's routing written out: Conv1D kernels are stored (out, in)."""

  def one(path, x):
    name = routing_lib.leaf_name(path)
    if not name.endswith("kernel"):
      return None
    if "c_attn" in name:
      return SplitDN(1, 0, split_sizes=(E, E, E), split_axis=0)
    return DN(1, 0)

  return jax.tree_util.tree_map_with_path(one, params)


def test_gpt2_kernels_are_read_stored_out_in(gpt2):
  spec = optax_orth.route_by_model(gpt2, IDS)
  table = rows(gpt2.params, spec)
  expected = {
    "transformer/wte/embedding": (
      "(50, 32)",
      "adam",
      "-",
      "gather (an embedding lookup), also a dot_general (a tied output head)",
    ),
    "transformer/wpe/embedding": (
      "(16, 32)",
      "adam",
      "-",
      "gather (an embedding lookup)",
    ),
  }
  stored = "dot_general: fan-in axis 1, fan-out axis 0 (stored out, in)"
  for i in range(2):
    h = f"transformer/h/{i}/"
    expected[h + "attn/c_attn/kernel"] = (
      "(96, 32)",
      ORTH,
      "3 x 32 x 32",
      stored + ", 3 blocks",
    )
    expected[h + "attn/c_proj/kernel"] = ("(32, 32)", ORTH, "1 x 32 x 32", stored)
    expected[h + "mlp/c_fc/kernel"] = ("(128, 32)", ORTH, "1 x 32 x 128", stored)
    expected[h + "mlp/c_proj/kernel"] = ("(32, 128)", ORTH, "1 x 128 x 32", stored)
  for name, row in table.items():
    if name in expected:
      assert row == expected[name], name
    else:  # biases and LayerNorm parameters
      assert row[1:3] == ADAM and row[3].startswith("elementwise only"), name
  assert set(expected) <= set(table)

  # Every orthogonal update is the NumPy Muon of the matrices cut by hand.
  qkv = (
    lambda x: x.reshape(3, E, E).transpose(0, 2, 1),
    lambda m: m.transpose(0, 2, 1).reshape(3 * E, E),
  )
  matrices = {}
  for i in range(2):
    h = f"transformer/h/{i}/"
    matrices[h + "attn/c_attn/kernel"] = qkv
    for name in ("attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
      matrices[f"{h}{name}/kernel"] = TRANSPOSE
  check_updates(gpt2.params, spec, matrices)


@pytest.mark.parametrize(
  "make",
  [
    lambda spec: optax_orth.muon(0.02, muon_weight_dimension_numbers=spec),
    lambda spec: optax_orth.normuon(weight_dimension_numbers=spec),
    lambda spec: optax_orth.namo_d(weight_dimension_numbers=spec),
  ],
  ids=["muon", "normuon", "namo_d"],
)
def test_gpt2_trains_as_its_routing_written_out(gpt2, make):
  params = gpt2.params
  read, written = optax_orth.route_by_model(gpt2, IDS), _gpt2_spec(params)
  trajectories = []
  for spec in (read, written):
    tx, p = make(spec), params
    state = tx.init(p)
    update = jax.jit(tx.update)
    for t in range(10):
      u, state = update(random_like(p, seed=t), state, p)
      p = jax.tree.map(jnp.add, p, u)
    trajectories.append(p)
  chex.assert_trees_all_close(*trajectories, rtol=1e-6, atol=1e-6)


# Hugging Face: Llama, headless Llama, Bloom, GPT-Neo -------------------------------


def _llama_config():
  return transformers.LlamaConfig(
    vocab_size=V,
    hidden_size=E,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
  )


def test_llama_per_head_with_grouped_kv():
  model, params = _hugging_face(transformers.FlaxLlamaForCausalLM, _llama_config())
  spec = optax_orth.route_by_model(model, IDS, params=params, per_head=True)
  a, m = "model/layers/0/self_attn/", "model/layers/0/mlp/"
  expected = {
    "lm_head/kernel": ADAM,
    "model/embed_tokens/embedding": ADAM,
    a + "q_proj/kernel": (ORTH, "4 x 32 x 8"),
    a + "k_proj/kernel": (ORTH, "2 x 32 x 8"),
    a + "v_proj/kernel": (ORTH, "2 x 32 x 8"),
    a + "o_proj/kernel": (ORTH, "4 x 8 x 32"),
    m + "gate_proj/kernel": (ORTH, "1 x 32 x 48"),
    m + "up_proj/kernel": (ORTH, "1 x 32 x 48"),
    m + "down_proj/kernel": (ORTH, "1 x 48 x 32"),
    "model/layers/0/input_layernorm/weight": ADAM,
    "model/layers/0/post_attention_layernorm/weight": ADAM,
    "model/norm/weight": ADAM,
  }
  assert matrices_column(params, spec) == expected
  assert rows(params, spec)["lm_head/kernel"][3].startswith("output head")
  matrices = {
    a + "q_proj/kernel": viewed((E, 4, 8), (1, 0, 2), (E, 8)),
    a + "k_proj/kernel": viewed((E, 2, 8), (1, 0, 2), (E, 8)),
    a + "v_proj/kernel": viewed((E, 2, 8), (1, 0, 2), (E, 8)),
    a + "o_proj/kernel": reshaped(8, E),
  }
  matrices |= {m + n: _same() for n in ("gate_proj/kernel", "up_proj/kernel")}
  matrices[m + "down_proj/kernel"] = _same()
  check_updates(params, spec, matrices)


def test_a_headless_llama_trunk_has_no_head():
  model, params = _hugging_face(transformers.FlaxLlamaModel, _llama_config())
  spec = optax_orth.route_by_model(model, IDS, params=params)
  table = matrices_column(params, spec)
  assert table["layers/0/mlp/down_proj/kernel"] == (ORTH, "1 x 48 x 32")
  assert table["layers/0/self_attn/k_proj/kernel"] == (ORTH, "1 x 32 x 16")
  assert [k for k, v in table.items() if v == ADAM] == [
    "embed_tokens/embedding",
    "layers/0/input_layernorm/weight",
    "layers/0/post_attention_layernorm/weight",
    "norm/weight",
  ]


@pytest.mark.parametrize("per_head", [False, True])
def test_bloom_interleaved_qkv(per_head):
  config = transformers.BloomConfig(vocab_size=V, hidden_size=E, n_layer=1, n_head=4)
  model, params = _hugging_face(transformers.FlaxBloomForCausalLM, config)
  spec = optax_orth.route_by_model(model, IDS, params=params, per_head=per_head)
  # Bloom's fused kernel (32, 96): output index = (head, q/k/v, head dim).
  h = "transformer/h/0/"
  table = matrices_column(params, spec)
  qkv = h + "self_attention/query_key_value/kernel"
  assert table[qkv] == (ORTH, "12 x 32 x 8" if per_head else "3 x 32 x 32")
  assert table["transformer/word_embeddings/embedding"] == ADAM
  if per_head:
    to_mats = viewed((E, 4, 3, 8), (1, 2, 0, 3), (E, 8))
  else:
    to_mats = viewed((E, 4, 3, 8), (2, 0, 1, 3), (E, E))
  matrices = {qkv: to_mats}
  if per_head:
    matrices[h + "self_attention/dense/kernel"] = reshaped(8, E)
  else:
    matrices[h + "self_attention/dense/kernel"] = _same()
  for name in ("dense_h_to_4h", "dense_4h_to_h"):
    matrices[f"{h}mlp/{name}/kernel"] = _same()
  check_updates(params, spec, matrices)


def test_gpt_neo_local_and_global_attention():
  config = transformers.GPTNeoConfig(
    vocab_size=V,
    hidden_size=E,
    num_layers=2,
    num_heads=4,
    attention_types=[[["global", "local"], 1]],
    max_position_embeddings=16,
    window_size=4,
  )
  model, params = _hugging_face(transformers.FlaxGPTNeoForCausalLM, config)
  spec = optax_orth.route_by_model(model, IDS, params=params)
  table = matrices_column(params, spec)
  for i in range(2):
    a, m = f"transformer/h/{i}/attn/attention/", f"transformer/h/{i}/mlp/"
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      assert table[f"{a}{n}/kernel"] == (ORTH, "1 x 32 x 32")
    assert table[m + "c_fc/kernel"] == (ORTH, "1 x 32 x 128")
    assert table[m + "c_proj/kernel"] == (ORTH, "1 x 128 x 32")
  assert table["transformer/wte/embedding"] == ADAM


# Equinox -----------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
def test_equinox_transformer(per_head):
  eqx = pytest.importorskip("equinox")
  model = rm.equinox_transformer(jax.random.key(0))
  tokens = jnp.zeros((5,), jnp.int32)
  spec = optax_orth.route_by_model(model, tokens, per_head=per_head)
  params = eqx.filter(model, eqx.is_inexact_array)
  table = matrices_column(params, spec)
  D, N, HD, FF = rm.D, rm.N, rm.D // rm.N, rm.FF
  assert table["head/weight"] == ADAM and table["embed/weight"] == ADAM
  matrices = {}
  for i in range(2):
    b = f"blocks/{i}/"
    for n in ("query_proj", "key_proj", "value_proj"):
      assert table[f"{b}attn/{n}/weight"] == (
        ORTH,
        f"{N} x {D} x {HD}" if per_head else f"1 x {D} x {D}",
      )
      # stored (out, in); the output index is (head, head dim)
      matrices[f"{b}attn/{n}/weight"] = (
        viewed((N, HD, D), (0, 2, 1), (D, HD)) if per_head else TRANSPOSE
      )
    assert table[b + "attn/output_proj/weight"] == (
      ORTH,
      f"{N} x {HD} x {D}" if per_head else f"1 x {D} x {D}",
    )
    matrices[b + "attn/output_proj/weight"] = (
      viewed((D, N, HD), (1, 2, 0), (HD, D)) if per_head else TRANSPOSE
    )
    assert table[b + "up/weight"] == (ORTH, f"1 x {D} x {FF}")
    assert table[b + "down/weight"] == (ORTH, f"1 x {FF} x {D}")
    matrices[b + "up/weight"] = matrices[b + "down/weight"] = TRANSPOSE
  check_updates(params, spec, matrices)


# Models written for these tests (tests/routing_models.py) -------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["stacked_kv", "fused_qkv"])
@pytest.mark.parametrize("per_head", [False, True])
def test_einsum_attention_with_stacked_projections(fused, per_head):
  model, params = _abstract(lambda: rm.EinsumLM(fused, nnx.Rngs(0)))
  spec = optax_orth.route_by_model(
    model, jnp.zeros((2, 5), jnp.int32), per_head=per_head
  )
  D, N, K, HD, FF = rm.D, rm.N, rm.K, rm.HD, rm.FF
  expected = {
    "embed/embedding": ADAM,  # the lookup and the tied head
    "norm/scale": ADAM,
    "up/kernel": (ORTH, f"2 x {D} x {FF}"),  # fused gate/up, split by jnp.split
    "down/kernel": (ORTH, f"1 x {FF} x {D}"),
    "attn/o/kernel": (ORTH, f"{N} x {HD} x {D}" if per_head else f"1 x {N * HD} x {D}"),
  }
  # (s, n, d, h) kernels: s (q/k/v) is indexed, so each a matrix; per head
  # also n.
  stacked = "attn/qkv/kernel" if fused else "attn/kv/kernel"
  s, n = (3, N) if fused else (2, K)
  if per_head:
    expected[stacked] = (ORTH, f"{s * n} x {D} x {HD}")
    to_stacked = viewed((s, n, D, HD), (0, 1, 2, 3), (D, HD))
  else:
    expected[stacked] = (ORTH, f"{s} x {D} x {n * HD}")
    to_stacked = viewed((s, n, D, HD), (0, 2, 1, 3), (D, n * HD))
  if not fused:
    expected["attn/q/kernel"] = (
      ORTH,
      f"{N} x {D} x {HD}" if per_head else f"1 x {D} x {N * HD}",
    )
  assert matrices_column(params, spec) == expected
  split = (
    lambda x: x.reshape(1, D, 2, FF).transpose(0, 2, 1, 3).reshape(2, D, FF),
    lambda m: m.reshape(2, D, FF).transpose(1, 0, 2).reshape(D, 2 * FF),
  )
  matrices = {
    stacked: to_stacked,
    "up/kernel": split,
    "down/kernel": _same(),
    "attn/o/kernel": reshaped(HD, D) if per_head else reshaped(N * HD, D),
  }
  if not fused:
    matrices["attn/q/kernel"] = (
      viewed((N, D, HD), (0, 1, 2), (D, HD))
      if per_head
      else viewed((N, D, HD), (1, 0, 2), (D, N * HD))
    )
  check_updates(params, spec, matrices)


@pytest.mark.parametrize("kind", ["rnn", "scan", "linen"])
def test_recurrent_input_projection_is_hidden(kind):
  x = jnp.zeros((2, 7, 3))
  if kind == "linen":
    model = rm.LinenRecurrent()
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = random_like(shapes, seed=9)
    cell = {"SimpleCell_0/h/kernel", "SimpleCell_0/i/kernel"}
  else:
    model, params = _abstract(lambda: rm.RecurrentNet(kind, nnx.Rngs(0)))
    cell = (
      {"rnn/cell/dense_h/kernel", "rnn/cell/dense_i/kernel"}
      if kind == "rnn"
      else {"cell/kernel"}
    )
  spec = optax_orth.route_by_model(model, x)
  table = rows(params, spec)
  orthogonal = {k for k, v in table.items() if v[1] == ORTH}
  assert orthogonal == cell | {"proj/kernel"}
  assert table["head/kernel"][3].startswith("output head")
  check_updates(params, spec, {k: _same() for k in orthogonal})


def test_grouped_convolution_is_one_matrix_per_group_and_depthwise_is_adam():
  model, params = _abstract(lambda: rm.GroupedConvNet(nnx.Rngs(0)))
  spec = optax_orth.route_by_model(model, jnp.zeros((2, 6, 6, 3)))
  table = rows(params, spec)
  assert table["stem/kernel"][1:3] == (ORTH, "1 x 27 x 8")
  assert table["grouped/kernel"][1:3] == (ORTH, "2 x 36 x 4")
  assert table["depthwise/kernel"] == (
    "(3, 3, 1, 8)",
    "adam",
    "-",
    "conv_general_dilated, depthwise (one input channel per group)",
  )
  assert table["fc/kernel"][1:3] == ADAM
  # group g's kernel: input channels of group g (all of the stored axis 2),
  # output channels g * 4 ... g * 4 + 3
  grouped = viewed((9 * 4, 2, 4), (1, 0, 2), (36, 4))
  check_updates(
    params, spec, {"stem/kernel": reshaped(27, 8), "grouped/kernel": grouped}
  )


def test_two_heads_both_go_to_adam():
  model, params = _abstract(lambda: rm.TwoHeads(nnx.Rngs(0)))
  table = rows(params, optax_orth.route_by_model(model, jnp.zeros((2, 6))))
  assert {k for k, v in table.items() if v[1] == ORTH} == {
    "trunk1/kernel",
    "trunk2/kernel",
  }
  for head in ("policy/kernel", "value/kernel"):
    assert table[head][3].startswith("output head"), head


def test_the_spec_fits_the_pure_dict_and_nnx_optimizer_trains_with_it():
  model, params = _abstract(lambda: rm.EinsumLM(True, nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: 0.3 * x, params))
  nnx.update(model, state)  # random weights, without the initializers' compiles
  tokens = jnp.ones((2, 5), jnp.int32)
  spec = optax_orth.route_by_model(model, tokens, per_head=True)
  state = nnx.state(model, nnx.Param)
  assert rows(nnx.to_pure_dict(state), spec) == rows(state, spec)
  optimizer = nnx.Optimizer(
    model, optax_orth.namo(weight_dimension_numbers=spec), wrt=nnx.Param
  )

  def loss(model):
    logits = model(tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 1])

  @nnx.jit
  def step(model, optimizer):
    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value

  losses = [float(step(model, optimizer)) for _ in range(4)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_vit_patch_convolution_and_a_learned_class_token():
  config = transformers.ViTConfig(
    hidden_size=E,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=8,
    num_labels=3,
  )
  model, params = _hugging_face(transformers.FlaxViTForImageClassification, config)
  with warnings.catch_warnings():
    warnings.simplefilter("error", optax_orth.RoutingWarning)  # nothing to report
    spec = optax_orth.route_by_model(model, jnp.zeros((1, 3, 16, 16)), params=params)
  table = rows(params, spec)
  patches = "vit/embeddings/patch_embeddings/projection/kernel"
  assert table[patches][1:3] == (ORTH, "1 x 192 x 32")  # (8, 8, 3, 32)
  # (1, 1, 32), concatenated in front of the patches: a vector
  assert table["vit/embeddings/cls_token"][1:] == (
    "adam",
    "-",
    "used only through concatenate, a vector",
  )
  assert table["classifier/kernel"][3].startswith("output head")
  dense = {k for k, v in table.items() if v[1] == ORTH and k != patches}
  assert len(dense) == 6 and all(table[k][3] == DOT for k in dense)
  matrices = {k: _same() for k in dense}
  check_updates(params, spec, matrices | {patches: reshaped(192, E)})


@pytest.mark.parametrize("top1", [True, False], ids=["top1", "dense"])
def test_mixture_of_experts(top1):
  model, params = _abstract(lambda: rm.MoE(top1, nnx.Rngs(0)))
  spec = optax_orth.route_by_model(model, jnp.zeros((2, 5, rm.D)))
  table = matrices_column(params, spec)
  D, FF = rm.D, rm.FF
  # top-1: each token's expert matrices are picked by the data (a gather of
  # whole matrices, not a lookup); dense: every expert is applied, so w_in
  # is one map from D to all experts' FF (see docs/routing.md), while w_out
  # is batched over the experts
  assert table["w_in"] == (ORTH, f"4 x {D} x {FF}" if top1 else f"1 x {D} x {4 * FF}")
  assert table["w_out"] == (ORTH, f"4 x {FF} x {D}")
  assert table["router/kernel"] == (ORTH, f"1 x {D} x 4")
  assert table["head/kernel"] == ADAM
  w_in = reshaped(D, FF) if top1 else viewed((4, D, FF), (1, 0, 2), (D, 4 * FF))
  matrices = {"w_in": w_in, "w_out": reshaped(FF, D), "router/kernel": _same()}
  check_updates(params, spec, matrices)


def test_a_one_hot_product_is_an_embedding_and_float_features_are_not():
  def one_hot_lm(params, tokens):  # the embedding as a one-hot matmul, tied
    x = jax.nn.one_hot(tokens, 20) @ params["embed"]
    return jnp.tanh(x @ params["hidden"]) @ params["embed"].T

  def time_mlp(params, t):  # sinusoidal features of an integer input
    features = jnp.sin(t[:, None].astype(jnp.float32) * jnp.arange(1, 9))
    return jnp.tanh(features @ params["first"]) @ params["head"]

  lm = {"embed": jnp.zeros((20, 8)), "hidden": jnp.zeros((8, 8))}
  table = rows(lm, optax_orth.route_by_model(one_hot_lm, IDS, params=lm))
  assert table["embed"][1:] == (
    "adam",
    "-",
    "one-hot dot_general (an embedding lookup), also a dot_general (a tied "
    "output head)",
  )
  assert table["hidden"][1:] == ("orthogonal", "1 x 8 x 8", DOT)
  mlp = {"first": jnp.zeros((8, 16)), "head": jnp.zeros((16, 3))}
  t = jnp.zeros((4,), jnp.int32)
  table = rows(mlp, optax_orth.route_by_model(time_mlp, t, params=mlp))
  assert table["first"][1:] == ("orthogonal", "1 x 8 x 16", DOT)
  assert table["head"][3].startswith("output head")
