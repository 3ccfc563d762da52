"""How a CLT step grows with depth: t(2L) / t(L) at a fixed per-layer width.

The encoders are linear in L; the causal decoder holds L (L + 1) / 2 (source, target) pairs, so
a decode that reads each active latent's rows once grows only with the active pairs
(k * L (L + 1) / 2 rows of d per token) against the encoders' L * d * F. Target: t(2L)/t(L) <= 2.2.
Each time is the best of --steps calls of the full jitted train step, L and 2L alternating.

  python benchmarks/clt_depth.py                  # L = 4 -> 8, d=640, F=4096/layer, B=1024, k=64
  python benchmarks/clt_depth.py --layers 9       # L = 9 -> 18
  python benchmarks/clt_depth.py --profile        # + each part of the step timed alone at L, 2L

The profile times the step's parts as separate jitted calls on random inputs of the step's
shapes (the same kernel seam, `kernels=auto`): the encoder product and its top-k, the CLT decode,
its two backward halves (d values: gather-dot; d w_dec: scatter-outer), the sparse encoder
gradient, and the optimizer's update of the decoder. Their sum is not the step's time (the step
fuses and overlaps some of them), but their growth from L to 2L says which term is super-linear.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from allscope import kernels
from allscope.trainers import dictionaries, mesh as mesh_lib, state as state_lib
from allscope.trainers.config import TrainConfig
from allscope.trainers.step import compile_step
from allscope.launch import host_memory


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

def _best(fn, *args, steps: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def profile(n_layers: int, d: int, width: int, tokens: int, k: int, steps: int) -> dict[str, float]:
  """Seconds of each part of a CLT step at n_layers (see the module docstring)."""
  cfg = TrainConfig(kind="clt", activation="topk", layers=tuple(range(n_layers)), width=width, k=k,
                    batch_size=tokens, steps=10**6, mesh_data=1)
  ops = dictionaries.kernel_ops(cfg)
  keys = jax.random.split(jax.random.key(2), 6)
  x = jax.random.normal(keys[0], (n_layers, tokens, d), jnp.float32)
  w_enc = jax.random.normal(keys[1], (n_layers, d, width), jnp.float32) / d ** 0.5
  params = dictionaries.init_params(cfg, d, d, keys[2])
  w_dec = params["w_dec"]
  idx = jax.random.randint(keys[3], (n_layers, tokens, k), 0, width, jnp.int32)
  vals = jax.random.uniform(keys[4], (n_layers, tokens, k), jnp.float32)
  g = jax.random.normal(keys[5], (tokens, n_layers, d), jnp.float32)
  tx = state_lib.optimizer(cfg)
  opt = tx.init({"w_dec": w_dec})
  parts = {
      "encoder x@w_enc": (jax.jit(lambda x, w: jnp.matmul(x, w)), x, w_enc),
      "top-k": (jax.jit(lambda x, w: kernels.topk(jnp.matmul(x, w), k, ops).values), x, w_enc),
      "decode": (jax.jit(lambda i, v, w: ops.clt_decode(i, v, w)), idx, vals, w_dec),
      "d values (gather-dot)": (jax.jit(lambda i, g, w: ops.clt_gather_dot(i, g, w)), idx, g, w_dec),
      "d w_dec (scatter)": (jax.jit(lambda i, v, g: ops.clt_scatter_outer(i, v, g, width)),
                            idx, vals, g),
      "d w_enc (scatter)": (jax.jit(lambda x, i, v: jax.vmap(
          lambda x, i, v: kernels.encoder_grad(x, i, v, width, ops))(x, i, v)), x, idx, vals),
      "optimizer (decoder)": (jax.jit(lambda p, o: tx.update(p, o, p)), {"w_dec": w_dec}, opt),
  }
  # "top-k" includes its product: the selection alone is top-k minus the encoder row.
  return {name: _best(fn, *args, steps=steps) for name, (fn, *args) in parts.items()}


def main() -> None:
  host_memory.keep_freed_memory()  # as the CLI runs: freed memory reused
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=4, help="L (the second row has 2L)")
  ap.add_argument("--d", type=int, default=640)
  ap.add_argument("--width", type=int, default=4096, help="latents per layer")
  ap.add_argument("--tokens", type=int, default=1024)
  ap.add_argument("--k", type=int, default=64)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--profile", action="store_true", help="also time each part at L and 2L")
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
  if not args.profile:
    return
  del runners
  small, big = (profile(n, args.d, args.width, args.tokens, args.k, args.steps)
                for n in (args.layers, 2 * args.layers))
  header = (f"{'part':>22} {f'L={args.layers} ms':>10} {f'L={2 * args.layers} ms':>10} "
            f"{'ratio':>6}")
  print(header)
  print("-" * len(header))
  for name in small:
    print(f"{name:>22} {1e3 * small[name]:>10.1f} {1e3 * big[name]:>10.1f} "
          f"{big[name] / small[name]:>6.2f}", flush=True)

if __name__ == "__main__":
  main()
