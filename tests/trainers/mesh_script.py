"""Checks sharded_ops.per_device on 4 CPU devices in a fresh process and prints the results as
JSON (tests/trainers/test_mesh.py).

usage: python -m tests.trainers.mesh_script
"""

from __future__ import annotations

import json
import re


def main() -> None:
  import jax

  jax.config.update("jax_num_cpu_devices", 4)
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from allscope import kernels
  from allscope.trainers import TrainConfig, mesh as mesh_lib, sharded_ops, step as step_lib

  cfg = TrainConfig(kind="sae", layers=(0, 1), width=2048, mesh_data=1, mesh_model=2,
                    mesh_layer=2)
  mesh = mesh_lib.make_mesh(cfg)
  rng = np.random.default_rng(0)
  # rounded to a few levels: many ties, within and across the two devices' halves of each row
  x = np.round(rng.standard_normal((2, 64, 2048)), 1).astype(np.float32)
  x[:, :8] = -np.inf  # rows with fewer finite entries than k
  x[:, :8, 1022:1026] = 1.0  # on both devices
  offset = rng.standard_normal(2048).astype(np.float32)
  # top_k's offset row per layer (a bias; -inf: AuxK's mask of live latents), split on `model`
  rows = np.round(rng.standard_normal((2, 2048)), 1).astype(np.float32)
  rows[:, rng.random(2048) < 0.5] = -np.inf

  names = []

  def split(x, offset, rows, k):
    def one(row, add):
      ops = sharded_ops.per_device(kernels.XLA)
      names.append(ops.name)
      return (ops.top_k(row, k), ops.row_count(row, lambda v: v > 0.5, offset),
              ops.top_k(row, k, add), ops.compact(row, lambda v, t: v > t, k, offset, (0.5,)))
    with mesh_lib.tracing(mesh):
      return jax.vmap(one, spmd_axis_name="layer")(x, rows)

  sh = NamedSharding(mesh, P("layer", "data", "model"))
  results = {}
  for k in (8, 64, 1500):  # 1500: more than a device's 1024 columns
    (values, indices), counts, (off_v, off_i), compacted = jax.jit(
        lambda x, o, r: split(x, o, r, k))(jax.device_put(x, sh), offset, rows)
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
    want_c = np.sum(x + offset > 0.5, axis=-1)
    want_ov, want_oi = jax.lax.top_k(jnp.asarray(x + rows[:, None, :]), k)
    results[str(k)] = {"indices": bool(np.array_equal(indices, want_i)),
                       "values": bool(np.array_equal(values, want_v)),
                       "counts": bool(np.array_equal(counts, want_c)),
                       "offset": bool(np.array_equal(off_i, want_oi)
                                      and np.array_equal(off_v, want_ov)),
                       "compact": all(np.array_equal(got, want) for got, want in zip(
                           compacted, jax.vmap(lambda m: kernels.compact_mask(m, k))(
                               jnp.asarray(x + offset > 0.5)))), "ops": names[-1]}

  # Every primitive on a data 2 x model 2 mesh against the same primitive off the mesh: the
  # psums over `model` (decodes, dots) and over `data` (scatters, with and without acc).
  grid = mesh_lib.make_mesh(TrainConfig(kind="sae", layers=(0,), mesh_data=2, mesh_model=2))
  b, c, f, d, n_layers = 32, 6, 64, 16, 3
  idx = rng.integers(0, f, (b, c)).astype(np.int32)
  idx[:, 1] = idx[:, 0]  # duplicates within rows, and across them (f << b c)
  vals = rng.standard_normal((b, c)).astype(np.float32)
  vals[:, 2] = 0.0
  src, table = (rng.standard_normal(s).astype(np.float32) for s in ((b, d), (f, d)))
  acc = rng.standard_normal((f, d)).astype(np.float32)
  cidx = rng.integers(0, f, (n_layers, b, c)).astype(np.int32)
  cvals = rng.standard_normal((n_layers, b, c)).astype(np.float32)
  g = rng.standard_normal((b, n_layers, d)).astype(np.float32)
  w = rng.standard_normal((f, n_layers * (n_layers + 1) // 2, d)).astype(np.float32)
  cacc = rng.standard_normal(w.shape).astype(np.float32)
  idx, vals, src, table, acc, cidx, cvals, g, w, cacc = map(
      jnp.asarray, (idx, vals, src, table, acc, cidx, cvals, g, w, cacc))
  calls = {  # name: (call, its array arguments)
      "gather_decode": (lambda o, *a: o.gather_decode(*a), (idx, vals, table)),
      "gather_dot": (lambda o, *a: o.gather_dot(*a), (idx, src, table)),
      "scatter_outer": (lambda o, *a: o.scatter_outer(*a, f), (idx, vals, src)),
      "scatter_outer+acc": (lambda o, *a: o.scatter_outer(*a[:3], f, a[3]), (idx, vals, src, acc)),
      "clt_decode": (lambda o, *a: o.clt_decode(*a), (cidx, cvals, w)),
      "clt_gather_dot": (lambda o, *a: o.clt_gather_dot(*a), (cidx, g, w)),
      "clt_scatter_outer": (lambda o, *a: o.clt_scatter_outer(*a, f), (cidx, cvals, g)),
      "clt_scatter_outer+acc": (lambda o, *a: o.clt_scatter_outer(*a[:3], f, a[3]),
                                (cidx, cvals, g, cacc)),
  }
  errors = {}
  for base in (kernels.XLA, kernels.resolve("pallas", interpret=True)):
    for name, (call, args) in calls.items():
      want = np.asarray(jax.jit(lambda *a: call(base, *a))(*args))

      def on_grid(*a, call=call):
        with mesh_lib.tracing(grid):
          ops = sharded_ops.per_device(base)
          names.append(ops.name)
          return call(ops, *a)
      got = np.asarray(jax.jit(on_grid)(*jax.device_put(args, NamedSharding(grid, P()))))
      errors[f"{names[-1]}:{name}"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

  # Pallas for CUDA on the mesh, at real shapes: each Triton kernel lowers on a device's block.
  S = jax.ShapeDtypeStruct
  b, c, f, d = 4096, 64, 65536, 2304
  n_layers, fc, dc = 18, 8192, 640
  pairs = n_layers * (n_layers + 1) // 2
  on_cuda = kernels.resolve("pallas", backend="cuda")

  def every_primitive(idx, vals, table, src, pre, bias, cidx, cvals, g, w):
    with mesh_lib.tracing(grid):
      ops = sharded_ops.per_device(on_cuda)
      return (ops.gather_decode(idx, vals, table), ops.gather_dot(idx, src, table),
              ops.scatter_outer(idx, vals, src, f), ops.top_k(pre, 64, bias),
              ops.clt_decode(cidx, cvals, w), ops.clt_gather_dot(cidx, g, w),
              ops.clt_scatter_outer(cidx, cvals, g, fc))
  bf16, i32 = jnp.bfloat16, jnp.int32
  # top_k as the trainers call it: the f32 encoder product and the bias row
  args = (S((b, c), i32), S((b, c), bf16), S((f, d), bf16), S((b, d), bf16),
          S((b, f), jnp.float32), S((f,), jnp.float32), S((n_layers, b, c), i32),
          S((n_layers, b, c), bf16), S((b, n_layers, dc), bf16), S((fc, pairs, dc), bf16))
  specs = (P("data"), P("data"), P("model"), P("data"), P("data", "model"), P("model"),
           P(None, "data"), P(None, "data"), P("data"), P("model"))
  hlo = jax.jit(every_primitive, in_shardings=[NamedSharding(grid, s) for s in specs]).trace(
      *args).lower(lowering_platforms=("cuda",)).as_text()
  cuda = {"triton_calls": hlo.count("__gpu$xla.gpu.triton"),
          "top_k_block": f"tensor<{b // 2}x{f // 2}xf32>" in hlo}

  # The step moves no [B, F] pre-activations between devices.
  gathered = {}
  for activation in ("topk", "batchtopk", "jumprelu"):
    step_cfg = TrainConfig(kind="sae", activation=activation, layers=(0, 1), width=4096, k=16,
                           target_l0=16, batch_size=256, mesh_data=1, mesh_model=2, mesh_layer=2)
    hlo = step_lib.lower_step(step_cfg, 64, 64, mesh_lib.make_mesh(step_cfg)).compile().as_text()
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
             for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-(?:gather|reduce)", hlo)]
    gathered[activation] = max(sizes, default=0)
  # A device's temporary memory, latents on 1 device and split over 4 (B=1024, F=16384, d=64)
  temp = {}
  for m in (1, 4):
    mem_cfg = TrainConfig(kind="transcoder", activation="topk", layers=(0,), width=16384, k=16,
                          batch_size=1024, mesh_data=1, mesh_model=m)
    mem_mesh = mesh_lib.make_mesh(mem_cfg, jax.devices()[:m])
    temp[m] = step_lib.lower_step(mem_cfg, 64, 64, mem_mesh).compile().memory_analysis(
    ).temp_size_in_bytes
  print(json.dumps({"top_k": results, "primitive_errors": errors, "cuda": cuda,
                    "largest_collective": gathered, "temp_4_over_1": temp[4] / temp[1]}))


if __name__ == "__main__":
  main()
