"""clt_scatter_outer: out[n, p(s, t)] = sum over (b, j) with indices[s, b, j] == n of
values[s, b, j] * g[b, t] (d w_dec of `clt_decode`).

The sort-based segment reduction of `scatter_outer`, per source layer: one batched XLA sort
orders each source's [B * C] pairs by latent; one program per (latent n, pair p(s, t), d block)
walks latent n's segment of source s, gathers g[b, t] and writes its output row once. Every
row of the causal decoder gradient is written exactly once, zeros where no pair touches it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from allscope.kernels import clt_layout
from allscope.kernels.pallas import _common, _segments


def _kernel(src_ref, tgt_ref, starts_ref, pair_ref, val_ref, g_ref, out_ref, *, block_d: int,
            block_p: int, slots: int):
  n, p, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(k * block_d, block_d)
  s, t = src_ref[p], tgt_ref[p]
  start, end = starts_ref[s, n], starts_ref[s, n + 1]

  def body(q, acc):
    first = start + q * block_p
    live = first + jnp.arange(block_p, dtype=jnp.int32) < end
    b = pair_ref[s, pl.ds(first, block_p)] // slots
    val = jnp.where(live, val_ref[s, pl.ds(first, block_p)].astype(jnp.float32), 0.0)
    contrib = val[:, None] * g_ref[b, t, cols].astype(jnp.float32)
    return acc + jnp.sum(jnp.where(live[:, None], contrib, 0.0), axis=0)

  trips = (end - start + block_p - 1) // block_p
  acc = lax.fori_loop(0, trips, body, jnp.zeros((block_d,), jnp.float32))
  out_ref[...] = acc


@functools.partial(jax.jit,
                   static_argnames=("num_rows", "interpret", "block_d", "block_p", "backend"))
def clt_scatter_outer(indices: jax.Array, values: jax.Array, g: jax.Array, num_rows: int, *,
                      interpret: bool = False, block_d: int = 128,
                      block_p: int = 16, backend: str | None = None) -> jax.Array:
  """indices [L, B, C] int32, values [L, B, C], g [B, L, d] -> float32 [num_rows, P, d]."""
  num_layers, batch, slots = indices.shape
  dim = g.shape[2]
  bd = _common.feature_block(dim, block_d, interpret, "clt_scatter_outer")
  starts, pairs, vals = _segments.plan(indices.reshape(num_layers, -1),
                                       values.reshape(num_layers, -1), num_rows, block_p)
  sources, targets = (jnp.asarray(a) for a in clt_layout.pair_layers(num_layers))
  num_pairs = clt_layout.num_pairs(num_layers)
  return pl.pallas_call(
      functools.partial(_kernel, block_d=bd, block_p=block_p, slots=slots),
      out_shape=jax.ShapeDtypeStruct((num_rows, num_pairs, dim), jnp.float32),
      grid=(num_rows, num_pairs, dim // bd),
      in_specs=[pl.BlockSpec()] * 6,
      out_specs=pl.BlockSpec((None, None, bd), lambda n, p, k: (n, p, k)),
      compiler_params=_common.compiler_params(interpret, num_warps=2, backend=backend),
      interpret=interpret,
  )(sources, targets, starts, pairs, vals, g)
