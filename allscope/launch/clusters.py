"""Job scripts that start one allscope process per host on a cluster.

Each host runs the same command; `distributed.initialize` joins them into one JAX job and every
process uses all of its host's accelerators:
  SLURM  one task per node (--ntasks-per-node=1) seeing every GPU of the node; allscope passes
         them all as local_device_ids (JAX alone would give the task GPU SLURM_LOCALID only).
  TPU    the same command on every worker of the slice (gcloud ... --worker=all); JAX reads the
         slice's topology.
The script activates the Python environment it was written from, runs from the directory it was
written in, and names the config and output_dir by absolute paths. A preempted job exits with
trainers.preemption.EXIT_CODE after checkpointing; submitting the script again resumes it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from allscope.trainers.preemption import EXIT_CODE

STAGES = ("harvest", "train", "evaluate", "release", "run")

_SLURM = """#!/bin/bash
#SBATCH --job-name=allscope-{stage}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output={log_dir}/%x-%j.log
# One task per node, seeing all {gpus_per_node} GPUs of its node: allscope hands them all to
# jax.distributed.initialize (SLURM_GPUS_ON_NODE). SIGTERM (preemption, or 120 s before the time
# limit) checkpoints every process at one step; the job then exits {exit_code}: resubmit this
# script (or let --requeue do it) to continue from that step.
set -euo pipefail
cd {cwd}
{activate}
srun {command}
"""

_TPU = """#!/bin/bash
# Runs HOST_COMMAND on every worker of the TPU VM slice at once; JAX finds the slice's topology.
# A preempted run exits {exit_code} after checkpointing; run this script again to resume.
set -euo pipefail
HOST_COMMAND={host_command}
gcloud compute tpus tpu-vm ssh {tpu_name} --zone={zone} --worker=all --command="$HOST_COMMAND"
"""


def _activate() -> str:
  """Shell lines putting this Python environment first on PATH."""
  prefix = Path(sys.prefix)
  script = prefix / "bin" / "activate"
  if script.exists():
    return f"source {shlex.quote(str(script))}"
  return f"export PATH={shlex.quote(str(prefix / 'bin'))}:\"$PATH\""


def job_script(cluster: str, stage: str, config: str | None, overrides: Sequence[str], *,
               output_dir: str, nodes: int = 1, gpus_per_node: int = 8, tpu_name: str = "",
               zone: str = "") -> str:
  """The text of a job script running `allscope <stage>` on every host of the cluster."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
  if nodes < 1 or gpus_per_node < 0:
    raise ValueError(f"--nodes={nodes} must be >= 1 and --gpus-per-node={gpus_per_node} >= 0")
  output_dir = os.path.abspath(output_dir)
  words = [sys.executable, "-m", "allscope.launch.cli", stage]
  words += ([f"--config={os.path.abspath(config)}"] if config else []) + list(overrides)
  words.append(f"output_dir={output_dir}")
  command = shlex.join(words)
  cwd = shlex.quote(os.getcwd())
  if cluster == "slurm":
    return _SLURM.format(stage=stage, nodes=nodes, gpus_per_node=gpus_per_node, command=command,
                         log_dir=shlex.quote(str(Path(output_dir) / "launch")), cwd=cwd,
                         activate=_activate(), exit_code=EXIT_CODE)
  if cluster == "tpu":
    if not tpu_name or not zone:
      raise ValueError("--cluster=tpu needs --tpu-name and --zone")
    host = f"cd {cwd} && {_activate()} && exec {command}"
    return _TPU.format(tpu_name=shlex.quote(tpu_name), zone=shlex.quote(zone),
                       host_command=shlex.quote(host), exit_code=EXIT_CODE)
  raise ValueError(f"unknown cluster {cluster!r}; choose slurm or tpu")


def write_job_script(text: str, output_dir: str, cluster: str, stage: str) -> Path:
  """Writes the script under <output_dir>/launch/ (the name is ours, never the user's)."""
  path = Path(output_dir) / "launch" / f"{stage}.{cluster}.sh"
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  tmp.chmod(0o755)
  os.replace(tmp, path)
  return path
