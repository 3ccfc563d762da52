"""Multi-host start-up reads the cluster from the environment."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from allscope.launch.distributed import cluster_from_env


def test_single_process_needs_no_initialization():
  assert cluster_from_env({}) is None
  assert cluster_from_env({"SLURM_NTASKS": "1"}) is None


def test_explicit_coordinator_and_detected_clusters():
  env = {"ALLSCOPE_COORDINATOR": "h0:1234", "ALLSCOPE_NUM_PROCESSES": "4",
         "ALLSCOPE_PROCESS_ID": "2"}
  assert cluster_from_env(env) == {"coordinator_address": "h0:1234", "num_processes": 4,
                                   "process_id": 2}
  assert cluster_from_env({"SLURM_NTASKS": "8"}) == {}
  # One task per node sees every GPU of its node (not JAX's default, GPU SLURM_LOCALID only).
  assert cluster_from_env({"SLURM_NTASKS": "2", "SLURM_GPUS_ON_NODE": "8"}) == {
      "local_device_ids": list(range(8))}
  assert cluster_from_env({"SLURM_NTASKS": "2", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == {
      "local_device_ids": [0, 1, 2, 3]}
  assert cluster_from_env({"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
  with pytest.raises(ValueError, match="ALLSCOPE_PROCESS_ID"):
    cluster_from_env({"ALLSCOPE_COORDINATOR": "h0:1", "ALLSCOPE_NUM_PROCESSES": "2"})


def test_two_processes_join_one_job_on_loopback(tmp_path):
  """Two real JAX processes on this machine form one job and see each other's devices."""
  import portpicker

  port = portpicker.pick_unused_port()
  script = textwrap.dedent("""
      import os, sys
      from allscope.launch import distributed
      assert distributed.initialize()
      import jax
      print(jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
      jax.distributed.shutdown()
  """)
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
          env={"ALLSCOPE_COORDINATOR": f"127.0.0.1:{port}", "ALLSCOPE_NUM_PROCESSES": "2",
               "ALLSCOPE_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
               "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
      for i in range(2)]
  outs = [p.communicate(timeout=180) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
  assert sorted(out.split()[0] for out, _ in outs) == ["0", "1"]
  assert all(out.split()[1:] == ["2", "2"] for out, _ in outs)
