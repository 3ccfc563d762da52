"""Multi-host start-up: one JAX process per host using all of its devices.

JAX detects SLURM, Cloud TPU, Open MPI and Kubernetes jobs by itself. Anywhere else, name the
coordinator explicitly:

  ALLSCOPE_COORDINATOR=host0:1234 ALLSCOPE_NUM_PROCESSES=4 ALLSCOPE_PROCESS_ID=<i> allscope train ...

SLURM layout: one task per node (`--ntasks-per-node=1`) seeing every GPU of its node. JAX's
SLURM detection would give such a task only GPU SLURM_LOCALID, so `cluster_from_env` passes
local_device_ids for all of the node's GPUs (SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")
_BARRIER_TIMEOUT_MS = 2**31 - 1  # ~24 days: process 0 may harvest for a long time


def _slurm_local_devices(env: Mapping[str, str]) -> list[int] | None:
  if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
    return list(range(int(env["SLURM_GPUS_ON_NODE"])))
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  return list(range(len(visible))) if visible else None


def cluster_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
  """Keyword arguments for `jax.distributed.initialize`, or None for a single-process run."""
  if "ALLSCOPE_COORDINATOR" in env:
    missing = [k for k in ("ALLSCOPE_NUM_PROCESSES", "ALLSCOPE_PROCESS_ID") if k not in env]
    if missing:
      raise ValueError(f"ALLSCOPE_COORDINATOR is set but {', '.join(missing)} is not; set all three")
    return {"coordinator_address": env["ALLSCOPE_COORDINATOR"],
            "num_processes": int(env["ALLSCOPE_NUM_PROCESSES"]),
            "process_id": int(env["ALLSCOPE_PROCESS_ID"])}
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    devices = _slurm_local_devices(env)
    return {"local_device_ids": devices} if devices else {}  # JAX reads the rest
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return {}
  if len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return {}
  return None


def initialize(env: Mapping[str, str] = os.environ) -> bool:
  """Joins the multi-host job described by `env`; returns whether there is one."""
  kwargs = cluster_from_env(env)
  if kwargs is None:
    return False
  import jax

  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**kwargs)
  return True


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (no-op on one process).

  The coordination service's barrier, not a device collective: the waiting processes hold no
  accelerator work open while process 0 runs a long stage.
  """
  import jax

  if jax.process_count() == 1 or not jax.distributed.is_initialized():
    return
  from jax._src import distributed as jax_distributed  # the client has no public accessor

  jax_distributed.global_state.client.wait_at_barrier(f"allscope:{name}", _BARRIER_TIMEOUT_MS)


def on_primary(name: str, fn: Callable[[], T]) -> T | None:
  """Runs `fn` on process 0 only (shared outputs are written once); the others wait for it and
  get None."""
  import jax

  result = fn() if jax.process_index() == 0 else None
  barrier(name)
  return result
