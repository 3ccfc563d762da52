"""Where the quickstart's train step goes: its parts timed alone, at the quickstart's shapes.

Takes the TrainConfig of configs/quickstart.py (18 skip-transcoders, F=1024, B=512, BatchTopK
k=16 in 32 slots, AuxK) on random activations, and times in one process, interleaved (best of
--rounds, so load from other processes hits all alike):

  product     the dense encoder product x @ w_enc + b_enc (forward only, as in the step)
  select      BatchTopK's selection from that product
  main        the main sparse encode + decode, forward and backward (C slots)
  skip        the skip term x @ w_skip, forward and backward
  aux_select  AuxK's ranking of each row's dead latents (every latent dead), as the step runs it
  aux         AuxK's encode + decode, forward and backward (aux_k slots), as the step runs it
  optimizer   gradient clipping, Adam, decoder renormalization
  step        the full jitted train step with 10% of each layer's latents silent for AuxK (at most
              aux_k: every row takes all of them, no ranking), as the quickstart runs from about
              step 45 on (docs/train.md, "AuxK in the quickstart")
  step_ranked the step with every latent silent (more than aux_k: each row ranks them), as in
              the quickstart's first steps; step_sparse / step_dense / step_noaux: the same with
              AuxK's sparse path, its dense path, and AuxK off

  python benchmarks/quickstart_step.py [--rounds 3] [train.aux_k=64 ...]

--aux-sweep 16,32,64,128,256 instead times AuxK alone (selection + encode/decode forward and
backward) on both paths (train.aux_path sparse and dense) at each aux_k, as ratios to the
dense encoder product: where the dense path starts to pay (dictionaries.AUX_DENSE_MIN_FRACTION).
"""

from __future__ import annotations

import argparse
import dataclasses
import runpy
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from allscope import kernels
from allscope.trainers import dictionaries, losses, mesh as mesh_lib, state as state_lib
from allscope.trainers.step import compile_step
from allscope.launch import host_memory

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"
D = 640  # Gemma 3 270M's mlp_in / mlp_out width


def quickstart_train(overrides: list[str]):
  cfg = runpy.run_path(str(CONFIG))["get_config"]().train
  for o in overrides:
    name, value = o.removeprefix("train.").split("=", 1)
    cfg = dataclasses.replace(cfg, **{name: type(getattr(cfg, name))(value)})
  return cfg


def _best(runners: dict, rounds: int) -> dict[str, float]:
  for fn in runners.values():
    jax.block_until_ready(fn())
  best = {name: float("inf") for name in runners}
  for _ in range(rounds):
    for name, fn in runners.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      best[name] = min(best[name], time.perf_counter() - t)
  return best


