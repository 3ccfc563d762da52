"""Fresh random inputs for every kernel test; a failure names its seed."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng(request):
  seed = int(np.random.SeedSequence().entropy % (1 << 63))
  request.node.user_properties.append(("seed", seed))
  print(f"seed {seed}")  # shown by pytest for a failing test
  return np.random.default_rng(seed)


def rel(a, b) -> float:
  """Relative error ||a - b|| / ||b|| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def sparse_indices(rng, b: int, c: int, n: int, dup: bool = True) -> np.ndarray:
  """[b, c] int32 rows: random, with duplicates inside rows when dup (and always across rows)."""
  if dup:
    out = rng.integers(0, n, (b, c))
    out[:, -1] = out[:, 0]  # at least one duplicate in every row
    return out.astype(np.int32)
  return np.stack([rng.choice(n, c, replace=False) for _ in range(b)]).astype(np.int32)


def ragged_values(rng, b: int, c: int, dtype=np.float32) -> np.ndarray:
  """[b, c] values, each row using a random prefix of its slots (zeros after: empty slots)."""
  v = rng.standard_normal((b, c))
  used = rng.integers(0, c + 1, b)
  v[np.arange(c)[None, :] >= used[:, None]] = 0.0
  v[0] = 0.0  # one row entirely empty
  return v.astype(dtype)
