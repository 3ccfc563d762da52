"""Harvest at scale: worker processes claim their own devices, a mesh shards the forward and
writes the same rows, and a Dask cluster of worker processes writes the FnApiRunner's bytes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from allscope.models import ModelConfig
from allscope.pipelines import devices, job
from allscope.pipelines.config import HarvestConfig
from tests.pipelines.helpers import all_rows, file_digests

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(name="gemma3-270m")
# 2 shards of 8 sequences of 64 tokens, layers 1 and 3 (the forward stops at layer 3).
SMALL = dict(sites=["mlp_in", "mlp_out"], layers=[1, 3], context_length=64, token_budget=16 * 63,
             batch_size=4, sequences_per_shard=8, rows_per_record=8, seed=7, progress=False)


def _env(**extra) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")
  env.pop("CUDA_VISIBLE_DEVICES", None)
  env.update(extra)
  return env


def _claims(workers: int, n_devices: int, **env) -> list[dict]:
  """`workers` fresh processes claim their devices at once, holding their slots meanwhile."""
  job_id = uuid.uuid4().hex
  procs = [subprocess.Popen([sys.executable, "-m", "tests.pipelines.scale_script", "claim", job_id,
                             str(workers), str(n_devices)], cwd=ROOT, env=_env(**env),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(workers)]
  try:
    out = []
    for p in procs:
      line = p.stdout.readline()
      assert line, p.stderr.read()[-2000:]
      out.append(json.loads(line))
    return sorted(out, key=lambda c: c["slot"])
  finally:
    for p in procs:
      p.stdin.close()
      p.wait(timeout=60)
    shutil.rmtree(devices.slot_folder(job_id), ignore_errors=True)


def test_local_worker_processes_each_take_their_own_block_of_devices():
  claims = _claims(2, 4)
  assert [c["slot"] for c in claims] == [0, 1]
  assert [c["devices"] for c in claims] == [[0, 1], [2, 3]]


def test_on_gpu_hosts_a_worker_sees_only_its_own_gpus():
  # With GPUs visible, the restriction happens before JAX starts a backend, so the process never
  # opens (or preallocates on) another worker's GPU. This machine has none: JAX then falls back to
  # the CPU, but the visibility setting it was given is what a GPU backend would read.
  claims = _claims(2, 1, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", JAX_PLATFORMS="")
  assert [c["cuda_visible"] for c in claims] == ["0,1,2,3", "4,5,6,7"]


def test_more_worker_processes_than_slots_or_devices_is_refused():
  job_id = uuid.uuid4().hex
  held = [devices.claim(job_id, 2), devices.claim(job_id, 2)]  # two locks, as two processes hold
  try:
    assert [c.slot for c in held] == [0, 1]
    with pytest.raises(RuntimeError, match="more than harvest.num_workers=2 worker processes"):
      devices.claim(job_id, 2)
    n, other = len(held[0].devices), uuid.uuid4().hex
    with pytest.raises(ValueError, match=f"do not fit this host's {n} devices"):
      devices.claim(other, 2, per_worker=n)
  finally:
    for c in held:
      c.lock.close()
    shutil.rmtree(devices.slot_folder(job_id))
    shutil.rmtree(devices.slot_folder(other), ignore_errors=True)


def _rows_by_position(root: Path, site: str, layer: int):
  manifest = json.loads((root / "manifest.json").read_text())
  index, rows = all_rows(root, manifest, site, layer)
  order = np.argsort(index, order=["sequence", "position"])
  return index[order], rows[order]


@pytest.fixture(scope="module")
def reference(gemma270m, tmp_path_factory):
  """The one-device, in-process store of SMALL that the others are compared with."""
  model, tokenizer = gemma270m
  out = tmp_path_factory.mktemp("ref") / "store"
  cfg = HarvestConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in SMALL.items()})
  manifest, _ = job.run(cfg, MODEL, str(out), model=model, tokenizer=tokenizer)
  return out, manifest


def _harvest_with_devices(tmp_path, n_devices: int, fields: dict) -> dict:
  proc = subprocess.run([sys.executable, "-m", "tests.pipelines.scale_script", "harvest",
                         str(tmp_path), str(n_devices), json.dumps({"store": fields})], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])["store"]


def _check_same_rows(root: Path, reference) -> None:
  ref_root, ref = reference
  got = json.loads((root / "manifest.json").read_text())
  assert got["harvest"] == ref["harvest"] and got["num_rows"] == ref["num_rows"]
  for site in SMALL["sites"]:
    for layer in SMALL["layers"]:
      want_index, want = _rows_by_position(ref_root, site, layer)
      index, rows = _rows_by_position(root, site, layer)
      np.testing.assert_array_equal(index, want_index)
      # bf16 storage: at most one rounding step apart (near-zero values: float32 noise of the
      # row's scale), almost all bit-identical.
      rms = np.sqrt(np.mean(want ** 2, axis=1, keepdims=True))
      assert np.all(np.abs(rows - want) <= 2.0 ** -7 * np.abs(want) + 1e-4 * rms), (site, layer)
      assert np.linalg.norm(rows - want) / np.linalg.norm(want) < 1e-3, (site, layer)
      assert np.mean(rows == want) > 0.99, (site, layer)


def test_a_harvest_sharded_over_data_and_model_writes_the_same_rows(reference, tmp_path):
  # One process, 4 devices, mesh 2 x 2: the model is loaded straight onto the mesh.
  _harvest_with_devices(tmp_path, 4, dict(SMALL, mesh_data=2, mesh_model=2))
  _check_same_rows(tmp_path / "store", reference)


def test_two_local_workers_with_two_devices_each_write_the_same_rows(reference, tmp_path):
  # Two FnApiRunner worker processes on a 4-device host: each claims 2 devices, tensor parallel.
  counters = _harvest_with_devices(tmp_path, 4, dict(SMALL, num_workers=2, mesh_model=2))
  assert counters["model_load_ms"] > 0  # the worker processes loaded their own
  _check_same_rows(tmp_path / "store", reference)


def test_dask_cluster_of_worker_processes_writes_the_local_runners_bytes(reference, gemma270m,
                                                                          tmp_path):
  from distributed import LocalCluster

  local, ref = reference
  _, tokenizer = gemma270m
  cfg = HarvestConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in SMALL.items()})
  with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                    dashboard_address=None) as cluster:
    dask_cfg = dataclasses.replace(cfg, num_workers=2, beam_args=(
        "--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
        f"--dask_client_address={cluster.scheduler_address}"))
    manifest, counters = job.run(dask_cfg, MODEL, str(tmp_path / "dask"), tokenizer=tokenizer)
    pids = {w.process.pid for w in cluster.workers.values()}
  assert len(pids) == 2
  assert manifest == ref
  assert file_digests(tmp_path / "dask") == file_digests(local)
  assert "wall_s" in counters  # DaskRunner keeps no Beam metrics; the run still reports
