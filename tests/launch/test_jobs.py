"""Generated job scripts run for real: the scheduler is the only stand-in.

A stand-in `sbatch` runs the script with SLURM's job variables; a stand-in `srun` starts its
command once per node on this machine with SLURM's task variables (JAX's own SLURM detection
then finds the coordinator). The TPU script's per-host command runs once per worker with the
coordinator named (the TPU runtime's part). Each process has 2 CPU devices; the transcoders
train on a (data=2, model=2) mesh from a real store. Then `evaluate` and `release` on an
unfinished run stop and say so instead of training.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import portpicker
import pytest

from allscope.launch import config as config_lib, stages
from allscope.trainers import checkpoint
from tests.pipelines.helpers import write_random_store

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 8

SRUN = """#!/bin/bash
# Stand-in srun: one task per node, all on this machine, with SLURM's task variables.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
  SLURM_PROCID=$i SLURM_NODEID=$i SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_JOB_NUM_NODES \\
  SLURM_STEP_NUM_NODES=$SLURM_JOB_NUM_NODES SLURM_STEP_NODELIST=localhost \\
  SLURM_GPUS_ON_NODE=2 "$@" > "$SLURM_TEST_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""

SBATCH = """#!/bin/bash
# Stand-in sbatch: runs the job script now, with SLURM's job variables from its #SBATCH lines.
export SLURM_JOB_NUM_NODES=$(sed -n 's/^#SBATCH --nodes=//p' "$1")
export SLURM_JOB_NODELIST=localhost
exec bash "$1"
"""

CONFIG = """
from allscope.launch.config import RunConfig
from allscope.trainers import TrainConfig

def get_config():
  return RunConfig(seed=5, output_dir={out!r}, train=TrainConfig(
      kind="transcoder", activation="jumprelu", layers=(1, 4), width=32, target_l0=4,
      threshold_init=0.0, batch_size=16, steps={steps}, lr=3e-3, lr_warmup_steps=2,
      sparsity_warmup_steps=3, mesh_data=2, mesh_model=2, checkpoint_every=3, log_every=4))
"""


def _slurm_port() -> int:
  """A free port JAX's SLURM detection will pick: 61440 + SLURM_JOB_ID % 4096."""
  while True:
    port = random.randint(61440, 65535)
    if portpicker.is_port_free(port):
      return port


def _env(root: Path, **extra) -> dict[str, str]:
  return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
          "JAX_NUM_CPU_DEVICES": "2", "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def _launch(root: Path, *args: str) -> Path:
  out = subprocess.run([sys.executable, "-m", "allscope.launch.cli", "launch", "--stage", "train",
                        "--config", str(root / "tiny.py"), *args], cwd=root, env=_env(root),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  return Path(out.stdout.split("job script: ")[1].split()[0])


def _committed(run: Path) -> list[int]:
  return sorted(int(p.name) for p in (run / "train" / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("jobs")
  write_random_store(root / "slurm" / "store")
  shutil.copytree(root / "slurm" / "store", root / "tpu" / "store")
  (root / "tiny.py").write_text(CONFIG.format(out=str(root / "slurm"), steps=STEPS))
  return root


def test_slurm_job_trains_to_the_end_with_one_process_per_node(root):
  script = _launch(root, "--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "2")
  assert script == root / "slurm" / "launch" / "train.slurm.sh"
  bin_dir, logs = root / "bin", root / "slurm_logs"
  bin_dir.mkdir()
  logs.mkdir()
  for name, text in (("srun", SRUN), ("sbatch", SBATCH)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = _env(root, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_TEST_LOGS=str(logs),
             SLURM_JOB_ID=str(_slurm_port() - 61440 + 4096 * 7))
  job = subprocess.run(["sbatch", str(script)], cwd="/", env=env, capture_output=True,
                       text=True, timeout=600)
  tasks = [(logs / f"task{i}.log").read_text() for i in range(2)]
  assert job.returncode == 0, "\n".join(t[-3000:] for t in tasks)
  assert "final metrics: " in tasks[0] and "loss=" in tasks[0] and "final metrics" not in tasks[1]  # process 0 prints
  assert _committed(root / "slurm")[-1] == STEPS
  data = sorted(p.name for p in (root / "slurm" / "train" / "checkpoints" / str(STEPS) / "data")
                .glob("process_*"))
  assert data == ["process_0-of-2.json", "process_1-of-2.json"]


def test_tpu_host_command_trains_to_the_end_on_every_worker(root):
  script = _launch(root, "--cluster", "tpu", "--tpu-name", "v5p-16", "--zone", "us-east5-a",
                   f"output_dir={root / 'tpu'}")
  host = subprocess.run(["bash", "-c", script.read_text().split("gcloud")[0]
                         + 'printf %s "$HOST_COMMAND"'], capture_output=True, text=True,
                        check=True).stdout
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(["bash", "-c", host], cwd="/", stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(
                                root, ALLSCOPE_COORDINATOR=f"127.0.0.1:{port}",
                                ALLSCOPE_NUM_PROCESSES="2", ALLSCOPE_PROCESS_ID=str(i)))
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
  assert _committed(root / "tpu")[-1] == STEPS
  assert (root / "tpu" / "train" / "checkpoints" / str(STEPS) / "data" / "process_1-of-2.json").exists()


def test_evaluate_and_release_restore_and_never_train(root):
  """An unfinished run stops with a clear message; --allow-partial takes its latest step."""
  run = root / "slurm"
  before = _committed(run)
  longer = config_lib.load(str(root / "tiny.py"), [f"train.steps={STEPS + 4}"])
  out = subprocess.run([sys.executable, "-m", "allscope.launch.cli", "evaluate", "--config",
                        str(root / "tiny.py"), f"train.steps={STEPS + 4}"], env=_env(root),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert (f"is unfinished: its latest checkpoint is step {STEPS} of train.steps={STEPS + 4}"
          in out.stderr and "--allow-partial" in out.stderr and "Traceback" not in out.stderr)
  with pytest.raises(checkpoint.UnfinishedRun, match="unfinished"):
    stages.trained_dictionaries(longer)
  partial = stages.trained_dictionaries(longer, allow_partial=True)
  finished = stages.trained_dictionaries(config_lib.load(str(root / "tiny.py")))
  assert _committed(run) == before  # nothing trained, nothing saved
  assert len(partial) == len(finished) == 2
  for a, b in zip(partial, finished):
    assert np.array_equal(a.params["w_enc"], b.params["w_enc"])
