"""Optimizers: short compositions of the public blocks.

Each alias is an ``optax.partition`` of an orthogonal branch (the public
blocks) for the matrices and an AdamW fallback for
everything else (embeddings, head, biases, norm scales).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_orth._src import adam as adam_lib
from optax_orth._src import orthogonalizers as orth_lib
from optax_orth._src import rescale, routing, transforms, validation
from optax_orth._src import weight_decay as wd_lib
from optax_orth._src.routing import DimensionNumbersSpec
from optax_orth._src.sharding import AUTO, ShardingLike

#: The names of the two branches of the optimizers' ``optax.partition``.
#: :func:`muon` names its orthogonal branch ``"muon"``, as optax does.
ORTHOGONAL, ADAM = "orthogonal", "adam"


def _parameter_shapes(state: optax.PartitionState, labels: tuple[str, str]) -> Any:
  """The parameters' tree, rebuilt from the two branches' first moments.

  The orthogonal branch keeps its momentum in an
  :class:`~optax_orth.OrthogonalizeMomentumState`, the AdamW fallback in an
  ``optax.ScaleByAdamState``; each holds its branch's leaves and
  ``optax.MaskedNode`` elsewhere. Found by type.
  """
  matrix_label, adam_label = labels
  if not isinstance(state, optax.PartitionState):
    raise ValueError(
      "update: expected the state that this optimizer's init returned (an "
      f"optax.PartitionState); got {type(state).__name__}."
    )
  moments = []
  for label, cls in (
    (matrix_label, transforms.OrthogonalizeMomentumState),
    (adam_label, adam_lib.ScaleByAdamState),
  ):
    found = transforms.find_states(state.inner_states.get(label), cls)
    if len(found) != 1:
      raise ValueError(
        f"update: the {label!r} branch of the state should hold one "
        f"{cls.__name__}; found {len(found)}. Pass the state that this "
        "optimizer's init returned (called init first?)."
      )
    moments.append(found[0].mu)
  leaves, treedef = jax.tree.flatten(moments[0], is_leaf=validation.is_masked)
  others = jax.tree.leaves(moments[1], is_leaf=validation.is_masked)
  if len(others) != len(leaves):
    raise ValueError("update: the two branches of the state disagree on the tree.")
  masked = validation.is_masked
  leaves = [b if masked(a) else a for a, b in zip(leaves, others, strict=True)]
  return jax.tree.unflatten(treedef, leaves)


def _block_kinds(state: optax.PartitionState, label: str) -> tuple[str, ...]:
  """The state types of one branch's blocks, in chain order."""
  inner = state.inner_states.get(label)
  inner = getattr(inner, "inner_state", inner)
  if isinstance(inner, tuple) and not hasattr(inner, "_fields"):
    return tuple(type(s).__name__ for s in inner)
  return (type(inner).__name__,)


def _check_block_kinds(state, expected, labels: tuple[str, str]) -> None:
  """The state of another optimizer of this package has the same two branches
  and moments, and can even have as many blocks; its block states differ."""
  for label in labels:
    got, want = _block_kinds(state, label), _block_kinds(expected, label)
    if got != want:
      raise ValueError(
        f"update: the {label!r} branch of the state holds {list(got)}, but "
        f"this optimizer's init returns {list(want)}. Pass the state that "
        "this optimizer's init returned (called init first?)."
      )


def _partition(
  orthogonal: optax.GradientTransformation,
  adam: optax.GradientTransformation,
  spec: DimensionNumbersSpec,
  labels: tuple[str, str] = (ORTHOGONAL, ADAM),
) -> optax.GradientTransformationExtraArgs:
  tx = optax.partition(
    dict(zip(labels, (orthogonal, adam), strict=True)),
    lambda params: routing.label_tree(params, spec, *labels),
  )

  expected = []  # the state init returns, abstract; its block kinds only

  def update_fn(updates, state, params=None, **extra_args):
    # Name the offending leaf before optax.partition fails on a bare tree error.
    reference = _parameter_shapes(state, labels)
    validation.check_matches_state(updates, reference, "update")
    if not expected:
      expected.append(jax.eval_shape(tx.init, reference))
    _check_block_kinds(state, expected[0], labels)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _adam_fallback(
  learning_rate: optax.ScalarOrSchedule,
  adam_learning_rate: optax.ScalarOrSchedule | None,
  cautious_weight_decay: bool = False,
  **adamw_kwargs,
) -> optax.GradientTransformation:
  """AdamW for the non-matrix leaves, at ``learning_rate`` unless overridden.

  ``optax.adamw``'s rule, overflow-safe (its state is
  :class:`optax_orth.ScaleByAdamState`); with ``cautious_weight_decay``, its
  decay is :func:`optax_orth.add_cautious_weight_decay`.
  """
  lr = learning_rate if adam_learning_rate is None else adam_learning_rate
  if not cautious_weight_decay:
    return adam_lib.adamw(learning_rate=lr, **adamw_kwargs)
  wd = adamw_kwargs.pop("weight_decay", 0.0)
  return optax.chain(
    adam_lib.scale_by_adam(**adamw_kwargs),
    wd_lib.add_cautious_weight_decay(wd),
    optax.scale_by_learning_rate(lr),
  )


