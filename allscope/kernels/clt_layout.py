"""The causal layout of a cross-layer transcoder's decoder: one home for its pair indexing.

A CLT over L layers stores w_dec [F, P, d] with P = L (L + 1) / 2 (source, target) pairs,
target >= source, in source-major order: p(s, t) = off(s) + (t - s), off(s) = s L - s (s - 1) / 2.
Latent f of source s owns the contiguous rows w_dec[f, off(s) : off(s) + L - s] (targets s..L-1).
"""

from __future__ import annotations

import numpy as np


def n_pairs(n_layers: int) -> int:
  return n_layers * (n_layers + 1) // 2


def offset(source: int, n_layers: int) -> int:
  """off(s): the pair index of (s, s)."""
  return source * n_layers - source * (source - 1) // 2


def offsets(n_layers: int) -> np.ndarray:
  """[L] int32 off(s) for every source."""
  return np.array([offset(s, n_layers) for s in range(n_layers)], np.int32)


def pair_index(n_layers: int) -> np.ndarray:
  """[L, L] int32 p(s, t) for t >= s, -1 below the diagonal."""
  out = np.full((n_layers, n_layers), -1, np.int32)
  for s in range(n_layers):
    out[s, s:] = offset(s, n_layers) + np.arange(n_layers - s)
  return out


def pair_source(n_layers: int) -> np.ndarray:
  """[P] int32: the source layer of every pair."""
  return np.concatenate([np.full(n_layers - s, s, np.int32) for s in range(n_layers)])


def pair_target(n_layers: int) -> np.ndarray:
  """[P] int32: the target layer of every pair."""
  return np.concatenate([np.arange(s, n_layers, dtype=np.int32) for s in range(n_layers)])


def n_layers_of(n_pairs_: int) -> int:
  """L from P = L (L + 1) / 2; raises if P is not triangular."""
  n = int(round((np.sqrt(8 * n_pairs_ + 1) - 1) / 2))
  if n_pairs(n) != n_pairs_:
    raise ValueError(f"{n_pairs_} decoder pairs is not L (L + 1) / 2 for any layer count L")
  return n


def to_dense(w_dec: np.ndarray, source: int) -> np.ndarray:
  """Causal [F, P, d] -> source layer's Gemma Scope 2 [F, L, d], zero for targets before it."""
  n = n_layers_of(w_dec.shape[1])
  out = np.zeros((w_dec.shape[0], n, w_dec.shape[2]), w_dec.dtype)
  off = offset(source, n)
  out[:, source:] = w_dec[:, off:off + n - source]
  return out


def from_dense(per_source) -> np.ndarray:
  """[L] arrays [F, L, d] (or one [L, F, L, d]) -> causal [F, P, d]; entries before s dropped."""
  n = len(per_source)
  return np.concatenate([np.asarray(per_source[s])[:, s:] for s in range(n)], axis=1)
