"""Fresh processes for the multi-device harvest tests (the device count is fixed at start-up).

  python -m tests.pipelines.scale_script claim JOB WORKERS DEVICES
      claims this process's devices, prints them as JSON, holds the slot until stdin closes
  python -m tests.pipelines.scale_script harvest OUT DEVICES CONFIG_JSON
      runs harvests on the real 270M with DEVICES CPU devices (workers load the model); CONFIG_JSON
      maps a store name to HarvestConfig fields
"""

from __future__ import annotations

import json
import sys


def claim(job: str, workers: int, n_devices: int) -> None:
  import jax
  jax.config.update("jax_num_cpu_devices", n_devices)
  from allscope.pipelines import devices

  got = devices.claim(job, workers)
  print(json.dumps({"slot": got.slot, "devices": [d.id for d in got.devices],
                    "cuda_visible": jax.config.values["jax_cuda_visible_devices"],
                    "platform": got.devices[0].platform}), flush=True)
  sys.stdin.read()


def harvest(out: str, n_devices: int, configs: dict) -> None:
  import os
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"  # workers too
  from allscope import models
  from allscope.pipelines import job
  from allscope.pipelines.config import HarvestConfig

  report = {}
  for name, fields in configs.items():  # the model is loaded by the workers, through the hook
    cfg = HarvestConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    _, report[name] = job.run(cfg, models.ModelConfig(name="gemma3-270m"), os.path.join(out, name))
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "claim":
    claim(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
  else:
    harvest(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
