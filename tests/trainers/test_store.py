"""Training straight from a real activation store (ArrayRecord shards, Grain reader)."""

from __future__ import annotations

import dataclasses

import numpy as np

from allscope.pipelines.reader import open_store
from allscope.trainers import TrainConfig, train
from tests.pipelines.helpers import LAYERS, write_random_store


def test_transcoder_trains_and_resumes_exactly_from_the_store(tmp_path):
  write_random_store(tmp_path / "store")
  store = open_store(tmp_path / "store")
  cfg = TrainConfig(kind="transcoder", activation="jumprelu", layers=LAYERS, width=32,
                    target_l0=4, batch_size=8, steps=6, lr=1e-3, lr_warmup_steps=1,
                    checkpoint_every=3, log_every=3)
  norm = {site: store.norm_scale(site, LAYERS) for site in cfg.sites}
  loader = lambda: store.global_batches(8, sites=("mlp_in", "mlp_out"), layers=LAYERS, seed=1)

  straight = train(cfg, loader(), norm, tmp_path / "straight", progress=False)
  train(dataclasses.replace(cfg, steps=3), loader(), norm, tmp_path / "split", progress=False)
  resumed = train(cfg, loader(), norm, tmp_path / "split", progress=False)
  assert resumed.resumed_from == 3
  assert np.isfinite(straight.metrics["loss"])
  for k, v in straight.params.items():
    assert np.array_equal(v, resumed.params[k]), k
