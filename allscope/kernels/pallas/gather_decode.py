"""gather_decode: out[b] = sum_j values[b, j] * table[indices[b, j]] (the sparse decode).

Grid over (row block of B, block of D); each program loops over the C slots, gathers its BB
table rows for that slot in one load (a row gather, coalesced along D) and accumulates in
float32 registers. No [B, C, D] block exists anywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from allscope.kernels.pallas import _common


def _kernel(idx_ref, val_ref, table_ref, out_ref, *, block_b: int, block_d: int, slots: int):
  i, k = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(i * block_b, block_b)
  cols = pl.ds(k * block_d, block_d)

  def body(c, acc):
    idx = idx_ref[c, rows]  # [BB]: slot c of each row in the block
    val = val_ref[c, rows].astype(jnp.float32)
    return acc + val[:, None] * table_ref[idx, cols].astype(jnp.float32)

  acc = lax.fori_loop(0, slots, body, jnp.zeros((block_b, block_d), jnp.float32))
  out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("interpret", "block_b", "block_d", "backend"))
def gather_decode(indices: jax.Array, values: jax.Array, table: jax.Array, *,
                  interpret: bool = False, block_b: int = 16, block_d: int = 256,
                  backend: str | None = None) -> jax.Array:
  """indices [B, C] int32, values [B, C], table [N, D] -> float32 [B, D]."""
  batch, slots = indices.shape
  dim = table.shape[1]
  bb = _common.row_block(batch, block_b)
  bd = _common.feature_block(dim, block_d, interpret, "gather_decode")
  # Slot-major [C, B] so a slot's indices for a row block are one contiguous load.
  idx_t = _common.pad_to(indices.astype(jnp.int32).T, 1, bb)
  val_t = _common.pad_to(values.T, 1, bb)
  padded = idx_t.shape[1]
  out = pl.pallas_call(
      functools.partial(_kernel, block_b=bb, block_d=bd, slots=slots),
      out_shape=jax.ShapeDtypeStruct((padded, dim), jnp.float32),
      grid=(padded // bb, dim // bd),
      in_specs=[pl.BlockSpec(), pl.BlockSpec(), pl.BlockSpec()],
      out_specs=pl.BlockSpec((bb, bd), lambda i, k: (i, k)),
      compiler_params=_common.compiler_params(interpret, backend=backend),
      interpret=interpret,
  )(idx_t, val_t, table)
  return out[:batch]
