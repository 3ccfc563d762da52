"""One process of a multi-process training job on CPU devices (the multi-host tests start it).

usage: python -m tests.trainers.multihost_script OUT STORE --devices D --steps S
         [--checkpoint-every C] [--sleep SECONDS] [--params PATH] [--kill-in-save STEP]

The job joins through ALLSCOPE_COORDINATOR / ALLSCOPE_NUM_PROCESSES / ALLSCOPE_PROCESS_ID (none:
one process). Every job trains the same transcoders on a (data=2, model=2) mesh of 4 devices
in all, whatever the number of processes. It prints `step k` after each step and, at the end,
one JSON line; on preemption it prints {"preempted": step} and exits with EXIT_CODE.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def config(steps: int, checkpoint_every: int):
  from allscope.trainers import TrainConfig
  return TrainConfig(kind="transcoder", activation="jumprelu", layers=(1, 4), width=32,
                     target_l0=4, threshold_init=0.0, batch_size=16, steps=steps, lr=3e-3,
                     lr_warmup_steps=2, sparsity_warmup_steps=3, mesh_data=2, mesh_model=2,
                     checkpoint_every=checkpoint_every, keep_checkpoints=3, log_every=4)


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("out")
  ap.add_argument("store")
  ap.add_argument("--devices", type=int, default=2)
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--checkpoint-every", type=int, default=3)
  ap.add_argument("--sleep", type=float, default=0.0)
  ap.add_argument("--params", default="")
  ap.add_argument("--kill-in-save", type=int, default=0)
  args = ap.parse_args()

  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  from allscope.launch import distributed
  distributed.initialize()
  import grain
  import numpy as np
  from allscope.pipelines.reader import open_store
  from allscope.trainers import preemption, train

  cfg = config(args.steps, args.checkpoint_every)
  store = open_store(args.store)
  batches = store.global_batches(cfg.batch_size, sites=cfg.sites, layers=cfg.layers, seed=5)
  norm = {site: store.norm_scale(site, cfg.layers) for site in cfg.sites}

  if args.kill_in_save and jax.process_index() == jax.process_count() - 1:
    # Dies inside a checkpoint write: its data file is on disk, the checkpoint not committed.
    handler_save = grain.checkpoint.CheckpointHandler.save

    def save(self, directory, *a, **kw):
      handler_save(self, directory, *a, **kw)
      step_dir = Path(directory).parent.name  # "<step>.orbax-checkpoint-tmp..." while writing
      if step_dir.split(".")[0] == str(args.kill_in_save):
        os.kill(os.getpid(), signal.SIGKILL)

    grain.checkpoint.CheckpointHandler.save = save

  def hook(step, ctx):
    print(f"step {step}", flush=True)
    if args.sleep:
      time.sleep(args.sleep)

  try:
    result = train(cfg, batches, norm, args.out, hooks=[hook], progress=False)
  except preemption.Preempted as e:
    print(e, file=sys.stderr)
    print(json.dumps({"preempted": e.step}), flush=True)
    return preemption.EXIT_CODE
  params = result.params
  if args.params and jax.process_index() == 0:
    np.savez(args.params, **params)
  print(json.dumps({"resumed_from": result.resumed_from, "process_count": jax.process_count(),
                    "devices": jax.device_count()}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
