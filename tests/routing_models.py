"""Models written for the route_by_model tests: a scan-over-layers NNX
transformer, and layouts that class tables misread (Einsum attention with
stacked k/v and q/k/v axes, recurrent nets with an input projection, grouped
and depthwise convolutions, two heads)."""

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

D, N, K, HD, FF, V = 8, 4, 2, 4, 16, 20
L, H = 3, 2  # layers and heads of ScannedTransformer
TOKENS = jnp.zeros((2, 5), jnp.int32)


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


class EinsumAttention(nnx.Module):
  """Gemma-style: q (N, D, HD); k and v stacked (2, K, D, HD), or q, k, v
  stacked (3, N, D, HD); output (N, HD, D). GQA when k/v are separate."""

  def __init__(self, fused: bool, rngs):
    self.fused = fused
    if fused:
      self.qkv = nnx.Einsum("btd,sndh->sbtnh", (3, N, D, HD), rngs=rngs)
    else:
      self.q = nnx.Einsum("btd,ndh->btnh", (N, D, HD), rngs=rngs)
      self.kv = nnx.Einsum("btd,sndh->sbtnh", (2, K, D, HD), rngs=rngs)
    self.o = nnx.Einsum("btnh,nhd->btd", (N, HD, D), rngs=rngs)

  def __call__(self, x):
    if self.fused:
      q, k, v = self.qkv(x)
    else:
      q = self.q(x)
      k, v = self.kv(x)
      k, v = (jnp.repeat(a, N // K, axis=2) for a in (k, v))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(HD)
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
    return self.o(out)


class EinsumLM(nnx.Module):
  def __init__(self, fused: bool, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.attn = EinsumAttention(fused, rngs)
    self.norm = nnx.RMSNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, 2 * FF, use_bias=False, rngs=rngs)  # fused gate/up
    self.down = nnx.Linear(FF, D, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attn(self.norm(x))
    gate, up = jnp.split(self.up(x), 2, axis=-1)
    x = x + self.down(jax.nn.silu(gate) * up)
    return self.embed.attend(self.norm(x))  # tied head


class RecurrentNet(nnx.Module):
  """An input projection in front of a recurrent layer, and a head."""

  def __init__(self, kind: str, rngs):
    self.kind = kind
    self.proj = nnx.Linear(3, D, rngs=rngs)
    if kind == "rnn":
      self.rnn = nnx.RNN(nnx.SimpleCell(D, D, rngs=rngs))
    else:  # a hand-written nnx.scan over time
      self.cell = nnx.Linear(D, D, rngs=rngs)
    self.head = nnx.Linear(D, 5, rngs=rngs)

  def __call__(self, x):  # (batch, time, 3)
    x = self.proj(x)
    if self.kind == "rnn":
      h = self.rnn(x)
    else:

      @nnx.scan(in_axes=(nnx.Carry, None, 1), out_axes=(nnx.Carry, 1))
      def step(h, cell, xt):
        h = jnp.tanh(xt + cell(h))
        return h, h

      _, h = step(jnp.zeros((x.shape[0], D)), self.cell, x)
    return self.head(h[:, -1])


class LinenRecurrent(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="proj")(x)
    h = nn.RNN(nn.SimpleCell(D), name="rnn")(x)
    return nn.Dense(5, name="head")(h[:, -1])


class GroupedConvNet(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs)
    self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
    self.fc = nnx.Linear(8, 5, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    x = nnx.relu(self.depthwise(nnx.relu(self.grouped(x))))
    return self.fc(x.mean(axis=(1, 2)))


class TwoHeads(nnx.Module):
  """A trunk with a policy head and a value head."""

  def __init__(self, rngs):
    self.trunk1 = nnx.Linear(6, 16, rngs=rngs)
    self.trunk2 = nnx.Linear(16, 16, rngs=rngs)
    self.policy = nnx.Linear(16, 4, rngs=rngs)
    self.value = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.trunk2(nnx.relu(self.trunk1(x))))
    return jax.nn.log_softmax(self.policy(h)), self.value(h)[..., 0]


class MoE(nnx.Module):
  """Experts stacked (E, D, FF) and (E, FF, D): top-1 routing picks each
  token's expert matrices by the data (a gather); dense routing applies
  every expert and weighs the outputs."""

  def __init__(self, top1: bool, rngs, experts: int = 4):
    self.top1 = top1
    self.router = nnx.Linear(D, experts, rngs=rngs)
    init = nnx.initializers.lecun_normal()
    self.w_in = nnx.Param(init(rngs.params(), (experts, D, FF)))
    self.w_out = nnx.Param(init(rngs.params(), (experts, FF, D)))
    self.head = nnx.Linear(D, 5, rngs=rngs)

  def __call__(self, x):  # (batch, time, D)
    logits = self.router(x)
    if self.top1:
      expert = jnp.argmax(logits, axis=-1)
      h = jax.nn.gelu(jnp.einsum("btd,btdf->btf", x, self.w_in[...][expert]))
      y = jnp.einsum("btf,btfd->btd", h, self.w_out[...][expert])
    else:
      h = jax.nn.gelu(jnp.einsum("btd,edf->btef", x, self.w_in[...]))
      gates = jax.nn.softmax(logits, axis=-1)
      y = jnp.einsum("btef,efd,bte->btd", h, self.w_out[...], gates)
    return self.head(x + y)


def equinox_transformer(key):
  """A small Equinox transformer (a list of blocks, a separate head)."""
  import equinox as eqx

  class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, key):
      k1, k2, k3 = jax.random.split(key, 3)
      self.norm1, self.norm2 = eqx.nn.LayerNorm(D), eqx.nn.LayerNorm(D)
      self.attn = eqx.nn.MultiheadAttention(N, D, key=k1)
      self.up = eqx.nn.Linear(D, FF, key=k2)
      self.down = eqx.nn.Linear(FF, D, key=k3)

    def __call__(self, x):  # (seq, D)
      y = jax.vmap(self.norm1)(x)
      x = x + self.attn(y, y, y)
      y = jax.vmap(self.norm2)(x)
      return x + jax.vmap(lambda t: self.down(jax.nn.gelu(self.up(t))))(y)

  class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    head: eqx.nn.Linear

    def __init__(self, key):
      k1, k2, k3 = jax.random.split(key, 3)
      self.embed = eqx.nn.Embedding(V, D, key=k1)
      self.blocks = [Block(k) for k in jax.random.split(k2, 2)]
      self.head = eqx.nn.Linear(D, V, key=k3)

    def __call__(self, tokens):  # (seq,)
      x = jax.vmap(self.embed)(tokens)
      for block in self.blocks:
        x = block(x)
      return jax.vmap(self.head)(x)

  return Transformer(key)
