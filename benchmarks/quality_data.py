"""Rows of an activation store in memory, split into training and held-out records.

Shared by benchmarks/quality.py and benchmarks/lr_sweep.py: both sides of a comparison read the
same global batches (`batches`), and every evaluation uses records the training never saw.
"""

from __future__ import annotations

import numpy as np

from allscope.pipelines.reader import GlobalBatches, open_store


class ArraySource:
  """A Grain-style random-access source over in-memory rows {site: [N, L, d]}."""

  def __init__(self, columns: dict[str, np.ndarray], rows_per_record: int, name: str):
    self.columns, self.rows_per_record, self.name = columns, rows_per_record, name
    self.n_rows = next(iter(columns.values())).shape[0]

  def __len__(self) -> int:
    return self.n_rows // self.rows_per_record

  def __repr__(self) -> str:
    return f"ArraySource({self.name}, n_rows={self.n_rows})"

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rows = slice(index * self.rows_per_record, (index + 1) * self.rows_per_record)
    return {site: col[rows] for site, col in self.columns.items()}


class Split:
  """A store's (site_in, site_out) rows for `layers`: train records first, held-out records last."""

  def __init__(self, path: str, layers: tuple[int, ...], held_out_rows: int,
               sites: tuple[str, str] = ("mlp_in", "mlp_out")):
    store = open_store(path)
    src = store.source(sites, layers)
    r = store.rows_per_record
    n_held = -(-held_out_rows // r)
    if n_held >= len(src):
      raise ValueError(f"{path} holds {len(src)} records of {r} rows; {n_held} held-out records "
                       "leave none to train on; harvest more tokens")
    parts = [src[i] for i in range(len(src))]
    cols = {s: np.concatenate([p[s] for p in parts]) for s in sites}
    cut = (len(src) - n_held) * r
    self.path, self.layers, self.sites, self.rows_per_record = path, layers, sites, r
    self.train = ArraySource({s: c[:cut] for s, c in cols.items()}, r, f"{path}:train")
    self.held_out = {s: c[cut:].astype(np.float32) for s, c in cols.items()}  # [N, L, d]
    self.norm_scale = {s: store.norm_scale(s, layers) for s in sites}
    self.model_name = store.manifest["model"]["name"]

  def batches(self, batch_size: int, seed: int = 0) -> GlobalBatches:
    return GlobalBatches(self.train, self.rows_per_record, batch_size, seed)
