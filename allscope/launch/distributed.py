"""Multi-host start-up: one JAX process per host, initialized from the environment.

JAX detects SLURM, Cloud TPU, Open MPI and Kubernetes jobs by itself. Anywhere else, name the
coordinator explicitly:

  ALLSCOPE_COORDINATOR=host0:1234 ALLSCOPE_NUM_PROCESSES=4 ALLSCOPE_PROCESS_ID=<i> allscope train ...
"""

from __future__ import annotations

import os
from typing import Any, Mapping


def cluster_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
  """Keyword arguments for `jax.distributed.initialize`, or None for a single-process run."""
  if "ALLSCOPE_COORDINATOR" in env:
    missing = [k for k in ("ALLSCOPE_NUM_PROCESSES", "ALLSCOPE_PROCESS_ID") if k not in env]
    if missing:
      raise ValueError(f"ALLSCOPE_COORDINATOR is set but {', '.join(missing)} is not; set all three")
    return {"coordinator_address": env["ALLSCOPE_COORDINATOR"],
            "num_processes": int(env["ALLSCOPE_NUM_PROCESSES"]),
            "process_id": int(env["ALLSCOPE_PROCESS_ID"])}
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return {}  # JAX's cluster detection reads the rest
  if len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return {}
  return None


def initialize(env: Mapping[str, str] = os.environ) -> bool:
  """Joins the multi-host job described by `env`; returns whether there is one."""
  kwargs = cluster_from_env(env)
  if kwargs is None:
    return False
  import jax

  jax.distributed.initialize(**kwargs)
  return True
