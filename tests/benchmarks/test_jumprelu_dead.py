"""benchmarks/jumprelu_dead.py: the steady-state overflow and silent-latent columns it adds."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

from tests.pipelines.helpers import write_random_store

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import jumprelu_dead  # noqa: E402
from quality_data import Split  # noqa: E402


@pytest.fixture(scope="module")
def split(tmp_path_factory):
  path = tmp_path_factory.mktemp("jr") / "store"
  write_random_store(path, shard_rows=(64, 64, 64), identity={"model": {"name": "test"}})
  return Split(str(path), (1, 4), held_out_rows=32)


def _cfg(**kw):
  from allscope.trainers.config import TrainConfig
  return TrainConfig(kind="transcoder", activation="jumprelu", layers=(1, 4), width=32,
                     target_l0=4.0, batch_size=32, steps=8, checkpoint_every=10 ** 9,
                     log_every=10 ** 9, **kw)


def test_overflow_counts_the_second_half_only_when_the_capacity_binds(split):
  marks = (2, 4, 8)
  ms, train_l0, overflow, silent = jumprelu_dead.run(split, _cfg(capacity=1), marks)
  assert overflow > 0  # one slot per row, target 4: rows fire more than one latent
  assert len(ms) == 2 and train_l0.shape == (2,)
  assert sorted(silent) == list(marks)
  assert all(s.shape == (2,) and np.all((0 <= s) & (s <= 1)) for s in silent.values())
  # aux_after_tokens is 5k tokens: after 2 steps of 32 rows no latent can count as silent yet.
  assert np.all(silent[2] == 0)
  _, _, wide, _ = jumprelu_dead.run(split, _cfg(), marks)  # capacity = width: nothing dropped
  assert wide == 0

  # With aux_after_tokens of one batch, a latent is silent when it missed the last step.
  _, _, _, short = jumprelu_dead.run(split, _cfg(aux_after_tokens=32, revive=False), (8,))
  assert np.any(short[8] > 0) and np.all(short[8] * 32 == np.round(short[8] * 32))
