"""benchmarks/lr_sweep.py drives every per-layer kind: --set parsing and held-out metrics."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

from tests.pipelines.helpers import write_random_store

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import lr_sweep  # noqa: E402
import quality  # noqa: E402
from quality_data import Split  # noqa: E402


def test_set_takes_literals_and_bare_strings():
  assert lr_sweep.parse_override("site_in=mlp_in") == ("site_in", "mlp_in")
  assert lr_sweep.parse_override("threshold_lr_multiple=10") == ("threshold_lr_multiple", 10)
  assert lr_sweep.parse_override("matryoshka=(8, 16)") == ("matryoshka", (8, 16))
  with pytest.raises(ValueError, match="name=value"):
    lr_sweep.parse_override("site_in")


def _fvu(y, y_hat):
  return np.sum((y - y_hat) ** 2) / np.sum((y - y.mean(0)) ** 2)


def test_an_sae_is_measured_against_its_own_site(tmp_path):
  # An SAE over mlp_in reconstructs mlp_in: its held-out FVU must be taken against mlp_in, not
  # against the store's other site (which it never saw).
  from allscope.trainers.config import TrainConfig
  write_random_store(tmp_path / "store", shard_rows=(64, 64, 64),
                     identity={"model": {"name": "test"}})
  split = Split(str(tmp_path / "store"), (1, 4), held_out_rows=32)
  cfg = TrainConfig(kind="sae", activation="topk", site_in="mlp_in", layers=(1, 4), width=16,
                    k=4, batch_size=32, steps=30, lr=3e-2, checkpoint_every=10 ** 9,
                    log_every=10 ** 9)
  dicts = quality.train_allscope_cfg(split, cfg)
  metrics = quality.held_out_metrics(split, dicts)
  for g, (d, m) in enumerate(zip(dicts, metrics)):
    assert (d.site_in, d.site_out) == ("mlp_in", "mlp_in")
    p = {n: v.astype(np.float64) for n, v in d.params.items()}
    x = split.held_out["mlp_in"][:, g].astype(np.float64)
    pre = x @ p["w_enc"] + p["b_enc"]
    kth = np.sort(pre, axis=-1)[:, -4][:, None]
    f = np.where(pre >= kth, np.maximum(pre, 0), 0.0)
    want = _fvu(x, f @ p["w_dec"] + p["b_dec"])
    assert m["fvu"] == pytest.approx(want, rel=1e-9)
    assert m["l0"] == pytest.approx(np.mean(np.sum(f != 0, -1)), rel=1e-9)
    assert m["fvu"] < 0.9 * _fvu(split.held_out["mlp_out"][:, g].astype(np.float64),
                                 f @ p["w_dec"] + p["b_dec"])
