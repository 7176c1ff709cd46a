"""Owner scheme vs replicate vs automatic partitioning, read from compiled HLO.

Compiles optimizer updates on 8 simulated CPU devices and reads, from the
compiled (SPMD-partitioned, per-device) module:

* per-device FLOPs (``compiled.cost_analysis()``) against the single-device
  FLOPs of the same update divided by ``N``;
* the collectives (all-to-all, all-gather, all-reduce, reduce-scatter,
  collective-permute): count, operand bytes and estimated bytes sent per
  device (:func:`optax_orth.measure.hlo_collective_bytes`).

Sections:

* **explicit**: a scan-stacked transformer-like tree FSDP-sharded on the
  fan-in axis, ``jax.jit`` with in/out shardings; ``owner``
  (``sharding=OwnerSharding(mesh)``, all four optimizers), ``replicate``
  (every device gathers every matrix: an orthogonalizer whose input and output
  are constrained to be replicated), ``automatic`` (``sharding=None``) and
  ``optax.contrib.muon``;
* **default**: what a user gets without any argument: a GPT-shaped tree of 64
  separate 2-D kernels FSDP-sharded on axis 0, plain ``jax.jit(tx.update)``
  under ``jax.set_mesh(mesh)``, no ``sharding=``, no in/out shardings; the
  four optimizers, ``sharding=None`` and ``optax.contrib.muon``; on ``Auto``
  and on ``Explicit`` mesh axes;
* **moe**: expert weights ``(layers, experts, in, out)``, the expert axis
  sharded; **2-D**: a ``("data", "model")`` mesh with FSDP x TP kernels;
* **nnx**: the train step of the Flax NNX FSDP flow of
  ``examples/distributed.py`` (``nnx.with_partitioning``, ``nnx.Optimizer``,
  ``nnx.jit``), forward and backward included.

Nothing is timed: CPU devices simulated on one host say nothing about a
network.

Usage: ``python benchmarks/bench_sharding.py [--layers 16 --width 256]
[--write docs/benchmarks.md]``. The ``## Distributed`` section of the file is
replaced (or appended; the file is created if missing); the rest is kept.
"""

from __future__ import annotations

import os

N = 8
_flags = os.environ.get("XLA_FLAGS", "")
if "host_platform_device_count" not in _flags:  # before jax is imported
  os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={N}"

import argparse  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_orth  # noqa: E402
from optax_orth import MuonDimensionNumbers as DimNums  # noqa: E402


def tree(layers: int, d: int):
  shapes = {
    "qkv": (layers, d, 3 * d),
    "attn_out": (layers, d, d),
    "mlp_up": (layers, d, 4 * d),
    "mlp_down": (layers, 4 * d, d),
  }
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


def gpt_tree(layers: int, d: int, seed: int = 0):
  """``layers`` x (qkv, attn_out, mlp_up, mlp_down): separate 2-D kernels."""
  rng = np.random.default_rng(seed)
  shapes = {"qkv": (d, 3 * d), "attn_out": (d, d), "mlp_up": (d, 4 * d)}
  shapes["mlp_down"] = (4 * d, d)
  return {
    f"layer{i}": {
      k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()
    }
    for i in range(layers)
  }


def _cost(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def compile_update(tx, params, mesh=None):
  state = jax.eval_shape(tx.init, params)
  if mesh is None:
    fn = jax.jit(tx.update)
  else:
    p_sh = {k: NamedSharding(mesh, P(None, "fsdp", None)) for k in params}
    s_sh = optax_orth.state_shardings(state, params, p_sh)
    fn = jax.jit(tx.update, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
  return fn.lower(params, state, params).compile()


def measure_default(tx, params, mesh, specs):
  """Plain ``jax.jit(tx.update)`` on one device and under ``jax.set_mesh``.

  Returns per-device FLOPs, their ratio to one-device FLOPs / N, the
  collectives, whether the updates and the sharded state leaves came back in
  their inputs' shardings, and the largest difference to one device.
  """
  grads = jax.tree.map(lambda x: 0.5 * x + 0.1, params)
  single = jax.jit(tx.update)
  state = tx.init(params)
  want, _ = single(grads, state, params)
  flops_1 = _cost(single.lower(grads, state, params).compile())
  with jax.set_mesh(mesh):
    sh = jax.tree.map(lambda p: NamedSharding(mesh, p), specs)
    p_d, g_d = jax.device_put(params, sh), jax.device_put(grads, sh)
    s_d = tx.init(p_d)
    compiled = jax.jit(tx.update).lower(g_d, s_d, p_d).compile()
    got, s_new = jax.jit(tx.update)(g_d, s_d, p_d)
  same = lambda xs, ys: all(
    x.sharding.is_equivalent_to(y.sharding, x.ndim)
    for x, y in zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True)
    if not y.sharding.is_fully_replicated
  )
  flops = _cost(compiled)
  diff = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  )
  return {
    "flops": flops,
    "ratio": flops / (flops_1 / mesh.size),
    "coll": optax_orth.measure.hlo_collective_bytes(compiled.as_text(), mesh.size),
    "kept": same(got, g_d) and same(s_new, s_d),
    "diff": diff,
  }


