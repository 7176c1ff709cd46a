"""Leaves as stacks of matrices: for writing your own blocks and partitions.

The optimizers view every routed leaf as ``(batch, fan_in, fan_out)``
matrices through its dimension numbers. These are the same tools, for code
outside the package that needs the same view:

* :func:`matrix_layout` gives the :class:`MatrixLayout` of one leaf shape:
  ``to_matrices`` / ``from_matrices`` reshape a leaf, ``map_parts`` applies a
  function per stack of matrices (per block of a cut leaf, whose results are
  a :class:`Parts`);
* :func:`label_tree` labels each leaf ``"orthogonal"`` or ``"adam"`` exactly
  as the optimizers do, for an ``optax.partition`` of your own.
"""

from optax_orth._src.routing import MatrixLayout as MatrixLayout
from optax_orth._src.routing import Parts as Parts
from optax_orth._src.routing import label_tree as label_tree
from optax_orth._src.routing import matrix_layout as matrix_layout
