"""Harvest throughput and storage against their floors, in one run.

Baseline: `model.capture` alone on the same packed sequences and batch size, with its bf16
results copied to the host (what any harvest must at least do). Harvest: the full Beam job
(tokenize, pack, forward, shuffle, write ArrayRecord shards, checksums, stats, manifest).
Storage: bytes on disk per token against the floor of 2 bytes x sum of captured widths.

  PYTHONPATH=. python benchmarks/harvest.py                       # CPU defaults (small)
  PYTHONPATH=. python benchmarks/harvest.py --tokens 1000000 --context 1024 --batch 32 \\
      --layers all --sites mlp_in,mlp_out --seqs-per-shard 64      # a GPU-sized run

Targets: harvest overhead over capture <= 30% (one-time model load and compile excluded, and
reported), storage overhead <= 2%.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time

import numpy as np


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="gemma3-270m")
  ap.add_argument("--sites", default="mlp_in,mlp_out")
  ap.add_argument("--layers", default="all", help="'all' or comma-separated indices")
  ap.add_argument("--context", type=int, default=128)
  ap.add_argument("--tokens", type=int, default=16_384)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seqs-per-shard", type=int, default=64)
  ap.add_argument("--rows-per-record", type=int, default=32)
  ap.add_argument("--workers", type=int, default=1)
  ap.add_argument("--out", default="", help="store folder (default: a temporary one)")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  from allscope import models
  from allscope.pipelines import corpus, job
  from allscope.pipelines.config import CorpusConfig, HarvestConfig

  model_cfg = models.ModelConfig(name=args.model)
  sites = tuple(args.sites.split(","))
  arch, _ = job.describe(model_cfg)
  layers = (tuple(range(arch.n_layers)) if args.layers == "all"
            else tuple(int(l) for l in args.layers.split(",")))
  cfg = HarvestConfig(corpus=CorpusConfig(kind="builtin"), sites=sites, layers=layers,
                      context_length=args.context, token_budget=args.tokens,
                      batch_size=args.batch, sequences_per_shard=args.seqs_per_shard,
                      rows_per_record=args.rows_per_record, num_workers=args.workers,
                      progress=False)

  # -- baseline: capture alone ------------------------------------------------------------------
  t0 = time.perf_counter()
  model, tokenizer = models.load(args.model, dtype=model_cfg.dtype)
  load_s = time.perf_counter() - t0
  n_seq = math.ceil(args.tokens / (args.context - 1))
  seqs = []
  for unit in corpus.units(cfg.corpus):
    seqs += list(corpus.unit_sequences(cfg.corpus, unit, lambda t: tokenizer.encode(t),
                                       args.context, arch.bos_id, arch.eos_id, arch.pad_id))
    if len(seqs) >= n_seq:
      break
  seqs = seqs[:n_seq]
  n_seq = len(seqs) // args.batch * args.batch
  tokens = np.stack([s for s, _ in seqs[:n_seq]])
  valid = np.array([n for _, n in seqs[:n_seq]])
  mask = np.arange(args.context)[None, :] < valid[:, None]
  stored = int(np.sum(valid - 1))

  def capture(i: int, fetch: bool):
    out = model.capture(jnp.asarray(tokens[i:i + args.batch]), sites=sites, layers=layers,
                        mask=jnp.asarray(mask[i:i + args.batch]))
    if fetch:
      return {s: np.asarray(x.astype(jnp.bfloat16)) for s, x in out.items()}
    return jax.block_until_ready(out)

  t0 = time.perf_counter()
  capture(0, True)
  first_s = time.perf_counter() - t0
  timings = {}
  for fetch in (False, True):
    t0 = time.perf_counter()
    for i in range(0, n_seq, args.batch):
      capture(i, fetch)
    timings[fetch] = time.perf_counter() - t0
  compile_s = max(first_s - timings[True] / (n_seq // args.batch), 0.0)
  capture_tps = stored / timings[True]
  del model

  # -- harvest ----------------------------------------------------------------------------------
  with tempfile.TemporaryDirectory() as tmp:
    out = args.out or os.path.join(tmp, "store")
    cfg = dataclasses.replace(cfg, token_budget=n_seq * (args.context - 1))
    manifest, counters = job.run(cfg, model_cfg, out)
    n = manifest["num_tokens"]
    assert n == stored, (n, stored)
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    total = sum(os.path.getsize(f) for f in files)
    acts = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs
               if os.path.relpath(d, out).split(os.sep)[0] in sites)
  wall = counters["wall_s"]
  one_time = counters.get("model_load_ms", 0) / 1000 / args.workers + compile_s
  steady = max(wall - one_time, 1e-9)
  floor = 2 * sum(manifest["widths"][s] for s in sites) * len(layers)

  print(f"\nharvest benchmark: {args.model}, sites {','.join(sites)}, {len(layers)} layers, "
        f"context {args.context}, batch {args.batch}, {n} stored tokens, {args.workers} worker(s), "
        f"{jax.devices()[0].platform}")
  rows = [
      ("capture alone, device only", stored / timings[False], timings[False], ""),
      ("capture alone + bf16 to host (baseline)", capture_tps, timings[True], "1.00"),
      ("harvest end to end", n / wall, wall, f"{capture_tps / (n / wall):.2f}"),
      ("harvest minus model load + compile", n / steady, steady, f"{capture_tps / (n / steady):.2f}"),
  ]
  print(f"{'':42s} {'tokens/s':>10s} {'seconds':>9s} {'time ratio':>11s}")
  for name, tps, sec, ratio in rows:
    print(f"{name:42s} {tps:10.0f} {sec:9.2f} {ratio:>11s}")
  print(f"one-time costs: model load {counters.get('model_load_ms', 0) / 1000:.2f}s in harvest "
        f"({load_s:.2f}s in baseline), jit compile ~{compile_s:.2f}s; harvest forward "
        f"{counters.get('forward_ms', 0) / 1000:.2f}s, write {counters.get('write_ms', 0) / 1000:.2f}s")
  overhead = capture_tps / (n / steady) - 1
  print(f"harvest overhead over capture: {100 * overhead:.1f}% (target <= 30%)")
  print(f"{'':42s} {'bytes/token':>12s} {'vs floor':>9s}")
  print(f"{'floor: 2 bytes x sum of widths':42s} {floor:12.1f} {1:9.4f}")
  print(f"{'activation shards':42s} {acts / n:12.1f} {acts / n / floor:9.4f}")
  print(f"{'whole store (index, receipts, manifest)':42s} {total / n:12.1f} {total / n / floor:9.4f}")
  print(f"storage overhead: {100 * (total / n / floor - 1):.2f}% (target <= 2%)")


if __name__ == "__main__":
  main()
