"""The Beam harvest on the real Gemma 3 270M (FnApiRunner): rows equal `model.capture` of the
traced tokens; stores are reproducible across workers and runs; interruptions resume without
duplicates or holes; bad input fails before the model loads; a failed write leaves no manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from allscope.models import ModelConfig
from allscope.pipelines import ActivationStore, HarvestError, corpus, job, store
from allscope.pipelines.config import CorpusConfig, HarvestConfig

MODEL = ModelConfig(name="gemma3-270m")
# Small and fast: 4 shards of 8 sequences of 64 tokens, two layers (the forward stops at 3).
BASE = HarvestConfig(sites=("mlp_in", "mlp_out"), layers=(1, 3), context_length=64,
                     token_budget=2000, batch_size=4, sequences_per_shard=8, rows_per_record=8,
                     seed=7, progress=False)


def _run(gemma270m, cfg, out, **kw):
  model, tokenizer = gemma270m
  return job.run(cfg, MODEL, str(out), model=model, tokenizer=tokenizer, **kw)


@pytest.fixture(scope="module")
def reference(gemma270m, tmp_path_factory):
  """The store every other test compares with (one in-process worker)."""
  out = tmp_path_factory.mktemp("ref") / "store"
  manifest, counters = _run(gemma270m, BASE, out)
  return out, manifest, counters


def _file_digests(root: Path) -> dict[str, str]:
  """Every file of a store (temporary files would show up here too) with its sha256."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _all_rows(root: Path, manifest: dict, site: str, layer: int):
  """Every stored row (partial records included) with its index entry, in store order."""
  idx, rows = [], []
  for shard in manifest["shards"]:
    name = store.shard_name(shard["shard"])
    idx += [np.frombuffer(b, store.INDEX_DTYPE)
            for b in store.open_reader(str(root / "index" / name)).read_all()]
    reader = store.open_reader(str(root / store.layer_dir(site, layer) / name))
    rows += [np.frombuffer(b, store.DTYPE).reshape(-1, manifest["widths"][site])
             for b in reader.read_all()]
  return np.concatenate(idx), np.concatenate(rows).astype(np.float32)


def _packed(cfg: HarvestConfig, tokenizer, n: int) -> np.ndarray:
  """The first n packed sequences, rebuilt independently from the corpus."""
  seqs = []
  for unit in corpus.units(cfg.corpus):
    seqs += [s for s, _ in corpus.unit_sequences(cfg.corpus, unit, tokenizer.encode,
                                                 cfg.context_length, 2, 1, 0)]
    if len(seqs) >= n:
      break
  return np.stack(seqs[:n])


def _check_rows_equal_capture(root, manifest, cfg, gemma270m):
  model, tokenizer = gemma270m
  n_seq = manifest["num_sequences"]
  tokens = _packed(cfg, tokenizer, n_seq)
  for site in cfg.sites:
    want = model.capture(jnp.asarray(tokens), sites=(site,), layers=cfg.layers)[site]
    want = np.asarray(want, np.float32)  # [n_seq, ctx, n_layers, d], batched differently
    for j, layer in enumerate(cfg.layers):
      index, rows = _all_rows(root, manifest, site, layer)
      # Every non-BOS, non-PAD position of sequences 0..n-1 exactly once: no holes, no duplicates.
      keys = index["sequence"] * cfg.context_length + index["position"]
      expected = np.flatnonzero((tokens != 0).reshape(-1) &
                                (np.arange(tokens.size) % cfg.context_length != 0))
      np.testing.assert_array_equal(np.sort(keys), expected)
      np.testing.assert_array_equal(index["token"], tokens[index["sequence"], index["position"]])
      ref = want[index["sequence"], index["position"], j]
      err = np.abs(rows - ref)
      # bf16 keeps 8 significant bits: a rounding error of at most 2^-9 relative.
      assert np.all(err <= 2.0 ** -8 * np.abs(ref) + 1e-5 * np.abs(ref).max()), err.max()
      assert np.linalg.norm(rows - ref) / np.linalg.norm(ref) < 3e-3
      x = rows.astype(np.float64)
      stats = manifest["stats"][site][str(layer)]
      assert abs(stats["mean_sq_norm"] - np.mean(np.sum(x * x, 1))) <= 1e-9 * stats["mean_sq_norm"]
  assert manifest["num_tokens"] == int(np.sum((tokens != 0)[:, 1:]))


