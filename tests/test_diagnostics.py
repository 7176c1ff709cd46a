"""optax_orth.diagnostics: each metric against a direct NumPy computation."""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_orth
from optax_orth import diagnostics as dg
from tests import reference_numpy as ref

MDN = optax_orth.MuonDimensionNumbers


# NumPy statements of the metrics, written from their definitions (float64).


def np_metrics(x: np.ndarray) -> dict[str, float]:
  """The update metrics of one (fan_in, fan_out) matrix."""
  x = np.asarray(x, np.float64)
  fan_in, fan_out = x.shape
  r = min(fan_in, fan_out)
  short = x if fan_in <= fan_out else x.T
  x_hat = np.sqrt(r) * short / np.linalg.norm(short)
  n = np.array([np.linalg.norm(x[:, j]) for j in range(fan_out)])
  return {
    "update_rms": np.sqrt(np.sum(x**2) / (fan_in * fan_out)),
    "update_spectral_norm": np.linalg.svd(x, compute_uv=False)[0],
    "orthogonality_error": np.linalg.norm(x_hat @ x_hat.T - np.eye(r)) / np.sqrt(r),
    "neuron_norm_max_min": n.max() / n.min(),
    "neuron_norm_cv": n.std() / n.mean(),
  }


def rand(shape, seed=0, row_scale=None):
  x = np.random.default_rng(seed).standard_normal(shape)
  if row_scale is not None:
    x = x * row_scale
  return x.astype(np.float32)


