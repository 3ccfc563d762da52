"""Runs a small training in a fresh process (multi-device CPU tests and the SIGKILL test).

usage: python -m tests.trainers.train_script OUT_DIR --devices N --mesh D,M,L --steps S
         [--checkpoint-every C] [--kill-at K] [--params PATH] [--single-device-params PATH]
         [--activation A] [--width F] [--kind K]
"""

from __future__ import annotations

import argparse
import json
import os
import signal


def config(mesh: tuple[int, int, int], steps: int, checkpoint_every: int,
           activation: str = "jumprelu", width: int = 64, kind: str = "sae"):
  from allscope.trainers import TrainConfig
  # 4 dictionaries: a layer axis of 2 gives each device 2, which it encodes in a loop. Other
  # kinds than the SAE run AuxK (and its shared gradient buffers) on every step.
  return TrainConfig(kind=kind, activation=activation, layers=(0, 1, 2, 3), width=width,
                     k=4, target_l0=4, batch_size=64,
                     aux_after_tokens=64 if kind != "sae" else 5000, steps=steps, lr=3e-3,
                     lr_warmup_steps=2,
                     mesh_data=mesh[0], mesh_model=mesh[1], mesh_layer=mesh[2],
                     checkpoint_every=checkpoint_every, keep_checkpoints=2, log_every=5,
                     sparsity_warmup_steps=5, threshold_init=0.0)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("out")
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--mesh", default="1,1,1")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--checkpoint-every", type=int, default=4)
  ap.add_argument("--kill-at", type=int, default=0)
  ap.add_argument("--params", default="")
  ap.add_argument("--single-device-params", default="")
  ap.add_argument("--activation", default="jumprelu")
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--kind", default="sae")
  args = ap.parse_args()

  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  import numpy as np
  from allscope.trainers import synthetic, train

  mesh = tuple(int(v) for v in args.mesh.split(","))
  cfg = config(mesh, args.steps, args.checkpoint_every, args.activation, args.width, args.kind)
  site_in, site_out = cfg.sites
  mode = {"sae": "same", "crosscoder": "same", "clt": "clt"}.get(cfg.kind, "map")
  src = synthetic.SyntheticSource(synthetic.SyntheticSpec(
      d=16, n_features=32, n_layers=4, l0=4, scale=2.0, site_in=site_in, site_out=site_out,
      mode=mode), n_rows=4096)

  def hook(step, ctx):
    if step == args.checkpoint_every:
      ctx["manager"].wait_until_finished()  # the first checkpoint is committed ...
    if step == args.kill_at:
      os.kill(os.getpid(), signal.SIGKILL)  # ... and the run dies mid-way, no cleanup

  result = train(cfg, synthetic.loader(src, 64, seed=3), src.norm_scale(), args.out,
                 hooks=[hook] if args.kill_at else [], progress=False)
  shardings = {k: list(v.sharding.spec) for k, v in result.state.params.items()}
  print(json.dumps({"resumed_from": result.resumed_from, "n_devices": len(jax.devices()),
                    "mesh_devices": int(result.state.params["w_enc"].sharding.mesh.size),
                    "shardings": shardings}))
  if args.params:
    np.savez(args.params, **result.params)
  if args.single_device_params:
    single = train(cfg.__class__(**{**cfg.__dict__, "mesh_data": 1, "mesh_model": 1,
                                    "mesh_layer": 1}),
                   synthetic.loader(src, 64, seed=3), src.norm_scale(), args.out + "_single",
                   devices=jax.devices()[:1], progress=False)
    np.savez(args.single_device_params, **single.params)


if __name__ == "__main__":
  main()
