"""The Beam harvest on the real Gemma 3 270M (FnApiRunner): rows equal `model.capture` of the
traced tokens; stores are reproducible across workers and runs; interruptions resume without
duplicates or holes; bad input fails before the model loads; a failed write leaves no manifest."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from allscope import files
from allscope.models import ModelConfig
from allscope.pipelines import ActivationStore, HarvestError, corpus, job, output, store, worker
from allscope.pipelines.config import CorpusConfig, HarvestConfig
from tests.pipelines.helpers import all_rows, file_digests

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


def _packed(cfg: HarvestConfig, tokenizer, n: int, texts=None) -> np.ndarray:
  """The first n packed sequences, rebuilt from the texts (default: the corpus' units)."""
  if texts is not None:
    groups = [texts[a:a + cfg.corpus.docs_per_unit]
              for a in range(0, len(texts), cfg.corpus.docs_per_unit)]
  else:
    groups = (corpus.documents(cfg.corpus, u) for u in corpus.units(cfg.corpus))
  seqs = []
  for group in groups:
    ids = [tokenizer.encode(t) for t in group if t.strip()]
    seqs += [s for s, _ in corpus.pack(ids, cfg.context_length, 2, 1, 0)]
    if len(seqs) >= n:
      break
  return np.stack(seqs[:n])


def _check_rows_equal_capture(root, manifest, cfg, gemma270m, texts=None):
  model, tokenizer = gemma270m
  n_seq = manifest["num_sequences"]
  tokens = _packed(cfg, tokenizer, n_seq, texts)
  captured = model.capture(jnp.asarray(tokens), sites=cfg.sites, layers=cfg.layers)
  for site in cfg.sites:
    want = np.asarray(captured[site], np.float32)  # [n_seq, ctx, n_layers, d], another batching
    for j, layer in enumerate(cfg.layers):
      index, rows = all_rows(root, manifest, site, layer)
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


def _tiny_tfds(data_dir: Path) -> None:
  """A small TFDS dataset of fresh random English-like text, array_record, no TensorFlow."""
  import tensorflow_datasets as tfds

  words = ("light", "house", "keeper", "river", "stone", "winter", "quiet", "engine", "paper",
           "garden", "north", "signal", "copper", "window", "harbour", "lantern")

  class TinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look up (TFDS would probe importlib_resources)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(11)
      for i in range(40):
        yield i, {"text": " ".join(rng.choice(words, size=rng.integers(5, 40))) + "."}

  TinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_a_tfds_dataset_built_locally_harvests_correctly(gemma270m, tmp_path):
  import tensorflow_datasets as tfds

  _tiny_tfds(tmp_path / "tfds")
  assert "tensorflow" not in sys.modules
  cfg = dataclasses.replace(BASE, token_budget=8 * 63, corpus=CorpusConfig(
      kind="tfds", path="tiny_text", split="train", data_dir=str(tmp_path / "tfds"),
      docs_per_unit=16))
  manifest, _ = _run(gemma270m, cfg, tmp_path / "store")
  # The texts in the data source's order, packed independently of the harvest.
  source = tfds.data_source("tiny_text", split="train", data_dir=str(tmp_path / "tfds"))
  texts = [source[i]["text"].decode() for i in range(len(source))]
  assert manifest["harvest"]["corpus"]["kind"] == "tfds" and manifest["num_sequences"] == 8
  _check_rows_equal_capture(tmp_path / "store", manifest, cfg, gemma270m, texts=texts)


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
  assert file_digests(tmp_path / "again") == file_digests(root)
  one_shard = dataclasses.replace(BASE, seed=8, token_budget=8 * 63)  # sequences 0..7 = shard 0
  other, _ = _run(gemma270m, one_shard, tmp_path / "other")
  files, ref_files = other["shards"][0]["files"], manifest["shards"][0]["files"]
  assert all(files[k]["sha256"] != ref_files[k]["sha256"] for k in files)
  index, rows = all_rows(tmp_path / "other", other, "mlp_in", 3)
  ref_index, ref_rows = all_rows(root, manifest, "mlp_in", 3)
  shard0 = ref_index["sequence"] < 8
  assert not np.array_equal(index, ref_index[shard0])  # the same rows, in another order
  order, ref_order = np.argsort(index, order=["sequence", "position"]), np.argsort(
      ref_index[shard0], order=["sequence", "position"])
  np.testing.assert_array_equal(rows[order], ref_rows[shard0][ref_order])


def test_two_worker_processes_write_a_byte_identical_store(reference, gemma270m, tmp_path):
  root, manifest, _ = reference
  two, counters = _run(gemma270m, dataclasses.replace(BASE, num_workers=2), tmp_path / "two")
  assert counters["model_load_ms"] > 0  # the worker processes loaded their own model
  assert two == manifest
  assert file_digests(tmp_path / "two") == file_digests(root)


def test_a_finished_store_is_returned_without_work(reference, gemma270m, monkeypatch):
  root, manifest, _ = reference
  monkeypatch.setattr(worker, "load_model", lambda *a: pytest.fail("model loaded"))
  again, counters = _run(gemma270m, BASE, root)
  assert again == manifest and counters == {}


_CHILD = """
import sys, time
from allscope import models
from allscope.pipelines import job, store
from allscope.pipelines.config import HarvestConfig
write = store.write_shard
def slow(*a, **k):  # widens 'midway' so that the kill lands there
  out = write(*a, **k)
  time.sleep(2)
  return out
store.write_shard = slow
model, tokenizer = models.load("gemma3-270m")
job.harvest(HarvestConfig(**eval(sys.argv[1])), models.ModelConfig(name="gemma3-270m"), sys.argv[2],
            model=model, tokenizer=tokenizer)
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
  finished = {p.stem for p in receipts.glob("*.safetensors")}
  assert not (out / store.MANIFEST).exists()
  assert 0 < len(finished) < 4
  kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.array_record") if p.stem in finished}
  resumed, counters = _run(gemma270m, BASE, out)
  # Finished shards were neither recomputed nor rewritten; the others were.
  assert counters["tokens_written"] == manifest["num_tokens"] - sum(
      s["rows"] for s in manifest["shards"] if store.shard_name(s["shard"]).removesuffix(".array_record") in finished)
  assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
  assert resumed == manifest
  assert file_digests(out) == file_digests(root)


def test_a_different_store_is_refused_unless_overwrite(gemma270m, tmp_path):
  out = tmp_path / "store"
  small = dataclasses.replace(BASE, token_budget=8 * 63)
  _run(gemma270m, small, out)
  other = dataclasses.replace(small, layers=(0, 1))
  with pytest.raises(HarvestError, match=r"holds a different activation store: harvest.layers: "
                     r"\[1, 3\] in the store, \[0, 1\] in the config; .*harvest.overwrite=true"):
    _run(gemma270m, other, out)
  assert (out / "mlp_in" / "layer_3").is_dir()
  replaced, _ = _run(gemma270m, dataclasses.replace(other, overwrite=True), out)
  assert replaced["layers"] == [0, 1]
  listed = {f for s in replaced["shards"] for f in s["files"]}
  on_disk = {str(p.relative_to(out)) for p in out.rglob("*.array_record")}
  assert on_disk == listed  # nothing of the old store is left
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
  monkeypatch.setattr(worker, "load_model", lambda *a: pytest.fail("model loaded"))
  with pytest.raises(HarvestError, match=message):
    _run(gemma270m, dataclasses.replace(BASE, **change), tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_disk_full_stops_the_job_and_leaves_no_manifest(reference, gemma270m, tmp_path,
                                                       monkeypatch):
  root, manifest, _ = reference
  # A temporary name that is a link to /dev/full makes the kernel answer ENOSPC: a real
  # disk-full at the filesystem boundary.
  os.symlink("/dev/full", tmp_path / "dev_full")
  real = files._temporary_name
  monkeypatch.setattr(files, "_temporary_name", lambda path: str(tmp_path / "dev_full")
                      if path.endswith("mlp_out/layer_3/shard_00002.array_record") else real(path))
  out = tmp_path / "full"
  with pytest.raises(Exception, match="No space left on device") as info:
    _run(gemma270m, BASE, out)
  assert "mlp_out/layer_3/shard_00002.array_record" in str(info.value)
  assert not (out / store.MANIFEST).exists()
  assert not (out / store.RECEIPTS / "shard_00002.safetensors").exists()
  monkeypatch.undo()
  resumed, _ = _run(gemma270m, BASE, out)
  assert resumed == manifest and file_digests(out) == file_digests(root)


def test_a_reharvest_rewrites_shards_that_fail_their_receipts(reference, gemma270m, tmp_path):
  """Flipped bytes of the same size (in a finished store, and in an unfinished one) are found
  by the receipts' sha256 and rewritten; the intact shards are kept as they are."""
  root, manifest, _ = reference
  out = tmp_path / "copy"
  shutil.copytree(root, out)
  bad = out / "mlp_in/layer_3/shard_00001.array_record"
  data = bytearray(bad.read_bytes())
  data[len(data) // 2] ^= 0xFF
  bad.write_bytes(bytes(data))
  kept = out / "mlp_in/layer_3/shard_00000.array_record"
  kept_inode = kept.stat().st_ino
  repaired, counters = _run(gemma270m, BASE, out)
  assert repaired == manifest and counters["tokens_written"] > 0  # a shard was recomputed
  assert file_digests(out) == file_digests(root)
  assert kept.stat().st_ino == kept_inode  # an intact shard is not rewritten
  # Unfinished store (no manifest yet): a resumed harvest checks the receipts the same way.
  (out / store.MANIFEST).unlink()
  bad.write_bytes(bytes(data))
  _run(gemma270m, BASE, out)
  assert file_digests(out) == file_digests(root)


def test_the_corrupt_shard_message_names_the_fix(reference, tmp_path):
  root, manifest, _ = reference
  out = tmp_path / "copy"
  shutil.copytree(root, out)
  bad = out / "mlp_out/layer_1/shard_00000.array_record"
  data = bytearray(bad.read_bytes())
  data[-100] ^= 0xFF
  bad.write_bytes(bytes(data))
  with pytest.raises(store.CorruptShardError, match="re-run the same harvest command on this "
                     "output: it checks every shard against its receipt"):
    ActivationStore(str(out)).source(("mlp_out",), (1,), verify="checksum")[0]


def test_a_store_mismatch_names_every_differing_field_and_both_values():
  found = {"format": "f", "harvest": {"token_budget": 1008, "layers": [1, 3],
                                      "corpus": {"kind": "builtin", "path": ""}}, "units": 2}
  wanted = {"format": "f", "harvest": {"token_budget": 2000, "layers": [1, 3],
                                       "corpus": {"kind": "files", "path": "/d/*.txt"}}, "units": 2}
  assert output.differences(found, wanted) == [
      'harvest.corpus.kind: "builtin" in the store, "files" in the config',
      'harvest.corpus.path: "" in the store, "/d/*.txt" in the config',
      "harvest.token_budget: 1008 in the store, 2000 in the config"]
  assert output.differences(found, found) == []
