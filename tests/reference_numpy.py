"""Our own NumPy statement of ../shared/ALGORITHMS.md, one matrix at a time.

Written independently of the package: plain float64 NumPy loops over the
rules as the specification states them, for the Flax layout (fan_in, fan_out).
"""

from __future__ import annotations

import numpy as np

STANDARD = [(3.4445, -4.7750, 2.0315)] * 5


def ns(x: np.ndarray, rows=STANDARD, eps: float = 1e-7, safety: float = 1.0):
  x = np.asarray(x, np.float64)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  x = x / (np.linalg.norm(x) * safety + eps)
  for a, b, c in rows:
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def polar(x: np.ndarray) -> np.ndarray:
  u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return u @ vt


class Muon:
  """optax.contrib.muon's matrix rule (bias-corrected Nesterov momentum)."""

  def __init__(self, lr, beta=0.95, eps=1e-8, wd=0.0, nesterov=True):
    self.lr, self.beta, self.eps, self.wd, self.nesterov = lr, beta, eps, wd, nesterov
    self.m, self.t = None, 0

  def step(self, k, g):
    b = self.beta
    self.m = (1 - b) * g if self.m is None else b * self.m + (1 - b) * g
    self.t += 1
    if self.nesterov:
      mt = b * self.m / (1 - b ** (self.t + 1)) + (1 - b) * g / (1 - b**self.t)
    else:
      mt = self.m / (1 - b**self.t)
    fan_in, fan_out = k.shape
    o = ns(mt, eps=self.eps) * np.sqrt(max(1, fan_out / fan_in))
    return k - self.lr * (o + self.wd * k)


class Namo:
  """NAMO (granularity "matrix") and NAMO-D (granularity "feature")."""

  def __init__(
    self,
    lr,
    b1=0.95,
    b2=0.99,
    eps=1e-8,
    wd=0.1,
    nesterov=True,
    scale_coeff=0.2,
    diagonal=False,
    clamp=0.75,
    decoupled=False,
    direction=None,
  ):
    self.__dict__.update(locals())
    del self.__dict__["self"]
    self.m, self.v, self.t = None, None, 0

  def step(self, k, g):
    b1, b2 = self.b1, self.b2
    fan_in, fan_out = k.shape
    lr = self.lr(self.t) if callable(self.lr) else self.lr
    if self.diagonal:
      g2 = np.sum(g * g, axis=1)  # per input feature: norm over the output axis
    else:
      g2 = np.sum(g * g)
    self.v = (1 - b2) * g2 if self.v is None else b2 * self.v + (1 - b2) * g2
    self.m = (1 - b1) * g if self.m is None else b1 * self.m + (1 - b1) * g
    mt = (1 - b1) * g + b1 * self.m if self.nesterov else self.m
    o = ns(mt) if self.direction is None else self.direction(mt)
    self.t += 1
    beta = lr * np.sqrt(1 - b2**self.t) / (1 - b1**self.t + 1e-12)
    scale = self.scale_coeff * np.sqrt(max(fan_in, fan_out))
    if self.diagonal:
      d = np.linalg.norm(mt, axis=1) / (np.sqrt(self.v) + self.eps)
      c = self.clamp
      if 0 < c <= 1:
        mean = d.mean()
        if np.isfinite(mean) and mean > 0:
          d = np.clip(d, c * mean, mean / c)
      alpha = beta * d[:, None]
      if self.decoupled:
        k = k * (1 - lr * self.wd)
      else:
        k = k * np.maximum(0, 1 - self.wd * np.minimum(alpha, 1))
      return k - np.minimum(alpha * scale, 1) * o
    alpha = beta * np.linalg.norm(mt) / (np.sqrt(self.v) + self.eps)
    k = k * (1 - lr * self.wd) if self.decoupled else k * (1 - self.wd * min(alpha, 1))
    return k - min(alpha * scale, 1) * o


class NorMuon:
  """NorMuon's released rule, or the paper's fixed-RMS form."""

  def __init__(
    self, lr, b1=0.95, b2=0.95, eps=1e-10, wd=0.0, nesterov=True, target_rms=None
  ):
    self.__dict__.update(locals())
    del self.__dict__["self"]
    self.m, self.v = None, None

  def step(self, k, g):
    b1 = self.b1
    fan_in, fan_out = k.shape
    self.m = (1 - b1) * g if self.m is None else b1 * self.m + (1 - b1) * g
    mt = (1 - b1) * g + b1 * self.m if self.nesterov else self.m
    o = self.normalize(ns(mt))
    if self.target_rms is None:
      o = o * np.sqrt(max(1, fan_out / fan_in))
    k = k * (1 - self.lr * self.wd)
    return k - self.lr * o

  def normalize(self, o):
    """The per-neuron normalization (updates the second moment)."""
    b2, eps = self.b2, self.eps
    fan_in, fan_out = o.shape
    n0 = np.linalg.norm(o)
    col_ms = np.mean(o * o, axis=0)  # per neuron j: mean over the reduction axis
    self.v = (1 - b2) * col_ms if self.v is None else b2 * self.v + (1 - b2) * col_ms
    o = o / (np.sqrt(self.v) + eps)[None, :]
    if self.target_rms is None:
      return o * n0 / (np.linalg.norm(o) + eps)
    return o * self.target_rms * np.sqrt(fan_in * fan_out) / (np.linalg.norm(o) + eps)
