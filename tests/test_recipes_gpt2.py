"""The new optimizers train the GPT-2 example's model at its ``smoke`` preset.

``benchmarks/gpt2/harness.py`` builds only the anchor optimizers, so this test
builds each new alias and recipe itself on the example's model and data (the
``smoke`` preset's shape, batch and number of steps) and checks that the
training loss falls. MuonClip gets its per-head maximum logits from a forward
pass of the attention, as the example would need to provide them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_orth

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "gpt2"))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpt2"))

import data as data_lib  # noqa: E402
import harness as train_lib  # noqa: E402
import model as model_lib  # noqa: E402

SMOKE = train_lib.PRESETS["smoke"]
ADAM_LR = 3e-3


def _config():
  cfg = train_lib.TrainConfig(**SMOKE)
  return cfg, model_lib.GPTConfig(
    vocab_size=256,
    seq_len=cfg.seq_len,
    n_layer=cfg.n_layer,
    n_head=cfg.n_head,
    d_model=cfg.d_model,
  )


def max_logits(model: model_lib.GPT, tokens: jax.Array) -> dict[str, jax.Array]:
  """``{"blocks/<i>": (n_head,)}``: each head's largest causal logit."""
  t = tokens.shape[-1]
  x = model.wte(tokens) + model.wpe(jnp.arange(t))
  out = {}
  for i, block in enumerate(model.blocks):
    q, k, _ = jnp.split(block.attn.qkv(block.ln1(x)), 3, axis=-1)
    q, k = (z.reshape(*z.shape[:2], block.attn.n_head, -1) for z in (q, k))
    s = jnp.einsum("bihd,bjhd->bhij", q, k) / jnp.sqrt(q.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    out[f"blocks/{i}"] = jax.lax.stop_gradient(s.max(axis=(0, 2, 3)))
    x = block(x)
  return out


def _qk_targets(mcfg):
  d = mcfg.d_model
  return {
    f"blocks/{i}/attn/qkv/kernel": (
      optax_orth.QKClipSlice(f"blocks/{i}", mcfg.n_head, axis=1, stop=d),
      optax_orth.QKClipSlice(f"blocks/{i}", mcfg.n_head, axis=1, start=d, stop=2 * d),
    )
    for i in range(mcfg.n_layer)
  }


def _muonh(spec):
  orthogonal = optax.chain(
    optax_orth.orthogonalize_momentum(0.95, weight_dimension_numbers=spec),
    optax_orth.scale_by_hyperball(0.05, weight_dimension_numbers=spec),
  )
  return optax.partition(
    {"orthogonal": orthogonal, "adam": optax.adamw(ADAM_LR, b2=0.95)},
    lambda p: optax_orth.layout.label_tree(p, spec),
  )


def _optimizers(mcfg):
  spec = optax_orth.route_by_path()
  adam = {"adam_learning_rate": ADAM_LR}
  return {
    "adamuon": optax_orth.adamuon(ADAM_LR, **adam),
    "muon_cwd": optax_orth.muon(
      0.02, weight_decay=0.1, cautious_weight_decay=True,
      muon_weight_dimension_numbers=spec, **adam,
    ),
    "namo_d_cwd": optax_orth.namo_d(1e-2, cautious_weight_decay=True, **adam),
    "normuon_larger": optax.partition(
      {
        "orthogonal": optax.chain(
          optax_orth.orthogonalize_momentum(0.95, weight_dimension_numbers=spec),
          optax_orth.scale_by_neuron_rms(axis="larger", weight_dimension_numbers=spec),
          optax_orth.scale_by_shape(spec),
          optax_orth.add_cautious_weight_decay(0.025),
          optax.scale_by_learning_rate(0.02),
        ),
        "adam": optax.adamw(ADAM_LR, b2=0.95),
      },
      lambda p: optax_orth.layout.label_tree(p, spec),
    ),
    "muonh": _muonh(spec),
    "muon_clip": optax.chain(
      optax_orth.muon(0.02, muon_weight_dimension_numbers=spec, **adam),
      optax_orth.qk_clip(_qk_targets(mcfg), threshold=0.05),
    ),
  }  # fmt: skip


@pytest.fixture(scope="module")
def setup():
  cfg, mcfg = _config()
  train_tok, _, _ = train_lib.load_config_splits(cfg)
  graphdef, params = train_lib.init_params(mcfg, cfg.seed)
  batches = [
    data_lib.sample_batch(train_tok, cfg.batch_size, cfg.seq_len, cfg.seed, s)
    for s in range(cfg.steps)
  ]
  return mcfg, graphdef, params, batches


def _train(tx, graphdef, params, batches, clip: bool):
  def loss_fn(p, x, y):
    return model_lib.cross_entropy(nnx.merge(graphdef, p)(x), y)

  @jax.jit
  def step(p, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    extra = {"max_logits": max_logits(nnx.merge(graphdef, p), x)} if clip else {}
    updates, state = tx.update(grads, state, p, **extra)
    return optax.apply_updates(p, updates), state, loss, extra

  state, losses, gammas = tx.init(params), [], []
  for x, y in batches:
    params, state, loss, _ = step(params, state, x, y)
    losses.append(float(loss))
    if clip:  # the gamma that qk_clip applied at this step, per layer
      gammas.append({k: np.asarray(v) for k, v in state[1].scale.items()})
  return losses, gammas


@pytest.mark.parametrize(
  "name", ["adamuon", "muon_cwd", "namo_d_cwd", "normuon_larger", "muonh", "muon_clip"]
)
def test_new_optimizers_train_the_smoke_gpt2(setup, name):
  mcfg, graphdef, params, batches = setup
  tx = _optimizers(mcfg)[name]
  losses, gammas = _train(tx, graphdef, params, batches, clip=name == "muon_clip")
  assert np.all(np.isfinite(losses)), losses
  first, last = np.mean(losses[:2]), np.mean(losses[-2:])
  print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  assert last < first - 0.05, (name, losses)
  if name == "muon_clip":
    g = np.stack([step[f"blocks/{i}"] for step in gammas for i in range(mcfg.n_layer)])
    assert np.all(g <= 1.0) and np.any(g < 1.0), g  # some heads were clipped
    print(f"  clipped (head, step) pairs: {int(np.sum(g < 1))} of {g.size}")
