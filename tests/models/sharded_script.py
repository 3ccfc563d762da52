"""A sharded forward next to the unsharded one, in a fresh process with N CPU devices.

usage: python -m tests.models.sharded_script --devices 4 --mesh 2,2 --preset gemma3-1b
Prints one JSON line: per (site, layer) relative error, parameter specs, bytes per device.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, default=4)
  ap.add_argument("--mesh", default="2,2")
  ap.add_argument("--preset", default="gemma3-1b")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=24)
  ap.add_argument("--layers", default="0,5,13,25")
  args = ap.parse_args()

  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  import numpy as np
  from flax import nnx

  from allscope.models import init_random, preset, sharding

  cfg = preset(args.preset)
  data, model_axis = (int(v) for v in args.mesh.split(","))
  mesh = sharding.make_mesh(data, model_axis)
  sharded = init_random(cfg, args.dtype, sharding=sharding.param_sharding(mesh, cfg), seed=1)
  graphdef, state = nnx.split(sharded)
  # The unsharded model: the same weights, all on one device.
  single = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
  layers = tuple(int(v) for v in args.layers.split(","))
  sites = ("resid_post", "attn_out", "mlp_in", "mlp_out")
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
  tokens[:, 0] = cfg.bos_id
  mask = np.ones_like(tokens, bool)
  mask[-1, args.seq // 2:] = False  # a padded row
  tokens[~mask] = cfg.pad_id

  got = sharding.capture_fn(sharded, sites, layers, mesh)(tokens, mask)
  want = sharding.capture_fn(single, sites, layers)(tokens, mask)
  errors = {}
  for s in sites:
    a, b = np.asarray(got[s], np.float32)[mask], np.asarray(want[s], np.float32)[mask]
    for j, l in enumerate(layers):
      errors[f"{s}/{l}"] = float(np.linalg.norm(a[:, j] - b[:, j]) / np.linalg.norm(b[:, j]))
  blk = sharded.layers[0]
  specs = {name: list(getattr(blk, name).get_value().sharding.spec)
           for name in ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")}
  specs["embed_tokens"] = list(sharded.embed_tokens.get_value().sharding.spec)
  per_device = [0] * len(jax.devices())
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      per_device[shard.device.id] += shard.data.nbytes
  total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
  print(json.dumps({"errors": errors, "specs": specs, "out_spec": list(got["mlp_in"].sharding.spec),
                    "bytes_per_device": per_device, "param_bytes": total,
                    "identical": bool(all(np.array_equal(np.asarray(got[s]), np.asarray(want[s]))
                                          for s in sites))}))


if __name__ == "__main__":
  main()
