"""The device mesh (data, model, layer) and the sharding of every array the trainer holds."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from allscope.trainers.config import TrainConfig

AXES = ("data", "model", "layer")


def make_mesh(cfg: TrainConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """data x model x layer over `devices` (default: all); mesh_data=-1 takes what is left."""
  devices = list(devices if devices is not None else jax.devices())
  rest = cfg.mesh_model * cfg.mesh_layer
  data = cfg.mesh_data if cfg.mesh_data > 0 else len(devices) // rest
  if data < 1 or data * rest != len(devices):
    raise ValueError(
        f"mesh data={cfg.mesh_data} x model={cfg.mesh_model} x layer={cfg.mesh_layer} does not "
        f"fit {len(devices)} devices; set train.mesh_data/mesh_model/mesh_layer to multiply to it")
  if cfg.batch_size % data:
    raise ValueError(f"train.batch_size={cfg.batch_size} is not divisible by the mesh's data "
                     f"axis ({data}); change train.batch_size or train.mesh_data")
  return jax.make_mesh((data, cfg.mesh_model, cfg.mesh_layer), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=np.asarray(devices))


def param_spec(name: str, ndim: int, kind: str = "sae") -> P:
  """Dictionaries on `layer`, latents F on `model`.

  A CLT's causal decoder [F, P, d] has no per-dictionary axis (its pairs are ragged per
  source), so only its latents are sharded (on `model`).
  """
  if kind == "clt" and name == "w_dec":
    return P("model", None, None)
  return {
      "w_enc": P("layer", None, "model"),
      "b_enc": P("layer", "model"),
      "log_threshold": P("layer", "model"),
      "w_dec": P("layer", "model", None) if ndim == 3 else P("layer", "model", None, None),
      "b_dec": P("layer", None),
      "w_skip": P("layer", None, None),
  }[name]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, G, d] activations: rows on `data`, dictionaries on `layer`."""
  return NamedSharding(mesh, P("data", "layer", None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def tracing(mesh: Mesh):
  """Context for tracing a step on `mesh`: what traces under it can read the mesh (traced_axis,
  group_vmap, sharded_ops)."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def traced_axis(name: str) -> str | None:
  """`name` where the step traces under a mesh that has it (see `tracing`), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return name if not mesh.empty and name in mesh.axis_names else None


def group_vmap(fn):
  """jax.vmap over the dictionaries (axis 0), which lie on `layer`: a shard_map inside
  (sharded_ops) then keeps each device's own."""
  return jax.vmap(fn, spmd_axis_name=traced_axis("layer"))
