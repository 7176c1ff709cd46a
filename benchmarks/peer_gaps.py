"""How far each recipe is from its peer's rule, exact and with the former setup.

For each peer (AdaMuon's two releases, Levanter's MuonH, modded-nanogpt's
NorMuon), the largest absolute difference between the parameters of this
package's chain and of the NumPy statement of the peer's rule
(``tests/reference_recipes.py``) after 20 steps on the wide, tall, square and
stacked leaves of ``tests/test_peers.py``: once as the recipe now stands,
once as it stood before (the gap the recipe closed). float32 against float64.

Usage: ``python benchmarks/peer_gaps.py``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import optax_orth
from tests import helpers as h
from tests import reference_recipes as rr


def _gap(tx, make_rule) -> float:
  params = h.initial_params(1, h.PEER_SHAPES)
  grads = h.scaled_gradients(h.PEER_STEPS, 0, h.PEER_SHAPES, spread=1.0)
  ours = h.run_optax(tx, params, grads)
  theirs = h.run_reference(make_rule, params, grads)
  return max(float(np.max(np.abs(ours[-1][n] - theirs[-1][n]))) for n in h.PEER_SHAPES)


def _muonh(coeffs, eps):
  return optax.chain(
    optax_orth.orthogonalize_momentum(
      0.95, ns_coeffs=coeffs, eps=eps, weight_dimension_numbers=h.PEER_DIMS
    ),
    optax_orth.scale_by_hyperball(0.05, weight_dimension_numbers=h.PEER_DIMS),
  )


def main() -> None:
  dims = h.PEER_DIMS
  lr = optax.linear_schedule(0.05, 0.005, h.PEER_STEPS)
  modded = lambda: rr.ModdedNorMuon(lambda t: float(lr(t)), wd=1.2)
  current = lambda: rr.AdaMuon(3e-3, wd=0.01)
  first = lambda: rr.AdaMuon(3e-3, b2=0.999, sign=False, bias2=True, wd=0.01)
  rows = [
    (
      "AdaMuon current release",
      _gap(optax_orth.adamuon(3e-3, weight_dimension_numbers=dims), current),
      _gap(optax_orth.adamuon(3e-3, b2=0.999, weight_dimension_numbers=dims), current),
    ),
    (
      "AdaMuon first upload",
      _gap(
        optax_orth.adamuon(
          3e-3,
          sign_momentum=False,
          b2=0.999,
          second_moment_bias_correction=True,
          weight_dimension_numbers=dims,
        ),
        first,
      ),
      _gap(
        optax_orth.adamuon(
          3e-3, sign_momentum=False, b2=0.999, weight_dimension_numbers=dims
        ),
        first,
      ),
    ),
    (
      "Levanter MuonH",
      _gap(_muonh("dion", 1e-8), lambda: rr.MuonH(0.05)),
      _gap(_muonh("standard", 1e-7), lambda: rr.MuonH(0.05)),
    ),
    (
      "modded-nanogpt NorMuon",
      _gap(h.modded_normuon(lr, 1.2, h.PEER_DIMS), modded),
      _gap(h.modded_normuon(lr, 1.2, h.PEER_DIMS, order="former"), modded),
    ),
  ]
  print("| peer | recipe now | recipe before |")
  print("|---|---|---|")
  for name, now, before in rows:
    print(f"| {name} | {now:.1e} | {before:.1e} |")


if __name__ == "__main__":
  main()
