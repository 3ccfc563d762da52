"""Train-step throughput of JumpReLU and TopK SAEs against the dense encoder product.

For each shape it times the full jitted train step (forward, selection, sparse decode, losses,
sparse gradients, Adam, decoder renormalization) and, in the same run, one dense bf16 encoder
product x @ w_enc of the same shape: the floor no sparse kernel can go below. Prints a table
with the ratio step / floor.

  python benchmarks/train_step.py            # CPU-sized shapes (d and F / 4)
  python benchmarks/train_step.py --full     # the issue's shapes: (640, 16384), (2304, 65536)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from allscope.trainers import dictionaries, mesh as mesh_lib, state as state_lib
from allscope.trainers.config import TrainConfig
from allscope.trainers.step import compile_step

FULL_SHAPES = ((640, 16384), (2304, 65536))
SMALL_SHAPES = ((160, 4096), (576, 16384))


def _time(fn, n: int) -> float:
  """Median seconds of n calls of fn() (each returns something to block on)."""
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def dense_floor(d: int, width: int, tokens: int, n: int) -> float:
  key = jax.random.key(0)
  x = jax.random.normal(key, (tokens, d), jnp.bfloat16)
  w = jax.random.normal(key, (d, width), jnp.bfloat16)
  mm = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))
  return _time(lambda: mm(x, w), n)


def step_time(d: int, width: int, tokens: int, activation: str, k: int, n: int,
              matmul_dtype: str) -> float:
  cfg = TrainConfig(kind="sae", activation=activation, layers=(0,), width=width, k=k,
                    target_l0=k, batch_size=tokens, steps=10**6, matmul_dtype=matmul_dtype,
                    mesh_data=-1)
  mesh = mesh_lib.make_mesh(cfg)
  params = dictionaries.init_params(cfg, d, d, jax.random.key(0))
  if "log_threshold" in params:  # pre ~ N(0, 1) on this data: fire about k latents per token
    z = np.quantile(np.random.default_rng(0).standard_normal(1 << 20), 1.0 - k / width)
    params["log_threshold"] = jnp.full_like(params["log_threshold"], np.log(z))
  abstract = jax.eval_shape(lambda p: state_lib.init_state(cfg, p, jax.random.key(0)), params)
  shardings = state_lib.shardings(cfg, abstract, mesh)
  st = jax.device_put(state_lib.init_state(cfg, params, jax.random.key(0)), shardings)
  step = compile_step(cfg, mesh, shardings)
  batch_sh = mesh_lib.batch_sharding(mesh)
  x = jax.device_put(jax.random.normal(jax.random.key(1), (tokens, 1, d), jnp.bfloat16), batch_sh)
  ones = jax.device_put(jnp.ones((1,)), mesh_lib.replicated(mesh))
  holder = {"st": st}

  def run():
    holder["st"], metrics = step(holder["st"], x, x, ones, ones)
    return holder["st"]["step"], metrics

  return _time(run, n)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--full", action="store_true", help="the issue's shapes (needs ~16 GB on CPU)")
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--k", type=int, default=64)
  ap.add_argument("--steps", type=int, default=3, help="timed steps per row (median)")
  ap.add_argument("--matmul-dtype", default="bfloat16", choices=("bfloat16", "float32"))
  args = ap.parse_args()
  shapes = FULL_SHAPES if args.full else SMALL_SHAPES
  dev = jax.devices()[0]
  print(f"backend {jax.default_backend()} ({dev.device_kind}) x{jax.device_count()}, "
        f"{args.tokens} tokens/step, k={args.k}, encoder matmul {args.matmul_dtype}")
  header = (f"{'d':>5} {'F':>6} {'activation':>10} {'step ms':>9} {'tokens/s':>10} "
            f"{'dense bf16 enc ms':>17} {'step/enc':>8}")
  print(header)
  print("-" * len(header))
  for d, width in shapes:
    floor = dense_floor(d, width, args.tokens, args.steps)
    for activation in ("jumprelu", "topk"):
      t = step_time(d, width, args.tokens, activation, args.k, args.steps, args.matmul_dtype)
      print(f"{d:>5} {width:>6} {activation:>10} {1e3 * t:>9.1f} {args.tokens / t:>10.3g} "
            f"{1e3 * floor:>17.2f} {t / floor:>8.1f}", flush=True)


if __name__ == "__main__":
  main()
