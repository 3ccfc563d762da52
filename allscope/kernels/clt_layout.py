"""Causal CLT decoder layout: one array w_dec [F, P, d] over the P = L (L + 1) / 2 (source, target)
pairs with target >= source, source-major, so a latent's rows for all its targets are contiguous.

p(s, t) = off(s) + (t - s), off(s) = s L - s (s - 1) / 2.
"""

from __future__ import annotations

import numpy as np


def num_pairs(num_layers: int) -> int:
  """P = L (L + 1) / 2."""
  return num_layers * (num_layers + 1) // 2


def pair_offset(source: int, num_layers: int) -> int:
  """off(s): the pair of (s, s); (s, t) is off(s) + t - s."""
  return source * num_layers - source * (source - 1) // 2


def pair_offsets(num_layers: int) -> np.ndarray:
  """off(s) for every source layer, int32 [L]."""
  return np.array([pair_offset(s, num_layers) for s in range(num_layers)], np.int32)


def pair_index(num_layers: int) -> np.ndarray:
  """p(s, t) as int32 [L, L], -1 where t < s (no decoder: the CLT is causal)."""
  s, t = np.meshgrid(np.arange(num_layers), np.arange(num_layers), indexing="ij")
  return np.where(t >= s, pair_offsets(num_layers)[s] + t - s, -1).astype(np.int32)


def pair_layers(num_layers: int) -> tuple[np.ndarray, np.ndarray]:
  """(source, target) of every pair p, each int32 [P]; the inverse of `pair_index`."""
  s, t = np.triu_indices(num_layers)  # row-major upper triangle = source-major pair order
  return s.astype(np.int32), t.astype(np.int32)
