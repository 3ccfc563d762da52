"""The Pallas top_k's Triton blocks: every (chunk, rows, num_warps) at the train step's shapes.

For each shape it times the whole top_k (stage 1 kernel, stage 2, fallback check) with the
offset row the trainers pass (the encoder bias; for AuxK's k=256 a -inf mask of half the
latents), checks the result against `lax.top_k(x + offset)`, and prints the fastest blocks
next to the ones `gpu_blocks` picks. Rerun it on a new GPU generation before trusting the rule.

  python benchmarks/top_k_blocks.py               # GPU only (Triton)
  python benchmarks/top_k_blocks.py --seconds 40  # time limit per shape
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
from jax import lax

from allscope.kernels.pallas import top_k as pallas_top_k
from allscope.kernels.pallas.top_k import gpu_blocks

SHAPES = ((4096, 16384, 64, False), (4096, 65536, 64, False), (4096, 65536, 256, True))


def _best_seconds(fn, n: int = 20) -> float:
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seconds", type=float, default=60.0, help="time limit per shape")
  ap.add_argument("--show", type=int, default=6, help="fastest configurations printed")
  args = ap.parse_args()
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
  for b, n, k, masked in SHAPES:
    x = jax.random.normal(jax.random.key(0), (b, n), jnp.float32)
    offset = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
    if masked:
      offset = jnp.where(jax.random.uniform(jax.random.key(2), (n,)) < 0.5, offset, -jnp.inf)
    want = lax.top_k(x + offset, k)
    chunk, rows = gpu_blocks(b, n, k)
    picked = dict(chunk=chunk, rows=rows, num_warps=1)
    configs = [picked] + [dict(chunk=c, rows=r, num_warps=w) for c in (256, 512, 128)
                          for r in (2, 4, 8, 16) for w in (1, 2, 4, 8)
                          if 2 <= r * c // (32 * w) <= 64 and (c, r, w) != (chunk, rows, 1)]
    end, times = time.time() + args.seconds, []
    for cfg in configs:
      if time.time() > end:
        print(f"  (time limit: {len(times)} of {len(configs)} configurations timed)")
        break
      fn = jax.jit(functools.partial(pallas_top_k, k=k, **cfg))
      values, indices = fn(x, offset=offset)
      exact = bool(jnp.array_equal(indices, want[1]) & jnp.array_equal(values, want[0]))
      times.append((_best_seconds(lambda: fn(x, offset=offset)), cfg, exact))
    reference = _best_seconds(jax.jit(lambda: lax.top_k(x + offset, k)))
    print(f"B={b} N={n} k={k}{' (half masked)' if masked else ''}: lax.top_k {1e3 * reference:.3f}"
          f" ms; gpu_blocks {picked}: {1e3 * times[0][0]:.3f} ms")
    print(f"  {'ms':>7} {'x picked':>8}  chunk rows warps  exact")
    for t, cfg, exact in sorted(times, key=lambda r: r[0])[:args.show]:
      print(f"  {1e3 * t:7.3f} {t / times[0][0]:8.2f}  {cfg['chunk']:>5} {cfg['rows']:>4} "
            f"{cfg['num_warps']:>5}  {exact}")
    if not all(e for _, _, e in times):
      raise SystemExit("a configuration differs from lax.top_k")


if __name__ == "__main__":
  main()
