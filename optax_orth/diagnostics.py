r"""Diagnostics: what the optimizers do to each layer, measured during training.

Every metric is computed per matrix: a leaf is viewed as ``(batch, fan_in,
fan_out)`` through its dimension numbers (as everywhere in this package, a
neuron is a column ``j`` of the Flax kernel, an input feature a row ``i``), so a
stacked leaf gives one value per matrix, an array of shape ``(batch,)``.

Metrics of an update matrix ``X`` (``fan_in x fan_out``, ``r = min(fan_in,
fan_out)``), see :func:`update_metrics`:

* ``update_rms``: ``||X||_F / sqrt(fan_in * fan_out)``.
* ``update_spectral_norm``: ``sigma_max(X)`` (by default a power-iteration
  estimate, see :data:`POWER_ITERATIONS`).
* ``orthogonality_error``: ``||Xh Xh^T - I_r||_F / sqrt(r)`` on the short side,
  with ``Xh = sqrt(r) X / ||X||_F`` (scale-free; ``0`` iff ``X`` is a multiple
  of a semi-orthogonal matrix), see :func:`orthogonality_error`.
* ``neuron_norm_max_min`` and ``neuron_norm_cv``: with ``n_j = ||X[:, j]||``,
  ``max_j n_j / min_j n_j`` and ``std_j n_j / mean_j n_j``.

Metrics read from the optimizer state, see :func:`state_metrics`:

* NAMO / NAMO-D (:class:`~optax_orth.ScaleByNormAdaptiveState`): the step size
  ``d`` that the optimizer applied, without the learning rate (``step_size``),
  NAMO's ``alpha = lr * d`` (``alpha``), and for NAMO-D the spread of the raw
  ``d_i``
  (``step_size_max_min``, ``step_size_cv``) and the fraction of the ``d_i``
  that the clamp moved (``clamped_fraction``).
* NorMuon (:class:`~optax_orth.ScaleByNeuronRmsState`): the spread of the
  per-neuron RMS ``sqrt(nu_j)`` that NorMuon divides by
  (``neuron_rms_max_min``, ``neuron_rms_cv``).

Both are read from the state of the block that applies them, never
recomputed, so they are exactly what the optimizer applied.

Collecting them costs no extra forward or backward pass: :func:`with_diagnostics`
wraps any optimizer and stores the metrics of each step in its state
(``opt_state.metrics``); :func:`record` is an identity block that does the same
for whatever flows through it inside a chain (for example the Newton–Schulz
output, right after :func:`~optax_orth.orthogonalize_momentum`).
:func:`to_dict` turns the metrics into plain Python floats for logging.

Metrics are trees with the structure of the parameters: one ``(batch,)``
float32 array per leaf that the metric applies to, ``None`` elsewhere.
"""

from optax_orth._src.diagnostics import POWER_ITERATIONS as POWER_ITERATIONS
from optax_orth._src.diagnostics import STATE_METRICS as STATE_METRICS
from optax_orth._src.diagnostics import UPDATE_METRICS as UPDATE_METRICS
from optax_orth._src.diagnostics import DiagnosticsState as DiagnosticsState
from optax_orth._src.diagnostics import Metrics as Metrics
from optax_orth._src.diagnostics import RecordState as RecordState
from optax_orth._src.diagnostics import (
  coefficient_of_variation as coefficient_of_variation,
)
from optax_orth._src.diagnostics import matrix_metrics as matrix_metrics
from optax_orth._src.diagnostics import max_min_ratio as max_min_ratio
from optax_orth._src.diagnostics import neuron_norms as neuron_norms
from optax_orth._src.diagnostics import orthogonality_error as orthogonality_error
from optax_orth._src.diagnostics import record as record
from optax_orth._src.diagnostics import rms as rms
from optax_orth._src.diagnostics import spectral_norm as spectral_norm
from optax_orth._src.diagnostics import state_metrics as state_metrics
from optax_orth._src.diagnostics import to_dict as to_dict
from optax_orth._src.diagnostics import update_metrics as update_metrics
from optax_orth._src.diagnostics import with_diagnostics as with_diagnostics
