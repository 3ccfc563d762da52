"""Checks split_latents on a 4-device CPU mesh (data 1, model 2, layer 2) in a fresh process and
prints the results as JSON (tests/trainers/test_mesh.py).

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
  from allscope.trainers import TrainConfig, mesh as mesh_lib, step as step_lib

  cfg = TrainConfig(kind="sae", layers=(0, 1), width=2048, mesh_data=1, mesh_model=2,
                    mesh_layer=2)
  mesh = mesh_lib.make_mesh(cfg)
  rng = np.random.default_rng(0)
  # rounded to a few levels: many ties, within and across the two devices' halves of each row
  x = np.round(rng.standard_normal((2, 64, 2048)), 1).astype(np.float32)
  x[:, :8] = -np.inf  # rows with fewer finite entries than k
  x[:, :8, 1022:1026] = 1.0  # on both devices
  offset = rng.standard_normal(2048).astype(np.float32)

  names = []

  def split(x, offset, k):
    def one(row):
      ops = mesh_lib.split_latents(kernels.XLA)
      names.append(ops.name)
      return ops.top_k(row, k), ops.row_count(row, lambda v: v > 0.5, offset)
    with mesh_lib.tracing(mesh):
      return jax.vmap(one, spmd_axis_name="layer")(x)

  sh = NamedSharding(mesh, P("layer", "data", "model"))
  results = {}
  for k in (8, 64, 1500):  # 1500: more than a device's 1024 columns
    (values, indices), counts = jax.jit(lambda x, o: split(x, o, k))(jax.device_put(x, sh), offset)
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
    want_c = np.sum(x + offset > 0.5, axis=-1)
    results[str(k)] = {"indices": bool(np.array_equal(indices, want_i)),
                       "values": bool(np.array_equal(values, want_v)),
                       "counts": bool(np.array_equal(counts, want_c)), "ops": names[-1]}

  # The step moves no [B, F] pre-activations between devices.
  gathered = {}
  for activation in ("topk", "batchtopk", "jumprelu"):
    step_cfg = TrainConfig(kind="sae", activation=activation, layers=(0, 1), width=4096, k=16,
                           target_l0=16, batch_size=256, mesh_data=1, mesh_model=2, mesh_layer=2)
    hlo = step_lib.lower_step(step_cfg, 64, 64, mesh_lib.make_mesh(step_cfg)).compile().as_text()
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
             for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather", hlo)]
    gathered[activation] = max(sizes, default=0)
  print(json.dumps({"top_k": results, "largest_all_gather": gathered}))


if __name__ == "__main__":
  main()
