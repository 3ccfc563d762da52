"""Compiled temporary memory of one train step against its [L, B, F] float32 pre-activations.

Compile only (nothing is allocated): the step is lowered on abstract shapes at Gemma 3 270M
all-layer sizes (18 layers, d=640, B=4096 tokens) and XLA's buffer assignment is read
(`memory_analysis().temp_size_in_bytes`). Per-layer kinds use F=16384 per layer, a CLT F=8192 per
layer (configs/train_clt_270m.py), a crosscoder one F=16384 dictionary over all 18 layers
(its pre-activations are [1, B, F], so its parameters dominate the ratio).

  python benchmarks/step_memory.py           # every kind, TopK and JumpReLU (+ BatchTopK, ReLU
                                             #   for transcoders)
  python benchmarks/step_memory.py --quick   # the issue's three rows
  # one Gemma 3 27B layer (d=5376) at F=262144, latents split over 8 devices: memory per device
  python benchmarks/step_memory.py --quick --model 8 --d 5376 --width 262144 --layers 1

With --model M the step compiles for M CPU devices with its latents on `model`
(trainers/sharded_ops.py); every size is then one device's, against its [L, B, F/M].
"""

from __future__ import annotations

import argparse
import time

import jax

from allscope.trainers import mesh as mesh_lib, step
from allscope.trainers.config import TrainConfig

D, B, LAYERS = 640, 4096, 18  # Gemma 3 270M, all layers
QUICK = (("transcoder", "topk"), ("transcoder", "jumprelu"), ("clt", "topk"))
FULL = (("sae", "topk"), ("sae", "jumprelu"), ("transcoder", "topk"), ("transcoder", "batchtopk"),
        ("transcoder", "jumprelu"), ("transcoder", "relu"), ("skip_transcoder", "topk"),
        ("skip_transcoder", "jumprelu"), ("clt", "topk"), ("clt", "jumprelu"),
        ("crosscoder", "topk"), ("crosscoder", "jumprelu"))


def measure(kind: str, activation: str, args) -> tuple[TrainConfig, object, float]:
  width = args.width or (8192 if kind == "clt" else 16384)
  cfg = TrainConfig(kind=kind, activation=activation, layers=tuple(range(args.layers)),
                    width=width, k=64, target_l0=64, batch_size=B, mesh_data=1,
                    mesh_model=args.model, kernels=args.kernels)
  mesh = mesh_lib.make_mesh(cfg, jax.devices()[:args.model])
  t = time.perf_counter()
  mem = step.lower_step(cfg, args.d, args.d, mesh).compile().memory_analysis()
  return cfg, mem, time.perf_counter() - t


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="TopK/JumpReLU transcoders and the TopK CLT")
  ap.add_argument("--kernels", default="auto", choices=("auto", "xla", "pallas"))
  ap.add_argument("--model", type=int, default=1, help="devices the latents are split over")
  ap.add_argument("--d", type=int, default=D, help="model width (Gemma 3 270M: 640)")
  ap.add_argument("--width", type=int, default=0, help="latents per layer (0: 16384, CLT 8192)")
  ap.add_argument("--layers", type=int, default=LAYERS)
  args = ap.parse_args()
  jax.config.update("jax_num_cpu_devices", args.model)
  print(f"backend {jax.default_backend()}, {args.layers} layers, d={args.d}, B={B}, k / target "
        f"L0 64, kernels={args.kernels}, latents over {args.model} device(s): sizes per device")
  header = (f"{'kind':>15} {'activation':>10} {'F':>6} {'capacity':>8} {'[L,B,F/M] GiB':>13} "
            f"{'temp GiB':>9} {'temp/pre':>8} {'params+opt GiB':>14} {'compile s':>9}")
  print(header)
  print("-" * len(header))
  gib = float(1 << 30)
  for kind, activation in (QUICK if args.quick else FULL):
    cfg, mem, secs = measure(kind, activation, args)
    pre = cfg.n_groups * cfg.batch_size * cfg.width * 4 // args.model
    print(f"{kind:>15} {activation:>10} {cfg.width:>6} {cfg.slots:>8} {pre / gib:>13.2f} "
          f"{mem.temp_size_in_bytes / gib:>9.2f} {mem.temp_size_in_bytes / pre:>8.2f} "
          f"{mem.argument_size_in_bytes / gib:>14.2f} {secs:>9.1f}", flush=True)


if __name__ == "__main__":
  main()
