"""The hidden-matrix shapes of a GPT-2-style tree, for the benchmarks.

Imports nothing, so that ``torch_muon_worker.py`` (NumPy and PyTorch only) and
the JAX benchmarks time the same tree.
"""


def gpt2_shapes(layers: int, width: int = 768) -> dict[str, tuple[int, int]]:
  """Per layer: attention ``qkv`` and output, MLP in and out, ``(fan_in, fan_out)``."""
  shapes = {}
  for i in range(layers):
    shapes[f"h_{i}/attn/c_attn/kernel"] = (width, 3 * width)
    shapes[f"h_{i}/attn/c_proj/kernel"] = (width, width)
    shapes[f"h_{i}/mlp/c_fc/kernel"] = (width, 4 * width)
    shapes[f"h_{i}/mlp/c_proj/kernel"] = (4 * width, width)
  return shapes
