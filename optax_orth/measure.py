"""Measuring tools: what an update costs, counted rather than timed.

These are the counters the benchmarks and the distributed tests use, kept
public so that a user can check a compiled step on their own mesh:

* :func:`newton_schulz_flops` counts the floating-point operations of one
  Newton–Schulz call on a matrix shape (:class:`NewtonSchulzFlops`);
* :func:`hlo_collective_bytes` reads the bytes that each kind of collective
  moves out of a compiled program's HLO text.
"""

from optax_orth._src.orthogonalizers import NewtonSchulzFlops as NewtonSchulzFlops
from optax_orth._src.orthogonalizers import newton_schulz_flops as newton_schulz_flops
from optax_orth._src.sharding import hlo_collective_bytes as hlo_collective_bytes
