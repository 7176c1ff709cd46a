"""Moving optimizer states between ``optax.contrib.muon`` and :func:`optax_orth.muon`.

The two state trees have the same nesting (``muon`` and ``adam`` branches of
an ``optax.partition``) and hold the same momentum. They differ in two leaves:
optax keeps the Newton–Schulz coefficients in ``MuonState.ns_coeffs`` (this
package takes them from the optimizer's arguments), and optax's Adam keeps
``nu`` where :class:`optax_orth.ScaleByAdamState` keeps ``rms = sqrt(nu)``
(which does not overflow). Restore an optax checkpoint with optax's own state
as the target, then convert it::

  restored = checkpointer.restore(path, optax.contrib.muon(lr).init(params))
  opt_state = optax_orth.interop.muon_state_from_optax(restored)
"""

from optax_orth._src.interop import muon_state_from_optax as muon_state_from_optax
from optax_orth._src.interop import muon_state_to_optax as muon_state_to_optax