def main() -> None:
  host_memory.keep_freed_memory()  # as the CLI runs: freed memory reused
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--aux-sweep", default="", help="comma-separated aux_k values")
  p.add_argument("overrides", nargs="*")
  args = p.parse_args()
  cfg = quickstart_train(args.overrides)
  if args.aux_sweep:
    aux_sweep(cfg, [int(v) for v in args.aux_sweep.split(",")], args.rounds)
    return
  g, b, f, c, ka = cfg.n_groups, cfg.batch_size, cfg.width, cfg.slots, min(cfg.aux_k, cfg.width)
  ops = dictionaries.kernel_ops(cfg)
  params = dictionaries.init_params(cfg, D, D, jax.random.key(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, g, D), np.float32))
  y = jnp.asarray(rng.standard_normal((b, g, D), np.float32))
  xg = jnp.swapaxes(x, 0, 1)
  dead = jnp.ones((g, f), bool)

  product = jax.jit(jax.vmap(lambda x, w, bb: x @ w + bb))
  dense = product(xg, params["w_enc"], params["b_enc"])
  select = jax.jit(jax.vmap(lambda d: kernels.batchtopk(d, cfg.k, c, ops)[0]))
  sel = select(dense)
  rank = ((lambda s: kernels.nth_largest(s, ka)) if dictionaries.aux_dense(cfg)
          else (lambda s: kernels.topk(s, ka, ops)))
  aux_select = jax.jit(jax.vmap(lambda d, m: rank(jnp.where(m[None], d, -jnp.inf))))
  aux_sel = aux_select(dense, dead)

  def sparse_loss(p, idx, pre, xg, y):
    pre = jax.vmap(lambda x_g, w, bb, i, v: kernels.sparse_encode(x_g, w, bb, i, v, ops))(
        xg, p["w_enc"], p["b_enc"], idx, pre)
    out = dictionaries.decode_latents(p, cfg, idx, jax.nn.relu(pre))
    return jnp.sum(jnp.square(out - y))

  main_grad = jax.jit(jax.grad(sparse_loss))
  skip_grad = jax.jit(jax.grad(lambda w, x, y: jnp.sum(jnp.square(jnp.einsum("bgi,gio->bgo", x, w) - y))))
  enc = dictionaries.encode(params, cfg, x, dead)
  aux_grad = jax.jit(jax.grad(lambda p, e, x, y: losses._auxk(p, cfg, x, e, y)))

  tx = state_lib.optimizer(cfg)
  opt_state = tx.init(params)

  @jax.jit
  def optimize(grads, opt_state, p):
    updates, opt_state = tx.update(grads, opt_state, p)
    new = optax.apply_updates(p, updates)
    new["w_dec"] = dictionaries.normalize_decoder(new["w_dec"], cfg)
    return new, opt_state

  mesh = mesh_lib.make_mesh(cfg)
  norm = jnp.ones((g,), jnp.float32)

  def step_runner(c, silent: float = 1.0):
    st = state_lib.init_state(c, jax.tree.map(jnp.copy, params), jax.random.key(0))  # donated
    sh = state_lib.shardings(c, st, mesh)
    st = jax.device_put(st, sh)
    step = compile_step(c, mesh, sh)
    since = jax.device_put(jnp.where(jnp.asarray(rng.random((g, f)) < silent), 1 << 29, 0)
                           .astype(st.since_fired.dtype), sh.since_fired)
    holder = {"st": st}

    def run():  # the same silent latents every call (a step resets those that fire)
      st = dataclasses.replace(holder["st"], since_fired=jnp.copy(since))
      holder["st"], m = step(st, x, y, norm, norm)
      return m["loss"]
    return run

  runners = {
      "product": lambda: product(xg, params["w_enc"], params["b_enc"]),
      "select": lambda: select(dense),
      "main": lambda: main_grad(params, sel.indices, sel.values, xg, y),
      "skip": lambda: skip_grad(params["w_skip"], x, y),
      "aux_select": lambda: aux_select(dense, dead),
      "aux": lambda: aux_grad(params, enc, x, y),
      "optimizer": lambda: optimize(params, opt_state, params),
      "step": step_runner(cfg, silent=0.1),
      "step_ranked": step_runner(cfg),
      "step_sparse": step_runner(dataclasses.replace(cfg, aux_path="sparse")),
      "step_dense": step_runner(dataclasses.replace(cfg, aux_path="dense")),
      "step_noaux": step_runner(dataclasses.replace(cfg, aux_after_tokens=1 << 30)),
  }
  t = _best(runners, args.rounds)
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); G={g} B={b} d={D} F={f} "
        f"k={cfg.k} slots={c} aux_k={ka} ({cfg.activation}, {cfg.kind})")
  print(f"{'part':>12} {'ms':>9} {'of step':>8}")
  for name, s in t.items():
    print(f"{name:>12} {1e3 * s:9.1f} {s / t['step']:8.2f}")
  parts = sum(v for k, v in t.items() if not k.startswith("step"))
  print(f"{'sum of parts':>12} {1e3 * parts:9.1f} {parts / t['step']:8.2f}")
  del aux_sel


def aux_sweep(cfg, aux_ks: list[int], rounds: int) -> None:
  g, b, f = cfg.n_groups, cfg.batch_size, cfg.width
  params = dictionaries.init_params(cfg, D, D, jax.random.key(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, g, D), np.float32))
  y = jnp.asarray(rng.standard_normal((b, g, D), np.float32))
  # 3/4 silent: more than any swept aux_k, so every row ranks them (the ranked regime)
  dead = jnp.asarray(rng.random((g, f)) < 0.75)
  xg = jnp.swapaxes(x, 0, 1)
  product = jax.jit(jax.vmap(lambda x, w, bb: x @ w + bb))
  runners = {"product": lambda: product(xg, params["w_enc"], params["b_enc"])}
  for k in aux_ks:
    for path in ("sparse", "dense"):
      c = dataclasses.replace(cfg, aux_k=k, aux_path=path)
      fn = jax.jit(jax.grad(lambda p, d, x, y, c=c: losses._auxk(
          p, c, x, dictionaries.encode(p, c, x, d), y)))  # x, y as arguments: no constant folding
      runners[(k, path)] = lambda fn=fn: fn(params, dead, x, y)
  t = _best(runners, rounds)
  print(f"backend {jax.default_backend()}; G={g} B={b} d={D} F={f}; AuxK selection + encode/decode "
        "forward and backward (main encode included), ms and / product")
  print(f"{'aux_k':>6} {'aux_k/F':>8} {'sparse':>9} {'dense':>9} {'sparse/prod':>11} "
        f"{'dense/prod':>10} {'sparse/dense':>12}")
  for k in aux_ks:
    sp, de = t[(k, "sparse")], t[(k, "dense")]
    print(f"{k:6d} {k / f:8.3f} {1e3 * sp:9.1f} {1e3 * de:9.1f} {sp / t['product']:11.2f} "
          f"{de / t['product']:10.2f} {sp / de:12.2f}")


if __name__ == "__main__":
  main()
