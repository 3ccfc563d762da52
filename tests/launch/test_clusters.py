"""`allscope launch` writes job scripts that start one allscope process per host."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from allscope.launch import clusters
from allscope.trainers import preemption


def test_slurm_script_runs_the_stage_once_per_node_with_all_its_gpus(tmp_path):
  text = clusters.job_script("slurm", "train", "configs/my run.py", ["train.steps=5", "x=$(rm)"],
                             output_dir=str(tmp_path), nodes=4, gpus_per_node=8)
  assert "#SBATCH --nodes=4" in text and "#SBATCH --gpus-per-node=8" in text
  assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --signal=TERM@120" in text
  srun = next(line for line in text.splitlines() if line.startswith("srun "))
  words = shlex.split(srun)
  assert words[1:5] == [sys.executable, "-m", "allscope.launch.cli", "train"]
  assert words[5].startswith("--config=/") and words[5].endswith("configs/my run.py")
  assert words[6:] == ["train.steps=5", "x=$(rm)", f"output_dir={tmp_path}"]
  assert f"source {sys.prefix}/bin/activate" in text or f"export PATH={sys.prefix}/bin" in text
  assert f"exits {preemption.EXIT_CODE}" in text
  subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid shell


def test_tpu_script_reaches_all_workers_with_one_host_command(tmp_path):
  text = clusters.job_script("tpu", "harvest", None, ["seed=1"], output_dir="o", tpu_name="v5p-64",
                             zone="us-east5-a")
  assert '--worker=all --command="$HOST_COMMAND"' in text
  host = subprocess.run(["bash", "-c", text.split("gcloud")[0] + 'printf %s "$HOST_COMMAND"'],
                        capture_output=True, text=True, check=True).stdout
  assert f"-m allscope.launch.cli harvest seed=1 output_dir=" in host and "&& exec " in host
  with pytest.raises(ValueError, match="--tpu-name and --zone"):
    clusters.job_script("tpu", "train", None, [], output_dir="o")


@pytest.mark.parametrize("cluster,stage,message", [
    ("slurm", "deploy", "unknown stage 'deploy'"), ("k8s", "train", "unknown cluster 'k8s'")])
def test_bad_choices_are_named(cluster, stage, message):
  with pytest.raises(ValueError, match=message):
    clusters.job_script(cluster, stage, None, [], output_dir="o")


def test_cli_writes_the_script_inside_the_output_folder(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "allscope.launch.cli", "launch", "--stage", "train", "--nodes", "2",
       f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  script = tmp_path / "launch" / "train.slurm.sh"
  assert script.exists() and f"job script: {script}" in out.stdout
  assert not (tmp_path / "config.json").exists()  # launch starts no work: nothing recorded
  assert f"output_dir={tmp_path}" in script.read_text()
