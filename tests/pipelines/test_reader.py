"""The Grain reader: aligned batches, global shuffle, process sharding, resumable state,
per-layer reads, corrupt shards reported by name, incomplete stores refused."""

from __future__ import annotations

import os

import grain
import numpy as np
import pytest

from allscope.pipelines import ActivationStore, CorruptShardError, IncompleteStoreError, store
from tests.pipelines.helpers import LAYERS, R, write_random_store


def _rows(truth, site, manifest):
  """Store-order rows of full records only (what the loader serves)."""
  keep, start = [], 0
  for s in manifest["shards"]:
    keep.append(np.arange(start, start + s["rows"] // R * R))
    start += s["rows"]
  return truth[site][np.concatenate(keep)]


def test_source_record_i_is_rows_of_every_site_and_layer(random_store):
  root, manifest, truth = random_store
  src = ActivationStore(root).source(("mlp_in", "mlp_out"), (4, 1))
  assert len(src) == 9 + 10 + 7
  for i in (0, 9, 25):
    rec = src[i]
    for site in ("mlp_in", "mlp_out"):
      want = _rows(truth, site, manifest)[i * R:(i + 1) * R][:, [1, 0]]
      np.testing.assert_array_equal(rec[site].astype(np.float32), want)
      assert rec[site].dtype == store.DTYPE and rec[site].shape == (R, 2, 24)


def test_index_is_aligned_with_records(random_store):
  root, manifest, _ = random_store
  index = ActivationStore(root).index()
  first = index[10]  # record 0 of shard 1
  assert first["sequence"].min() >= manifest["shards"][1]["sequences"][0]
  assert len(first) == R


def test_loader_serves_every_full_record_once_per_epoch_shuffled(random_store):
  root, manifest, truth = random_store
  st = ActivationStore(root)
  loader = st.loader(batch_size=2 * R, sites=("mlp_in",), layers=(1,), seed=3, num_epochs=1,
                     shard_options=grain.sharding.NoSharding())
  batches = [b["mlp_in"] for b in loader]
  assert all(b.shape == (2 * R, 1, 24) for b in batches)
  got = np.concatenate(batches)[:, 0].astype(np.float32)
  want = _rows(truth, "mlp_in", manifest)[:, 0]
  assert len(got) == len(want) // (2 * R) * (2 * R)
  assert not np.array_equal(got, want[:len(got)])  # shuffled
  order = {row.tobytes(): i for i, row in enumerate(want)}
  assert len({order[r.tobytes()] for r in got}) == len(got)  # no duplicates
  assert st.num_rows_served == len(want)


def test_processes_get_disjoint_shares(random_store):
  root, _, _ = random_store
  st = ActivationStore(root)
  seen = []
  for index in range(2):
    opts = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
    loader = st.loader(batch_size=R, layers=(1,), num_epochs=1, shard_options=opts)
    seen.append({b["mlp_out"].tobytes() for b in loader})
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_iterator_state_resumes_exactly(random_store):
  root, _, _ = random_store
  loader = ActivationStore(root).loader(batch_size=R, seed=1, num_epochs=None,
                                        shard_options=grain.sharding.NoSharding())
  it = iter(loader)
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it)["mlp_in"] for _ in range(30)]  # runs into the second epoch
  it2 = iter(loader)
  it2.set_state(state)
  got = [next(it2)["mlp_in"] for _ in range(30)]
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)


def test_per_layer_reader_opens_only_its_layer_files(random_store, monkeypatch):
  root, _, _ = random_store
  opened = []
  real = store.open_reader
  monkeypatch.setattr(store, "open_reader", lambda p: opened.append(p) or real(p))
  loader = ActivationStore(root).loader(batch_size=R, sites=("mlp_out",), layers=(4,),
                                        num_epochs=1, shard_options=grain.sharding.NoSharding())
  list(loader)
  assert opened and all(os.sep.join(("mlp_out", "layer_4")) in p for p in opened)


def test_norm_scale_makes_mean_squared_norm_one(random_store):
  root, manifest, truth = random_store
  st = ActivationStore(root)
  scale = st.norm_scale("mlp_in", LAYERS)
  x = truth["mlp_in"].astype(np.float64) * scale[None, :, None]
  np.testing.assert_allclose(np.mean(np.sum(x * x, axis=-1), axis=0), 1.0, rtol=1e-6)
  np.testing.assert_allclose(st.mean("mlp_in", (4,))[0], truth["mlp_in"][:, 1].mean(0), atol=1e-6)


def test_corrupt_shard_is_reported_by_name_and_never_served(random_store):
  root, _, _ = random_store
  path = root / "mlp_in" / "layer_1" / "shard_00002.array_record"
  data = bytearray(path.read_bytes())
  data[len(data) // 3] ^= 0xFF  # same size, one flipped byte
  path.write_bytes(bytes(data))
  src = ActivationStore(root).source(("mlp_in",), (1,))
  src[0]  # other shards still read
  with pytest.raises(CorruptShardError, match="mlp_in/layer_1/shard_00002.array_record: sha256"):
    src[len(src) - 1]


def test_truncated_shard_is_reported_by_name(random_store):
  root, _, _ = random_store
  path = root / "mlp_out" / "layer_4" / "shard_00000.array_record"
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(CorruptShardError, match="layer_4/shard_00000.array_record"):
    ActivationStore(root).source(("mlp_out",), (4,), verify="none")[0]


def test_incomplete_store_is_refused(random_store):
  root, _, _ = random_store
  (root / "manifest.json").unlink()
  with pytest.raises(IncompleteStoreError, match="manifest.json is missing"):
    ActivationStore(root)


def test_unknown_site_layer_and_bad_batch_are_refused(random_store):
  st = ActivationStore(random_store[0])
  with pytest.raises(ValueError, match="holds sites"):
    st.loader(batch_size=R, sites=("resid_post",))
  with pytest.raises(ValueError, match="holds layers"):
    st.loader(batch_size=R, layers=(2,))
  with pytest.raises(ValueError, match="multiple of the store's rows_per_record"):
    st.loader(batch_size=R + 1)