def test_rows_equal_model_capture_of_the_traced_tokens(reference, gemma270m):
  root, manifest, _ = reference
  assert manifest["num_sequences"] == 32 and len(manifest["shards"]) == 4
  assert manifest["widths"] == {"mlp_in": 640, "mlp_out": 640}
  _check_rows_equal_capture(root, manifest, BASE, gemma270m)


def test_rows_are_shuffled_across_sequences(reference):
  root, manifest, _ = reference
  first = np.frombuffer(store.open_reader(str(root / "index" / store.shard_name(0))).read([0])[0],
                        store.INDEX_DTYPE)
  assert len(set(first["sequence"].tolist())) >= 4  # one record of 8 rows mixes sequences


def test_reader_serves_aligned_normalizable_batches(reference):
  root, _, _ = reference
  st = ActivationStore(root)
  it = iter(st.loader(batch_size=16, sites=("mlp_in", "mlp_out"), layers=(3,), seed=0))
  batch = next(it)
  assert batch["mlp_in"].shape == (16, 1, 640) and batch["mlp_out"].dtype == store.DTYPE
  x = batch["mlp_in"].astype(np.float64) * st.norm_scale("mlp_in", (3,))[None, :, None]
  assert 0.2 < np.mean(np.sum(x * x, -1)) < 5


def test_same_seed_gives_identical_checksums_and_another_seed_reshuffles(reference, gemma270m,
                                                                         tmp_path):
  root, manifest, _ = reference
  again, _ = _run(gemma270m, BASE, tmp_path / "again")
  assert again == manifest
  assert _file_digests(tmp_path / "again") == _file_digests(root)
  other, _ = _run(gemma270m, dataclasses.replace(BASE, seed=8), tmp_path / "other")
  assert other["shards"][0]["files"] != manifest["shards"][0]["files"]
  for site in BASE.sites:  # the same rows, in another order
    assert other["stats"][site]["1"]["mean_sq_norm"] == pytest.approx(
        manifest["stats"][site]["1"]["mean_sq_norm"], rel=1e-12)


def test_two_worker_processes_write_a_byte_identical_store(reference, gemma270m, tmp_path):
  root, manifest, _ = reference
  two, counters = _run(gemma270m, dataclasses.replace(BASE, num_workers=2), tmp_path / "two")
  assert counters["model_load_ms"] > 0  # the worker processes loaded their own model
  assert two == manifest
  assert _file_digests(tmp_path / "two") == _file_digests(root)


def test_a_finished_store_is_returned_without_work(reference, gemma270m, monkeypatch):
  root, manifest, _ = reference
  monkeypatch.setattr(job, "load_model", lambda cfg: pytest.fail("model loaded"))
  again, counters = _run(gemma270m, BASE, root)
  assert again == manifest and counters == {}


_CHILD = """
import sys, time
from allscope.pipelines import job, store
from allscope.pipelines.config import HarvestConfig
from allscope.models import ModelConfig
write = store.write_shard
def slow(*a, **k):  # makes 'midway' wide enough to hit
  out = write(*a, **k)
  time.sleep(2)
  return out
store.write_shard = slow
job.harvest(HarvestConfig(**eval(sys.argv[1])), ModelConfig(name="gemma3-270m"), sys.argv[2])
"""


