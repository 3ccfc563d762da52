"""The store's held-out split: the packed sequences right after the training ones, disjoint from
the training rows, checksummed in the manifest, rewritten identically on resume, and refused
with the fix when missing or damaged."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from allscope.models import ModelConfig
from allscope.pipelines import ActivationStore, StoreError, corpus, heldout, job, store
from allscope.pipelines.config import HarvestConfig

pytestmark = pytest.mark.slow

MODEL = ModelConfig(name="gemma3-270m")
CFG = HarvestConfig(sites=("mlp_in",), layers=(0,), context_length=32, token_budget=300,
                    batch_size=4, sequences_per_shard=4, rows_per_record=8, heldout_sequences=5,
                    progress=False)


def _harvest(gemma270m, out, cfg=CFG):
  model, tokenizer = gemma270m
  return job.run(cfg, MODEL, str(out), model=model, tokenizer=tokenizer)[0]


@pytest.fixture(scope="module")
def harvested(gemma270m, tmp_path_factory):
  out = tmp_path_factory.mktemp("heldout") / "store"
  return out, _harvest(gemma270m, out)


def _packed(tokenizer, n):
  """The corpus' first n packed sequences, rebuilt independently of the harvest."""
  seqs = []
  for unit in corpus.units(CFG.corpus):
    ids = [tokenizer.encode(t, add_bos=False) for t in corpus.documents(CFG.corpus, unit)
           if t and t.strip()]
    seqs += list(corpus.pack(ids, CFG.context_length, 2, 1, 0))
    if len(seqs) >= n:
      break
  return seqs[:n]


def test_split_is_the_sequences_after_the_training_rows(harvested, gemma270m):
  out, manifest = harvested
  _, tokenizer = gemma270m
  n_train = manifest["num_sequences"]
  split = ActivationStore(out).heldout()
  assert split.first_sequence == n_train == 10  # ceil(300 / 31)
  want = _packed(tokenizer, n_train + 5)[n_train:]
  np.testing.assert_array_equal(split.tokens, np.stack([t for t, _ in want]))
  np.testing.assert_array_equal(split.n_valid, [n for _, n in want])
  assert split.tokens.dtype == np.int32 and (split.tokens[:, 0] == 2).all()
  # Disjoint: every training row comes from a sequence id below the split's first id.
  index = ActivationStore(out).index()
  seq_ids = np.concatenate([index[i]["sequence"] for i in range(len(index))])
  assert seq_ids.max() == n_train - 1 and len(np.unique(seq_ids)) == n_train
  # Document starts: position 1 and each position after an EOS (id 1) that holds text.
  for row, n, starts in zip(split.tokens, split.n_valid, split.doc_start):
    want_starts = {1} | {p + 1 for p in range(1, n - 1) if row[p] == 1}
    assert set(np.flatnonzero(starts)) == want_starts
  assert manifest["heldout"]["tokens"] == split.num_tokens == int(np.sum(split.n_valid - 1))


def test_split_is_checksummed_in_the_manifest(harvested):
  out, manifest = harvested
  entry = manifest["heldout"]
  data = (out / heldout.FILE).read_bytes()
  assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
  assert entry["sequences"] == 5 and entry["path"] == heldout.FILE


def test_resume_rewrites_identical_bytes_and_damage_is_refused(harvested, gemma270m, tmp_path):
  out, manifest = harvested
  copy = tmp_path / "store"
  import shutil
  shutil.copytree(out, copy)
  (copy / store.MANIFEST).unlink()  # an interrupted harvest: the split and manifest are redone
  (copy / heldout.FILE).write_bytes(b"partial")
  again = _harvest(gemma270m, copy)
  assert again["heldout"] == manifest["heldout"]
  assert (copy / heldout.FILE).read_bytes() == (out / heldout.FILE).read_bytes()

  data = bytearray((copy / heldout.FILE).read_bytes())
  data[-3] ^= 0xFF
  (copy / heldout.FILE).write_bytes(bytes(data))
  with pytest.raises(store.CorruptShardError, match="re-run the same harvest"):
    ActivationStore(copy).heldout()


def test_a_store_without_a_split_names_the_fix(harvested, tmp_path):
  out, manifest = harvested
  import shutil
  old = tmp_path / "old"
  shutil.copytree(out, old)
  (old / store.MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items()
                                                if k != "heldout"}))
  with pytest.raises(StoreError, match=r"no held-out split.*re-harvest.*evaluate.tokens="):
    ActivationStore(old).heldout_tokens()


def test_split_size_does_not_change_the_training_shards(harvested, gemma270m, tmp_path):
  out, manifest = harvested
  other = _harvest(gemma270m, tmp_path / "store", dataclasses.replace(CFG, heldout_sequences=0))
  assert other["heldout"] is None
  assert [s["files"] for s in other["shards"]] == [s["files"] for s in manifest["shards"]]
  with pytest.raises(StoreError, match="harvest.heldout_sequences=0"):
    ActivationStore(tmp_path / "store").heldout()
