"""Train-step time against the dense encoder product and against EleutherAI sparsify's step.

For each shape (d, F), B tokens and k, it times in one run:
  floor     one dense encoder product x @ w_enc (float32 on CPU, bfloat16 on GPU/TPU): the cost
            no sparse step can go below;
  allscope  the full jitted train step (encoder, selection, sparse decode, losses, sparse
            gradients, clipping, Adam, decoder renormalization) of a TopK / BatchTopK / JumpReLU
            SAE, with the kernels `train.kernels=auto` picks (Pallas on GPU, sparse XLA on CPU);
  sparsify  `sparsify.SparseCoder` (PyPI eai-sparsify, torch) forward (FVU + AuxK) + backward +
            its decoder-gradient projection + torch Adam + unit-norm decoder, on the same device
            (TopK only: sparsify has no BatchTopK or JumpReLU).
  adam      the optimizer of allscope's step alone (clipping, Adam over the float32 parameters
            and both moments, applied in place): a step that keeps this state and updates it
            after the product takes at least floor + adam, 1 + adam/floor times the floor.
Rows with AuxK "off" have no dead latents on either side (AuxK does not run); rows with "on" run
AuxK every step (allscope: aux_k = 256 over its silent latents; sparsify: its own k_aux over a
random 10% of latents marked dead).
and prints a table of step / floor ratios, the floor's GFLOP/s, and allscope's speed-up in
tokens/s over sparsify. The ratios depend on the device's GEMM speed against its memory: the
sparse passes are memory-bound, so a faster GEMM (a lower floor) raises every ratio.
Each time is the best of --steps rounds that call floor, allscope and sparsify once each in turn
(after a warm-up), so that load from other processes hits every column alike.

  python benchmarks/train_step.py --quick    # d=640, F=16384, TopK only, AuxK off
  python benchmarks/train_step.py            # d=640/F=16384 and d=2304/F=65536, all activations
  python benchmarks/train_step.py --kernels pallas xla   # a row for each (GPU: Pallas vs XLA)
  python benchmarks/train_step.py --d 2304   # one shape
  python benchmarks/train_step.py --activations topk   # the rows sparsify also runs
Needs the `bench` extra (eai-sparsify) for the sparsify column; without it the column is blank.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from allscope.trainers import dictionaries, mesh as mesh_lib, state as state_lib
from allscope.trainers.config import KERNELS, TrainConfig
from allscope.trainers.step import compile_step
from allscope.launch import host_memory

SHAPES = ((640, 16384), (2304, 65536))
ACTIVATIONS = ("topk", "batchtopk", "jumprelu")


def _interleaved_best(runners: dict, n: int) -> dict[str, float]:
  """Best seconds of each runner over n rounds; one call of each per round (after a warm-up),
  so that a load change on a shared machine hits every column alike."""
  for run, sync in runners.values():
    sync(run())
  best = {name: float("inf") for name in runners}
  for _ in range(n):
    for name, (run, sync) in runners.items():
      t = time.perf_counter()
      sync(run())
      best[name] = min(best[name], time.perf_counter() - t)
  return best


def _dtype() -> str:
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def floor_runner(d: int, width: int, tokens: int):
  dt = jnp.dtype(_dtype())
  x = jax.random.normal(jax.random.key(0), (tokens, d), dt)
  w = jax.random.normal(jax.random.key(1), (d, width), dt)
  mm = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))
  return (lambda: mm(x, w)), jax.block_until_ready


def optimizer_runner(cfg: TrainConfig, holder: dict):
  """The step's optimizer alone (clipping, Adam; applied in place on the donated state) on
  holder["st"], the parameters standing in for their gradients: no second state in memory."""
  tx = state_lib.optimizer(cfg)

  def update(st: state_lib.TrainState) -> state_lib.TrainState:
    updates, opt_state = tx.update(st.params, st.opt_state, st.params)
    return st.replace(params=optax.apply_updates(st.params, updates), opt_state=opt_state)

  update = jax.jit(update, donate_argnums=(0,))

  def run():
    holder["st"] = update(holder["st"])
    return holder["st"].step

  return run, jax.block_until_ready


def allscope_runner(d: int, width: int, tokens: int, activation: str, k: int, auxk: bool,
                    kernels: str = "auto", compiler_options: dict | None = None):
  # AuxK (and revive) act on latents silent for aux_after_tokens: 1 token makes every step run
  # them (random data leaves many latents silent each step), 10**9 none.
  cfg = TrainConfig(kind="sae", activation=activation, layers=(0,), width=width, k=k,
                    target_l0=k, batch_size=tokens, steps=10**6, matmul_dtype=_dtype(),
                    mesh_data=1, aux_after_tokens=1 if auxk else 10**9, kernels=kernels)
  mesh = mesh_lib.make_mesh(cfg, jax.devices()[:1])
  params = dictionaries.init_params(cfg, d, d, jax.random.key(0))
  if "log_threshold" in params:  # pre ~ N(0, 1) on this data: fire about k latents per token
    z = np.quantile(np.random.default_rng(0).standard_normal(1 << 20), 1.0 - k / width)
    params["log_threshold"] = jnp.full_like(params["log_threshold"], np.log(z))
  abstract = jax.eval_shape(lambda p: state_lib.init_state(cfg, p, jax.random.key(0)), params)
  shardings = state_lib.shardings(cfg, abstract, mesh)
  st = jax.device_put(state_lib.init_state(cfg, params, jax.random.key(0)), shardings)
  batch_sh = mesh_lib.batch_sharding(mesh)
  x = jax.device_put(jax.random.normal(jax.random.key(1), (tokens, 1, d), jnp.bfloat16), batch_sh)
  ones = jax.device_put(jnp.ones((1,)), mesh_lib.replicated(mesh))
  # compiled ahead, with any XLA options (gpu_step_profile.py --xla)
  step = compile_step(cfg, mesh, shardings).lower(st, x, x, ones, ones).compile(compiler_options)
  holder = {"st": st}

  def run():
    holder["st"], metrics = step(holder["st"], x, x, ones, ones)
    return holder["st"].step, metrics

  run.hlo_text = step.as_text  # the optimized HLO, for step_profile.py to name what it times
  run.optimizer = optimizer_runner(cfg, holder)  # for the adam/floor column
  return (run, jax.block_until_ready), dictionaries.kernel_ops(cfg).name


def add_step_args(ap: argparse.ArgumentParser) -> None:
  """One step's shape flags, for the profilers (step_profile.py, gpu_step_profile.py)."""
  ap.add_argument("--d", type=int, default=640)
  ap.add_argument("--width", type=int, default=16384)
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--k", type=int, default=64)
  ap.add_argument("--activation", default="topk")
  ap.add_argument("--auxk", action="store_true", help="every step runs AuxK and revive "
                  "(train_step.py's AuxK-on rows); default: none, the steady state")


