"""optax_orth: orthogonalized-momentum optimizers as composable Optax blocks."""

from optax_orth import adam as adam
from optax_orth import diagnostics as diagnostics
from optax_orth import interop as interop
from optax_orth.aliases import adamuon, muon, namo, namo_d, normuon
from optax_orth.hyperball import ScaleByHyperballState, scale_by_hyperball
from optax_orth.model_routing import ModelRouting, route_by_model
from optax_orth.orthogonalizers import (
  PRESETS,
  NewtonSchulzFlops,
  NewtonSchulzPreset,
  Orthogonalizer,
  make_newton_schulz,
  newton_schulz,
  newton_schulz_flops,
  polar_svd,
)
from optax_orth.qk_clip import QKClipSlice, QKClipState, qk_clip
from optax_orth.rescale import scale_to_rms
from optax_orth.routing import (
  DEFAULT_ADAM_PATTERNS,
  MatrixLayout,
  MuonDimensionNumbers,
  RoutingWarning,
  SplitDimensionNumbers,
  label_tree,
  matrix_layout,
  route_by_path,
  routing_table,
)
from optax_orth.sharding import (
  OwnerSharding,
  hlo_collective_bytes,
  state_shardings,
)
from optax_orth.transforms import (
  MomentumStatistics,
  OrthogonalizeMomentumState,
  ScaleByNeuronRmsState,
  ScaleByNormAdaptiveState,
  clamp_diagonal,
  orthogonalize_momentum,
  scale_by_neuron_rms,
  scale_by_norm_adaptive,
  scale_by_shape,
  shape_scale,
)
from optax_orth.weight_decay import (
  AddCautiousWeightDecayState,
  add_cautious_weight_decay,
)

__version__ = "0.1.0"

__all__ = [
  "DEFAULT_ADAM_PATTERNS",
  "PRESETS",
  "AddCautiousWeightDecayState",
  "MatrixLayout",
  "ModelRouting",
  "MomentumStatistics",
  "MuonDimensionNumbers",
  "NewtonSchulzFlops",
  "NewtonSchulzPreset",
  "OrthogonalizeMomentumState",
  "Orthogonalizer",
  "OwnerSharding",
  "QKClipSlice",
  "QKClipState",
  "RoutingWarning",
  "ScaleByHyperballState",
  "ScaleByNeuronRmsState",
  "ScaleByNormAdaptiveState",
  "SplitDimensionNumbers",
  "adamuon",
  "add_cautious_weight_decay",
  "clamp_diagonal",
  "hlo_collective_bytes",
  "label_tree",
  "make_newton_schulz",
  "matrix_layout",
  "muon",
  "namo",
  "namo_d",
  "newton_schulz",
  "newton_schulz_flops",
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
  "shape_scale",
  "state_shardings",
]