def close(actual, expected, rtol=2e-4, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# Per-matrix metrics.


class MatrixMetricsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_against_numpy(self):
    # Wide, tall and square; columns of unequal scale so that the neuron
    # imbalance is far from 1.
    for shape in [(5, 7), (7, 5)]:
      x = rand(shape, seed=sum(shape), row_scale=None) * np.linspace(
        0.5, 2.0, shape[1]
      ).astype(np.float32)
      got = self.variant(lambda x: dg.matrix_metrics(x, None))(jnp.asarray(x))
      want = np_metrics(x)
      assert set(got) == set(dg.UPDATE_METRICS)
      for name in dg.UPDATE_METRICS:
        close(got[name], want[name], rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_batched_leading_axes(self):
    x = rand((2, 3, 4, 6), seed=1)
    got = self.variant(lambda x: dg.matrix_metrics(x, None))(jnp.asarray(x))
    for name in dg.UPDATE_METRICS:
      assert got[name].shape == (2, 3)
      want = [[np_metrics(x[a, b])[name] for b in range(3)] for a in range(2)]
      close(got[name], np.array(want), rtol=1e-4)

  def test_orthogonality_error_special_matrices(self):
    q = np.linalg.qr(rand((8, 5), seed=2))[0]  # 8 x 5, orthonormal columns
    # A multiple of a semi-orthogonal matrix, either orientation: 0.
    close(dg.orthogonality_error(jnp.asarray(3.0 * q)), 0.0, atol=2e-6)
    close(dg.orthogonality_error(jnp.asarray(0.01 * q.T)), 0.0, atol=2e-6)
    # Rank one: sqrt(r - 1).
    rank_one = np.outer(rand(4, 3), rand(9, 4))
    close(dg.orthogonality_error(jnp.asarray(rank_one)), np.sqrt(3.0), rtol=1e-5)
    # Scale-free.
    x = rand((4, 6), seed=5)
    close(
      dg.orthogonality_error(jnp.asarray(1e-3 * x)),
      float(dg.orthogonality_error(jnp.asarray(x))),
      rtol=1e-5,
    )
    # The Newton–Schulz output of a full-rank matrix: below the 0.617 bound of
    # the docstring, and far above polar_svd's.
    o = jax.jit(optax_orth.newton_schulz)(jnp.asarray(x))
    e_ns = float(dg.orthogonality_error(o))
    assert 1e-3 < e_ns < 0.617
    assert (
      float(dg.orthogonality_error(jax.jit(optax_orth.polar_svd)(jnp.asarray(x))))
      < 1e-5
    )

  def test_zero_and_dead_neuron_conventions(self):
    got = dg.matrix_metrics(jnp.zeros((3, 4)))
    close(got["orthogonality_error"], 0.0)
    close(got["neuron_norm_max_min"], 1.0)
    close(got["neuron_norm_cv"], 0.0)
    close(got["update_spectral_norm"], 0.0)
    x = rand((3, 4), seed=6)
    x[:, 2] = 0.0  # a dead neuron
    got = dg.matrix_metrics(jnp.asarray(x))
    assert np.isposinf(got["neuron_norm_max_min"])
    assert all(np.isfinite(got[k]) for k in dg.UPDATE_METRICS if "max_min" not in k)

  def test_spectral_norm_power_iteration(self):
    # A clear gap between the top two singular values.
    u = np.linalg.qr(rand((6, 6), seed=7))[0]
    v = np.linalg.qr(rand((10, 6), seed=8))[0]
    x = (u * np.array([5.0, 2.0, 1.5, 1.0, 0.5, 0.1])) @ v.T
    exact = float(dg.spectral_norm(jnp.asarray(x, jnp.float32)))
    close(exact, 5.0, rtol=1e-5)
    close(dg.spectral_norm(jnp.asarray(x, jnp.float32), iterations=30), 5.0, rtol=1e-5)
    # Few iterations: a lower bound.
    assert float(dg.spectral_norm(jnp.asarray(x, jnp.float32), iterations=1)) <= (
      5.0 + 1e-4
    )
    # The default of the tree functions, on a matrix without a gap.
    g = jnp.asarray(rand((48, 48), seed=9))
    est = float(dg.spectral_norm(g, iterations=dg.POWER_ITERATIONS))
    assert (
      0.985 * float(dg.spectral_norm(g)) <= est <= float(dg.spectral_norm(g)) + 1e-4
    )
    with pytest.raises(ValueError, match="iterations"):
      dg.spectral_norm(jnp.ones((2, 2)), iterations=0)

  def test_rank_checks(self):
    with pytest.raises(ValueError, match="rank >= 2"):
      dg.orthogonality_error(jnp.ones(3))


# ---------------------------------------------------------------------------
# Trees, dimension numbers.


class UpdateMetricsTest(chex.TestCase):
  @chex.variants(with_jit=True)
  def test_stacked_and_plain_leaves(self):
    updates = {
      "w": jnp.asarray(rand((4, 6), seed=10)),
      # (layers, fan_in, fan_out) stack, and a (fan_out, batch, fan_in) leaf.
      "stack": jnp.asarray(rand((3, 5, 2), seed=11)),
      "odd": jnp.asarray(rand((7, 2, 4), seed=12)),
      "bias": jnp.ones(6),
    }
    spec = {
      "w": MDN(0, 1),
      "stack": MDN(reduction_axis=1, output_axis=2),
      "odd": MDN(reduction_axis=2, output_axis=0),
      "bias": None,
    }
    got = self.variant(
      lambda u: dg.update_metrics(u, spec, spectral_norm_iterations=None)
    )(updates)
    matrices = {
      "w": [np.asarray(updates["w"])],
      "stack": [np.asarray(updates["stack"][k]) for k in range(3)],
      "odd": [np.asarray(updates["odd"][:, k, :]).T for k in range(2)],
    }
    for name in dg.UPDATE_METRICS:
      assert got[name]["bias"] is None
      for leaf, mats in matrices.items():
        want = np.array([np_metrics(m)[name] for m in mats])
        assert got[name][leaf].shape == (len(mats),)
        assert got[name][leaf].dtype == jnp.float32
        close(got[name][leaf], want, rtol=1e-4)

  def test_default_spec_selects_2d_leaves(self):
    updates = {"k": jnp.ones((3, 4)), "b": jnp.ones(4), "c": jnp.ones((2, 3, 4))}
    got = dg.update_metrics(updates)
    assert got["update_rms"]["b"] is None and got["update_rms"]["c"] is None
    close(got["update_rms"]["k"], [1.0])

  def test_bad_dimension_numbers_name_the_leaf(self):
    with pytest.raises(ValueError, match="'layers/kernel'"):
      dg.update_metrics(
        {"layers": {"kernel": jnp.ones((2, 3, 4))}},
        MDN(reduction_axis=5, output_axis=1),
      )

  def test_to_dict_rows(self):
    got = dg.to_dict(
      dg.update_metrics(
        {"a": {"k": jnp.ones((2, 3, 4))}, "b": jnp.ones((3, 4))},
        {"a": {"k": MDN(1, 2)}, "b": MDN(0, 1)},
      )
    )
    assert set(got["update_rms"]) == {"a/k[0]", "a/k[1]", "b"}
    assert all(isinstance(v, float) for v in got["update_rms"].values())
    with pytest.raises(ValueError, match="mapping"):
      dg.to_dict([1.0])


# ---------------------------------------------------------------------------
# Metrics from the optimizer state, checked against a NumPy simulation.


def grads_at(step: int, params):
  """Gradients whose row scales drift, so NAMO-D's d_i differ and get clamped."""
  out = {}
  for i, (name, p) in enumerate(sorted(params.items())):
    shape = np.shape(p)
    rows = shape[-2] if len(shape) >= 2 else 1
    scale = np.exp(np.sin(0.7 * step + np.arange(rows) * 1.3))
    g = rand(shape, seed=100 * step + i)
    if len(shape) >= 2:
      g = g * scale[:, None]
    out[name] = jnp.asarray(g, jnp.float32)
  return out


PARAMS = {
  "hidden": jnp.asarray(rand((6, 8), seed=20)),
  "tall": jnp.asarray(rand((9, 4), seed=21)),
  "bias": jnp.zeros(8),
}


def simulate_namo(steps, per_feature, b1, b2, eps, clamp, lr, params=PARAMS):
  """NAMO / NAMO-D's d per matrix from ALGORITHMS.md, in float64 NumPy.

  Keys: a 2-D leaf's name, or ``(name, k)`` for matrix ``k`` of a
  ``(batch, fan_in, fan_out)`` leaf.
  """
  keys = []
  for name, p in params.items():
    if np.ndim(p) == 2:
      keys.append(name)
    elif np.ndim(p) == 3:
      keys += [(name, k) for k in range(np.shape(p)[0])]
  state = {}
  result = {}
  for t in range(1, steps + 1):
    grads = grads_at(t, params)
    for k in keys:
      g = grads[k] if isinstance(k, str) else grads[k[0]][k[1]]
      g = np.asarray(g, np.float64)
      m, v = state.get(k, (np.zeros(g.shape), None))
      if per_feature:
        g2 = np.sum(g**2, axis=1)
      else:
        g2 = np.sum(g**2)
      v = (1 - b2) * g2 if v is None else b2 * v + (1 - b2) * g2
      m = b1 * m + (1 - b1) * g
      mt = b1 * m + (1 - b1) * g
      corr = np.sqrt(1 - b2**t) / (1 - b1**t + 1e-12)
      mt2 = np.sum(mt**2, axis=1) if per_feature else np.sum(mt**2)
      d = corr * np.sqrt(mt2) / (np.sqrt(v) + eps)
      state[k] = (m, v)
      if per_feature:
        mean = d.mean()
        lo, hi = clamp * mean, mean / clamp
        result[k] = {
          "step_size": np.clip(d, lo, hi).mean(),
          "alpha": lr * np.clip(d, lo, hi).mean(),
          "step_size_max_min": d.max() / d.min(),
          "step_size_cv": d.std() / d.mean(),
          "clamped_fraction": np.mean((d < lo) | (d > hi)),
          "mt": mt,
          "d": np.clip(d, lo, hi),
        }
      else:
        result[k] = {"step_size": d, "alpha": lr * d, "mt": mt}
  return result


def run(tx, steps, jit=True):
  state = tx.init(PARAMS)
  update = jax.jit(tx.update) if jit else tx.update
  updates = None
  for t in range(1, steps + 1):
    updates, state = update(grads_at(t, PARAMS), state, PARAMS)
  return updates, state


class StateMetricsTest(chex.TestCase):
  def test_namo_alpha(self):
    # Non-default hyperparameters, none of them given to the diagnostics, and
    # a schedule: alpha uses the learning rate of the step, lr(t - 1).
    schedule = optax.linear_schedule(1e-2, 1e-3, 10)
    lr = float(schedule(3))
    b1, b2, eps = 0.8, 0.5, 1e-3
    tx = dg.with_diagnostics(
      optax_orth.namo(schedule, b1=b1, b2=b2, eps=eps, weight_decay=0.0)
    )
    updates, state = run(tx, 4)
    sim = simulate_namo(4, False, b1, b2, eps, None, lr)
    for k in ("hidden", "tall"):
      close(state.metrics["step_size"][k], [sim[k]["step_size"]], rtol=1e-4)
      close(state.metrics["alpha"][k], [sim[k]["alpha"]], rtol=1e-4)
      # The applied step is min(alpha s, 1) NS(Mt): check it on the update.
      fan_in, fan_out = PARAMS[k].shape
      s = 0.2 * np.sqrt(max(fan_in, fan_out))
      o = np.asarray(
        jax.jit(optax_orth.newton_schulz)(jnp.asarray(sim[k]["mt"], jnp.float32))
      )
      close(
        np.linalg.norm(np.asarray(updates[k])),
        min(sim[k]["alpha"] * s, 1.0) * np.linalg.norm(o),
        rtol=1e-3,
      )
    assert state.metrics["alpha"]["bias"] is None
    assert "clamped_fraction" not in state.metrics
    assert "neuron_rms_cv" not in state.metrics

  @parameterized.parameters(
    {"lr": 1e-2, "b1": 0.95, "b2": 0.99, "eps": 1e-8, "clamp": 0.9},
    {"lr": 3e-2, "b1": 0.8, "b2": 0.5, "eps": 1e-3, "clamp": 0.97},
  )
  def test_namo_d_clamp_statistics(self, lr, b1, b2, eps, clamp):
    tx = dg.with_diagnostics(optax_orth.namo_d(lr, b1=b1, b2=b2, eps=eps, clamp=clamp))
    updates, state = run(tx, 5)
    sim = simulate_namo(5, True, b1, b2, eps, clamp, lr)
    for k in ("hidden", "tall"):
      for name in (
        "step_size",
        "alpha",
        "step_size_max_min",
        "step_size_cv",
        "clamped_fraction",
      ):
        close(state.metrics[name][k], [sim[k][name]], rtol=1e-4)
      # What was applied: row i of the update is -min(alpha_i s, 1) O[i, :].
      fan_in, fan_out = PARAMS[k].shape
      s = 0.2 * np.sqrt(max(fan_in, fan_out))
      o = np.asarray(
        jax.jit(optax_orth.newton_schulz)(jnp.asarray(sim[k]["mt"], jnp.float32))
      )
      k_decay = 0.1 * np.minimum(lr * sim[k]["d"], 1.0)[:, None] * np.asarray(PARAMS[k])
      want = -np.minimum(lr * sim[k]["d"] * s, 1.0)[:, None] * o - k_decay
      close(np.asarray(updates[k]), want, rtol=2e-3, atol=1e-6)
    # The test exercises the clamp (otherwise the fraction check is vacuous).
    assert sim["hidden"]["clamped_fraction"] > 0

  def test_normuon_second_moment_spread(self):
    b1, b2 = 0.8, 0.6
    _, state = run(dg.with_diagnostics(optax_orth.normuon(0.01, b1=b1, b2=b2)), 3)
    for k in ("hidden", "tall"):
      rule = ref.NorMuon(0.01, b1=b1, b2=b2)
      p = np.asarray(PARAMS[k], np.float64)
      for t in range(1, 4):
        p = rule.step(p, np.asarray(grads_at(t, PARAMS)[k], np.float64))
      rho = np.sqrt(rule.v)
      close(state.metrics["neuron_rms_max_min"][k], [rho.max() / rho.min()], rtol=1e-4)
      close(state.metrics["neuron_rms_cv"][k], [rho.std() / rho.mean()], rtol=1e-4)
      assert float(state.metrics["neuron_rms_max_min"][k][0]) > 1.0
    assert "step_size" not in state.metrics

  def test_diagnostics_take_no_optimizer_hyperparameters(self):
    with pytest.raises(TypeError):
      dg.with_diagnostics(optax_orth.namo_d(), learning_rate=1e-2)

  def test_stacked_leaves(self):
    params = {"layers": jnp.asarray(rand((3, 4, 5), seed=30))}
    spec = {"layers": MDN(reduction_axis=1, output_axis=2)}
    lr, clamp = 1e-2, 0.9
    tx = dg.with_diagnostics(
      optax_orth.namo_d(lr, clamp=clamp, weight_dimension_numbers=spec), spec
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(1, 4):
      updates, state = step(grads_at(t, params), state, params)
    sim = simulate_namo(3, True, 0.95, 0.99, 1e-8, clamp, lr, params)
    for name in ("step_size", "alpha", "step_size_cv", "clamped_fraction"):
      got = state.metrics[name]["layers"]
      assert got.shape == (3,)
      close(got, [sim[("layers", k)][name] for k in range(3)], rtol=1e-4)
    for k in range(3):
      want = np_metrics(np.asarray(updates["layers"][k]))
      for name in ("orthogonality_error", "neuron_norm_cv"):
        close(state.metrics[name]["layers"][k], want[name], rtol=1e-4)

  def test_state_of_other_parameters_names_the_leaf(self):
    params = {"layers": jnp.ones((3, 4, 5))}
    spec = {"layers": MDN(reduction_axis=1, output_axis=2)}
    inner = optax_orth.namo_d(1e-2, weight_dimension_numbers=spec)
    state = inner.init(params)
    with pytest.raises(ValueError, match="'layers'"):
      dg.state_metrics({"other": jnp.ones((3, 4, 5))}, state)


# ---------------------------------------------------------------------------
# The wrapper and the recording block.


class WrapperTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_round_trip(self):
    params = {"hidden": PARAMS["hidden"], "bias": PARAMS["bias"]}
    inner = optax_orth.muon(0.05)
    tx = dg.with_diagnostics(inner)
    s_in, s_out = inner.init(params), tx.init(params)
    # Before the first update: zeros of the final shapes.
    close(s_out.metrics["update_rms"]["hidden"], [0.0])
    assert s_out.metrics["update_rms"]["bias"] is None
    step_in, step_out = jax.jit(inner.update), self.variant(tx.update)
    for t in range(1, 3):
      g = grads_at(t, params)
      u_in, s_in = step_in(g, s_in, params)
      u_out, s_out = step_out(g, s_out, params)
      # Updates unchanged (up to float32 rounding of eager versus jit).
      chex.assert_trees_all_close(u_out, u_in, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(s_out.inner_state, s_in, rtol=1e-5, atol=1e-6)
      assert int(s_out.count) == t
      want = dg.update_metrics(u_in)
      for name in dg.UPDATE_METRICS:
        chex.assert_trees_all_close(s_out.metrics[name], want[name], rtol=1e-4)

  def test_every(self):
    tx = dg.with_diagnostics(optax_orth.muon(0.05), every=2)
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    seen = []
    for t in range(1, 5):
      _, state = step(grads_at(t, PARAMS), state, PARAMS)
      seen.append(float(state.metrics["update_rms"]["hidden"][0]))
    # Computed at counts 0 and 2 (steps 1 and 3), kept in between.
    assert seen[0] == seen[1] and seen[2] == seen[3] and seen[1] != seen[2]
    with pytest.raises(ValueError, match="every"):
      dg.with_diagnostics(optax_orth.muon(0.05), every=0)

  def test_record_measures_the_newton_schulz_output(self):
    ortho = optax_orth.orthogonalize_momentum(0.9)
    tx = optax.chain(ortho, dg.record(), optax_orth.scale_by_neuron_rms())
    params = {k: v for k, v in PARAMS.items() if k != "bias"}
    state, s_ortho = tx.init(params), ortho.init(params)
    g = {k: v for k, v in grads_at(1, PARAMS).items() if k != "bias"}
    _, state = jax.jit(tx.update)(g, state)
    o, _ = jax.jit(ortho.update)(g, s_ortho)
    metrics = optax.tree_utils.tree_get(state, "metrics")
    for k in params:
      close(
        metrics["orthogonality_error"][k],
        [np_metrics(np.asarray(o[k]))["orthogonality_error"]],
        rtol=1e-4,
      )

  def test_record_inside_the_namo_direction_and_a_partition(self):
    # Masked (Adam) leaves pass through; record sees the Newton-Schulz output.
    spec = optax_orth.route_by_path()
    tx = optax.partition(
      {
        "orthogonal": optax_orth.scale_by_norm_adaptive(
          optax.chain(
            optax_orth.orthogonalize_momentum(
              statistics=True, weight_dimension_numbers=spec
            ),
            dg.record(spec),
          ),
          1e-2,
          weight_dimension_numbers=spec,
        ),
        "adam": optax.adam(1e-3),
      },
      lambda p: optax_orth.layout.label_tree(p, spec),
    )
    state = tx.init(PARAMS)
    _, state = jax.jit(tx.update)(grads_at(1, PARAMS), state, PARAMS)
    metrics = optax.tree_utils.tree_get(state, "metrics")
    assert metrics["update_rms"]["bias"] is None
    assert metrics["update_rms"]["hidden"].shape == (1,)
    assert 0 < float(metrics["orthogonality_error"]["hidden"][0]) < 0.617


# ---------------------------------------------------------------------------
# The plotting helper of examples/plot_diagnostics.py.


def test_heatmaps_helper(tmp_path, monkeypatch):
  pytest.importorskip("matplotlib")
  monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
  import plot_diagnostics

  updates = {"a": jnp.asarray(rand((3, 4), seed=40)), "b": jnp.ones((2, 3, 4))}
  spec = {"a": MDN(0, 1), "b": MDN(1, 2)}
  history = []
  for t in range(4):
    metrics = dg.update_metrics(jax.tree.map(lambda x, s=t + 1: s * x, updates), spec)
    history.append(dg.to_dict(metrics))
  history[2]["neuron_norm_max_min"]["a"] = float("inf")  # drawn, not a crash
  rows = ["a", "b[0]", "b[1]"]
  mat = plot_diagnostics._matrix(history, "update_rms", rows)
  assert mat.shape == (3, 4)
  close(mat[0], [history[t]["update_rms"]["a"] for t in range(4)])
  out = tmp_path / "maps.png"
  plot_diagnostics.heatmaps({"x": history, "y": history[:2]}, str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="metrics"):
    plot_diagnostics.heatmaps(history, str(out), metrics=["nope"])
