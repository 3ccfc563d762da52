"""The data position: global batch k is fixed by (store, seed, batch size, k) alone; a process
reads rows of it, and any split of the rows over processes gives back the same batch."""

from __future__ import annotations

import numpy as np
import pytest

from allscope.pipelines.reader import open_store
from tests.pipelines.helpers import LAYERS, R, write_random_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  root = tmp_path_factory.mktemp("store")
  _, truth = write_random_store(root)
  return open_store(root), truth


def test_any_split_of_the_rows_reassembles_the_global_batch(store):
  st, truth = store
  batches = st.global_batches(4 * R, sites=("mlp_in",), layers=LAYERS, seed=3)
  one = batches.local(0, 4 * R)
  for k in (0, 5, 6, 13):  # 26 records: 6 batches per epoch, so k = 6 and 13 are later epochs
    whole = one[k]["mlp_in"]
    for cuts in ((0, R, 4 * R), (0, 2 * R, 4 * R), (0, R, 2 * R, 3 * R, 4 * R)):
      parts = [batches.local(a, b)[k]["mlp_in"] for a, b in zip(cuts, cuts[1:])]
      assert np.array_equal(np.concatenate(parts), whole)
    # The rows are the store's full records (9, 10 and 7 per shard) of the seeded order.
    starts = [0] * 9 + [37] * 10 + [77] * 7
    first = [starts[i] + (i - [0, 9, 19][(i >= 9) + (i >= 19)]) * R for i in range(26)]
    rows = np.concatenate([np.arange(first[i], first[i] + R) for i in batches.records(k)])
    assert np.array_equal(whole.astype(np.float32), truth["mlp_in"][rows])


def test_each_epoch_is_a_seeded_permutation_of_all_records(store):
  st, _ = store
  batches = st.global_batches(4 * R, sites=("mlp_in",), layers=LAYERS, seed=3)
  assert batches.steps_per_epoch == 26 // 4
  epoch0 = np.concatenate([batches.records(k) for k in range(6)])
  epoch1 = np.concatenate([batches.records(k) for k in range(6, 12)])
  assert len(set(epoch0)) == len(epoch0) == 24 and len(set(epoch1)) == 24
  assert not np.array_equal(epoch0, epoch1)
  again = st.global_batches(4 * R, sites=("mlp_in",), layers=LAYERS, seed=3)
  other = st.global_batches(4 * R, sites=("mlp_in",), layers=LAYERS, seed=4)
  assert np.array_equal(again.records(7), batches.records(7))
  assert not np.array_equal(other.records(0), batches.records(0))


def test_rows_off_record_boundaries_are_refused(store):
  st, _ = store
  batches = st.global_batches(4 * R, sites=("mlp_in",), layers=LAYERS)
  with pytest.raises(ValueError, match=f"multiple of {R}"):
    batches.local(0, R + 1)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    st.global_batches(1000 * R, sites=("mlp_in",), layers=LAYERS)
