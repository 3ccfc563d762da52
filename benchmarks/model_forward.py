"""Tokens/s of the Gemma 3 forward (logits) against `capture` of all sites at all layers.

  python benchmarks/model_forward.py                         # CPU-sized default
  python benchmarks/model_forward.py --dtype bfloat16 --batch 32 --seq 1024   # GPU

Capture is the harvest's inner loop; the target is at most 15% over the plain forward.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from allscope import models
from allscope.launch import host_memory


def _time(fn, iters: int) -> float:
  jax.block_until_ready(fn())  # compile
  start = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) / iters


def main():
  host_memory.keep_freed_memory()  # as the CLI runs: freed memory reused
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="gemma3-270m")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--random-weights", action="store_true",
                      help="random weights of the preset's shape (speed does not depend on values)")
  args = parser.parse_args()

  if args.random_weights:
    model = models.Gemma3(models.preset(args.model), args.dtype, rngs=nnx.Rngs(0))
  else:
    model, _ = models.load(args.model, dtype=args.dtype)
  cfg = model.config
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.seq), np.int32)
  tokens[:, 0] = cfg.bos_id
  n = tokens.size

  rows = [
      ("forward (logits)", _time(lambda: model.logits(tokens), args.iters)),
      ("capture (4 sites x all layers)", _time(lambda: model.capture(tokens), args.iters)),
  ]
  base = rows[0][1]
  print(f"\n{args.model} {args.dtype} batch={args.batch} seq={args.seq} "
        f"device={jax.devices()[0].device_kind}")
  print(f"{'pass':34s} {'ms/batch':>10s} {'tokens/s':>12s} {'vs forward':>11s}")
  for name, t in rows:
    print(f"{name:34s} {t * 1e3:10.1f} {n / t:12.0f} {t / base:10.2f}x")


if __name__ == "__main__":
  main()
