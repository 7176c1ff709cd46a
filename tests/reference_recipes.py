"""NumPy statements of the newer rules, one matrix at a time (Flax layout).

Written from the papers and released codes, independently of the package,
in float64; the Flax kernel is ``(fan_in, fan_out)``:

* cautious weight decay: Chen et al. 2025 (arXiv 2510.12402), Algorithm 1,
  ``x <- x - eta (u + lambda 1[u x >= 0] x)``; Dion's ``cautious_wd``.
* AdaMuon: Si et al. 2025 (arXiv 2507.11005 v2), Algorithm 1, and both
  releases of ``Chongjie-Si/AdaMuon`` (``5b99dd0``'s
  ``gpt2/models/optimizers/adamuon.py``, and the first upload ``3b84e03``).
* MuonH: Levanter's ``muonh.py`` (``scale_invariant_update``) with its
  ``"quintic"`` Newton–Schulz rows.
* NorMuon over the larger axis: modded-nanogpt's NorMuon (``red_dim`` is the
  smaller axis, the statistics run along the larger one), and its whole rule
  with the cautious ``lr^2`` decay.
* Dion's Muon with cautious weight decay.
* QK-clip: Kimi K2 (arXiv 2507.20534), Algorithm 1.
"""

from __future__ import annotations

import numpy as np

from tests import reference_numpy as ref


def cautious(u, k):
  """The paper's indicator ``1[u * k >= 0]``."""
  return (u * k >= 0).astype(np.float64)


class _Momentum:
  """``M = b M + (1 - b) G`` and the (Nesterov) direction, as the references."""

  def __init__(self, beta, nesterov):
    self.beta, self.nesterov, self.m = beta, nesterov, None

  def __call__(self, g):
    b = self.beta
    self.m = (1 - b) * g if self.m is None else b * self.m + (1 - b) * g
    return (1 - b) * g + b * self.m if self.nesterov else self.m


class CautiousMuon(ref.Muon):
  """optax.contrib.muon's rule with the decay made cautious."""

  def step(self, k, g):
    b = self.beta
    self.m = (1 - b) * g if self.m is None else b * self.m + (1 - b) * g
    self.t += 1
    mt = b * self.m / (1 - b ** (self.t + 1)) + (1 - b) * g / (1 - b**self.t)
    fan_in, fan_out = k.shape
    o = ref.ns(mt, eps=self.eps) * np.sqrt(max(1, fan_out / fan_in))
    return k - self.lr * (o + self.wd * cautious(o, k) * k)


class CautiousNamo:
  """NAMO / NAMO-D (adaptive decay) with the decay made cautious."""

  def __init__(self, lr, b1=0.95, b2=0.99, eps=1e-8, wd=0.1, diagonal=False, c=0.75):
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, wd
    self.diagonal, self.c = diagonal, c
    self.mom, self.v, self.t = _Momentum(b1, True), None, 0

  def step(self, k, g):
    b1, b2 = self.b1, self.b2
    axis = 1 if self.diagonal else None
    g2 = np.sum(g * g, axis=axis)
    self.v = (1 - b2) * g2 if self.v is None else b2 * self.v + (1 - b2) * g2
    mt = self.mom(g)
    o = ref.ns(mt)
    self.t += 1
    corr = self.lr * np.sqrt(1 - b2**self.t) / (1 - b1**self.t + 1e-12)
    d = np.linalg.norm(mt, axis=axis) / (np.sqrt(self.v) + self.eps)
    if self.diagonal:
      mean = d.mean()
      d = np.clip(d, self.c * mean, mean / self.c)[:, None]
    alpha = corr * d
    s = 0.2 * np.sqrt(max(k.shape))
    shrink = np.minimum(self.wd * np.minimum(alpha, 1), 1)
    return k - np.minimum(alpha * s, 1) * o - shrink * cautious(o, k) * k


class AdaMuon:
  """AdaMuon, from ``Chongjie-Si/AdaMuon``.

  The current release (``gpt2/models/optimizers/adamuon.py`` at ``5b99dd0``):
  ``M.lerp_(g, 1 - b1)``; Nesterov ``g.lerp_(M, b1)``; ``O = NS(sign(.))``;
  ``v = b1 v + (1 - b1) O^2``; ``O / (sqrt(v) + eps)``; times ``0.2
  sqrt(min * max) / (||.|| + eps)``; ``p *= 1 - lr wd``; ``p -= lr O``.
  The first upload (``adamuon.py`` at ``3b84e03``): no sign, ``v`` with its
  own ``beta2`` and divided by ``1 - beta2^t``, and the scale split as
  ``sqrt(min) / (||.|| + eps)`` and ``0.2 sqrt(max)`` (the same product).
  ``b2=None`` is the release's ``b1``; ``cwd`` makes the decay cautious.
  """

  def __init__(
    self, lr, b1=0.95, b2=None, eps=1e-8, wd=0.0, sign=True, bias2=False, cwd=False
  ):
    self.lr, self.eps, self.wd, self.sign = lr, eps, wd, sign
    self.b2 = b1 if b2 is None else b2
    self.bias2, self.cwd, self.mom, self.v, self.t = (
      bias2,
      cwd,
      _Momentum(b1, True),
      None,
      0,
    )

  def step(self, k, g):
    mt = self.mom(g)
    o = ref.ns(np.sign(mt) if self.sign else mt)
    b2 = self.b2
    self.v = (1 - b2) * o * o if self.v is None else b2 * self.v + (1 - b2) * o * o
    self.t += 1
    v = self.v / (1 - b2**self.t) if self.bias2 else self.v
    o = o / (np.sqrt(v) + self.eps)
    o = o * 0.2 * np.sqrt(min(k.shape) * max(k.shape)) / (np.linalg.norm(o) + self.eps)
    decay = self.wd * (cautious(o, k) if self.cwd else 1.0) * k
    return k - self.lr * (o + decay)


