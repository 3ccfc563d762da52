"""The model inside a harvest worker process: claim devices, load or place the weights once,
and compile the capture. The only harvest module that loads weights (allscope.models).

Each worker process claims its own devices (pipelines/devices.py) and shards the model over them
(models/sharding.py). A process's DoFn threads share one `_Slot` through beam.utils.shared.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import apache_beam as beam
import jax
from apache_beam.utils import shared

from allscope import models
from allscope.models import sharding
from allscope.models.loader import ModelConfig
from allscope.pipelines import devices
from allscope.pipelines.config import HarvestConfig

_MS_LOAD = beam.metrics.Metrics.counter("harvest", "model_load_ms")


def load_model(model_cfg: ModelConfig, placement=None):
  """The model's weights, each placed by `placement` (models.load's sharding hook) as read."""
  model, _ = models.load(model_cfg.name, dtype=model_cfg.dtype, sharding=placement)
  return model


capture_fn = sharding.capture_fn


class _Slot:
  """One worker process's model, devices and compiled captures (shared by its DoFn threads
  through beam.utils.shared, which needs a weak-referenceable value)."""

  def __init__(self, model=None):
    self.model = model  # a model handed in by the driver, or None until loaded
    self.claim: devices.Claim | None = None
    self.mesh = None
    self.compiled: dict[tuple, Any] = {}  # per-process jitted captures of the model
    self.lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Handles:
  """The per-process shared model: each worker process loads it at most once, and an
  in-process worker reuses the driver's when one was passed in (the driver holds it)."""

  model: shared.Shared = dataclasses.field(default_factory=shared.Shared)

  def hold(self, model) -> _Slot:
    """Hands the driver's model to in-process workers; keep the returned slot alive."""
    return self.model.acquire(lambda: _Slot(model))

  def slot(self) -> _Slot:
    """This process's slot; the caller keeps a reference (shared.Shared holds weak ones)."""
    return self.model.acquire(_Slot)


def forward(slot: _Slot, cfg: HarvestConfig, model_cfg: ModelConfig, arch, job_id: str,
            widths: dict[str, int], layers: tuple[int, ...]):
  """(model, compiled capture) of this process, claiming devices and loading on first use."""
  with slot.lock:
    if slot.claim is None:
      start = time.perf_counter()
      claim = devices.claim(job_id, cfg.num_workers, cfg.devices_per_worker)
      if len(claim.devices) > 1 or cfg.mesh_model > 1:
        slot.mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_model, claim.devices)
        if cfg.batch_size % slot.mesh.shape["data"]:
          raise ValueError(f"harvest.batch_size={cfg.batch_size} does not divide over this "
                           f"worker's mesh (data={slot.mesh.shape['data']}, model="
                           f"{slot.mesh.shape['model']}); make it a multiple of mesh_data")
        placement = sharding.param_sharding(slot.mesh, arch)
      else:
        placement = jax.sharding.SingleDeviceSharding(claim.devices[0])
      if slot.model is None:
        slot.model = load_model(model_cfg, placement)
      else:  # the driver's model: a copy placed on this worker's devices
        slot.model = sharding.place(slot.model, placement)
      slot.claim = claim
      _MS_LOAD.inc(int(1000 * (time.perf_counter() - start)))
    key = (tuple(widths), layers)
    if key not in slot.compiled:
      slot.compiled[key] = capture_fn(slot.model, *key, mesh=slot.mesh)
    return slot.model, slot.compiled[key]
