"""Synthetic activations from a known overcomplete sparse dictionary, served through Grain.

Each row has a sparse code c [L, F_true] (each feature fires with probability l0 / F_true,
magnitude 1 + |N(0, 0.5)|) and writes
  site_in[l]  = c[l] @ D_in[l]                  (unit-norm true features)
  site_out[l] = c[l] @ D_out[l]                 (per-layer kinds)
  site_out[t] = sum_{s <= t} c[s] @ D_clt[s, t]   (mode="clt")
so a dictionary that learns the truth reconstructs the data exactly. The source is random-access
and served in global batches exactly like an activation store (pipelines.reader.GlobalBatches). Rows are drawn once, vectorized, and held in memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from allscope.pipelines.reader import GlobalBatches


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  d: int = 32
  n_features: int = 64
  n_layers: int = 1
  l0: float = 4.0
  site_in: str = "resid_post"
  site_out: str = "resid_post"
  mode: str = "same"  # same (sae) | map (transcoder) | clt
  dtype: str = "float32"
  scale: float = 1.0  # raw activations are scaled by this (tests the normalization)
  seed: int = 0


def _unit(a: np.ndarray) -> np.ndarray:
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


class SyntheticSource:
  """A Grain random-access source (len / getitem) of records of rows, like the store's records."""

  def __init__(self, spec: SyntheticSpec, n_rows: int = 16384, rows_per_record: int = 64):
    if n_rows % rows_per_record:
      raise ValueError(f"n_rows={n_rows} is not a multiple of rows_per_record={rows_per_record}")
    self.spec = spec
    self.n_rows = n_rows
    self.rows_per_record = rows_per_record
    rng = np.random.default_rng(spec.seed)
    f, d, nl = spec.n_features, spec.d, spec.n_layers
    self.d_in = _unit(rng.standard_normal((nl, f, d)))
    if spec.mode == "clt":
      dec = rng.standard_normal((nl, f, nl, d)) * np.triu(np.ones((nl, nl)))[:, None, :, None]
      self.d_out = dec / np.sqrt(np.sum(dec**2, axis=(2, 3), keepdims=True))
    elif spec.mode == "map":
      self.d_out = _unit(rng.standard_normal((nl, f, d)))
    else:
      self.d_out = self.d_in

    codes = self._codes(rng, n_rows)
    if spec.mode == "clt":
      y = np.einsum("nsf,sftd->ntd", codes, self.d_out)
    else:
      y = np.einsum("nlf,lfd->nld", codes, self.d_out)
    x = np.einsum("nlf,lfd->nld", codes, self.d_in)
    dtype = "float32" if spec.dtype == "bfloat16" else spec.dtype
    self.columns = {spec.site_in: (x * spec.scale).astype(dtype)}
    if spec.site_out != spec.site_in:
      self.columns[spec.site_out] = (y * spec.scale).astype(dtype)
    if spec.dtype == "bfloat16":
      import ml_dtypes
      self.columns = {k: v.astype(ml_dtypes.bfloat16) for k, v in self.columns.items()}

  def _codes(self, rng: np.random.Generator, n: int) -> np.ndarray:
    spec = self.spec
    shape = (n, spec.n_layers, spec.n_features)
    on = rng.random(shape, dtype=np.float32) < spec.l0 / spec.n_features
    mags = 1.0 + np.abs(rng.normal(0.0, 0.5, shape)).astype(np.float32)
    return on * mags

  def __len__(self) -> int:
    return self.n_rows // self.rows_per_record

  def __repr__(self) -> str:  # stable across processes: Grain records it in the iterator state
    return f"SyntheticSource({self.spec}, n_rows={self.n_rows}, rows={self.rows_per_record})"

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Record `index`: a block of rows_per_record rows, {site: [rows, n_layers, d]}."""
    rows = slice(index * self.rows_per_record, (index + 1) * self.rows_per_record)
    return {site: col[rows] for site, col in self.columns.items()}

  def norm_scale(self, n: int = 2048) -> dict[str, np.ndarray]:
    """Per-(site, layer) scalar making the mean squared norm 1, as the store's manifest gives."""
    return {site: 1.0 / np.sqrt(np.mean(np.sum(np.square(col[:n].astype(np.float64)), axis=-1),
                                        axis=0)) for site, col in self.columns.items()}


def loader(source: SyntheticSource, batch_size: int, seed: int = 0,
           shuffle: bool = True) -> GlobalBatches:
  """Global batches {site: [batch_size, n_layers, d]} in a seeded order (what `train` reads)."""
  if batch_size % source.rows_per_record:
    raise ValueError(
        f"batch_size={batch_size} is not a multiple of rows_per_record={source.rows_per_record}")
  return GlobalBatches(source, source.rows_per_record, batch_size, seed, shuffle)
