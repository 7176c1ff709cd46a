"""Our NumPy statement of fused and multi-head leaves, on top of reference_numpy.

The rule (Dion's ``split_sizes``; modded-nanogpt orthogonalizes its fused
attention weight as a batch of separate matrices; NAMO, NAMO-D and NorMuon
define their statistics per matrix): a fused leaf ``K = [K_1 | ... | K_P]``,
cut along its output axis (or its reduction axis) into blocks, is ``P``
matrices. Each block, for each element of the batch axes, has its own
momentum and Newton–Schulz, its own shape factor (``fan_in x size_p``), its
own NAMO step size and caps, its own NAMO-D clamp mean, its own NorMuon
second moment and norm; the fused leaf's update is the blocks' updates put
back in place. The per-head form is the same with ``H`` equal blocks.
"""

from __future__ import annotations

import numpy as np


class Split:
  """One reference rule per block of a ``(fan_in, fan_out)`` matrix.

  Args:
    make_rule: a factory of a reference rule (``reference_numpy.Muon``,
      ``Namo``, ``NorMuon``), each with ``step(k, g) -> new k``.
    sizes: the blocks' sizes along ``axis``.
    axis: ``1`` (output axis, a fused QKV kernel) or ``0`` (reduction axis,
      a fused per-head output kernel).
  """

  def __init__(self, make_rule, sizes, axis=1):
    self.rules = [make_rule() for _ in sizes]
    self.offsets = np.cumsum(sizes)[:-1]
    self.axis = axis

  def step(self, k, g):
    ks = np.split(k, self.offsets, axis=self.axis)
    gs = np.split(g, self.offsets, axis=self.axis)
    new = [r.step(kb, gb) for r, kb, gb in zip(self.rules, ks, gs, strict=True)]
    return np.concatenate(new, axis=self.axis)


def heads(make_rule, n_heads, size, axis=1):
  """The per-head form: ``n_heads`` equal blocks of an axis of ``size``."""
  return Split(make_rule, [size // n_heads] * n_heads, axis)
