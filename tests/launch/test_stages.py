"""`allscope run` end to end on the real Gemma 3 270M: harvest -> train -> evaluate -> release,
then a second run that finds everything done and resumes instead of redoing it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allscope import models, release
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
  loads, trained, load, train = [], [], models.load, stages.train
  with pytest.MonkeyPatch.context() as mp:  # counts the model loads after training
    mp.setattr(models, "load", lambda *a, **k: loads.append(a) or load(*a, **k))
    mp.setattr(stages, "train", lambda c: train(c) if trained.append(len(loads)) is None else None)
    out = stages.run(cfg)
  return cfg, {**out, "model_loads_after_train": len(loads) - trained[0]}


def test_run_writes_store_checkpoints_metrics_and_a_loadable_release(quick):
  cfg, out = quick
  assert out["tokens"] >= 1000
  rel = release.load(out["release"])
  assert len(rel.dictionaries) == 2
  assert {d.layer for d in rel.dictionaries} == {2, 3}
  metrics = json.loads(stages.Paths(out["store"].parent).evaluation.read_text())
  # Every held-out sequence is full (64 > 32 positions): 31 non-BOS tokens and targets each.
  assert metrics["tokens"] == {"activation_metrics": 2 * 31, "delta_lm": 2 * 31,
                               "delta_lm_sequences": 2}
  for entry in metrics["dictionaries"]:
    assert np.isfinite(entry["metrics"]["fvu"]) and entry["metrics"]["l0"] > 0
  assert (out["release"] / "README.md").exists()
  assert (out["release"] / "browser" / "index.html").exists()  # the feature browser
  assert json.loads((out["store"].parent / "config.json").read_text())["train"]["steps"] == 12


def test_run_loads_the_model_once_for_evaluation_and_the_browser(quick):
  _, out = quick
  assert out["model_loads_after_train"] == 1


def test_heldout_tokens_are_not_in_the_store(quick):
  cfg, out = quick
  from allscope import models, pipelines

  arch, _ = models.describe(cfg.model.name)
  held, source = stages.heldout_tokens(cfg)
  assert "held-out split" in source
  index = pipelines.open_store(out["store"]).index()
  rows = np.concatenate([index[i] for i in range(len(index))])
  rows = rows[np.lexsort((rows["position"], rows["sequence"]))]  # back into reading order
  stream = rows["token"].astype(np.int32).tobytes()
  assert held.shape == (cfg.harvest.heldout_sequences, 64) and (held[:, 0] == arch.bos_id).all()
  # No 16-token window of the held-out text appears in the harvested token stream.
  windows = [held[i, j:j + 16].astype(np.int32).tobytes() for i in range(4) for j in (1, 16)]
  assert not any(w in stream for w in windows)
  assert len(rows) > out["tokens"] - 64  # every full record was searched


def test_evaluation_from_a_token_file_equals_evaluation_from_the_store(quick, tmp_path):
  cfg, out = quick
  import dataclasses
  held, _ = stages.heldout_tokens(cfg)
  np.save(tmp_path / "held.npy", held)
  from_file = dataclasses.replace(cfg, evaluate=dataclasses.replace(
      cfg.evaluate, tokens=str(tmp_path / "held.npy"), output=str(tmp_path / "file.json")))
  dicts = list(release.load(out["release"]).dictionaries)
  stages.evaluate(from_file, dicts)
  written = json.loads((tmp_path / "file.json").read_text())
  assert written["heldout"] == str(tmp_path / "held.npy")
  run = json.loads(stages.Paths(out["store"].parent).evaluation.read_text())
  assert written["tokens"] == run["tokens"]
  got = {e["path"]: e["metrics"] for e in written["dictionaries"]}
  for entry in run["dictionaries"]:
    for key in ("fvu", "l0", "delta_lm_loss", "delta_lm_loss_stderr"):
      assert got[entry["path"]][key] == pytest.approx(entry["metrics"][key], rel=1e-4, abs=1e-6)


def test_evaluating_a_release_writes_beside_it_not_over_the_run(quick, capsys):
  cfg, out = quick
  from allscope.launch import cli
  run_json = stages.Paths(out["store"].parent).evaluation
  before = run_json.read_bytes()
  overrides = [f"output_dir={cfg.output_dir}", "harvest.layers=[2,3]", "train.layers=[2,3]",
               "train.width=128", "train.k=8", "train.batch_size=64", "train.steps=12",
               "train.checkpoint_every=6", "harvest.token_budget=1008", "harvest.context_length=64",
               "evaluate.n_sequences=2", "evaluate.seq_len=32", "evaluate.batch_size=2"]
  cli.main(["evaluate", *overrides, "--config", "quickstart", "--release", str(out["release"])])
  beside = out["release"].with_name(out["release"].name + ".evaluation.json")
  assert json.loads(beside.read_text())["tokens"]["activation_metrics"] > 0
  assert run_json.read_bytes() == before
  assert f"metrics: {beside}" in capsys.readouterr().out


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


def test_model_once_loads_on_first_use_and_again_only_after_drop(monkeypatch):
  """The run's shared model: one load serves every use until `drop` frees the weights (the
  tokenizer stays); a bfloat16 run's model is never handed to the browser's float32 math."""
  loads = []
  monkeypatch.setattr(models, "load", lambda name, dtype: loads.append(dtype) or (object(), "tok"))
  once = stages.ModelOnce(config_lib.load("quickstart"))
  first = once("evaluate")
  assert once("browse") is first and loads == ["float32"] and once.float32
  once.drop()
  assert once.loaded == (None, "tok")
  assert once("evaluate") is not first and len(loads) == 2
  assert not stages.ModelOnce(config_lib.load("quickstart", ["model.dtype=bfloat16"])).float32
