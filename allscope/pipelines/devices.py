"""Which accelerators a harvest worker process uses.

Several worker processes on one host (FnApiRunner with num_workers > 1, a Dask cluster of
processes, a Flink task manager with several slots) must not all grab every device: on a GPU each
JAX process preallocates 75% of every GPU it sees. Each process therefore claims a slot
0..num_workers-1 on its host with an exclusive lock on a file in a job-specific local folder,
and takes the slot's block of devices:

  GPU: before the backend starts, `jax_cuda_visible_devices` is restricted to the slot's GPUs,
       so the process never opens (or allocates on) the others.
  CPU, or a backend that is already running (the in-process runner): the slot's block of
       `jax.local_devices()`; with fewer CPU devices than workers, each uses its own
       process's CPU device (nothing is exclusive about it).

The lock is held for the life of the process (the file object lives in the returned Claim), so
a process that dies frees its slot for the one the runner starts in its place.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import tempfile
from typing import IO

import jax


@dataclasses.dataclass
class Claim:
  slot: int
  devices: list[jax.Device]
  lock: IO | None = dataclasses.field(default=None, repr=False)


def slot_folder(job_id: str) -> str:
  """The host-local folder where one job's worker processes claim their slots."""
  return os.path.join(tempfile.gettempdir(), f"allscope-devices-{job_id}")


def _visible_gpus() -> list[str] | None:
  """NVIDIA GPU ids this process may use, found without starting a JAX backend."""
  env = os.environ.get("CUDA_VISIBLE_DEVICES")
  if env is not None:
    return [d for d in env.split(",") if d.strip()]
  folder = "/proc/driver/nvidia/gpus"
  if os.path.isdir(folder):
    return [str(i) for i in range(len(os.listdir(folder)))]
  return None


def _backend_running() -> bool:
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def _block(n: int, workers: int, per_worker: int, slot: int, what: str) -> slice:
  k = per_worker or n // workers
  if k < 1 or k * workers > n:
    raise ValueError(f"{workers} worker process(es) x {per_worker or 'an even share of'} "
                     f"device(s) each do not fit this host's {n} {what}; lower harvest.num_workers "
                     "or set harvest.devices_per_worker")
  return slice(slot * k, (slot + 1) * k)


def _devices(slot: int, workers: int, per_worker: int) -> list[jax.Device]:
  gpus = None if _backend_running() else _visible_gpus()
  if gpus:
    mine = gpus[_block(len(gpus), workers, per_worker, slot, "GPUs")]
    jax.config.update("jax_cuda_visible_devices", ",".join(mine))
    return jax.local_devices()
  local = jax.local_devices()
  if local[0].platform == "cpu" and not per_worker and len(local) < workers:
    return local  # host CPU devices are each process's own; the cores are shared anyway
  return local[_block(len(local), workers, per_worker, slot, "devices")]


def claim(job_id: str, workers: int, per_worker: int = 0) -> Claim:
  """This process's slot and devices; `workers` processes of this job share the host."""
  if workers == 1 and not per_worker:
    return Claim(0, jax.local_devices())
  folder = slot_folder(job_id)
  os.makedirs(folder, exist_ok=True)
  for slot in range(workers):
    f = open(os.path.join(folder, f"slot_{slot}.lock"), "a")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.close()
      continue
    try:
      return Claim(slot, _devices(slot, workers, per_worker), f)
    except BaseException:
      f.close()
      raise
  raise RuntimeError(f"more than harvest.num_workers={workers} worker processes of this job run "
                     f"on this host (all slots in {folder} are taken); set harvest.num_workers to "
                     "the number of worker processes per host")
