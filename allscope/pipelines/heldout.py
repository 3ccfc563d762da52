"""The store's held-out split: packed token sequences the training rows never saw.

The harvest gives the sequences global ids in (unit, position) order; ids [0, num_sequences)
become training shards and the next `harvest.heldout_sequences` ids become the held-out split,
so the two are disjoint by construction and the training shards do not depend on the split's
size. The split is one small safetensors file (no pickle), written under a temporary name and
renamed, and recorded in the manifest with its sha256; a re-run writes the same bytes again.

  tokens     int32 [H, context_length]  BOS, up to context_length-1 tokens, PAD
  n_valid    int32 [H]                  BOS + real tokens per sequence
  doc_start  uint8 [H, context_length]  1 where a document begins (after BOS or EOS)

Evaluation reads it with `ActivationStore.heldout()`, so nothing outside `pipelines` replays
the harvest's plan or the corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Iterable

import numpy as np
from safetensors.numpy import load, save_file

from allscope import files
from allscope.pipelines import store

FILE = "heldout.safetensors"


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """The held-out split of a store. `first_sequence` is the global id of its first sequence
  (the store's training sequences are 0..first_sequence-1)."""

  tokens: np.ndarray
  n_valid: np.ndarray
  doc_start: np.ndarray
  first_sequence: int

  @property
  def num_tokens(self) -> int:
    """Real tokens, BOS excluded (the same count the store uses for its rows)."""
    return int(np.sum(np.maximum(self.n_valid - 1, 0)))


def select(seq, offsets: list[int], num_sequences: int, count: int):
  """Beam FlatMap: (unit, j, tokens, n_valid) -> (gid, tokens, n_valid) for held-out ids."""
  u, j, tokens, n_valid = seq
  gid = offsets[u] + j
  if num_sequences <= gid < num_sequences + count:
    yield gid, tokens, n_valid


def doc_starts(tokens: np.ndarray, n_valid: np.ndarray, eos_id: int) -> np.ndarray:
  """1 at position 1 and after every EOS that is followed by a real token."""
  starts = np.zeros(tokens.shape, np.uint8)
  positions = np.arange(tokens.shape[1])
  real = (positions[None, :] >= 1) & (positions[None, :] < n_valid[:, None])
  starts[:, 1] = real[:, 1]
  starts[:, 2:] = (tokens[:, 1:-1] == eos_id) & real[:, 2:]
  return starts


def write(items: Iterable[tuple[int, np.ndarray, int]], root: str, *, num_sequences: int,
          context_length: int, eos_id: int) -> dict[str, Any]:
  """Writes the split atomically and returns its manifest entry. `items` are the held-out
  sequences as (gid, tokens, n_valid); they must be consecutive from `num_sequences` (fewer
  than asked when the corpus ran out)."""
  # A runner may deliver an element twice (DaskRunner's global combine does); ids and their
  # tokens are deterministic, so a repeat is dropped once it is checked to agree.
  unique: dict[int, tuple[np.ndarray, int]] = {}
  for gid, tokens, n_valid in items:
    if gid in unique and (unique[gid][1] != n_valid or
                          not np.array_equal(unique[gid][0], tokens)):
      raise store.StoreError(f"{root}: held-out sequence {gid} arrived twice with different "
                             "tokens; not writing the held-out split")
    unique[gid] = (tokens, n_valid)
  items = [(gid, *unique[gid]) for gid in sorted(unique)]
  gids = sorted(unique)
  if gids != list(range(num_sequences, num_sequences + len(items))):
    raise store.StoreError(f"{root}: held-out sequence ids {gids[:5]}... are not consecutive "
                           f"from {num_sequences}; not writing the held-out split")
  tokens = (np.stack([t for _, t, _ in items]).astype(np.int32) if items
            else np.zeros((0, context_length), np.int32))
  n_valid = np.asarray([n for _, _, n in items], np.int32)
  tensors = {"tokens": tokens, "n_valid": n_valid,
             "doc_start": doc_starts(tokens, n_valid, eos_id)}
  path = files.join(root, FILE)

  def save(tmp: str) -> dict[str, Any]:
    save_file(tensors, tmp, metadata={"first_sequence": str(num_sequences)})
    return {"path": FILE, "bytes": os.path.getsize(tmp), "sha256": files.digest(tmp),
            "sequences": len(items), "first_sequence": num_sequences,
            "tokens": int(np.sum(np.maximum(n_valid - 1, 0)))}

  entry = files.atomic_write(path, save)
  return entry


def read(root: str, manifest: dict) -> HeldOut:
  """The split recorded in `manifest`, checked against its sha256. Raises StoreError with the
  fix for a store written before splits existed, one harvested without one, or a damaged file."""
  entry = manifest.get("heldout")
  if entry is None:
    raise store.StoreError(
        f"{root} holds no held-out split (harvested before stores carried one, or with "
        "harvest.heldout_sequences=0); re-harvest into a new output, or pass your own held-out "
        "tokens with evaluate.tokens=<file.npy>")
  path = files.join(root, entry["path"])
  if not files.exists(path):
    raise store.StoreError(f"{path} is missing; re-run the same harvest on {root} to rewrite it")
  data = files.read_bytes(path)
  if hashlib.sha256(data).hexdigest() != entry["sha256"]:
    raise store.CorruptShardError(f"{path} does not match its sha256 in the manifest; delete "
                                  f"it and {store.MANIFEST}, then re-run the same harvest to "
                                  "rewrite it")
  tensors = load(data)
  return HeldOut(tensors["tokens"], tensors["n_valid"], tensors["doc_start"],
                 int(entry["first_sequence"]))