def _decay(weight_decay, mask, cautious: bool) -> optax.GradientTransformation:
  """``optax.add_decayed_weights``, or its cautious form."""
  if cautious:
    return wd_lib.add_cautious_weight_decay(weight_decay, mask)
  return optax.add_decayed_weights(weight_decay, mask)


def _optax_ns_steps(ns_coeffs, ns_steps: Any) -> Any:
  """``ns_steps`` as ``optax.contrib.muon`` reads it with ``ns_coeffs``.

  One row repeats for ``ns_steps`` steps; ``n`` rows (a multi-row preset such
  as ``"dion"``, or an ``(n, 3)`` array) run once each, and ``n > ns_steps`` is
  an error, as in optax.
  """
  ns_steps, traced = validation.static_or_traced_int("ns_steps", ns_steps)
  if traced is not None:  # under optax.inject_hyperparams: newton_schulz decides
    return traced
  validation.check_positive_int("ns_steps", ns_steps)
  if isinstance(ns_coeffs, str):
    preset = orth_lib.PRESETS.get(ns_coeffs)
    rows = 1 if preset is None else len(preset.coeffs)
  else:
    rows = np.shape(ns_coeffs)[0] if np.ndim(ns_coeffs) == 2 else 1
  if rows == 1:
    return ns_steps
  if rows > ns_steps:
    raise ValueError(
      f"ns_coeffs={ns_coeffs!r} has {rows} rows, more than ns_steps={ns_steps}."
      if isinstance(ns_coeffs, str)
      else f"ns_coeffs has {rows} rows, more than ns_steps={ns_steps}."
    )
  return None


