"""Job scripts that start one allscope process per host on a cluster.

Each host runs the same command; `distributed.initialize` joins them into one JAX job (SLURM and
Cloud TPU are detected by JAX), and every host reads its own slice of the activation store.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

STAGES = ("harvest", "train", "evaluate", "release", "run")

_SLURM = """#!/bin/bash
#SBATCH --job-name=allscope-{stage}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --output={log_dir}/%x-%j.log
# One task per node; JAX reads SLURM_* to find the coordinator and this host's rank.
set -euo pipefail
srun allscope {stage} {args}
"""

_TPU = """#!/bin/bash
# Runs on every worker of the TPU VM slice at once; JAX finds the slice's topology itself.
set -euo pipefail
gcloud compute tpus tpu-vm ssh {tpu_name} --zone={zone} --worker=all \\
  --command={command}
"""


def job_script(cluster: str, stage: str, config: str | None, overrides: Sequence[str], *,
               output_dir: str, nodes: int = 1, gpus_per_node: int = 8, tpu_name: str = "",
               zone: str = "") -> str:
  """The text of a job script running `allscope <stage>` on every host of the cluster."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
  if nodes < 1 or gpus_per_node < 0:
    raise ValueError(f"--nodes={nodes} must be >= 1 and --gpus-per-node={gpus_per_node} >= 0")
  args = shlex.join(([f"--config={config}"] if config else []) + list(overrides))
  if cluster == "slurm":
    return _SLURM.format(stage=stage, nodes=nodes, gpus_per_node=gpus_per_node, args=args,
                         log_dir=shlex.quote(str(Path(output_dir) / "launch")))
  if cluster == "tpu":
    if not tpu_name or not zone:
      raise ValueError("--cluster=tpu needs --tpu-name and --zone")
    command = shlex.quote(f"allscope {stage} {args}")
    return _TPU.format(tpu_name=shlex.quote(tpu_name), zone=shlex.quote(zone), command=command)
  raise ValueError(f"unknown cluster {cluster!r}; choose slurm or tpu")


def write_job_script(text: str, output_dir: str, cluster: str, stage: str) -> Path:
  """Writes the script under <output_dir>/launch/ (the name is ours, never the user's)."""
  path = Path(output_dir) / "launch" / f"{stage}.{cluster}.sh"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)
  return path
