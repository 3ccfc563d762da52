"""gather_decode: out[b] = sum_j values[b, j] * table[indices[b, j]] (the sparse decode).

GPU (Triton): grid over (row block of B, block of D); each program loops over the C slots,
gathers its BB table rows for that slot in one load (a row gather, coalesced along D) and
accumulates in float32 registers. TPU (Mosaic): grid over row blocks of B; each program DMAs its
BB x C rows from HBM into VMEM (`_tpu`), then accumulates slot by slot. No [B, C, D] array
exists anywhere (the TPU buffer is one program's [C, BB, D]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from allscope.kernels.pallas import _common, _tpu


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


def _tpu_kernel(idx_ref, val_ref, table_ref, out_ref, rows_ref, sem, *, block_b: int,
                slots: int):
  _tpu.gather_rows(idx_ref, table_ref, rows_ref, sem, block_b=block_b, slots=slots)

  def body(c, acc):  # val_ref[c]: [BB, 1], rows_ref[c]: [BB, D]
    return acc + val_ref[c] * rows_ref[c].astype(jnp.float32)

  out_ref[...] = lax.fori_loop(0, slots, body, jnp.zeros(out_ref.shape, jnp.float32))


def _tpu_call(indices, values, table, interpret: bool):
  batch, slots = indices.shape
  dim = table.shape[1]
  bb = _tpu.row_block(table.dtype)
  idx = _common.pad_to(indices.astype(jnp.int32), 0, bb)  # [B, C] in SMEM, a block per program
  val = _common.pad_to(values.astype(jnp.float32).T, 1, bb)[:, :, None]  # [C, B, 1]: columns
  padded = idx.shape[0]
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, block_b=bb, slots=slots),
      name="gather_decode",
      out_shape=jax.ShapeDtypeStruct((padded, dim), jnp.float32),
      grid=(padded // bb,),
      in_specs=[pl.BlockSpec((bb, slots), lambda i: (i, 0), memory_space=pltpu.SMEM),
                pl.BlockSpec((slots, bb, 1), lambda i: (0, i, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((bb, dim), lambda i: (i, 0)),
      scratch_shapes=_tpu.rows_scratch(slots, bb, dim, table.dtype),
      compiler_params=_common.tpu_params(1),
      interpret=_common.interpret_mode(interpret, "tpu"),
  )(idx, val, table)
  return out[:batch]


@functools.partial(jax.jit, static_argnames=("interpret", "block_b", "block_d", "backend"))
def gather_decode(indices: jax.Array, values: jax.Array, table: jax.Array, *,
                  interpret: bool = False, block_b: int = 16, block_d: int = 256,
                  backend: str | None = None) -> jax.Array:
  """indices [B, C] int32, values [B, C], table [N, D] -> float32 [B, D]."""
  if _common.target(interpret, backend) == "tpu":
    return _tpu_call(indices, values, table, interpret)
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
      name="gather_decode",
      out_shape=jax.ShapeDtypeStruct((padded, dim), jnp.float32),
      grid=(padded // bb, dim // bd),
      in_specs=[pl.BlockSpec(), pl.BlockSpec(), pl.BlockSpec()],
      out_specs=pl.BlockSpec((bb, bd), lambda i, k: (i, k)),
      compiler_params=_common.compiler_params(interpret),
      interpret=interpret,
  )(idx_t, val_t, table)
  return out[:batch]
