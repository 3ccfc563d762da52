"""gather_dot: out[b, j] = g[b] . table[indices[b, j]] (d values of a sparse decode).

GPU (Triton): grid over (row block of B, block of CB slots): each program walks D block by
block, loads its g block once and reduces it against the gathered rows of each of its CB slots
in float32, so g is read C / CB times rather than C times; B / BB * C / CB programs still fill a
GPU at real shapes. TPU (Mosaic): grid over row blocks of
B; each program DMAs its BB x C rows into VMEM (`_tpu`) and reduces them slot by slot against
its g block. No [B, C, D] array exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from allscope.kernels.pallas import _common, _tpu


def _kernel(idx_ref, g_ref, table_ref, out_ref, *, block_b: int, block_c: int, block_d: int,
            num_d: int):
  i, c = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(i * block_b, block_b)
  idx = [idx_ref[c * block_c + s, rows] for s in range(block_c)]  # block_c x [BB]

  def body(k, accs):  # each g block is loaded once for the program's block_c slots
    cols = pl.ds(k * block_d, block_d)
    g = g_ref[rows, cols].astype(jnp.float32)
    return tuple(acc + jnp.sum(g * table_ref[ix, cols].astype(jnp.float32), axis=1)
                 for acc, ix in zip(accs, idx))

  zeros = tuple(jnp.zeros((block_b,), jnp.float32) for _ in range(block_c))
  for s, acc in enumerate(lax.fori_loop(0, num_d, body, zeros)):
    out_ref[pl.ds(s, 1), :] = acc[None, :]


def _tpu_kernel(idx_ref, g_ref, table_ref, out_ref, rows_ref, sem, *, block_b: int,
                slots: int):
  _tpu.gather_rows(idx_ref, table_ref, rows_ref, sem, block_b=block_b, slots=slots)
  g = g_ref[...].astype(jnp.float32)

  def body(c, carry):  # out_ref[c]: [BB, 1]
    out_ref[c] = jnp.sum(g * rows_ref[c].astype(jnp.float32), axis=1, keepdims=True)
    return carry

  lax.fori_loop(0, slots, body, 0)


def _tpu_call(indices, g, table, interpret: bool):
  batch, slots = indices.shape
  dim = table.shape[1]
  bb = _tpu.row_block(table.dtype)
  idx = _common.pad_to(indices.astype(jnp.int32), 0, bb)
  g = _common.pad_to(g, 0, bb)
  padded = idx.shape[0]
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, block_b=bb, slots=slots),
      name="gather_dot",
      out_shape=jax.ShapeDtypeStruct((slots, padded, 1), jnp.float32),  # [C, B, 1]: columns
      grid=(padded // bb,),
      in_specs=[pl.BlockSpec((bb, slots), lambda i: (i, 0), memory_space=pltpu.SMEM),
                pl.BlockSpec((bb, dim), lambda i: (i, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((slots, bb, 1), lambda i: (0, i, 0)),
      scratch_shapes=_tpu.rows_scratch(slots, bb, dim, table.dtype),
      compiler_params=_common.tpu_params(1),
      interpret=_common.interpret_mode(interpret, "tpu"),
  )(idx, g, table)
  return out[:, :batch, 0].T


@functools.partial(jax.jit, static_argnames=("interpret", "block_b", "block_c", "block_d",
                                             "backend"))
def gather_dot(indices: jax.Array, g: jax.Array, table: jax.Array, *,
               interpret: bool = False, block_b: int = 16, block_c: int = 8,
               block_d: int = 64, backend: str | None = None) -> jax.Array:
  """indices [B, C] int32, g [B, D], table [N, D] -> float32 [B, C]."""
  if _common.target(interpret, backend) == "tpu":
    return _tpu_call(indices, g, table, interpret)
  batch, slots = indices.shape
  dim = table.shape[1]
  bb = _common.row_block(batch, block_b)
  bd = _common.feature_block(dim, block_d, interpret, "gather_dot")
  bc = _common.pow2_divisor(slots, block_c)
  idx_t = _common.pad_to(indices.astype(jnp.int32).T, 1, bb)  # [C, B]: contiguous per slot
  g = _common.pad_to(g, 0, bb)
  padded = idx_t.shape[1]
  out = pl.pallas_call(
      functools.partial(_kernel, block_b=bb, block_c=bc, block_d=bd, num_d=dim // bd),
      name="gather_dot",
      out_shape=jax.ShapeDtypeStruct((slots, padded), jnp.float32),
      grid=(padded // bb, slots // bc),
      in_specs=[pl.BlockSpec(), pl.BlockSpec(), pl.BlockSpec()],
      out_specs=pl.BlockSpec((bc, bb), lambda i, c: (c, i)),
      compiler_params=_common.compiler_params(interpret),
      interpret=interpret,
  )(idx_t, g, table)
  return out[:, :batch].T
