"""What route_by_model costs: seconds to read a model, beside one trace.

For each model, in one run: the time of ``jax.make_jaxpr`` of one forward
pass (the trace route_by_model needs), and of ``route_by_model`` (trace and
read), best of ``--repeats``, each repeat on a new function so that no trace
is reused from jax's cache; their ratio is the reader's overhead. Inputs
and parameters are abstract (``jax.ShapeDtypeStruct``); the peak RSS of the
whole run, printed beside the parameter bytes of the largest model, shows
that nothing is allocated at model size.

Models: a scan-stacked Flax NNX transformer (``--layers`` layers, width
``--width``, one ``nnx.scan``), the same with ``per_head=True``, and Hugging
Face's Flax GPT-2 (unrolled, ``--hf-layers`` layers of width 768) when
transformers is installed.

Usage: ``python benchmarks/bench_route_by_model.py [--layers 24]
[--out benchmarks/results/route_by_model_cpu.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

import optax_orth


def scanned_transformer(layers: int, width: int, heads: int, vocab: int):
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.ln1 = nnx.LayerNorm(width, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
      self.ln2 = nnx.LayerNorm(width, rngs=rngs)
      self.up = nnx.Linear(width, 4 * width, rngs=rngs)
      self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x):
      x = x + self.attn(self.ln1(x))
      return x + self.down(nnx.gelu(self.up(self.ln2(x))))

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(vocab, width, rngs=rngs)

      @nnx.split_rngs(splits=layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(rngs)

      self.blocks = make(rngs)
      self.out = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def forward(x, block):
        return block(x)

      return self.out(forward(self.embed(tokens), self.blocks))

  # nnx.eval_shape: the model's structure with abstract arrays, nothing allocated
  return nnx.eval_shape(lambda: Model(nnx.Rngs(0)))


def best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--width", type=int, default=4096)
  parser.add_argument("--hf-layers", type=int, default=12)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  tokens = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
  rows = []

  model = scanned_transformer(args.layers, args.width, args.width // 64, 50304)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  forward = lambda p, r, x: nnx.merge(graphdef, p, r)(x)
  for per_head in (False, True):
    trace = best(
      lambda: jax.make_jaxpr(lambda *a: forward(*a))(params, rest, tokens),
      args.repeats,
    )
    read = best(
      lambda per_head=per_head: optax_orth.route_by_model(
        model, tokens, per_head=per_head
      ),
      args.repeats,
    )
    name = f"nnx scanned transformer, {args.layers} layers x {args.width}"
    rows.append((name + (", per_head" if per_head else ""), trace, read))

  try:
    import transformers
  except ImportError:
    transformers = None
  if transformers is not None:
    config = transformers.GPT2Config(n_layer=args.hf_layers)
    gpt2 = transformers.FlaxGPT2LMHeadModel(config, _do_init=False)
    hf_params = jax.eval_shape(lambda: gpt2.init_weights(jax.random.key(0), (1, 8)))
    hf_tokens = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
    call = lambda p, x: gpt2(x, params=p)
    trace = best(
      lambda: jax.make_jaxpr(lambda *a: call(*a))(hf_params, hf_tokens),
      args.repeats,
    )
    read = best(
      lambda: optax_orth.route_by_model(gpt2, hf_tokens, params=hf_params),
      args.repeats,
    )
    rows.append((f"Hugging Face Flax GPT-2, {args.hf_layers} layers", trace, read))

  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print("| model | make_jaxpr (s) | route_by_model (s) | ratio |")
  print("|---|---|---|---|")
  for name, trace, read in rows:
    print(f"| {name} | {trace:.3f} | {read:.3f} | {read / trace:.1f} |")
  print(
    f"peak RSS of the whole run: {peak_mb:.0f} MB; the scanned transformer has "
    f"{n_params / 1e9:.2f}B parameters ({n_params * 4 / 2**20:.0f} MB in float32)"
  )
  if args.out:
    result = {
      "peak_rss_mb": peak_mb,
      "scanned_transformer_params": n_params,
      "machine": f"{platform.machine()} {platform.processor()}, "
      f"{jax.devices()[0].device_kind}",
      "jax": jax.__version__,
      "rows": [
        {"model": n, "make_jaxpr_s": t, "route_by_model_s": r} for n, t, r in rows
      ],
    }
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optax_orth.RoutingWarning)
    main()
