"""Test helpers: a real activation store written from fresh random rows (no model needed)."""

from __future__ import annotations

import numpy as np

from allscope.pipelines import store

SITES = ("mlp_in", "mlp_out")
LAYERS = (1, 4)
WIDTHS = {"mlp_in": 24, "mlp_out": 24}
R = 4


def write_random_store(root, shard_rows=(37, 40, 29), seed=0, sites=SITES, layers=LAYERS):
  """Writes shards of random bf16 rows through the real writer; returns (manifest, truth).

  truth[site]: float32 [total_rows, n_layers, width], rows in store order (shard by shard).
  """
  rng = np.random.default_rng(seed)
  receipts, sums, truth = [], {}, {s: [] for s in sites}
  first = 0
  for k, n in enumerate(shard_rows):
    index = np.zeros(n, store.INDEX_DTYPE)
    index["sequence"] = first + np.arange(n) // 8
    index["position"] = 1 + np.arange(n) % 8
    index["token"] = rng.integers(3, 1000, n)
    acts = {s: (rng.normal(size=(n, len(layers), WIDTHS[s])) * (1 + np.arange(len(layers)))[:, None]
                ).astype(store.DTYPE) for s in sites}
    for s in sites:
      truth[s].append(acts[s].astype(np.float32))
    seqs = [first, first + (n + 7) // 8]
    first = seqs[1]
    receipt, part = store.write_shard(str(root), store.ShardRows(k, index, acts, layers), R,
                                      {"sequences": seqs})
    receipts.append(receipt)
    sums = store.combine_stats([sums, part])
  identity = {"format": store.FORMAT, "schema_version": store.SCHEMA_VERSION, "test": True}
  manifest = store.finish(str(root), identity, receipts, sums, sites=sites, layers=layers,
                          widths={s: WIDTHS[s] for s in sites}, rows_per_record=R,
                          context_length=9)
  return manifest, {s: np.concatenate(v) for s, v in truth.items()}
