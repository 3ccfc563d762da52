"""Test helpers: a real activation store written from fresh random rows (no model needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from allscope.pipelines import store

SITES = ("mlp_in", "mlp_out")
LAYERS = (1, 4)
WIDTHS = {"mlp_in": 24, "mlp_out": 24}
R = 4


def write_random_store(root, shard_rows=(37, 40, 29), seed=0, sites=SITES, layers=LAYERS,
                       codec="bf16", channel_scales=None, rows_per_record=R, identity=None):
  """Writes shards of random bf16 rows through the real writer; returns (manifest, truth).

  truth[site]: float32 [total_rows, n_layers, width], rows in store order (shard by shard), as
  generated (before any lossy codec). channel_scales: [width] multipliers of the channels.
  identity: extra manifest fields (e.g. {"model": {"name": ...}}, which readers of a model's store
  expect).
  """
  rng = np.random.default_rng(seed)
  receipts, truth = [], {s: [] for s in sites}
  first = 0
  for k, n in enumerate(shard_rows):
    index = np.zeros(n, store.INDEX_DTYPE)
    index["sequence"] = first + np.arange(n) // 8
    index["position"] = 1 + np.arange(n) % 8
    index["token"] = rng.integers(3, 1000, n)
    c = 1.0 if channel_scales is None else np.asarray(channel_scales)
    acts = {s: (rng.normal(size=(n, len(layers), WIDTHS[s])) * (1 + np.arange(len(layers)))[:, None]
                * c).astype(store.DTYPE) for s in sites}
    for s in sites:
      truth[s].append(acts[s].astype(np.float32))
    seqs = [first, first + (n + 7) // 8]
    first = seqs[1]
    receipt, _ = store.write_shard(str(root), store.ShardRows(k, index, acts, layers), rows_per_record,
                                   {"sequences": seqs}, codec=codec)
    receipts.append(receipt)
  identity = {"format": store.FORMAT, "schema_version": store.SCHEMA_VERSION, "test": True,
              **(identity or {})}
  manifest = store.finish(str(root), identity, receipts, sites=sites, layers=layers,
                          widths={s: WIDTHS[s] for s in sites}, rows_per_record=rows_per_record,
                          context_length=9, codec=codec)
  return manifest, {s: np.concatenate(v) for s, v in truth.items()}


def file_digests(root: Path) -> dict[str, str]:
  """Every file of a store (temporary files would show up here too) with its sha256."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def all_rows(root: Path, manifest: dict, site: str, layer: int):
  """Every stored row (partial records included) with its index entry, in store order."""
  idx, rows = [], []
  for shard in manifest["shards"]:
    name = store.shard_name(shard["shard"])
    idx += [np.frombuffer(b, store.INDEX_DTYPE)
            for b in store.open_reader(str(root / "index" / name)).read_all()]
    reader = store.open_reader(str(root / store.layer_dir(site, layer) / name))
    rows += [np.frombuffer(b, store.DTYPE).reshape(-1, manifest["widths"][site])
             for b in reader.read_all()]
  return np.concatenate(idx), np.concatenate(rows).astype(np.float32)