def muon(
  learning_rate: optax.ScalarOrSchedule,
  ns_coeffs: orth_lib.CoeffsLike = (3.4445, -4.7750, 2.0315),
  ns_steps: int = 5,
  beta: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  *,
  cautious_weight_decay: bool = False,
  nesterov: bool = True,
  adaptive: bool = False,
  preconditioning: orth_lib.Preconditioning = "frobenius",
  adam_b1: float = 0.9,
  adam_b2: float = 0.999,
  adam_eps_root: float = 0.0,
  adam_weight_decay: float = 0.0,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  muon_weight_dimension_numbers: DimensionNumbersSpec = None,
  consistent_rms: float | None = None,
  ns_dtype: jax.typing.DTypeLike | None = None,
  orthogonalizer: orth_lib.Orthogonalizer | None = None,
  sharding: ShardingLike = AUTO,
) -> optax.GradientTransformationExtraArgs:
  r"""Muon: momentum orthogonalized by Newton–Schulz; a drop-in for optax's.

  Takes the arguments of ``optax.contrib.muon`` and, with the same arguments,
  gives the same updates. The matrices get

  .. math::
    U = -\eta\,\left(\mathrm{shape}(K)\,
        \mathrm{NS}(\hat{\tilde M}_t) + \lambda K\right)

  with optax's bias-corrected (Nesterov) momentum, and every other leaf AdamW
  (``adam_*``; by default with Muon's ``eps``, ``mu_dtype`` and
  ``nesterov``, as optax does). Composition::

    partition(orthogonal=chain(orthogonalize_momentum(bias_correction=True),
                               scale_by_shape, add_decayed_weights,
                               scale_by_learning_rate),
              adam=adamw)

  Args:
    learning_rate: a float or an optax schedule.
    ns_coeffs: a preset name (``"standard"``, ``"dion"``,
      ``"polar_express"``), a row ``(a, b, c)`` or ``(n, 3)`` rows (which must
      not outnumber ``ns_steps``, as in optax).
    ns_steps: Newton–Schulz steps for a single row.
    beta: momentum decay.
    eps: Newton–Schulz epsilon, also Adam's.
    weight_decay: decoupled weight decay of the matrices (times ``lr``).
    weight_decay_mask: mask (or callable) for that decay, as in optax.
    mu_dtype: momentum dtype.
    cautious_weight_decay: decay only where the update and the weight agree
      in sign (:func:`optax_orth.add_cautious_weight_decay`), in both
      branches.
    nesterov: Nesterov momentum (both branches).
    adaptive: scale by the dual norm ``<Mt, O>``.
    preconditioning: ``"frobenius"``, ``"spectral"``, ``"aol"``,
      ``"schatten"``.
    adam_b1: Adam's ``b1``.
    adam_b2: Adam's ``b2``.
    adam_eps_root: Adam's ``eps_root``.
    adam_weight_decay: Adam's weight decay.
    adam_learning_rate: Adam's learning rate (``None``: ``learning_rate``).
    muon_weight_dimension_numbers: a dimension-numbers spec; ``None``:
      optax's rule for parity, ``optax_rule`` (every
      2-D leaf is a matrix, embeddings included). This is the one place in
      the package where ``None`` is not the default routing; pass
      :func:`optax_orth.route_by_path` ``()`` to send embeddings and the head
      to Adam.
    consistent_rms: ``None`` for width scaling, or the target RMS.
    ns_dtype: Newton–Schulz compute dtype (``None``: the momentum's).
    orthogonalizer: replaces Newton–Schulz, see
      :func:`optax_orth.orthogonalize_momentum`.
    sharding: ``"auto"`` (the default): with a mesh in context
      (``jax.set_mesh``), orthogonalize each matrix whole on one device of the
      mesh axes that shard it (the owner scheme, see
      :mod:`optax_orth.sharding`); ``None``: off; or an
      :class:`optax_orth.OwnerSharding`. A no-op without a mesh.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.
    Liu et al., `Muon is Scalable for LLM Training
    <https://arxiv.org/abs/2502.16982>`_, 2025.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_orth
    >>> params = {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}
    >>> g = jax.random.normal(jax.random.key(0), (4, 8))
    >>> grads = {"w": g, "b": jnp.ones(8)}  # w: a matrix; b: the AdamW fallback
    >>> tx = optax_orth.muon(learning_rate=0.02)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> s = jnp.linalg.svd(updates["w"], compute_uv=False)
    >>> [round(float(v), 2) for v in s / s.max()]  # orthogonalized: s near 1
    [1.0, 1.0, 0.98, 0.64]
  """
  validation.check_hyperparameters(locals())
  spec = (
    routing.optax_rule
    if muon_weight_dimension_numbers is None
    else (muon_weight_dimension_numbers)
  )
  orthogonal = optax.chain(
    transforms.orthogonalize_momentum(
      beta,
      nesterov=nesterov,
      bias_correction=True,
      mu_dtype=mu_dtype,
      ns_coeffs=ns_coeffs,
      ns_steps=_optax_ns_steps(ns_coeffs, ns_steps),
      eps=eps,
      ns_dtype=ns_dtype,
      preconditioning=preconditioning,
      orthogonalizer=orthogonalizer,
      adaptive=adaptive,
      weight_dimension_numbers=spec,
      sharding=sharding,
    ),
    transforms.scale_by_shape(spec, consistent_rms),
    _decay(weight_decay, weight_decay_mask, cautious_weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
  adam = _adam_fallback(
    learning_rate,
    adam_learning_rate,
    cautious_weight_decay,
    b1=adam_b1,
    b2=adam_b2,
    eps=eps,
    eps_root=adam_eps_root,
    weight_decay=adam_weight_decay,
    mu_dtype=mu_dtype,
    nesterov=nesterov,
  )
  return _partition(orthogonal, adam, spec, labels=("muon", ADAM))


def namo(
  learning_rate: optax.ScalarOrSchedule = 1e-2,
  *,
  b1: float = 0.95,
  b2: float = 0.99,
  eps: float = 1e-8,
  weight_decay: float = 0.1,
  weight_decay_mode: Literal["adaptive", "decoupled"] = "adaptive",
  cautious_weight_decay: bool = False,
  granularity: Literal["matrix", "input_feature"] = "matrix",
  clamp: float | None = None,
  nesterov: bool = True,
  scale_coeff: float = 0.2,
  ns_coeffs: orth_lib.CoeffsLike = "standard",
  ns_steps: int | None = None,
  ns_eps: float = 1e-7,
  ns_dtype: jax.typing.DTypeLike | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  weight_dimension_numbers: DimensionNumbersSpec = None,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  adam_b1: float = 0.9,
  adam_b2: float = 0.95,
  adam_eps: float = 1e-8,
  adam_weight_decay: float = 0.0,
  sharding: ShardingLike = AUTO,
) -> optax.GradientTransformationExtraArgs:
  r"""NAMO: orthogonalized momentum with one adaptive step size per matrix.

  For each matrix ``K`` (``G`` its gradient, ``O = NS(Mt)``):

  .. math::
    v_t = b_2 v_{t-1} + (1 - b_2)\|G_t\|_F^2, \quad
    \alpha_t = \eta_t \frac{\sqrt{1 - b_2^t}}{1 - b_1^t}
      \frac{\|\tilde M_t\|_F}{\sqrt{v_t} + \epsilon},

    K \leftarrow K (1 - \lambda \min(\alpha_t, 1))
      - \min(\alpha_t\, s, 1)\, O_t, \quad
    s = \text{scale\_coeff} \sqrt{\max(\text{fan\_in}, \text{fan\_out})}.

  Composition::

    partition(orthogonal=scale_by_norm_adaptive(
                  orthogonalize_momentum(b1, statistics=True), lr, b2=b2, eps=eps,
                  granularity=granularity,
                  step_size_transform=clamp_diagonal(clamp)),  # if clamp
              adam=adamw)

  :func:`namo_d` is this function with ``granularity="input_feature"`` and
  ``clamp=0.75``.

  Defaults are those of the authors' released code. ``weight_decay_mode=
  "decoupled"`` replaces the decay by the standard ``lr * lambda``.

  Args:
    learning_rate: a float or an optax schedule (reference ``1e-2``).
    b1: momentum decay.
    b2: decay of the squared gradient-norm EMA.
    eps: added to ``sqrt(v)``.
    weight_decay: ``lambda``.
    weight_decay_mode: ``"adaptive"`` (reference) or ``"decoupled"``.
    cautious_weight_decay: apply the decay only where ``O K >= 0``, where
      the step already shrinks the weight
      (:func:`optax_orth.add_cautious_weight_decay`), in both branches.
    granularity: one step size per matrix (``"matrix"``, NAMO) or per input
      feature (``"input_feature"``, NAMO-D).
    clamp: ``None`` (no clamp), or NAMO-D's clamp ``c`` of the step sizes
      toward their mean (:func:`optax_orth.clamp_diagonal`; ``0`` or ``> 1``
      disables it).
    nesterov: Nesterov momentum.
    scale_coeff: the shape coefficient of ``s``.
    ns_coeffs: Newton–Schulz coefficients (preset name or rows).
    ns_steps: Newton–Schulz steps (``None``: the preset's, 5 for ``standard``).
    ns_eps: Newton–Schulz normalization epsilon (``1e-7``, the reference's).
    ns_dtype: Newton–Schulz compute dtype (``None``: the leaf's).
    mu_dtype: momentum dtype.
    weight_dimension_numbers: a dimension-numbers spec; ``None`` (default)
      is the default routing, ``optax_orth.route_by_path()``: embeddings, the
      head, biases, norm scales and vectors go to Adam, every other 2-D leaf
      to NAMO.
    adam_learning_rate: Adam's learning rate (``None``: ``learning_rate``).
    adam_b1: Adam's ``b1``.
    adam_b2: Adam's ``b2``.
    adam_eps: Adam's ``eps``.
    adam_weight_decay: Adam's weight decay.
    sharding: ``"auto"`` (the default): with a mesh in context
      (``jax.set_mesh``), orthogonalize each matrix whole on one device of the
      mesh axes that shard it (the owner scheme, see
      :mod:`optax_orth.sharding`); ``None``: off; or an
      :class:`optax_orth.OwnerSharding`. A no-op without a mesh.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Zhang, Liu and Schaeffer, `Adam Improves Muon: Adaptive Moment Estimation
    with Orthogonalized Momentum <https://arxiv.org/abs/2602.17080>`_, 2026;
    released code ``minxin-zhg/namo``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_orth
    >>> params = {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}
    >>> g = jax.random.normal(jax.random.key(0), (4, 8))
    >>> grads = {"w": g, "b": jnp.ones(8)}  # w: a matrix; b: the AdamW fallback
    >>> tx = optax_orth.namo(learning_rate=0.02)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> import optax
    >>> d = optax.tree_utils.tree_get(state, "step_size")["w"]  # one per matrix
    >>> d.shape, round(float(d[0, 0]), 2)
    ((1, 1), 1.95)
  """
  validation.check_hyperparameters(locals())
  spec = weight_dimension_numbers
  direction = transforms.orthogonalize_momentum(
    b1,
    nesterov=nesterov,
    mu_dtype=mu_dtype,
    ns_coeffs=ns_coeffs,
    ns_steps=ns_steps,
    eps=ns_eps,
    ns_dtype=ns_dtype,
    statistics=True,
    weight_dimension_numbers=spec,
    sharding=sharding,
  )
  orthogonal = transforms.scale_by_norm_adaptive(
    direction,
    learning_rate,
    b2=b2,
    eps=eps,
    granularity=granularity,
    step_size_transform=None if clamp is None else transforms.clamp_diagonal(clamp),
    scale_coeff=scale_coeff,
    weight_decay=weight_decay,
    weight_decay_mode=weight_decay_mode,
    cautious_weight_decay=cautious_weight_decay,
    weight_dimension_numbers=spec,
  )
  adam = _adam_fallback(
    learning_rate,
    adam_learning_rate,
    cautious_weight_decay,
    b1=adam_b1,
    b2=adam_b2,
    eps=adam_eps,
    weight_decay=adam_weight_decay,
  )
  return _partition(orthogonal, adam, spec)


def _base_args(base: Callable) -> str:
  """The ``Args:`` section of ``base``'s docstring (its entries, indented)."""
  doc = base.__doc__ or ""
  return doc.split("  Args:\n", 1)[1].split("\n\n  Returns:", 1)[0]


def _preset(base: Callable, name: str, doc: str, **defaults) -> Callable:
  """``base`` with other defaults, under its own name, docstring and signature.

  ``doc``'s ``BASE_ARGS`` is replaced by ``base``'s argument descriptions, so
  that ``help()`` of the preset documents every argument without restating it.
  """
  doc = doc.replace("BASE_ARGS", _base_args(base))
  sig = inspect.signature(base)
  for key in defaults:
    if key not in sig.parameters:
      raise TypeError(f"{base.__name__} has no argument {key!r}.")
  sig = sig.replace(
    parameters=[
      p.replace(default=defaults[p.name]) if p.name in defaults else p
      for p in sig.parameters.values()
    ]
  )

  @functools.wraps(base)
  def preset(*args, **kwargs):
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return base(*bound.args, **bound.kwargs)

  preset.__name__ = preset.__qualname__ = name
  preset.__doc__ = doc
  preset.__signature__ = sig  # type: ignore[attr-defined]
  del preset.__wrapped__  # so that inspect reports the new defaults
  return preset


namo_d = _preset(
  namo,
  "namo_d",
  r"""NAMO-D: NAMO with a clamped diagonal step size per input feature.

  As :func:`namo`, with the second moment and step size per input feature
  ``i`` (a row of the Flax kernel, a column of PyTorch's weight):

  .. math::
    V_i \leftarrow b_2 V_i + (1 - b_2)\|G_{i,:}\|^2, \quad
    d_i = \frac{\sqrt{1 - b_2^t}}{1 - b_1^t}
      \frac{\|\tilde M_{i,:}\|}{\sqrt{V_i} + \epsilon},
    \quad d_i \leftarrow \mathrm{clip}(d_i, c\,\bar d, \bar d / c),

  then ``K[i, :]`` is updated as in NAMO with ``alpha_i = lr * d_i``; that is
  ``O diag(d)`` in PyTorch's layout. It is :func:`namo` with
  ``granularity="input_feature"`` and ``clamp=0.75``: the same arguments,
  the same composition::

    partition(orthogonal=scale_by_norm_adaptive(
                  orthogonalize_momentum(b1, statistics=True), lr, b2=b2, eps=eps,
                  granularity="input_feature",
                  step_size_transform=clamp_diagonal(clamp)),
              adam=adamw)

  Its arguments are :func:`namo`'s; only the defaults of ``granularity``
  (``"input_feature"``) and ``clamp`` (``0.75``, the reference's) differ.

  Args:
BASE_ARGS

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Zhang, Liu and Schaeffer, `Adam Improves Muon: Adaptive Moment Estimation
    with Orthogonalized Momentum <https://arxiv.org/abs/2602.17080>`_, 2026;
    released code ``minxin-zhg/namo``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_orth
    >>> params = {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}
    >>> g = jax.random.normal(jax.random.key(0), (4, 8))
    >>> grads = {"w": g, "b": jnp.ones(8)}  # w: a matrix; b: the AdamW fallback
    >>> tx = optax_orth.namo_d(learning_rate=0.02)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> import optax
    >>> d = optax.tree_utils.tree_get(state, "step_size")["w"]
    >>> d.shape  # one step size per input feature (row of the kernel)
    (1, 4)
  """,
  granularity="input_feature",
  clamp=0.75,
)


def normuon(
  learning_rate: optax.ScalarOrSchedule = 0.02,
  *,
  b1: float = 0.95,
  b2: float = 0.95,
  eps: float = 1e-10,
  weight_decay: float = 0.0,
  cautious_weight_decay: bool = False,
  nesterov: bool = True,
  target_rms: float | None = None,
  ns_coeffs: orth_lib.CoeffsLike = "standard",
  ns_steps: int | None = None,
  ns_eps: float = 1e-7,
  ns_dtype: jax.typing.DTypeLike | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  weight_dimension_numbers: DimensionNumbersSpec = None,
  adam_learning_rate: optax.ScalarOrSchedule | None = 3e-4,
  adam_b1: float = 0.9,
  adam_b2: float = 0.95,
  adam_eps: float = 1e-10,
  adam_weight_decay: float = 0.0,
  sharding: ShardingLike = AUTO,
) -> optax.GradientTransformationExtraArgs:
  r"""NorMuon: Muon followed by per-neuron second-moment normalization.

  For each matrix (a neuron is a column ``j`` of the Flax kernel):

  .. math::
    O = \mathrm{NS}(\tilde M_t), \quad
    v_j \leftarrow b_2 v_j + (1 - b_2)\,\mathrm{mean}_i O_{ij}^2, \quad
    \hat O_{:,j} = \frac{O_{:,j}}{\sqrt{v_j} + \epsilon}
      \cdot \frac{\|O\|_F}{\|\hat O\|_F + \epsilon},

    K \leftarrow K (1 - \eta\lambda)
      - \eta \sqrt{\max(1, \text{fan\_out}/\text{fan\_in})}\, \hat O.

  ``target_rms=0.2`` gives the paper's Algorithm 1 instead (fixed RMS, no
  shape factor; pair it with ``nesterov=False`` for the paper's momentum).
  Composition::

    partition(orthogonal=chain(orthogonalize_momentum, scale_by_neuron_rms,
                               scale_by_shape, add_decayed_weights,
                               scale_by_learning_rate),
              adam=adamw)

  Args:
    learning_rate: a float or an optax schedule (reference ``0.02``).
    b1: momentum decay.
    b2: decay of the per-neuron second moment.
    eps: added to the denominators.
    weight_decay: decoupled weight decay (times ``lr``).
    cautious_weight_decay: decay only where the update and the weight agree
      in sign (:func:`optax_orth.add_cautious_weight_decay`), in both
      branches.
    nesterov: Nesterov momentum.
    target_rms: ``None`` (released code) or the paper's fixed RMS.
    ns_coeffs: Newton–Schulz coefficients (a preset name or rows).
    ns_steps: Newton–Schulz steps (``None``: the preset's, 5 for
      ``"standard"``).
    ns_eps: Newton–Schulz normalization epsilon (``1e-7``, the reference's).
    ns_dtype: Newton–Schulz compute dtype (``None``: the leaf's).
    mu_dtype: momentum dtype.
    weight_dimension_numbers: a dimension-numbers spec (``None``: the
      default routing, :func:`optax_orth.route_by_path`; or
      :func:`optax_orth.route_by_model`'s).
    adam_learning_rate: Adam's learning rate (reference ``3e-4``; ``None``:
      ``learning_rate``).
    adam_b1: Adam's ``b1``.
    adam_b2: Adam's ``b2``.
    adam_eps: Adam's ``eps``.
    adam_weight_decay: Adam's weight decay.
    sharding: where each matrix is orthogonalized, as in :func:`namo`.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Li et al., `NorMuon: Making Muon more efficient and scalable
    <https://arxiv.org/abs/2510.05491>`_, 2025.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_orth
    >>> params = {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}
    >>> g = jax.random.normal(jax.random.key(0), (4, 8))
    >>> grads = {"w": g, "b": jnp.ones(8)}  # w: a matrix; b: the AdamW fallback
    >>> tx = optax_orth.normuon(learning_rate=0.02)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> rms = jnp.sqrt(jnp.mean(updates["w"] ** 2, axis=0))  # per neuron
    >>> bool(jnp.allclose(rms, rms[0]))
    True
  """
  validation.check_hyperparameters(locals())
  spec = weight_dimension_numbers
  blocks = [
    transforms.orthogonalize_momentum(
      b1,
      nesterov=nesterov,
      mu_dtype=mu_dtype,
      ns_coeffs=ns_coeffs,
      ns_steps=ns_steps,
      eps=ns_eps,
      ns_dtype=ns_dtype,
      weight_dimension_numbers=spec,
      sharding=sharding,
    ),
    transforms.scale_by_neuron_rms(
      b2, eps, target_rms=target_rms, weight_dimension_numbers=spec
    ),
  ]
  if target_rms is None:
    blocks.append(transforms.scale_by_shape(spec))
  blocks += [
    _decay(weight_decay, None, cautious_weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  ]
  adam = _adam_fallback(
    learning_rate,
    adam_learning_rate,
    cautious_weight_decay,
    b1=adam_b1,
    b2=adam_b2,
    eps=adam_eps,
    weight_decay=adam_weight_decay,
  )
  return _partition(optax.chain(*blocks), adam, spec)


def _finite_sign(x: jax.Array) -> jax.Array:
  """``sign(x)``, with non-finite values kept: ``sign(inf) = 1`` would turn a
  diverged gradient into an ordinary step, silently."""
  return jnp.where(jnp.isfinite(x), jnp.sign(x), x)


def adamuon(
  learning_rate: optax.ScalarOrSchedule,
  *,
  b1: float = 0.95,
  b2: float | None = None,
  eps: float = 1e-8,
  weight_decay: float = 0.01,
  cautious_weight_decay: bool = False,
  sign_momentum: bool = True,
  second_moment_bias_correction: bool = False,
  target_rms: float = 0.2,
  nesterov: bool = True,
  ns_coeffs: orth_lib.CoeffsLike = "standard",
  ns_steps: int | None = None,
  ns_eps: float = 1e-7,
  ns_dtype: jax.typing.DTypeLike | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  weight_dimension_numbers: DimensionNumbersSpec = None,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  adam_b1: float = 0.9,
  adam_b2: float = 0.95,
  adam_eps: float = 1e-8,
  adam_weight_decay: float = 0.0,
  sharding: ShardingLike = AUTO,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaMuon: orthogonalized sign momentum, element-wise second moment, RMS 0.2.

  For each matrix ``K`` (``m x n``), with Muon's (Nesterov) momentum
  ``Mt`` of decay ``b1``:

  .. math::
    O_t = \mathrm{NS}(\mathrm{sign}(\tilde M_t)), \quad
    V_t = b_2 V_{t-1} + (1 - b_2)\, O_t \odot O_t, \quad
    \hat O_t = O_t \oslash (\sqrt{V_t} + \epsilon),

    K \leftarrow K - \eta \left(\frac{r \sqrt{mn}}{\|\hat O_t\|_F
      + \epsilon} \hat O_t + \lambda K\right),

  with ``r = target_rms = 0.2`` (the RMS of a typical Adam step, so that
  AdamW's learning rate carries over). The defaults are the authors' current
  release (``Chongjie-Si/AdaMuon``, ``gpt2/models/optimizers/adamuon.py`` at
  commit ``5b99dd0``, 2025-08-19; its Megatron optimizer has the same rule):
  the sign is taken, ``V`` decays with the momentum's ``b1`` and is not
  bias-corrected. Their first upload (``adamuon.py`` at ``3b84e03``,
  2025-07-18) orthogonalizes ``Mt`` itself, with ``b2 = 0.999`` and
  ``V_t / (1 - b_2^t)`` in place of ``V_t``:
  ``adamuon(lr, sign_momentum=False, b2=0.999,
  second_moment_bias_correction=True)`` is that rule. Composition::

    partition(orthogonal=chain(orthogonalize_momentum(orthogonalizer=NS o sign),
                               optax.scale_by_rms(b2, eps, eps_in_sqrt=False),
                               scale_to_rms(target_rms), add_decayed_weights,
                               scale_by_learning_rate),
              adam=adamw)

  The sign makes the direction independent of the gradients' scale: a
  gradient of ``1e-30`` gets a full-size step, as one of ``1`` does (see
  ``docs/reliability.md``).

  Args:
    learning_rate: a float or an optax schedule; AdamW's is a good start
      (the release's default is ``0.02``).
    b1: momentum decay (``0.95``).
    b2: decay of the element-wise second moment; ``None`` (default): ``b1``,
      as the current release. The first upload used ``0.999``.
    eps: added to ``sqrt(V)`` and to ``||O_hat||`` (``1e-8``).
    weight_decay: decoupled weight decay (times ``lr``; ``0.01``, the
      release's).
    cautious_weight_decay: decay only where the update and the weight agree
      in sign (:func:`optax_orth.add_cautious_weight_decay`), in both
      branches.
    sign_momentum: orthogonalize ``sign(Mt)`` (the current release and the
      paper's Algorithm 1) or ``Mt`` (the first upload).
    second_moment_bias_correction: divide ``V_t`` by ``1 - b2^t`` (the
      first upload) or not (the current release).
    target_rms: the RMS ``r`` of each matrix's update before the learning
      rate.
    nesterov: Nesterov momentum.
    ns_coeffs: Newton–Schulz coefficients (a preset name or rows; the
      release's are ``"standard"``).
    ns_steps: Newton–Schulz steps (``None``: the preset's, 5).
    ns_eps: Newton–Schulz normalization epsilon (``1e-7``, the release's).
    ns_dtype: Newton–Schulz compute dtype (``None``: the leaf's; the release
      runs it in bfloat16).
    mu_dtype: momentum dtype.
    weight_dimension_numbers: a dimension-numbers spec (``None``: the
      default routing, :func:`optax_orth.route_by_path`).
    adam_learning_rate: the AdamW fallback's learning rate (``None``:
      ``learning_rate``).
    adam_b1: AdamW's ``b1``.
    adam_b2: AdamW's ``b2``.
    adam_eps: AdamW's ``eps``.
    adam_weight_decay: AdamW's weight decay.
    sharding: where each matrix is orthogonalized, as in :func:`namo`.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Si, Zhang and Shen, `AdaMuon: Adaptive Muon Optimizer
    <https://arxiv.org/abs/2507.11005>`_, 2025 (Algorithm 1); released code
    ``Chongjie-Si/AdaMuon``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_orth
    >>> params = {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}
    >>> g = jax.random.normal(jax.random.key(0), (4, 8))
    >>> grads = {"w": g, "b": jnp.ones(8)}  # w: a matrix; b: the AdamW fallback
    >>> tx = optax_orth.adamuon(learning_rate=0.02)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> round(float(jnp.sqrt(jnp.mean(updates["w"] ** 2))), 4)  # 0.2 * lr
    0.004
  """
  validation.check_hyperparameters(locals())
  spec = weight_dimension_numbers
  ns = orth_lib.make_newton_schulz(ns_coeffs, ns_steps, ns_eps, ns_dtype)
  orthogonal = optax.chain(
    transforms.orthogonalize_momentum(
      b1,
      nesterov=nesterov,
      mu_dtype=mu_dtype,
      orthogonalizer=(lambda x: ns(_finite_sign(x))) if sign_momentum else ns,
      weight_dimension_numbers=spec,
      sharding=sharding,
    ),
    optax.scale_by_rms(
      b1 if b2 is None else b2,
      eps,
      eps_in_sqrt=False,
      bias_correction=second_moment_bias_correction,
    ),
    rescale.scale_to_rms(target_rms, eps, weight_dimension_numbers=spec),
    _decay(weight_decay, None, cautious_weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
  adam = _adam_fallback(
    learning_rate,
    adam_learning_rate,
    cautious_weight_decay,
    b1=adam_b1,
    b2=adam_b2,
    eps=adam_eps,
    weight_decay=adam_weight_decay,
  )
  return _partition(orthogonal, adam, spec)


#: Every optimizer alias, by name. The tests read their registry from here, so
#: an alias added to this dict gets every shared input and reliability test.
ALIASES: dict[str, Callable[..., optax.GradientTransformation]] = {
  "muon": muon,
  "namo": namo,
  "namo_d": namo_d,
  "normuon": normuon,
  "adamuon": adamuon,
}
