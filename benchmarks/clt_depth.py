"""How a CLT step grows with depth: t(2L) / t(L) at a fixed per-layer width.

The encoders are linear in L; the causal decoder holds L (L + 1) / 2 (source, target) pairs, so
a decode that reads each active latent's rows once grows only with the active pairs
(k * L (L + 1) / 2 rows of d per token) against the encoders' L * d * F. Target: t(2L)/t(L) <= 2.2.
Each time is the best of --steps calls of the full jitted train step, L and 2L alternating.

  python benchmarks/clt_depth.py                  # L = 4 -> 8, d=640, F=4096/layer, B=1024, k=64
  python benchmarks/clt_depth.py --layers 9       # L = 9 -> 18
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from allscope.trainers import dictionaries, mesh as mesh_lib, state as state_lib
from allscope.trainers.config import TrainConfig
from allscope.trainers.step import compile_step


def step_runner(n_layers: int, d: int, width: int, tokens: int, k: int):
  cfg = TrainConfig(kind="clt", activation="topk", layers=tuple(range(n_layers)), width=width, k=k,
                    batch_size=tokens, steps=10**6, mesh_data=1,
                    matmul_dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")
  mesh = mesh_lib.make_mesh(cfg, jax.devices()[:1])
  params = dictionaries.init_params(cfg, d, d, jax.random.key(0))
  abstract = jax.eval_shape(lambda p: state_lib.init_state(cfg, p, jax.random.key(0)), params)
  shardings = state_lib.shardings(cfg, abstract, mesh)
  st = jax.device_put(state_lib.init_state(cfg, params, jax.random.key(0)), shardings)
  step = compile_step(cfg, mesh, shardings)
  batch_sh = mesh_lib.batch_sharding(mesh)
  x = jax.device_put(jax.random.normal(jax.random.key(1), (tokens, n_layers, d), jnp.bfloat16),
                     batch_sh)
  norm = jax.device_put(jnp.ones((n_layers,)), mesh_lib.replicated(mesh))
  holder = {"st": st}

  def run():
    holder["st"], metrics = step(holder["st"], x, x, norm, norm)
    return metrics

  return run, dictionaries.kernel_ops(cfg).name

def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=4, help="L (the second row has 2L)")
  ap.add_argument("--d", type=int, default=640)
  ap.add_argument("--width", type=int, default=4096, help="latents per layer")
  ap.add_argument("--tokens", type=int, default=1024)
  ap.add_argument("--k", type=int, default=64)
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args()
  print(f"backend {jax.default_backend()}, CLT TopK d={args.d}, F={args.width}/layer, "
        f"B={args.tokens}, k={args.k}")
  header = f"{'L':>3} {'kernels':>8} {'step ms':>9} {'t / t(L)':>9}"
  print(header)
  print("-" * len(header))
  runners = {n: step_runner(n, args.d, args.width, args.tokens, args.k)
             for n in (args.layers, 2 * args.layers)}
  for run, _ in runners.values():  # compile and warm up
    jax.block_until_ready(run())
  best = {n: float("inf") for n in runners}
  for _ in range(args.steps):  # alternate, so that load from other processes hits both rows
    for n, (run, _) in runners.items():
      t = time.perf_counter()
      jax.block_until_ready(run())
      best[n] = min(best[n], time.perf_counter() - t)
  for n, (_, kernels) in runners.items():
    print(f"{n:>3} {kernels:>8} {1e3 * best[n]:>9.1f} {best[n] / best[args.layers]:>9.2f}",
          flush=True)

if __name__ == "__main__":
  main()
