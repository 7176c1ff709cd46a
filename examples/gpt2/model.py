"""A compact GPT-2 in Flax NNX, in the style of nanoGPT.

Pre-LayerNorm transformer blocks, LayerNorms without bias, dense layers
without bias, learned position embeddings and an output head tied to the token
embedding (``logits = h @ wte.T``). Initialization as nanoGPT: normal with
standard deviation ``0.02``, and ``0.02 / sqrt(2 n_layer)`` for the two
projections that write into the residual stream.

Parameter paths (as :func:`optax_orth.routing_table` prints them) are
``wte/embedding``, ``wpe/embedding``, ``blocks/<i>/{ln1,ln2}/scale``,
``blocks/<i>/attn/{qkv,proj}/kernel``, ``blocks/<i>/mlp/{fc,proj}/kernel`` and
``ln_f/scale``. With :func:`optax_orth.route_by_path` the embeddings and the
norm scales go to AdamW and the four kernels of each block to the orthogonal
optimizer, as in the NAMO and NorMuon references.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Shape of the model.

  Attributes:
    vocab_size: size of the token vocabulary (256 for bytes; GPT-2's 50257 is
      padded to 50304 by :func:`padded_vocab_size`).
    seq_len: context length (number of position embeddings).
    n_layer: number of transformer blocks.
    n_head: attention heads per block.
    d_model: width of the residual stream.
    mlp_ratio: hidden width of the MLP over ``d_model``.
  """

  vocab_size: int = 256
  seq_len: int = 128
  n_layer: int = 4
  n_head: int = 4
  d_model: int = 128
  mlp_ratio: int = 4

  def __post_init__(self):
    for field in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
      if getattr(self, field) < 1:
        raise ValueError(f"GPTConfig.{field} must be >= 1, got {getattr(self, field)}.")
    if self.d_model % self.n_head:
      raise ValueError(
        f"GPTConfig.d_model={self.d_model} is not a multiple of n_head={self.n_head}."
      )


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
  """Rounds ``vocab_size`` up to a multiple (nanoGPT pads 50257 to 50304)."""
  return multiple * math.ceil(vocab_size / multiple)


def _dense(d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=False,
    kernel_init=nnx.initializers.normal(std),
    rngs=rngs,
  )


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with a fused ``(d, 3d)`` QKV kernel."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.n_head = cfg.n_head
    self.qkv = _dense(d, 3 * d, 0.02, rngs)
    self.proj = _dense(d, d, 0.02 / math.sqrt(2 * cfg.n_layer), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    heads = lambda z: z.reshape(b, t, self.n_head, d // self.n_head)
    y = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    return self.proj(y.reshape(b, t, d))


class MLP(nnx.Module):
  """``proj(gelu(fc(x)))``, hidden width ``mlp_ratio * d_model``."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    self.fc = _dense(d, h, 0.02, rngs)
    self.proj = _dense(h, d, 0.02 / math.sqrt(2 * cfg.n_layer), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(jax.nn.gelu(self.fc(x)))


class Block(nnx.Module):
  """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(cfg.d_model, use_bias=False, rngs=rngs)
    self.attn = CausalSelfAttention(cfg, rngs=rngs)
    self.ln2 = nnx.LayerNorm(cfg.d_model, use_bias=False, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
  """GPT-2: token + position embeddings, blocks, final LayerNorm, tied head."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, rngs=rngs)
    self.wpe = nnx.Embed(cfg.seq_len, cfg.d_model, embedding_init=init, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``(batch, time, vocab_size)`` for int tokens ``(batch, time)``."""
    t = tokens.shape[-1]
    if t > self.cfg.seq_len:
      raise ValueError(
        f"sequence of length {t} is longer than the model's seq_len={self.cfg.seq_len}."
      )
    x = self.wte(tokens) + self.wpe(jnp.arange(t))
    for block in self.blocks:
      x = block(x)
    return self.wte.attend(self.ln_f(x))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats, computed in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


def count_params(params) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
