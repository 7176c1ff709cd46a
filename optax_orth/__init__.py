"""optax_orth: orthogonalized-momentum optimizers as composable Optax blocks.

Everything public is re-exported here, plus four namespaces:
:mod:`optax_orth.diagnostics` (per-layer metrics during training),
:mod:`optax_orth.interop` (states to and from ``optax.contrib.muon``),
:mod:`optax_orth.layout` (leaves as matrices, for blocks of your own) and
:mod:`optax_orth.measure` (FLOP and collective-byte counters).
"""

from optax.contrib import MuonDimensionNumbers as MuonDimensionNumbers

from optax_orth import diagnostics as diagnostics
from optax_orth import interop as interop
from optax_orth import layout as layout
from optax_orth import measure as measure
from optax_orth._src.adam import ScaleByAdamState as ScaleByAdamState
from optax_orth._src.aliases import adamuon as adamuon
from optax_orth._src.aliases import muon as muon
from optax_orth._src.aliases import namo as namo
from optax_orth._src.aliases import namo_d as namo_d
from optax_orth._src.aliases import normuon as normuon
from optax_orth._src.hyperball import ScaleByHyperballState as ScaleByHyperballState
from optax_orth._src.hyperball import scale_by_hyperball as scale_by_hyperball
from optax_orth._src.model_routing import route_by_model as route_by_model
from optax_orth._src.orthogonalizers import newton_schulz as newton_schulz
from optax_orth._src.orthogonalizers import polar_svd as polar_svd
from optax_orth._src.qk_clip import QKClipSlice as QKClipSlice
from optax_orth._src.qk_clip import QKClipState as QKClipState
from optax_orth._src.qk_clip import qk_clip as qk_clip
from optax_orth._src.rescale import scale_to_rms as scale_to_rms
from optax_orth._src.routing import DEFAULT_ADAM_PATTERNS as DEFAULT_ADAM_PATTERNS
from optax_orth._src.routing import RoutingWarning as RoutingWarning
from optax_orth._src.routing import SplitDimensionNumbers as SplitDimensionNumbers
from optax_orth._src.routing import route_by_path as route_by_path
from optax_orth._src.routing import routing_table as routing_table
from optax_orth._src.sharding import OwnerSharding as OwnerSharding
from optax_orth._src.sharding import state_shardings as state_shardings
from optax_orth._src.transforms import MomentumStatistics as MomentumStatistics
from optax_orth._src.transforms import (
  OrthogonalizeMomentumState as OrthogonalizeMomentumState,
)
from optax_orth._src.transforms import ScaleByNeuronRmsState as ScaleByNeuronRmsState
from optax_orth._src.transforms import (
  ScaleByNormAdaptiveState as ScaleByNormAdaptiveState,
)
from optax_orth._src.transforms import clamp_diagonal as clamp_diagonal
from optax_orth._src.transforms import orthogonalize_momentum as orthogonalize_momentum
from optax_orth._src.transforms import scale_by_neuron_rms as scale_by_neuron_rms
from optax_orth._src.transforms import scale_by_norm_adaptive as scale_by_norm_adaptive
from optax_orth._src.transforms import scale_by_shape as scale_by_shape
from optax_orth._src.weight_decay import (
  AddCautiousWeightDecayState as AddCautiousWeightDecayState,
)
from optax_orth._src.weight_decay import (
  add_cautious_weight_decay as add_cautious_weight_decay,
)

__version__ = "0.2.0"

__all__ = [
  "DEFAULT_ADAM_PATTERNS",
  "AddCautiousWeightDecayState",
  "MomentumStatistics",
  "MuonDimensionNumbers",
  "OrthogonalizeMomentumState",
  "OwnerSharding",
  "QKClipSlice",
  "QKClipState",
  "RoutingWarning",
  "ScaleByAdamState",
  "ScaleByHyperballState",
  "ScaleByNeuronRmsState",
  "ScaleByNormAdaptiveState",
  "SplitDimensionNumbers",
  "adamuon",
  "add_cautious_weight_decay",
  "clamp_diagonal",
  "diagnostics",
  "interop",
  "layout",
  "measure",
  "muon",
  "namo",
  "namo_d",
  "newton_schulz",
  "normuon",
  "orthogonalize_momentum",
  "polar_svd",
  "qk_clip",
  "route_by_model",
  "route_by_path",
  "routing_table",
  "scale_by_hyperball",
  "scale_by_neuron_rms",
  "scale_by_norm_adaptive",
  "scale_by_shape",
  "scale_to_rms",
  "state_shardings",
]
