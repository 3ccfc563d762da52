"""The kernel seam on the step's mesh: each primitive runs on one device's rows and latents.

Under `mesh.tracing(mesh)`, `per_device(ops)` wraps every primitive in a shard_map: rows (B) on
`data`, latents (F, a table's first axis) on `model`, dictionaries on `layer` through the groups'
vmap (mesh.group_vmap). Left to XLA's SPMD partitioner, a Pallas kernel is an opaque custom
call, which it runs on whole, replicated operands on every device; and XLA's own top_k and
row_count gathered every device's [B, F] pre-activations (4096 x 16384 floats a layer at d=640).

With M devices on `model`, each holding latents f0 .. f0 + F/M - 1:
  top_k             each device's top k, gathered ([B, k M]), then their top k: exactly top_k
                    over whole rows (a winner is among its device's k; candidates lie in device
                    order, each device's by value then index, so ties go to the lower latent)
  row_count         each device's count, psum over `model`
  compact           each device's first C kept latents, gathered ([B, C M]), then the first C
                    of those: exactly compact over whole rows (devices hold latents in order)
  gather_decode, gather_dot, clt_decode, clt_gather_dot
                    the device's pairs (the others: value 0 at its latent f0), psum over `model`
  scatter_outer, clt_scatter_outer
                    the device's pairs into its rows, psum over `data` (the data-parallel
                    gradient sum), then + acc
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from allscope import kernels


def per_device(ops: kernels.Ops) -> kernels.Ops:
  """`ops` on the traced mesh's devices (see the module); `ops` itself off a trainer's mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not {"data", "model"} <= set(mesh.axis_names):
    return ops
  n_data = mesh.shape["data"]

  def on_mesh(f, in_specs, out_specs):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

  def rows(ndim: int, at: int = 0) -> P:  # rows on `data` at axis `at` (CLT slots: [L, B, C])
    return P(*(("data" if i == at else None) for i in range(ndim)))

  latents = lambda ndim: P("model", *([None] * (ndim - 1)))  # tables [F, ...]
  slots = lambda indices: rows(indices.ndim, indices.ndim - 2)  # [..., B, C]

  def mine(indices, n_local):
    """Local latent numbers of the pairs (0 for other devices' pairs), and which are its own."""
    first = lax.axis_index("model") * n_local
    own = (indices >= first) & (indices < first + n_local)
    return jnp.where(own, indices - first, 0), own

  def top_k(x, k, offset=None):
    def local(a, o):
      v, i = ops.top_k(a, min(k, a.shape[-1]), o)
      i = i + lax.axis_index("model") * a.shape[-1]
      v, i = (lax.all_gather(t, "model", axis=a.ndim - 1, tiled=True) for t in (v, i))
      v, at = kernels.XLA.top_k(v, k)
      return v, jnp.take_along_axis(i, at, axis=-1)
    spec = slots(x)
    in_specs = (P(*spec[:-1], "model"), None if offset is None else P(*spec[:-2], "model"))
    return on_mesh(local, in_specs, spec)(x, offset)

  def row_count(x, keep, offset=None, args=(), chunk=1024):
    count = lambda a, o, *c: lax.psum(ops.row_count(a, keep, o, c, chunk), "model")
    spec = slots(x)
    in_specs = (P(*spec[:-1], "model"), None if offset is None else P("model")) + (P(),) * len(args)
    return on_mesh(count, in_specs, P(*spec[:-1]))(x, offset, *args)

  def compact(x, keep, capacity, offset=None, args=()):
    def local(a, o, *c):
      idx, counts = ops.compact(a, keep, capacity, o, c)
      idx = lax.all_gather(idx + lax.axis_index("model") * a.shape[-1], "model", axis=a.ndim - 1,
                           tiled=True)  # [b, M C]: each device's first C, in device order
      counts = lax.all_gather(counts, "model", axis=counts.ndim)  # [b, M]
      kept = jnp.arange(capacity) < counts[..., None]
      at, _ = kernels.compact_mask(kept.reshape(kept.shape[:-2] + (-1,)), capacity)
      slot, total = jnp.arange(capacity), jnp.sum(counts, axis=-1)
      unused = jnp.minimum(slot, a.shape[-1] * counts.shape[-1] - 1)  # as compact_mask's
      used = slot < total[..., None]
      return jnp.where(used, jnp.take_along_axis(idx, at, axis=-1), unused), total
    spec = slots(x)
    split = lambda c: P("model") if jnp.ndim(c) == 1 and jnp.shape(c)[0] == x.shape[-1] else P()
    in_specs = ((P(*spec[:-1], "model"), None if offset is None else P("model"))
                + tuple(split(c) for c in args))
    return on_mesh(local, in_specs, (spec, P(*spec[:-1])))(x, offset, *args)

  def decode(prim):
    """gather_decode [B, C] -> [B, D], clt_decode [L, B, C] -> [B, L, d]."""
    def local(indices, values, table):
      idx, own = mine(indices, table.shape[0])
      return lax.psum(prim(idx, jnp.where(own, values, 0), table), "model")
    return lambda indices, values, table: on_mesh(
        local, (slots(indices), slots(indices), latents(table.ndim)),
        rows(table.ndim))(indices, values, table)

  def dot(prim):
    """gather_dot [B, C], [B, D] -> [B, C]; clt_gather_dot [L, B, C], [B, L, d] -> [L, B, C]."""
    def local(indices, g, table):
      idx, own = mine(indices, table.shape[0])
      return lax.psum(jnp.where(own, prim(idx, g, table), 0.0), "model")
    return lambda indices, g, table: on_mesh(
        local, (slots(indices), rows(g.ndim), latents(table.ndim)),
        slots(indices))(indices, g, table)

  def scatter(prim):
    """scatter_outer -> [F, D], clt_scatter_outer -> [F, P, d], + acc."""
    def run(indices, values, src, num_rows, acc=None):
      n_local = num_rows // mesh.shape["model"]

      def local(indices, values, src, acc):
        idx, own = mine(indices, n_local)
        values = jnp.where(own, values, 0)
        if n_data == 1:  # nothing to sum over: into acc's buffer, as off a mesh
          return prim(idx, values, src, n_local, acc)
        out = lax.psum(prim(idx, values, src, n_local), "data")
        return out if acc is None else acc + out

      table = latents(src.ndim)  # [B, D] -> [F, D]; [B, L, d] -> [F, P, d]
      return on_mesh(local, (slots(indices), slots(indices), rows(src.ndim),
                             None if acc is None else table), table)(indices, values, src, acc)
    return run

  return dataclasses.replace(
      ops, name=f"{ops.name}/per-device", top_k=top_k, row_count=row_count, compact=compact,
      gather_decode=decode(ops.gather_decode), clt_decode=decode(ops.clt_decode),
      gather_dot=dot(ops.gather_dot), clt_gather_dot=dot(ops.clt_gather_dot),
      scatter_outer=scatter(ops.scatter_outer), clt_scatter_outer=scatter(ops.clt_scatter_outer))
