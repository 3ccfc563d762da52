"""Text around a store row: the store's index traces every row to (sequence, position, token).

Rows are shuffled across sequences at harvest time, but every row of a sequence lives in the shard
whose `sequences` range holds it, so a window of surrounding tokens needs only that shard's index
file (16 bytes a row, against 2 * width bytes a row for every site and layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
            bos_id: int, verify: str = "checksum") -> np.ndarray:
  """Token ids [n, before + 1 + after] around (sequence, position); MISSING outside the sequence
  or where the store has no row (padding). Position 0 is BOS, which is never stored."""
  sequences = np.asarray(sequences, np.int64)
  positions = np.asarray(positions, np.int64)
  wanted = np.unique(sequences)
  keys, tokens = [], []
  span = int(store.manifest["context_length"]) + 1
  for shard in store.manifest["shards"]:
    lo, hi = shard["sequences"]
    if not np.any((wanted >= lo) & (wanted < hi)):
      continue
    rel = f"index/{store_lib.shard_name(shard['shard'])}"
    path = store_lib.join(store.path, rel)
    if verify == "checksum" and store_lib.sha256_file(path) != shard["files"][rel]["sha256"]:
      raise store_lib.CorruptShardError(f"{path}: sha256 does not match the manifest; the shard "
                                        "is corrupt")
    entries = np.concatenate([np.frombuffer(b, store_lib.INDEX_DTYPE)
                              for b in store_lib.open_reader(path).read_all()])
    entries = entries[np.isin(entries["sequence"], wanted)]
    keys.append(entries["sequence"] * span + entries["position"])
    tokens.append(entries["token"].astype(np.int64))
  keys_all = np.concatenate(keys) if keys else np.zeros(0, np.int64)
  order = np.argsort(keys_all, kind="stable")
  keys_all = keys_all[order]
  tokens_all = (np.concatenate(tokens) if tokens else np.zeros(0, np.int64))[order]

  offsets = np.arange(-before, after + 1)
  pos = positions[:, None] + offsets[None, :]
  query = sequences[:, None] * span + pos
  at = np.clip(np.searchsorted(keys_all, query), 0, max(len(keys_all) - 1, 0))
  found = (len(keys_all) > 0) & (keys_all[at] == query) if len(keys_all) else np.zeros_like(query, bool)
  out = np.where(found, tokens_all[at] if len(keys_all) else MISSING, MISSING)
  out = np.where((pos == 0) & ~found, bos_id, out)
  return np.where((pos < 0) | (pos >= span), MISSING, out).astype(np.int64)


def token_texts(tokenizer, ids: Sequence[int]) -> dict[int, str]:
  """Display text of each token id (leading spaces kept, e.g. ' the'), as plain text: the
  browser inserts it with textContent, never as HTML."""
  return {int(i): tokenizer.piece_text(int(i)) for i in np.unique(np.asarray(ids, np.int64))
          if i >= 0}