def sparsify_runner(d: int, width: int, tokens: int, k: int, auxk: bool):
  try:
    import torch
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder
  except ImportError:
    return None
  device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
  torch.manual_seed(0)
  sae = SparseCoder(d, SparseCoderConfig(num_latents=width, k=k), device=device,
                    dtype=torch.float32)
  opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
  x = torch.randn(tokens, d, device=device, dtype=torch.float32)
  # AuxK runs where some latents are dead (a random 10%), and not at all without dead latents.
  dead = (torch.rand(width, device=device) < 0.1) if auxk else torch.zeros(
      width, dtype=torch.bool, device=device)

  def run():
    out = sae(x, dead_mask=dead)
    (out.fvu + out.auxk_loss).backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    sae.set_decoder_norm_to_unit_norm()

  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  return run, sync


def main() -> None:
  host_memory.keep_freed_memory()  # as the CLI runs: freed memory reused
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="d=640, F=16384, TopK only, AuxK off")
  ap.add_argument("--d", type=int, choices=[d for d, _ in SHAPES], help="only this shape")
  ap.add_argument("--activations", nargs="+", choices=ACTIVATIONS, default=list(ACTIVATIONS),
                  help="the AuxK-off rows' activations (AuxK-on rows are TopK)")
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--k", type=int, default=64)
  ap.add_argument("--steps", type=int, default=3, help="timed calls per row (best is kept)")
  ap.add_argument("--kernels", nargs="+", default=["auto"], choices=KERNELS,
                  help="train.kernels of allscope's rows: one row for each")
  args = ap.parse_args()
  shapes = SHAPES[:1] if args.quick else [s for s in SHAPES if args.d in (None, s[0])]
  activations = ACTIVATIONS[:1] if args.quick else args.activations
  dev = jax.devices()[0]
  print(f"backend {jax.default_backend()} ({dev.device_kind}), {args.tokens} tokens/step, "
        f"k={args.k}, floor = x @ w_enc in {_dtype()}")
  header = (f"{'d':>5} {'F':>6} {'activation':>10} {'kernels':>8} {'AuxK':>5} {'floor ms':>9} "
            f"{'GFLOP/s':>8} {'allscope ms':>11} {'sparsify ms':>11} {'allscope/floor':>14} "
            f"{'sparsify/floor':>14} {'tok/s vs sparsify':>17} {'adam/floor':>10}")
  print(header)
  print("-" * len(header))
  for d, width in shapes:
    for auxk in (False,) if args.quick else (False, True):
      peer = step = runners = None  # the last rows' arrays: one process runs every row
      host_memory.release_freed_memory()
      peer = sparsify_runner(d, width, args.tokens, args.k, auxk)
      for activation in activations if not auxk else ACTIVATIONS[:1]:
        for choice in args.kernels:
          step = runners = None
          host_memory.release_freed_memory()
          row = f"{d:>5} {width:>6} {activation:>10}"
          try:
            step, kernels = allscope_runner(d, width, args.tokens, activation, args.k, auxk,
                                            choice)
            runners = {"floor": floor_runner(d, width, args.tokens), "allscope": step,
                       "adam": step[0].optimizer}
            if peer is not None and activation == "topk":
              runners["sparsify"] = peer
            best = _interleaved_best(runners, args.steps)
          except Exception as e:  # one row's failure (a kernel on a new device) spares the rest
            print(f"{row} {choice:>8} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
          floor, t, p = best["floor"], best["allscope"], best.get("sparsify")
          print(f"{row} {kernels:>8} {'on' if auxk else 'off':>5} "
                f"{1e3 * floor:>9.1f} {2e-9 * args.tokens * d * width / floor:>8.0f} "
                f"{1e3 * t:>11.1f} {(f'{1e3 * p:.1f}' if p else '-'):>11} "
                f"{t / floor:>14.2f} {(f'{p / floor:.2f}' if p else '-'):>14} "
                f"{(f'{p / t:.2f}x' if p else '-'):>17} {best['adam'] / floor:>10.2f}", flush=True)


if __name__ == "__main__":
  main()
