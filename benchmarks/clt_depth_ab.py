"""t(2L)/t(L) of a CLT step for several checkouts at once, interleaved (A/B across commits).

On a shared 2-core machine the load of other jobs moves one run's times by 2x and its ratio by
+-0.4, so commits can only be compared within one run. Each checkout gets a resident worker
process (its own `allscope` on PYTHONPATH) that compiles the step at L and 2L; then every round
calls each worker at both depths in turn (the order reversed every other round), one step per
call from the same initial state (no latent goes silent unless --dead says so). Each call
records wall and process CPU seconds (all XLA threads): CPU time is far less sensitive to the
load than wall time.

  git worktree add --detach /tmp/old <commit>
  python benchmarks/clt_depth_ab.py /tmp/old .               # L = 4 -> 8, 6 rounds
  python benchmarks/clt_depth_ab.py --dead 0.5 /tmp/old .    # half the latents silent: AuxK on
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from allscope.launch import host_memory

WORKER = r"""
import importlib.util, json, resource, sys, time
# this checkout's host_memory (older ones have none), so every worker allocates alike
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[7])
host_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_memory)
host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
from allscope.trainers import dictionaries, mesh as mesh_lib, state as state_lib
from allscope.trainers.config import TrainConfig
from allscope.trainers.step import compile_step

d, width, tokens, k = (int(a) for a in sys.argv[1:5])
dead = float(sys.argv[5])
def cpu():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime
runners = {}
for n in (int(a) for a in sys.argv[6].split(",")):
  cfg = TrainConfig(kind="clt", activation="topk", layers=tuple(range(n)), width=width, k=k,
                    batch_size=tokens, steps=10**6, mesh_data=1, matmul_dtype="float32")
  mesh = mesh_lib.make_mesh(cfg, jax.devices()[:1])
  params = dictionaries.init_params(cfg, d, d, jax.random.key(0))
  abstract = jax.eval_shape(lambda p: state_lib.init_state(cfg, p, jax.random.key(0)), params)
  sh = state_lib.shardings(cfg, abstract, mesh)
  st0 = state_lib.init_state(cfg, params, jax.random.key(0))
  if dead:  # the first fraction of every layer's latents silent for a million tokens
    st0 = st0.replace(since_fired=st0.since_fired.at[:, :int(dead * width)].set(10**6))
  st0 = jax.device_put(st0, sh)
  step = compile_step(cfg, mesh, sh)
  x = jax.device_put(jax.random.normal(jax.random.key(1), (tokens, n, d), jnp.bfloat16),
                     mesh_lib.batch_sharding(mesh))
  norm = jax.device_put(jnp.ones((n,)), mesh_lib.replicated(mesh))
  def run(step=step, st0=st0, x=x, norm=norm):
    st = jax.block_until_ready(jax.tree.map(jnp.copy, st0))  # the step donates its state
    t, c = time.perf_counter(), cpu()
    jax.block_until_ready(step(st, x, x, norm, norm))
    return time.perf_counter() - t, cpu() - c
  run()
  runners[n] = run
print("ready", flush=True)
for line in sys.stdin:
  print(json.dumps(runners[int(line)]()), flush=True)
"""


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("trees", nargs="+", help="checkouts (repository roots) to compare")
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--layers", type=int, default=4, help="L (and 2L)")
  ap.add_argument("--d", type=int, default=640)
  ap.add_argument("--width", type=int, default=4096, help="latents per layer")
  ap.add_argument("--tokens", type=int, default=1024)
  ap.add_argument("--k", type=int, default=64)
  ap.add_argument("--dead", type=float, default=0.0,
                  help="fraction of latents silent (AuxK and revive run every step)")
  args = ap.parse_args()
  depths = (args.layers, 2 * args.layers)
  trees = [os.path.abspath(t) for t in args.trees]
  for tree in trees:
    if not os.path.isfile(os.path.join(tree, "allscope", "trainers", "step.py")):
      raise SystemExit(f"{tree} is not an allscope checkout (no allscope/trainers/step.py); "
                       f"make one with `git worktree add --detach DIR COMMIT`")
  workers = []
  for tree in trees:
    argv = [sys.executable, "-c", WORKER, str(args.d), str(args.width), str(args.tokens),
            str(args.k), str(args.dead), ",".join(map(str, depths)), host_memory.__file__]
    p = subprocess.Popen(argv, cwd=tree, env=dict(os.environ, PYTHONPATH=tree),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if p.stdout.readline().strip() != "ready":
      raise SystemExit(f"the worker for {tree} failed to start (its stderr is above)")
    workers.append(p)
  times = {(i, n): [] for i in range(len(trees)) for n in depths}  # [(wall, cpu)] per call
  loads = [os.getloadavg()[0]]
  for r in range(args.rounds):
    flip = (lambda xs: xs[::-1]) if r % 2 else (lambda xs: xs)
    for i in flip(range(len(workers))):
      for n in flip(depths):
        workers[i].stdin.write(f"{n}\n")
        workers[i].stdin.flush()
        times[i, n].append(json.loads(workers[i].stdout.readline()))
    loads.append(os.getloadavg()[0])
  for p in workers:
    p.stdin.close()
    p.wait()
  print(f"CLT TopK d={args.d}, F={args.width}/layer, B={args.tokens}, k={args.k}, "
        f"dead {args.dead}; {args.rounds} rounds, load average {min(loads):.1f}-{max(loads):.1f}")
  header = (f"{'tree':>24} {'L':>3} {'wall min ms':>11} {'wall med ms':>11} {'cpu min ms':>10} "
            f"{'cpu med ms':>10}")
  print(header)
  print("-" * len(header))
  for i, tree in enumerate(trees):
    for n in depths:
      wall, cpu = zip(*times[i, n])
      print(f"{tree[-24:]:>24} {n:>3} {1e3 * min(wall):>11.0f} "
            f"{1e3 * statistics.median(wall):>11.0f} {1e3 * min(cpu):>10.0f} "
            f"{1e3 * statistics.median(cpu):>10.0f}")
    (w0, c0), (w1, c1) = (zip(*times[i, n]) for n in depths)
    print(f"{'t(2L) / t(L)':>24} {'':>3} {min(w1) / min(w0):>11.2f} "
          f"{statistics.median(w1) / statistics.median(w0):>11.2f} {min(c1) / min(c0):>10.2f} "
          f"{statistics.median(c1) / statistics.median(c0):>10.2f}", flush=True)


if __name__ == "__main__":
  main()
