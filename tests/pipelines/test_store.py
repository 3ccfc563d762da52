"""The store format: aligned bf16 records, checksums, receipts, statistics, manifest last."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from allscope import files
from allscope.pipelines import store
from tests.pipelines.helpers import LAYERS, R, SITES, WIDTHS, write_random_store


def test_records_hold_rows_per_record_bf16_rows_in_order(random_store):
  root, manifest, truth = random_store
  x = truth["mlp_out"]
  reader = store.open_reader(str(root / "mlp_out" / "layer_4" / "shard_00001.array_record"))
  assert reader.num_records() == 10  # 40 rows / 4
  rows = np.concatenate([np.frombuffer(b, store.DTYPE).reshape(-1, WIDTHS["mlp_out"])
                         for b in reader.read_all()])
  np.testing.assert_array_equal(rows.astype(np.float32), x[37:77, 1])


def test_partial_last_record_keeps_every_row(random_store):
  root, manifest, _ = random_store
  assert [s["records"] for s in manifest["shards"]] == [10, 10, 8]  # 37 -> 9 full + 1 partial
  reader = store.open_reader(str(root / "index" / "shard_00000.array_record"))
  assert len(reader.read([9])[0]) == 1 * store.INDEX_DTYPE.itemsize
  assert manifest["num_rows"] == 37 + 40 + 29


def test_manifest_lists_every_file_with_its_checksum(random_store):
  root, manifest, _ = random_store
  files = {rel: info for s in manifest["shards"] for rel, info in s["files"].items()}
  expected = {rel for k in range(3) for rel in store.shard_files(SITES, LAYERS, k)}
  assert set(files) == expected
  for rel, info in files.items():
    assert os.path.getsize(root / rel) == info["bytes"]
    assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == info["sha256"]
  leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name]
  assert not leftovers


def test_statistics_match_float64_reference(random_store):
  root, manifest, truth = random_store
  means = load_file(str(root / "stats.safetensors"))
  for site in SITES:
    for j, layer in enumerate(LAYERS):
      x = truth[site][:, j].astype(np.float64)
      entry = manifest["stats"][site][str(layer)]
      msn = np.mean(np.sum(x * x, axis=1))
      assert abs(entry["mean_sq_norm"] - msn) / msn < 1e-12
      assert abs(entry["norm_scale"] - 1 / np.sqrt(msn)) < 1e-9
      np.testing.assert_allclose(means[f"{site}/{layer}/mean"], x.mean(0), rtol=1e-6, atol=1e-7)


def test_manifest_is_refused_when_missing_or_foreign(tmp_path):
  (tmp_path / "s").mkdir()
  with pytest.raises(store.IncompleteStoreError, match="manifest.json is missing"):
    store.load_manifest(str(tmp_path / "s"))
  (tmp_path / "s" / "manifest.json").write_text(json.dumps({"format": "other"}))
  with pytest.raises(store.StoreError, match="format 'other'"):
    store.load_manifest(str(tmp_path / "s"))


def test_finish_refuses_a_hole(tmp_path):
  receipts = [{"shard": 0, "sequences": [0, 1]}, {"shard": 2, "sequences": [1, 2]}]
  with pytest.raises(store.StoreError, match="not 0..n-1"):
    store.finish(str(tmp_path / "x"), {}, receipts, sites=SITES, layers=LAYERS, widths=WIDTHS,
                 rows_per_record=R, context_length=9)
  receipts = [{"shard": 0, "sequences": [0, 1]}, {"shard": 1, "sequences": [2, 3]}]
  with pytest.raises(store.StoreError, match="hole"):
    store.finish(str(tmp_path / "x"), {}, receipts, sites=SITES, layers=LAYERS, widths=WIDTHS,
                 rows_per_record=R, context_length=9)
  assert not (tmp_path / "x" / "manifest.json").exists()


def test_failed_write_raises_oserror_naming_the_file_and_leaves_no_partial(tmp_path, monkeypatch):
  # A temporary name that is a link to /dev/full makes the kernel answer ENOSPC: a real
  # disk-full at the filesystem boundary.
  os.symlink("/dev/full", tmp_path / "full")
  real = files._temporary_name
  monkeypatch.setattr(files, "_temporary_name", lambda path: str(tmp_path / "full")
                      if "layer_4" in path else real(path))
  with pytest.raises(OSError, match="No space left") as info:
    write_random_store(tmp_path / "s")
  assert info.value.errno == 28
  assert "mlp_in/layer_4/shard_00000.array_record" in str(info.value)
  assert not (tmp_path / "s" / "manifest.json").exists()
  assert not (tmp_path / "s" / store.RECEIPTS).exists()
  assert not [p for p in (tmp_path / "s").rglob("*") if ".tmp-" in p.name]


def test_store_files_are_readable_by_others(tmp_path):
  old = os.umask(0o022)
  try:
    write_random_store(tmp_path / "s")
  finally:
    os.umask(old)
  modes = {p.relative_to(tmp_path / "s").as_posix(): p.stat().st_mode & 0o777
           for p in (tmp_path / "s").rglob("*") if p.is_file()}
  assert {"manifest.json", "stats.safetensors", "harvest.json"} & set(modes)
  assert set(modes.values()) == {0o644}, modes