KINDS = (
  "all-to-all",
  "all-gather",
  "all-reduce",
  "reduce-scatter",
  "collective-permute",
)
MIB = 2**20


def _row(name, m, base_bytes=None):
  coll = m["coll"]
  counts = " | ".join(str(coll[k]["count"]) for k in KINDS)
  sent = coll["total"]["moved_bytes"]
  rel = "" if base_bytes is None else f" | {sent / base_bytes:.3f}"
  tail = (
    "" if "kept" not in m else f" | {'yes' if m['kept'] else 'no'} | {m['diff']:.0e}"
  )
  return (
    f"| {name} | {m['flops'] / 1e9:.3f} | {m['ratio']:.2f} | {counts} | "
    f"{coll['total']['operand_bytes'] / MIB:.2f} | {sent / MIB:.2f}{rel}{tail} |"
  )


HEAD = (
  "| scheme | GFLOP / device | x total/N | all-to-all | all-gather | "
  "all-reduce | reduce-scatter | coll.-permute | operand MiB / device | "
  "sent MiB / device"
)


def explicit_section(layers, width):
  """The stacked tree with in/out shardings: owner, replicate, automatic."""
  mesh = jax.make_mesh((N,), ("fsdp",), axis_types=(AxisType.Auto,))
  params = tree(layers, width)
  dims = DimNums(1, 2)
  owner = optax_orth.OwnerSharding(mesh, "fsdp")
  replicated = NamedSharding(mesh, P())
  ns = optax_orth._src.orthogonalizers.make_newton_schulz("standard", 5, 1e-8, None)

  def replicate_ns(x):
    y = ns(jax.lax.with_sharding_constraint(x, replicated))
    return jax.lax.with_sharding_constraint(y, replicated)

  kw = {"weight_dimension_numbers": dims}
  muon = lambda **k: optax_orth.muon(0.02, muon_weight_dimension_numbers=dims, **k)
  schemes = {
    "muon, owner": muon(sharding=owner),
    "namo, owner": optax_orth.namo(sharding=owner, **kw),
    "namo_d, owner": optax_orth.namo_d(sharding=owner, **kw),
    "normuon, owner": optax_orth.normuon(sharding=owner, **kw),
    "muon, replicate": muon(sharding=None, orthogonalizer=replicate_ns),
    "muon, automatic (sharding=None)": muon(sharding=None),
    "optax.contrib.muon, automatic": optax.contrib.muon(
      0.02, muon_weight_dimension_numbers=dims
    ),
  }
  single = {
    "muon": muon(sharding=None),
    "namo": optax_orth.namo(sharding=None, **kw),
    "namo_d": optax_orth.namo_d(sharding=None, **kw),
    "normuon": optax_orth.normuon(sharding=None, **kw),
    "optax.contrib.muon": schemes["optax.contrib.muon, automatic"],
  }
  total = {k: _cost(compile_update(tx, params)) for k, tx in single.items()}
  ideal = sum(
    2 * 4 * s.shape[0] * s.shape[1] * s.shape[2] * (N - 1) / N**2
    for s in params.values()
  )
  lines = [
    "### The explicit scheme",
    "",
    f"One optimizer update of {layers * len(params)} matrices ({layers} "
    f"scan-stacked layers of `qkv {width}x{3 * width}`, `attn_out "
    f"{width}x{width}`, `mlp_up {width}x{4 * width}`, `mlp_down "
    f"{4 * width}x{width}`, float32), parameters and state FSDP-sharded on the "
    f"fan-in axis over N = {N} simulated CPU devices, compiled with `jax.jit` "
    "and `NamedSharding` in/out shardings (`optax_orth.state_shardings`).",
    "",
    HEAD + " |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, tx in schemes.items():
    compiled = compile_update(tx, params, mesh)
    flops = _cost(compiled)
    base = total[name.split(",")[0]]
    coll = optax_orth.measure.hlo_collective_bytes(compiled.as_text(), N)
    lines.append(
      _row(name, {"flops": flops, "ratio": flops / (base / N), "coll": coll})
    )
    print(lines[-1], flush=True)
  lines += [
    "",
    "The owner scheme's ideal traffic, two all-to-alls of `4 r c (N-1)/N^2` "
    f"bytes per matrix, is {ideal / MIB:.2f} MiB sent per device for this tree.",
    "",
  ]
  return lines


def default_section(layers=16, width=64):
  """No sharding=, plain jit under jax.set_mesh: the GPT tree, Auto/Explicit."""
  params = gpt_tree(layers, width)
  specs = jax.tree.map(lambda _: P("fsdp", None), params)
  dims = DimNums(0, 1)
  kw = {"weight_dimension_numbers": dims}
  rows = {
    "muon": optax_orth.muon(0.02, muon_weight_dimension_numbers=dims),
    "namo": optax_orth.namo(**kw),
    "namo_d": optax_orth.namo_d(**kw),
    "normuon": optax_orth.normuon(**kw),
    "muon, sharding=None": optax_orth.muon(
      0.02, muon_weight_dimension_numbers=dims, sharding=None
    ),
    "optax.contrib.muon": optax.contrib.muon(0.02, muon_weight_dimension_numbers=dims),
  }
  auto = jax.make_mesh((N,), ("fsdp",), axis_types=(AxisType.Auto,))
  explicit = jax.make_mesh((N,), ("fsdp",), axis_types=(AxisType.Explicit,))
  results = {k: measure_default(tx, params, auto, specs) for k, tx in rows.items()}
  results["namo_d, Explicit axes"] = measure_default(
    rows["namo_d"], params, explicit, specs
  )
  base = results["optax.contrib.muon"]["coll"]["total"]["moved_bytes"]
  lines = [
    "### The default path",
    "",
    f"What a user gets without any argument: {layers} layers of `qkv "
    f"{width}x{3 * width}`, `attn_out {width}x{width}`, `mlp_up "
    f"{width}x{4 * width}`, `mlp_down {4 * width}x{width}` as {4 * layers} "
    "separate 2-D kernels, FSDP-sharded on axis 0 over N = 8 devices "
    "(`jax.device_put` with `NamedSharding`; the state from `tx.init` on the "
    "sharded parameters), and `jax.jit(tx.update)` under `jax.set_mesh(mesh)`: "
    "no `sharding=`, no in/out shardings, a mesh with `Auto` axes unless "
    "named. `x optax` is the bytes sent over those of `optax.contrib.muon`; "
    "`kept`: every update and every sharded state leaf comes back in its "
    "input's sharding; `diff`: the largest difference to one device.",
    "",
    HEAD + " | x optax | kept | diff |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, m in results.items():
    lines.append(_row(name, m, base))
    print(lines[-1], flush=True)
  return [*lines, ""]


def _table(title, text, results, base=None):
  extra = " | x optax" if base else ""
  lines = [title, "", text, "", HEAD + extra + " | kept | diff |"]
  lines.append("|---" * (12 + bool(base)) + "|")
  for name, m in results.items():
    lines.append(_row(name, m, base))
    print(lines[-1], flush=True)
  return [*lines, ""]


def moe_section():
  """Expert weights (layers, experts, in, out), the expert axis sharded."""
  rng = np.random.default_rng(0)
  params = {"experts": rng.standard_normal((4, 8, 64, 128)).astype(np.float32)}
  specs = {"experts": P(None, "expert", None, None)}
  dims = {"experts": DimNums(2, 3)}
  mesh = jax.make_mesh((N,), ("expert",), axis_types=(AxisType.Auto,))
  rows = {
    "muon": optax_orth.muon(0.02, muon_weight_dimension_numbers=dims),
    "normuon": optax_orth.normuon(weight_dimension_numbers=dims),
    "muon, sharding=None": optax_orth.muon(
      0.02, muon_weight_dimension_numbers=dims, sharding=None
    ),
  }
  results = {k: measure_default(tx, params, mesh, specs) for k, tx in rows.items()}
  text = (
    "A leaf `(4, 8, 64, 128)` of 4 layers x 8 experts, the expert axis sharded "
    "over N = 8 devices (expert parallelism), plain `jax.jit` under "
    "`jax.set_mesh`. By default each device orthogonalizes the 4 matrices of "
    "the expert it holds, and nothing moves."
  )
  return _table("### Expert weights (MoE)", text, results)


def tensor_parallel_section(layers=8, width=64):
  """A ("data", "model") mesh, kernels sharded over both axes (FSDP x TP)."""
  params = gpt_tree(layers, width)
  spec = {"qkv": P("data", "model"), "attn_out": P("model", "data")}
  spec |= {"mlp_up": P("data", "model"), "mlp_down": P("model", "data")}
  specs = {k: dict(spec) for k in params}
  dims = DimNums(0, 1)
  results = {}
  for kind in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
    name = str(kind).split(".")[-1]
    for label, sharding in (("", "auto"), (", sharding=None", None)):
      tx = optax_orth.namo_d(weight_dimension_numbers=dims, sharding=sharding)
      results[f"namo_d{label}, {name} axes"] = measure_default(tx, params, mesh, specs)
  text = (
    f"The {4 * layers} kernels of {layers} layers (width {width}) on a 4 x 2 "
    '`("data", "model")` mesh, `qkv` and `mlp_up` sharded `P("data", "model")`, '
    '`attn_out` and `mlp_down` `P("model", "data")`. By default each matrix '
    "moves to its owner in one-axis all-to-alls (one per mesh axis) and back."
  )
  return _table('### A 2-D mesh ("data", "model")', text, results)


def nnx_section(width=128, depth=4):
  """The train step of the NNX FSDP flow (examples/distributed.py)."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      dense = lambda i, o, spec: nnx.Linear(
        i, o, kernel_init=nnx.with_partitioning(init, spec), rngs=rngs
      )
      self.stem = dense(32, width, ("fsdp", None))
      specs = [("fsdp", None) if i % 2 else (None, "fsdp") for i in range(depth)]
      self.blocks = nnx.List([dense(width, width, sp) for sp in specs])
      self.head = dense(width, 10, (None, None))

    def __call__(self, x):
      h = jax.nn.gelu(self.stem(x))
      for block in self.blocks:
        h = h + jax.nn.gelu(block(h))
      return self.head(h)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  def compiled(make_tx, mesh):
    x, y = jnp.ones((256, 32)), jnp.zeros((256,), jnp.int32)
    with jax.set_mesh(mesh):
      model = MLP(nnx.Rngs(0))
      opt = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
      x, y = jax.device_put((x, y), P("fsdp"))
      return step.lower(model, opt, x, y).compile()

  mesh = jax.make_mesh((N,), ("fsdp",), axis_types=(AxisType.Auto,))
  one = jax.make_mesh(
    (1,), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1]
  )
  rows = {
    "muon": lambda: optax_orth.muon(0.02),
    "muon, sharding=None": lambda: optax_orth.muon(0.02, sharding=None),
    "optax.contrib.muon": lambda: optax.contrib.muon(0.02),
  }
  results = {}
  for name, make_tx in rows.items():
    c, c1 = compiled(make_tx, mesh), compiled(make_tx, one)
    coll = optax_orth.measure.hlo_collective_bytes(c.as_text(), N)
    results[name] = {
      "flops": _cost(c),
      "ratio": _cost(c) / (_cost(c1) / N),
      "coll": coll,
    }
  text = (
    f"The whole `nnx.jit` train step (forward, backward, update) of a {depth}-block "
    f"residual MLP of width {width}, kernels with `nnx.with_partitioning`, the "
    "model created under `jax.set_mesh`, `nnx.Optimizer(model, tx, wrt=nnx.Param)`, "
    "a batch of 256 sharded over N = 8 devices, no in/out shardings. The "
    "all-gathers of the forward pass (FSDP) are in every row, and `x total/N` "
    "covers the whole step (the model's replicated head included)."
  )
  lines = ["### The Flax NNX FSDP flow", "", text, "", HEAD + " |"]
  lines.append("|---" * 10 + "|")
  for name, m in results.items():
    lines.append(_row(name, m))
    print(lines[-1], flush=True)
  return [*lines, ""]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--write", default="docs/benchmarks.md")
  args = parser.parse_args()
  assert jax.device_count() == N, jax.devices()
  lines = [
    "## Distributed",
    "",
    "Figures are read from the compiled per-device HLO module: FLOPs from "
    "`cost_analysis()`; collectives parsed with "
    "`optax_orth.measure.hlo_collective_bytes` (operand bytes per device, and bytes "
    "sent per device estimated as all-to-all `(g-1)/g`, all-gather `g-1`, "
    "all-reduce `2(g-1)/g` times the operand). `total/N` is the FLOPs of the "
    "same update compiled for one device, divided by N. Nothing is timed, so "
    "the machine's load does not change the figures. No GPU was available for "
    "these runs: every figure is from 8 CPU devices simulated on one host.",
    "",
  ]
  lines += default_section()
  lines += moe_section()
  lines += tensor_parallel_section()
  lines += nnx_section()
  lines += explicit_section(args.layers, args.width)
  lines += [
    f"Reproduce: `python benchmarks/bench_sharding.py --layers {args.layers} "
    f"--width {args.width}` on a {os.cpu_count()}-core CPU machine "
    f"({platform.machine()}), JAX {jax.__version__}, optax {optax.__version__}.",
    "",
  ]
  section = "\n".join(lines)
  if args.write:
    path = Path(args.write)
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(r"^## Distributed\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
      text = pattern.sub(lambda _: section, text, count=1)
    else:
      text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote the Distributed section of {path}")
  print(section)


if __name__ == "__main__":
  main()
