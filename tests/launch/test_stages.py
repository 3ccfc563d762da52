"""`allscope run` end to end on the real Gemma 3 270M: harvest -> train -> evaluate -> release,
then a second run that finds everything done and resumes instead of redoing it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allscope import release
from allscope.launch import config as config_lib
from allscope.launch import stages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("run")
  cfg = config_lib.load("quickstart", [
      f"output_dir={out}", "harvest.layers=[2,3]", "harvest.token_budget=1008",
      "harvest.context_length=64", "train.layers=[2,3]", "train.width=128", "train.k=8",
      "train.batch_size=64", "train.steps=12", "train.checkpoint_every=6",
      "evaluate.n_sequences=2", "evaluate.seq_len=32", "evaluate.batch_size=2"])
  return cfg, stages.run(cfg)


def test_run_writes_store_checkpoints_metrics_and_a_loadable_release(quick):
  cfg, out = quick
  assert out["tokens"] >= 1000
  rel = release.load(out["release"])
  assert len(rel.dictionaries) == 2
  assert {d.layer for d in rel.dictionaries} == {2, 3}
  metrics = json.loads(stages.Paths(out["store"].parent).evaluation.read_text())
  assert metrics["tokens"] == 2 * 32
  for entry in metrics["dictionaries"]:
    assert np.isfinite(entry["metrics"]["fvu"]) and entry["metrics"]["l0"] > 0
  assert (out["release"] / "README.md").exists()
  assert (out["release"] / "browser" / "index.html").exists()  # the feature browser
  assert json.loads((out["store"].parent / "config.json").read_text())["train"]["steps"] == 12


def test_heldout_tokens_are_not_in_the_store(quick):
  cfg, out = quick
  from allscope import models, pipelines

  arch, tokenizer = models.describe(cfg.model.name)
  held = stages.heldout_tokens(cfg, tokenizer, arch)
  index = pipelines.open_store(out["store"]).index()
  rows = np.concatenate([index[i] for i in range(len(index))])
  rows = rows[np.lexsort((rows["position"], rows["sequence"]))]  # back into reading order
  stream = rows["token"].astype(np.int32).tobytes()
  assert held.shape == (2, 32) and (held[:, 0] == arch.bos_id).all()
  # No 16-token window of the held-out text appears in the harvested token stream.
  windows = [held[i, j:j + 16].astype(np.int32).tobytes() for i in range(2) for j in (1, 16)]
  assert not any(w in stream for w in windows)
  assert len(rows) > out["tokens"] - 32  # every full record was searched


def test_second_run_resumes_and_redoes_nothing(quick):
  cfg, first = quick
  result = stages.train(cfg)
  assert result.resumed_from == cfg.train.steps


def test_released_dictionaries_evaluate_as_they_did_in_the_run(quick):
  """`allscope evaluate --release`: the published folder gives back the run's metrics."""
  cfg, out = quick
  reloaded = list(release.load(out["release"]).dictionaries)
  again = {e.path: e.metrics for e in stages.evaluate(cfg, reloaded)}
  for entry in json.loads(stages.Paths(out["store"].parent).evaluation.read_text())["dictionaries"]:
    for key in ("fvu", "l0", "delta_lm_loss"):
      assert again[entry["path"]][key] == pytest.approx(entry["metrics"][key], rel=1e-4, abs=1e-6)