# Levanter's "quintic" rows (levanter/optim/util.py), the same as Dion's.
QUINTIC = (
  (4.0848, -6.8946, 2.9270),
  (3.9505, -6.3029, 2.6377),
  (3.7418, -5.5913, 2.3037),
  (2.8769, -3.1427, 1.2046),
  (2.8366, -3.0525, 1.2012),
)
# modded-nanogpt's polar_express_coeffs (train_gpt.py).
POLAR_EXPRESS = (
  (8.156554524902461, -22.48329292557795, 15.878769915207462),
  (4.042929935166739, -2.808917465908714, 0.5000178451051316),
  (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
  (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
  (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


class MuonH:
  """Levanter's MuonH (marin-community/marin ``src/levanter/optim/muonh.py``
  at ``e8fe178``, ``scale_with_muonh``; its Newton–Schulz from
  ``levanter/optim/util.py`` at ``c877ddb``, the default ``"quintic"`` rows):
  ``buf = m buf + g``; Nesterov ``u = m buf + g``; ``O = NS(u)`` with ``X /
  (||X|| + eps)``; ``p' = p - lr O ||p|| / max(||O||, 1e-10)``; ``p'' = p' /
  max(||p'||, 1e-10) ||p||``. ``lr`` may be a function of the step."""

  def __init__(self, lr, momentum=0.95, eps=1e-8, rows=QUINTIC):
    self.lr, self.momentum, self.eps, self.rows = lr, momentum, eps, rows
    self.buf, self.t = None, 0

  def step(self, k, g):
    mu = self.momentum
    self.buf = g if self.buf is None else mu * self.buf + g
    o = ref.ns(mu * self.buf + g, rows=self.rows, eps=self.eps)
    lr = self.lr(self.t) if callable(self.lr) else self.lr
    self.t += 1
    new = k - lr * o * np.linalg.norm(k) / max(np.linalg.norm(o), 1e-10)
    return new / max(np.linalg.norm(new), 1e-10) * np.linalg.norm(k)


class ModdedNorMuon:
  """modded-nanogpt's NorMuon (KellerJordan/modded-nanogpt ``train_gpt.py`` at
  ``f411b3d``: ``polar_express``, ``_apply_normuon_variance_reduction``,
  ``_cautious_wd_and_update_inplace``), on the matrix as it stores it, ``W =
  K.T`` (out, in):

  Nesterov momentum by ``lerp``; ``V = PE(.)`` with ``X / (1.02 ||X|| +
  1e-6)``; the mean of ``V^2`` over the smaller axis (over columns when
  ``rows >= cols``) into a buffer by ``lerp(., 1 - beta2)``; ``V * rsqrt(max(
  buf, 1e-10))``, rescaled to ``V``'s norm; then with ``s = sqrt(max(1, rows /
  cols))`` and the schedule's ``lr(t)``: ``W -= W 1[V W >= 0] wd lr(t) s lr(t)
  + V s lr(t)``.
  """

  def __init__(self, lr, wd, momentum=0.95, beta2=0.9):
    self.lr, self.wd, self.momentum, self.beta2 = lr, wd, momentum, beta2
    self.m, self.buf, self.t = None, None, 0

  def step(self, k, g):
    w, gw = k.T, g.T
    mu = self.momentum
    self.m = (1 - mu) * gw if self.m is None else self.m + (1 - mu) * (gw - self.m)
    v = ref.ns(gw + mu * (self.m - gw), rows=POLAR_EXPRESS, eps=1e-6, safety=1.02)
    red = -1 if w.shape[0] >= w.shape[1] else -2
    v_mean = np.mean(v * v, axis=red, keepdims=True)
    size = v.shape[red]
    v_norm = np.sqrt(np.sum(v_mean) * size)
    if self.buf is None:
      self.buf = np.zeros_like(v_mean)
    self.buf = self.buf + (1 - self.beta2) * (v_mean - self.buf)
    step = 1 / np.sqrt(np.maximum(self.buf, 1e-10))
    v_norm_new = np.sqrt(np.sum(v_mean * size * step**2))
    v = v * step * (v_norm / max(v_norm_new, 1e-10))
    lr = self.lr(self.t) if callable(self.lr) else self.lr
    self.t += 1
    s = np.sqrt(max(1.0, w.shape[0] / w.shape[1]))
    mask = (v * w >= 0).astype(np.float64)
    w = w - w * mask * (self.wd * lr) * (s * lr) - v * (s * lr)
    return w.T


class DionCautiousMuon:
  """Dion's Muon with ``cautious_wd=True`` (microsoft/dion ``dion/muon.py`` at
  ``0a059a4``: ``muon_update_pre_orthogonalize``,
  ``muon_update_post_orthogonalize``, ``adjust_lr_spectral_norm``, with its
  ``zeropower_via_newtonschulz5``), on ``W = K.T`` (out, in): ``M = mu M + G``;
  ``U = NS(M)`` (or Nesterov ``mu M + G``); ``X -= lr wd 1[X U >= 0] X``;
  ``X -= lr sqrt(out / in) U``."""

  def __init__(self, lr, wd, mu=0.95, nesterov=False, eps=1e-8):
    self.lr, self.wd, self.mu, self.nesterov, self.eps = lr, wd, mu, nesterov, eps
    self.m = None

  def step(self, k, g):
    w, gw = k.T, g.T
    self.m = gw if self.m is None else self.mu * self.m + gw
    u = self.mu * self.m + gw if self.nesterov else self.m
    u = ref.ns(u, rows=QUINTIC, eps=self.eps)
    mask = (w * u >= 0).astype(np.float64)
    w = w - self.lr * self.wd * mask * w
    w = w - self.lr * np.sqrt(w.shape[0] / w.shape[1]) * u
    return w.T


class NorMuonAxis(ref.NorMuon):
  """NorMuon with the second moment per input feature (``axis="fan_in"``) or
  along the larger axis (``"larger"``, modded-nanogpt)."""

  def __init__(self, lr, axis, **kw):
    super().__init__(lr, **kw)
    self.axis = axis

  def normalize(self, o):
    fan_in, fan_out = o.shape
    keep_rows = self.axis == "fan_in" or (self.axis == "larger" and fan_in > fan_out)
    if not keep_rows:
      return super().normalize(o)
    n0 = np.linalg.norm(o)
    ms = np.mean(o * o, axis=1)  # per input feature: mean over the outputs
    self.v = (
      (1 - self.b2) * ms if self.v is None else self.b2 * self.v + (1 - self.b2) * ms
    )
    o = o / (np.sqrt(self.v) + self.eps)[:, None]
    return o * n0 / (np.linalg.norm(o) + self.eps)


def qk_clip(w_q, w_k, s_max, tau, num_heads):
  """Kimi K2's clip of one layer: per head ``h`` with ``S_h > tau``, both
  ``W_q^h`` and ``W_k^h`` (columns of the ``(d, heads * head_dim)`` kernels)
  are multiplied by ``sqrt(tau / S_h)``."""
  w_q, w_k = np.array(w_q, np.float64), np.array(w_k, np.float64)
  hd = w_q.shape[1] // num_heads
  for h in range(num_heads):
    if s_max[h] > tau:
      f = np.sqrt(tau / s_max[h])
      w_q[:, h * hd : (h + 1) * hd] *= f
      w_k[:, h * hd : (h + 1) * hd] *= f
  return w_q, w_k


def max_logits(x, w_q, w_k, num_heads):
  """``max_{b,i<=j} q_i . k_j / sqrt(head_dim)`` per head (causal)."""
  b, t, _ = x.shape
  hd = w_q.shape[1] // num_heads
  q = (x @ w_q).reshape(b, t, num_heads, hd)
  k = (x @ w_k).reshape(b, t, num_heads, hd)
  s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(hd)
  causal = np.tril(np.ones((t, t), bool))
  return np.where(causal, s, -np.inf).max(axis=(0, 2, 3))


def assert_close_up_to_mask_flips(ours, theirs, frac=0.005, rtol=2e-4, atol=2e-5):
  """Trajectories equal to ``rtol``/``atol`` except at a few elements.

  The cautious mask ``1[u K >= 0]`` is discontinuous: where ``u`` is within
  float32 rounding of zero, float32 and float64 may disagree on it, and that
  element's decay (``lr * lambda * K``, small) differs. The gradients are
  fixed in advance, so such a difference stays in its element. Allows at most
  ``frac`` of each leaf's elements to differ, and those by at most ``1e-2``.
  """
  assert len(ours) == len(theirs)
  for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
    for name in a:
      x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
      bad = np.abs(x - y) > atol + rtol * np.abs(y)
      msg = f"step {step}, leaf {name}: {bad.sum()} of {bad.size} differ"
      assert bad.mean() <= frac, msg
      np.testing.assert_allclose(x, y, atol=1e-2, err_msg=msg)
