"""Nothing is routed silently: warnings, strict mode, named spec errors, pytrees."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import optax_orth
from optax_orth import MuonDimensionNumbers as DN
from optax_orth._src import routing
from optax_orth.layout import label_tree
from tests.routing_check import rows
from tests.routing_models import TOKENS, ScannedTransformer


@pytest.fixture
def fresh_default():
  """The default routing reports each leaf once per process: forget them."""
  routing.default_routing().__dict__.pop("_reported", None)
  yield routing.default_routing()
  routing.default_routing().__dict__.pop("_reported", None)


def _routing_warnings(record):
  return [w for w in record if issubclass(w.category, optax_orth.RoutingWarning)]


def test_default_warns_once_on_the_scanned_model(fresh_default):
  model = ScannedTransformer(nnx.Rngs(0))
  grads = nnx.state(model, nnx.Param)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    optimizer = nnx.Optimizer(model, optax_orth.namo(1e-2), wrt=nnx.Param)
    for _ in range(2):
      optimizer.update(model, grads)
  (warning,) = _routing_warnings(record)
  message = str(warning.message)
  assert "route_by_model" in message
  for name in ("blocks/attn/query/kernel", "blocks/up/kernel", "blocks/down/kernel"):
    assert f"{name} (3, " in message
  assert "rank 4, no rule -> adam" in message
  assert warning.filename == __file__  # points at the user's line


def test_strict_is_an_error_and_route_by_model_is_quiet():
  model = ScannedTransformer(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  strict = optax_orth.route_by_path(strict=True)
  with pytest.raises(ValueError, match=r"blocks/up/kernel \(3, 8, 16\)"):
    optax_orth.namo_d(weight_dimension_numbers=strict).init(state)
  spec = optax_orth.route_by_model(model, TOKENS, strict=True)
  with warnings.catch_warnings():
    warnings.simplefilter("error", optax_orth.RoutingWarning)
    optax_orth.normuon(weight_dimension_numbers=spec).init(state)


def test_unused_and_inconsistent_leaves_are_reported():
  class Custom(nnx.Module):
    def __init__(self, rngs):
      self.unused = nnx.Param(jnp.zeros((5, 8)))  # never read by the call
      self.both = nnx.Param(jnp.zeros((8, 8)))  # read as (in, out) and (out, in)
      self.lin = nnx.Linear(8, 8, rngs=rngs)
      self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(self.lin(x @ self.both[...] + x @ self.both[...].T))

  model, x = Custom(nnx.Rngs(0)), jnp.zeros((2, 8))
  with pytest.warns(optax_orth.RoutingWarning) as record:
    spec = optax_orth.route_by_model(model, x)
  messages = sorted(str(w.message) for w in _routing_warnings(record))
  assert len(messages) == 2
  assert "leaf 'both': it is used as" in messages[0]
  assert "overrides={'^both$': None}" in messages[0]
  assert "leaf 'unused': it is not used by the traced call" in messages[1]
  assert all(w.filename == __file__ for w in record)
  table = rows(nnx.state(model, nnx.Param), spec)
  assert table["lin/kernel"][1:3] == ("orthogonal", "1 x 8 x 8")
  assert table["both"][1:] == ("adam", "-", "used in incompatible ways")
  assert table["unused"][1:] == ("adam", "-", "not used by the traced call")
  with pytest.raises(ValueError, match=r"leaf 'both'.*strict=True"):
    optax_orth.route_by_model(model, x, strict=True)
  # An override settles a leaf and silences its warning.
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    spec = optax_orth.route_by_model(
      model, x, overrides={r"^both$": DN(0, 1), r"^unused$": None}
    )
  assert not _routing_warnings(record)
  table = rows(nnx.state(model, nnx.Param), spec)
  assert table["both"][1:] == ("orthogonal", "1 x 8 x 8", "override '^both$'")


def test_rules_see_nnx_names_without_value_and_unmatched_rules_are_reported():
  model = ScannedTransformer(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  spec = optax_orth.route_by_path({r"blocks/(up|down)/kernel$": DN(1, 2)})
  with pytest.warns(optax_orth.RoutingWarning):  # attention kernels: no rule
    labels = label_tree(state, spec)
  assert labels["blocks"]["up"]["kernel"].get_value() == "orthogonal"
  typo = optax_orth.route_by_path({r"blocks/.*/kernal$": DN(1, 2)})
  with pytest.warns(optax_orth.RoutingWarning, match="match no leaf") as record:
    label_tree(state, typo)
  assert "blocks/.*/kernal$" in str(record[0].message)
  strict = optax_orth.route_by_path({r"blocks/.*/kernal$": DN(1, 2)}, strict=True)
  with pytest.raises(ValueError, match="kernal"):
    label_tree(state, strict)


def test_overrides_win_and_unmatched_overrides_are_reported():
  model = ScannedTransformer(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  spec = optax_orth.route_by_model(model, TOKENS, overrides={r"blocks/up/kernel": None})
  table = optax_orth.routing_table(state, spec)
  assert (
    "| blocks/up/kernel | (3, 8, 16) | adam | - | override 'blocks/up/kernel' |"
    in table
  )
  spec = optax_orth.route_by_model(model, TOKENS, overrides={r"blocks/upp/": None})
  with pytest.warns(optax_orth.RoutingWarning, match="blocks/upp/"):
    label_tree(state, spec)


def test_typo_in_a_nested_spec_key_is_named():
  params = {"attn": {"k": jnp.zeros((8, 8)), "q": jnp.zeros((8, 8))}}
  spec = {"attn": {"kk": DN(), "q": DN()}}
  with pytest.raises(ValueError) as err:
    optax_orth.namo(weight_dimension_numbers=spec).init(params)
  assert "leaf 'attn/k' (8, 8) has no entry; did the entry 'attn/kk' mean it?" in str(
    err.value
  )
  with pytest.raises(ValueError, match="'extra'"):
    label_tree({"w": jnp.zeros((2, 2))}, {"w": DN(), "extra": DN()})
  with pytest.raises(ValueError, match="'w' is 'matrix'"):
    label_tree({"w": jnp.zeros((2, 2))}, {"w": "matrix"})


def test_spec_trees_fit_any_container():
  @jax.tree_util.register_dataclass
  @dataclasses.dataclass
  class Layer:
    kernel: jax.Array
    bias: jax.Array | None

  params = [Layer(jnp.zeros((4, 6)), None), (Layer(jnp.zeros((6, 2)), jnp.zeros(2)),)]
  spec = ({"kernel": DN(), "bias": None}, [{"kernel": None, "bias": None}])
  labels = label_tree(params, spec)
  assert labels[0].kernel == "orthogonal" and labels[0].bias is None
  assert labels[1][0].kernel == "adam"
  model = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  pure_spec = {"kernel": DN(), "bias": None}  # a pure dict for an nnx.State
  assert label_tree(state, pure_spec)["kernel"].get_value() == "orthogonal"


def test_head_name_patterns():
  names = [
    "classifier",
    "cls_head",
    "logits",
    "decoder",
    "unembed",
    "output_head",
  ]
  params = {n: {"kernel": jnp.zeros((4, 4))} for n in names}
  params["decoder_stack"] = {"decoder": {"layers_0": {"kernel": jnp.zeros((4, 4))}}}
  params["mlp"] = {"fc": {"kernel": jnp.zeros((4, 4))}}
  labels = label_tree(params, None)
  assert all(labels[n]["kernel"] == "adam" for n in names)
  assert labels["decoder_stack"]["decoder"]["layers_0"]["kernel"] == "orthogonal"
  assert labels["mlp"]["fc"]["kernel"] == "orthogonal"  # GPT-2's hidden layer


def test_tied_embedding_head_is_the_embedding():
  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(20, 8, rngs=rngs)
      self.proj = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, tokens):
      return self.embed.attend(self.proj(self.embed(tokens)))

  model = Tied(nnx.Rngs(0))
  table = optax_orth.routing_table(
    nnx.state(model, nnx.Param), optax_orth.route_by_model(model, TOKENS)
  )
  dot = "dot_general: fan-in axis 0, fan-out axis 1"
  assert f"| proj/kernel | (8, 8) | orthogonal | 1 x 8 x 8 | {dot} |" in table
  tied = "gather (an embedding lookup), also a dot_general (a tied output head)"
  assert f"| embed/embedding | (20, 8) | adam | - | {tied} |" in table


def test_linen_with_partitioning_boxes_are_read_and_train():
  # nn.with_partitioning wraps kernels in nn.Partitioned boxes; their shapes
  # are read through the box (this raised ZeroDivisionError before), and the
  # boxed parameter tree trains with the spec.
  import flax.linen as nn
  import numpy as np
  import optax

  init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(32, kernel_init=init)(x))
      x = nn.relu(nn.Dense(24, kernel_init=init)(x))
      return nn.Dense(8)(x)

  model, x = MLP(), jnp.ones((2, 16))
  spec = optax_orth.route_by_model(model, x)
  params = model.init(jax.random.key(0), x)["params"]
  table = optax_orth.routing_table(params, spec)
  assert "| Dense_0/kernel | (16, 32) | orthogonal |" in table.replace("params/", "")
  assert "| Dense_1/kernel | (32, 24) | orthogonal |" in table.replace("params/", "")
  opt = optax_orth.muon(0.02, muon_weight_dimension_numbers=spec)
  state = opt.init(params)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  grads = treedef.unflatten(
    [jax.random.normal(k, v.shape) for k, v in zip(keys, leaves, strict=True)]
  )
  updates, _ = opt.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  kernel = nn.meta.unbox(updates["Dense_1"]["kernel"])
  s = np.linalg.svd(np.asarray(kernel), compute_uv=False)  # orthogonalized
  assert isinstance(new["Dense_0"]["kernel"], nn.Partitioned)
  assert s.max() / s.min() < 2.0  # a Gaussian 32 x 24 has about 14


def test_a_projection_that_is_both_head_and_hidden_is_reported():
  class Both(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(8, 8, rngs=rngs)
      self.b = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      h = self.a(x)  # returned, and fed to b
      return h, self.b(nnx.relu(h))

  model, x = Both(nnx.Rngs(0)), jnp.zeros((2, 8))
  with pytest.warns(optax_orth.RoutingWarning) as record:
    spec = optax_orth.route_by_model(model, x)
  (message,) = [str(w.message) for w in _routing_warnings(record)]
  assert (
    "leaf 'a/kernel'" in message and "both a hidden layer and an output head" in message
  )
  assert "overrides={'^a/kernel$': None}" in message
  table = rows(nnx.state(model, nnx.Param), spec)
  assert table["a/kernel"][1:3] == ("orthogonal", "1 x 8 x 8")  # kept, and said
  assert table["a/kernel"][3].endswith("also reaches the output directly")
  assert table["b/kernel"][3].startswith("output head")
  # The override settles it: a head, quietly.
  with warnings.catch_warnings():
    warnings.simplefilter("error", optax_orth.RoutingWarning)
    spec = optax_orth.route_by_model(model, x, overrides={r"^a/kernel$": None})
  assert spec.decisions["a/kernel"].dimension_numbers is not None  # the reading
  assert rows(nnx.state(model, nnx.Param), spec)["a/kernel"][1] == "adam"


def test_each_report_advises_the_keyword_of_its_caller(fresh_default):
  params = {"blocks": {"w": jnp.zeros((3, 4, 4))}, "embed": jnp.zeros((10, 4))}
  grads = jax.tree.map(jnp.ones_like, params)
  reports = {}
  for name, tx in (
    ("muon", optax_orth.muon(0.02)),  # optax's rule: muon's own keyword
    ("namo", optax_orth.namo()),  # route_by_path: weight_dimension_numbers
  ):
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      tx.update(grads, tx.init(params), params)
    (reports[name],) = [str(w.message) for w in _routing_warnings(record)]
  assert "muon_weight_dimension_numbers=optax_orth.route_by_model(" in reports["muon"]
  assert "Pass weight_dimension_numbers=" not in reports["muon"]
  assert "Pass weight_dimension_numbers=optax_orth.route_by_model(" in reports["namo"]
