"""scatter_outer: out[n] = sum over (b, j) with indices[b, j] == n of values[b, j] * src[b].

The decoder gradient (src = g) and the encoder gradient (src = x). A sort-based segment
reduction (see `_segments`): one program per (output row, D block) walks that row's sorted
pairs BP at a time, gathers their src rows and accumulates in float32 registers, then writes
the row once (GPU: Triton, a program per (row, D block); TPU: Mosaic, a program per block of
8 rows, pair lists and src rows by DMA, see `_tpu.segment_rows`). Rows no pair touches get
zeros (with `acc`, each program adds its block of `acc`, aliased to the output); there are no
float atomics, so the result is deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from allscope.kernels import xla
from allscope.kernels.pallas import _common, _segments, _tpu


def _kernel(starts_ref, pair_ref, val_ref, src_ref, *refs, block_d: int, block_p: int,
            slots: int):
  *acc_ref, out_ref = refs  # acc_ref: the `acc` block this program adds to (aliased to out)
  n, k = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(k * block_d, block_d)
  start, end = starts_ref[n], starts_ref[n + 1]

  def body(q, acc):
    first = start + q * block_p
    live = first + jnp.arange(block_p, dtype=jnp.int32) < end
    # Lanes past the segment re-read its first row (cached) instead of another row's.
    b = jnp.where(live, pair_ref[pl.ds(first, block_p)], pair_ref[start]) // slots
    val = jnp.where(live, val_ref[pl.ds(first, block_p)].astype(jnp.float32), 0.0)
    contrib = val[:, None] * src_ref[b, cols].astype(jnp.float32)
    return acc + jnp.sum(jnp.where(live[:, None], contrib, 0.0), axis=0)

  trips = (end - start + block_p - 1) // block_p
  acc = lax.fori_loop(0, trips, body, jnp.zeros((block_d,), jnp.float32))[None, :]
  out_ref[...] = (acc + acc_ref[0][...]) if acc_ref else acc


def _tpu_kernel(starts_hbm, pair_hbm, val_hbm, src_hbm, *refs, block_n: int, block_p: int,
                slots: int, has_acc: bool):
  acc_ref = refs[0] if has_acc else None  # the `acc` block (aliased to out_ref)
  out_ref, starts_smem, pair_smem, val_smem, buf_ref, sem = refs[int(has_acc):]
  i = pl.program_id(0)
  _tpu.copy_now(starts_hbm.at[0, pl.ds(i * block_n, block_n + 1)], starts_smem, sem)

  def store(r, acc):
    row = pl.ds(r, 1)
    out_ref[row, :] = (acc + acc_ref[row, :]) if has_acc else acc

  _tpu.segment_rows(starts_smem, pair_hbm, val_hbm, pair_smem, val_smem, buf_ref, sem,
                    block_n=block_n, block_p=block_p, slots=slots,
                    src_row=lambda b: src_hbm.at[pl.ds(b, 1)], store=store)


def _tpu_call(indices, values, src, num_rows: int, acc, interpret: bool, block_p: int):
  slots = indices.shape[1]
  dim = src.shape[1]
  bn = 8  # output rows per program: one f32 sublane tile
  padded = -(-num_rows // bn) * bn
  starts, pairs, vals = _segments.plan(indices.reshape(-1),
                                       values.reshape(-1).astype(jnp.float32), padded, block_p)
  block = pl.BlockSpec((bn, dim), lambda i: (i, 0))
  extra = () if acc is None else (_common.pad_to(acc, 0, bn),)
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, block_n=bn, block_p=block_p, slots=slots,
                        has_acc=acc is not None),
      name="scatter_outer",
      out_shape=jax.ShapeDtypeStruct((padded, dim), jnp.float32),
      grid=(padded // bn,),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 4 + [block] * len(extra),
      out_specs=block,
      scratch_shapes=_tpu.segment_scratch(bn, block_p, dim, src.dtype),
      input_output_aliases={4: 0} if extra else {},
      compiler_params=_common.tpu_params(1),
      interpret=_common.interpret_mode(interpret, "tpu"),
  )(starts[None], pairs[None], vals[None], src, *extra)  # rank 2: see _tpu.segment_rows
  return out[:num_rows]


@functools.partial(jax.jit,
                   static_argnames=("num_rows", "interpret", "block_d", "block_p", "backend"))
def scatter_outer(indices: jax.Array, values: jax.Array, src: jax.Array, num_rows: int,
                  acc: jax.Array | None = None, *, interpret: bool = False, block_d: int = 256,
                  block_p: int = 8, backend: str | None = None) -> jax.Array:
  """indices [B, C] int32, values [B, C], src [B, D] -> float32 [num_rows, D]; plus `acc`
  (float32 [num_rows, D]) when given, updated in its buffer (aliased)."""
  if acc is not None:
    xla.check_acc(acc, (num_rows, src.shape[1]))
  if _common.target(interpret, backend) == "tpu":
    return _tpu_call(indices, values, src, num_rows, acc, interpret, block_p)
  slots = indices.shape[1]
  dim = src.shape[1]
  bd = _common.feature_block(dim, block_d, interpret, "scatter_outer")
  starts, pairs, vals = _segments.plan(indices.reshape(-1), values.reshape(-1), num_rows, block_p)
  block = pl.BlockSpec((1, bd), lambda n, k: (n, k))
  extra = () if acc is None else (acc,)
  return pl.pallas_call(
      functools.partial(_kernel, block_d=bd, block_p=block_p, slots=slots),
      name="scatter_outer",
      out_shape=jax.ShapeDtypeStruct((num_rows, dim), jnp.float32),
      grid=(num_rows, dim // bd),
      in_specs=[pl.BlockSpec()] * 4 + [block] * len(extra),
      out_specs=block,
      input_output_aliases={4: 0} if extra else {},
      compiler_params=_common.compiler_params(interpret, num_warps=2),
      interpret=interpret,
  )(starts, pairs, vals, src, *extra)
