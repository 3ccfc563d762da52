"""The device mesh (data, model, layer) and the sharding of every array the trainer holds."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from allscope import kernels
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
  split_latents)."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def traced_axis(name: str) -> str | None:
  """`name` where the step traces under a mesh that has it (see `tracing`), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return name if not mesh.empty and name in mesh.axis_names else None


def split_latents(ops: kernels.Ops) -> kernels.Ops:
  """`ops`, with a top_k and a row_count that keep each device's latents local where the traced
  mesh splits them on `model`.

  top_k: each device takes the top k of its own columns, the k M candidates of the M devices
  are gathered, and their top k is the row's: exactly top_k over whole rows (a winner is among
  its device's k; candidates lie in device order, each device's by value then index, so ties
  still go to the lower latent). row_count: each device counts its columns, then a psum. Left to
  XLA's partitioner, both gathered every device's [B, F] pre-activations in whole (4096 x 16384
  floats for one layer at d=640) and ran on all of them on each device (row_count's chunk loop
  slices columns); here only [B, k M] and [B] move, and a Pallas top_k sees its own block.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get("model", 1) == 1:
    return ops
  local_top_k = ops.top_k

  def local(x, k):
    v, i = local_top_k(x, min(k, x.shape[-1]))
    i = i + lax.axis_index("model") * x.shape[-1]
    v = lax.all_gather(v, "model", axis=x.ndim - 1, tiled=True)
    i = lax.all_gather(i, "model", axis=x.ndim - 1, tiled=True)
    v, at = kernels.XLA.top_k(v, k)
    return v, jnp.take_along_axis(i, at, axis=-1)

  rows = lambda x: (None,) * (x.ndim - 2) + ("data",)  # [..., B, F]: rows on `data`
  split = lambda f, in_specs, out_specs: jax.shard_map(f, mesh=mesh, in_specs=in_specs,
                                                        out_specs=out_specs, check_vma=False)

  def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    return split(lambda a: local(a, k), P(*rows(x), "model"), P(*rows(x), None))(x)

  def row_count(x: jax.Array, keep, offset: jax.Array | None = None, args: tuple = (),
                chunk: int = 1024):
    count = lambda a, o, *c: lax.psum(ops.row_count(a, keep, o, c, chunk), "model")
    specs = (P(*rows(x), "model"), None if offset is None else P("model")) + (P(),) * len(args)
    return split(count, specs, P(*rows(x)))(x, offset, *args)

  return dataclasses.replace(ops, name=f"{ops.name}/latents-split", top_k=top_k,
                             row_count=row_count)
