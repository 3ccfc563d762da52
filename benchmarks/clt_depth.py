"""How a CLT step grows with depth: t(2L) / t(L) at a fixed per-layer width.

The encoders are linear in L; the causal decoder holds L (L + 1) / 2 (source, target) pairs, so
a decode that reads each active latent's rows once grows only with the active pairs
(k * L (L + 1) / 2 rows of d per token) against the encoders' L * d * F. Target: t(2L)/t(L) <= 2.2.
Each time is the best of --steps calls of the full jitted train step, L and 2L alternating.

  python benchmarks/clt_depth.py                  # L = 4 -> 8, d=640, F=4096/layer, B=1024, k=64
  python benchmarks/clt_depth.py --layers 9       # L = 9 -> 18
  python benchmarks/clt_depth.py --profile        # + each part of the step timed alone at L, 2L,
                                                  #   and the least ratio a kernel can give

The profile times the step's parts as separate jitted calls on random inputs of the step's
shapes (the same kernel seam, `kernels=auto`): the encoder product and its top-k, the CLT decode,
its two backward halves (d values: gather-dot; d w_dec: scatter-outer), the sparse encoder
gradient, and the step's optimizer over all the parameters (L F d encoder and L (L + 1) / 2 F d
decoder entries). Their sum is not the step's time (the step fuses and overlaps some of them),
but their growth from L to 2L says which term is super-linear.

The floor. Write t(L) = a L + b L (L + 1) / 2: a per layer (encoder product and selection,
encoder gradient, Adam over the layer's F d encoder entries), b per (source, target) pair
(decode, d values, d w_dec: B k d multiply-adds each, and Adam over the pair's F d decoder
entries, every entry every step). a is the larger of the profile's and the one fitted through the
two steps. With the pair's sparse passes as fast as the dense encoder product per multiply-add
and Adam as the step runs it (applied in place), b >= b_min, and

  t(2L) / t(L) >= (2 + r (2L + 1)) / (1 + r (L + 1) / 2),  r = b_min / a:

the least ratio any sparse kernel gives on this device next to this a and this optimizer (a
faster per-layer step only raises it).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from allscope import kernels
from allscope.trainers import dictionaries, mesh as mesh_lib, state as state_lib
from allscope.trainers.config import TrainConfig
from allscope.trainers.step import compile_step
from allscope.launch import host_memory
from train_step import optimizer_runner


def clt_config(n_layers: int, width: int, tokens: int, k: int) -> TrainConfig:
  return TrainConfig(kind="clt", activation="topk", layers=tuple(range(n_layers)), width=width,
                     k=k, batch_size=tokens, steps=10**6, mesh_data=1,
                     matmul_dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")


def step_runner(n_layers: int, d: int, width: int, tokens: int, k: int):
  cfg = clt_config(n_layers, width, tokens, k)
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
  cfg = clt_config(n_layers, width, tokens, k)
  ops = dictionaries.kernel_ops(cfg)
  keys = jax.random.split(jax.random.key(2), 6)
  compute = jnp.dtype(cfg.matmul_dtype)  # the step's encoder product: f32 on CPU, bf16 on GPU
  x = jax.random.normal(keys[0], (n_layers, tokens, d), compute)
  w_enc = (jax.random.normal(keys[1], (n_layers, d, width)) / d ** 0.5).astype(compute)
  product = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  params = dictionaries.init_params(cfg, d, d, keys[2])
  w_dec = params["w_dec"]
  idx = jax.random.randint(keys[3], (n_layers, tokens, k), 0, width, jnp.int32)
  vals = jax.random.uniform(keys[4], (n_layers, tokens, k), jnp.float32)
  g = jax.random.normal(keys[5], (tokens, n_layers, d), jnp.float32)
  # the optimizer's state holds w_dec and is donated: the optimizer runs last
  holder = {"st": state_lib.init_state(cfg, params, keys[2])}
  parts = {
      "encoder x@w_enc": (jax.jit(product), x, w_enc),
      "top-k": (jax.jit(lambda x, w: kernels.topk(product(x, w), k, ops).values), x, w_enc),
      "decode": (jax.jit(lambda i, v, w: ops.clt_decode(i, v, w)), idx, vals, w_dec),
      "d values (gather-dot)": (jax.jit(lambda i, g, w: ops.clt_gather_dot(i, g, w)), idx, g, w_dec),
      "d w_dec (scatter)": (jax.jit(lambda i, v, g: ops.clt_scatter_outer(i, v, g, width)),
                            idx, vals, g),
      "d w_enc (scatter)": (jax.jit(lambda x, i, v: jax.vmap(
          lambda x, i, v: kernels.encoder_grad(x, i, v, width, ops))(x, i, v)),
                            x.astype(jnp.float32), idx, vals),
      "optimizer": (optimizer_runner(cfg, holder)[0],),
  }
  # "top-k" includes its product: the selection alone is top-k minus the encoder row.
  times = {name: _best(fn, *args, steps=steps) for name, (fn, *args) in parts.items()}
  host_memory.release_freed_memory()
  return times


def pairs(n_layers: int) -> int:
  """(source, target) pairs of a causal CLT decoder: source l writes layers l..L-1."""
  return n_layers * (n_layers + 1) // 2


def depth_ratio(n_layers: int, r: float) -> float:
  """t(2L) / t(L) of t = a L + b pairs(L) at r = b / a."""
  return (2 * n_layers + r * pairs(2 * n_layers)) / (n_layers + r * pairs(n_layers))


def least_ratio(n_layers: int, d: int, width: int, tokens: int, k: int, steps: dict[int, float],
                small: dict[str, float], big: dict[str, float]) -> dict[str, float]:
  """a and b from the steps and the profile at L and 2L, the per-pair floor b_min, and the ratios
  they give."""
  per = {}
  for n, part in ((n_layers, small), (2 * n_layers, big)):
    adam = part["optimizer"] / (n + pairs(n))  # per F d block: a layer's encoder, a pair's decoder
    per[n] = {"a": (part["top-k"] + part["d w_enc (scatter)"]) / n + adam, "adam": adam,
              "b": (part["decode"] + part["d values (gather-dot)"] + part["d w_dec (scatter)"]) /
                   pairs(n) + adam,
              "macs/s": n * tokens * d * width / part["encoder x@w_enc"]}
  # the largest estimate of a (profiled at either depth, or fitted through the two steps): the
  # larger a, the lower the bound
  fitted = (steps[n_layers] - (steps[2 * n_layers] - 2 * steps[n_layers]) / n_layers ** 2 *
            pairs(n_layers)) / n_layers
  a = max(fitted, *(p["a"] for p in per.values()))
  adam = min(p["adam"] for p in per.values())
  b_min = adam + 3 * tokens * k * d / max(p["macs/s"] for p in per.values())
  b = per[2 * n_layers]["b"]
  return {"a": a, "b": b, "adam": adam, "b_min": b_min,
          "parts": depth_ratio(n_layers, b / a), "least": depth_ratio(n_layers, b_min / a)}


def time_steps(n_layers: int, d: int, width: int, tokens: int, k: int,
               steps: int) -> dict[int, float]:
  """Best seconds of the full step at L and 2L (alternating), each printed as a row."""
  runners = {n: step_runner(n, d, width, tokens, k) for n in (n_layers, 2 * n_layers)}
  for run, _ in runners.values():  # compile and warm up
    jax.block_until_ready(run())
  best = {n: float("inf") for n in runners}
  for _ in range(steps):  # alternate, so that load from other processes hits both rows
    for n, (run, _) in runners.items():
      t = time.perf_counter()
      jax.block_until_ready(run())
      best[n] = min(best[n], time.perf_counter() - t)
  for n, (_, kernels) in runners.items():
    print(f"{n:>3} {kernels:>8} {1e3 * best[n]:>9.1f} {best[n] / best[n_layers]:>9.2f}",
          flush=True)
  return best


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
  best = time_steps(args.layers, args.d, args.width, args.tokens, args.k, args.steps)
  if not args.profile:
    return
  host_memory.release_freed_memory()  # the steps' states, before the profile's arrays
  small, big = (profile(n, args.d, args.width, args.tokens, args.k, args.steps)
                for n in (args.layers, 2 * args.layers))
  header = (f"{'part':>22} {f'L={args.layers} ms':>10} {f'L={2 * args.layers} ms':>10} "
            f"{'ratio':>6}")
  print(header)
  print("-" * len(header))
  for name in small:
    print(f"{name:>22} {1e3 * small[name]:>10.1f} {1e3 * big[name]:>10.1f} "
          f"{big[name] / small[name]:>6.2f}", flush=True)
  bound = least_ratio(args.layers, args.d, args.width, args.tokens, args.k, best, small, big)
  a, b, b_min = (1e3 * bound[key] for key in ("a", "b", "b_min"))
  print(f"per layer a = {a:.1f} ms (top-k with its product, d w_enc, Adam over F d)")
  print(f"per pair  b = {b:.1f} ms at 2L (decode, d values, d w_dec, Adam over F d): "
        f"r = {b / a:.3f}, t(2L)/t(L) = {bound['parts']:.2f} in the model")
  print(f"per pair floor b_min = {b_min:.2f} ms (Adam {1e3 * bound['adam']:.2f} ms + 3 B k d "
        f"multiply-adds at the encoder product's rate): r >= {b_min / a:.3f}, "
        f"t(2L)/t(L) >= {bound['least']:.2f}; 2.2 needs r <= {0.2 / (0.9 * args.layers - 0.1):.3f}")


if __name__ == "__main__":
  main()
