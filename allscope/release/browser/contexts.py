"""Text around a store row: the store's index traces every row to (sequence, position, token).

Rows are shuffled across sequences at harvest time, but every row of a sequence lives in the shard
whose `sequences` range holds it, so a window of surrounding tokens needs only that shard's index
file (16 bytes a row, against 2 * width bytes a row for every site and layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from allscope import files
from allscope.pipelines import store as store_lib

MISSING = -1


def locate(store, rows: np.ndarray, verify: str = "checksum") -> np.ndarray:
  """(sequence, position, token) [n] (the store's INDEX_DTYPE) of pass rows (see scan.py)."""
  rows = np.asarray(rows, np.int64)
  r = store.rows_per_record
  index = store.index(verify)
  out = np.zeros(len(rows), store_lib.INDEX_DTYPE)
  records, inverse = np.unique(rows // r, return_inverse=True)
  slot = rows % r
  for i, rec in enumerate(records):
    entries = index[int(rec)]
    where = np.flatnonzero(inverse == i)
    out[where] = entries[slot[where]]
  return out


def windows(store, sequences: np.ndarray, positions: np.ndarray, before: int, after: int,
            bos_id: int, verify: str = "checksum") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Token ids [n, before + 1 + after] around (sequence, position); MISSING outside the sequence
  or where the store has no row (padding). Position 0 is BOS, which is never stored.

  Also where each window token's row is stored: its shard and its row in that shard's files
  (record = row // rows_per_record), both MISSING where there is no stored row.
  """
  sequences = np.asarray(sequences, np.int64)
  positions = np.asarray(positions, np.int64)
  wanted = np.unique(sequences)
  keys, tokens, shards, rows = [], [], [], []
  span = int(store.manifest["context_length"]) + 1
  for shard in store.manifest["shards"]:
    lo, hi = shard["sequences"]
    if not np.any((wanted >= lo) & (wanted < hi)):
      continue
    entries = read_index(store, shard, verify)
    keep = np.flatnonzero(np.isin(entries["sequence"], wanted))
    entries = entries[keep]
    keys.append(entries["sequence"] * span + entries["position"])
    tokens.append(entries["token"].astype(np.int64))
    shards.append(np.full(len(keep), shard["shard"], np.int64))
    rows.append(keep.astype(np.int64))
  cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)
  keys_all = cat(keys)
  order = np.argsort(keys_all, kind="stable")
  keys_all, tokens_all, shards_all, rows_all = (cat(a)[order] for a in (keys, tokens, shards, rows))

  offsets = np.arange(-before, after + 1)
  pos = positions[:, None] + offsets[None, :]
  inside = (pos >= 0) & (pos < span)  # a key outside would name a neighbouring sequence
  query = sequences[:, None] * span + np.where(inside, pos, 0)
  at = np.clip(np.searchsorted(keys_all, query), 0, max(len(keys_all) - 1, 0))
  found = inside & (keys_all[at] == query) if len(keys_all) else np.zeros(query.shape, bool)
  take = lambda a: np.where(found, a[at] if len(a) else MISSING, MISSING).astype(np.int64)
  out = np.where((pos == 0) & ~found, bos_id, take(tokens_all))
  return out, take(shards_all), take(rows_all)


def read_index(store, shard: dict, verify: str = "checksum") -> np.ndarray:
  """Every row of one shard's index file (partial last record included), in file order."""
  rel = f"index/{store_lib.shard_name(shard['shard'])}"
  return np.concatenate([np.frombuffer(b, store_lib.INDEX_DTYPE)
                         for b in _records(store, shard, rel, verify)])


def read_rows(store, site: str, layer: int, shards: np.ndarray, rows: np.ndarray,
              verify: str = "checksum") -> np.ndarray:
  """Activations bf16 [n, width] of (shard, row in shard) locations, reading only their records."""
  r, width = store.rows_per_record, store.widths[site]
  out = np.zeros((len(rows), width), store_lib.DTYPE)
  by_shard = {s["shard"]: s for s in store.manifest["shards"]}
  for shard_id in np.unique(shards):
    where = np.flatnonzero(shards == shard_id)
    records = np.unique(rows[where] // r)
    rel = f"{store_lib.layer_dir(site, layer)}/{store_lib.shard_name(int(shard_id))}"
    data = _records(store, by_shard[int(shard_id)], rel, verify, records.tolist())
    block = {int(rec): np.frombuffer(b, store_lib.DTYPE).reshape(-1, width)
             for rec, b in zip(records, data)}
    for i in where:
      out[i] = block[int(rows[i] // r)][rows[i] % r]
  return out


def _records(store, shard: dict, rel: str, verify: str, which: list[int] | None = None):
  path = files.join(store.path, rel)
  if verify == "checksum" and files.digest(path) != shard["files"][rel]["sha256"]:
    raise store_lib.CorruptShardError(f"{path}: sha256 does not match the manifest; the shard "
                                      f"is corrupt: {store_lib.REPAIR}")
  reader = store_lib.open_reader(path)
  return reader.read_all() if which is None else reader.read(which)


def token_texts(tokenizer, ids: Sequence[int]) -> dict[int, str]:
  """Display text of each token id (leading spaces kept, e.g. ' the'), as plain text: the
  browser inserts it with textContent, never as HTML."""
  return {int(i): tokenizer.piece_text(int(i)) for i in np.unique(np.asarray(ids, np.int64))
          if i >= 0}