def test_killed_harvest_resumes_without_redoing_finished_shards(reference, gemma270m, tmp_path):
  root, manifest, _ = reference
  out = tmp_path / "killed"
  fields = {k: v for k, v in dataclasses.asdict(BASE).items() if k != "corpus"}
  env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
  child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CHILD), repr(fields), str(out)],
                           env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
  receipts = out / store.RECEIPTS
  deadline = time.time() + 240
  while time.time() < deadline and child.poll() is None:
    if receipts.is_dir() and any(p.suffix == ".safetensors" for p in receipts.iterdir()):
      break
    time.sleep(0.05)
  assert child.poll() is None, child.stderr.read().decode()[-2000:]
  os.killpg(child.pid, signal.SIGKILL)
  child.wait()
  done = {p.name: p.stat().st_mtime_ns for p in out.rglob("*.array_record")}
  assert not (out / store.MANIFEST).exists()
  assert 0 < len(list(receipts.glob("*.safetensors"))) < 4
  resumed, counters = _run(gemma270m, BASE, out)
  assert counters["tokens_written"] < manifest["num_tokens"]  # finished shards were not redone
  for p in out.rglob("*.array_record"):
    if p.name in done and (receipts / p.name.replace(".array_record", ".safetensors")).exists():
      assert p.stat().st_mtime_ns == done[p.name]
  assert resumed == manifest
  assert _file_digests(out) == _file_digests(root)


def test_a_different_store_is_refused_unless_overwrite(reference, gemma270m, tmp_path):
  root, manifest, _ = reference
  out = tmp_path / "store"
  small = dataclasses.replace(BASE, token_budget=500)
  _run(gemma270m, small, out)
  with pytest.raises(HarvestError, match="holds a different activation store.*harvest"):
    _run(gemma270m, BASE, out)
  replaced, _ = _run(gemma270m, dataclasses.replace(BASE, overwrite=True), out)
  assert dataclasses.replace(BASE, overwrite=True) and replaced == manifest
  assert _file_digests(out) == _file_digests(root)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "mine.txt").write_text("keep me")
  with pytest.raises(HarvestError, match="not empty and holds no activation store"):
    _run(gemma270m, BASE, tmp_path / "notes")


@pytest.mark.parametrize("change, message", [
    (dict(corpus=CorpusConfig(kind="files", path="/nonexistent/*.txt")), "matches no files"),
    (dict(corpus=CorpusConfig(kind="files", path="{empty}/*.txt")), "holds no text"),
    (dict(corpus=CorpusConfig(kind="tfds", path="no_such_ds", data_dir="{empty}")), "TFDS"),
    (dict(context_length=40_000), "exceeds the maximum context of gemma3-270m \\(32768\\)"),
    (dict(sites=("mlp_in", "mlp_mid")), "unknown site"),
    (dict(layers=(3, 18)), "layer\\(s\\) \\[18\\] out of range; gemma3-270m has 18 layers"),
])
def test_bad_input_fails_before_the_model_loads(gemma270m, tmp_path, monkeypatch, change, message):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("  \n\n ")
  corpus_cfg = change.get("corpus")
  if corpus_cfg is not None:
    change["corpus"] = dataclasses.replace(
        corpus_cfg, path=corpus_cfg.path.format(empty=tmp_path / "empty"),
        data_dir=corpus_cfg.data_dir.format(empty=tmp_path / "empty"))
  monkeypatch.setattr(job, "load_model", lambda cfg: pytest.fail("model loaded"))
  with pytest.raises(HarvestError, match=message):
    _run(gemma270m, dataclasses.replace(BASE, **change), tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_disk_full_stops_the_job_and_leaves_no_manifest(reference, gemma270m, tmp_path,
                                                       monkeypatch):
  root, manifest, _ = reference
  real = store._Committer.scratch
  # /dev/full answers every write with ENOSPC: a real disk-full at the filesystem boundary.
  monkeypatch.setattr(store._Committer, "scratch", lambda self, rel: "/dev/full"
                      if rel == "mlp_out/layer_3/shard_00002.array_record" else real(self, rel))
  discard = store._Committer.discard
  monkeypatch.setattr(store._Committer, "discard",
                      lambda self, tmp: tmp != "/dev/full" and discard(self, tmp))
  out = tmp_path / "full"
  with pytest.raises(Exception, match="No space left on device") as info:
    _run(gemma270m, BASE, out)
  assert "mlp_out/layer_3/shard_00002.array_record" in str(info.value)
  assert not (out / store.MANIFEST).exists()
  assert not (out / store.RECEIPTS / "shard_00002.safetensors").exists()
  monkeypatch.undo()
  resumed, _ = _run(gemma270m, BASE, out)
  assert resumed == manifest and _file_digests(out) == _file_digests(root)
