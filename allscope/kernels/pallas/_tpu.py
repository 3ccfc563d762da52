"""The TPU (Mosaic) side of the kernels: data-dependent rows come from HBM by DMA.

A BlockSpec can fetch one data-dependent block per grid step (one row: far too many steps), so
tables, index lists and sorted pair lists stay in HBM (`memory_space=pl.ANY`). `gather_rows`
starts one DMA per (token, slot) into a VMEM buffer [C, BB, D] laid out slot-major, so that slot
c's rows for the BB tokens are one (BB, D) tile for the vector units; `segment_rows` is the
sort-based scatter's walk over sorted pairs. DMAs share one semaphore: each wait consumes one
copy's worth. The row buffer is C * BB * D elements of VMEM (4.7 MB at C = 64, D = 2304).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def row_block(dtype) -> int:
  """Tokens per program: one sublane tile of the table's dtype ((8, 128) f32, (16, 128) bf16)."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def copy_now(src, dst, sem) -> None:
  """A blocking DMA (small index / value blocks the row DMAs depend on)."""
  cp = pltpu.make_async_copy(src, dst, sem)
  cp.start()
  cp.wait()


def rows_scratch(slots: int, block_b: int, dim: int, dtype):
  return [pltpu.VMEM((slots, block_b, dim), dtype), pltpu.SemaphoreType.DMA(())]


def gather_rows(idx_ref, table_ref, rows_ref, sem, *, block_b: int, slots: int,
                pair=None) -> None:
  """rows_ref[c, r] = table_ref[idx_ref[r, c]] for the program's BB tokens and C slots; with
  `pair`, rows of a CLT decoder [F, P, d]: rows_ref[c, r] = table_ref[idx_ref[r, c], pair]."""

  def copy(j):
    r, c = lax.div(j, slots), lax.rem(j, slots)  # lax.div: jnp's // needs a sign op Mosaic lacks
    row = idx_ref[r, c]
    src = (table_ref.at[pl.ds(row, 1)] if pair is None
           else table_ref.at[row, pl.ds(pair, 1)])
    return pltpu.make_async_copy(src, rows_ref.at[c, pl.ds(r, 1)], sem)

  def start(j, carry):
    copy(j).start()
    return carry

  def wait(j, carry):
    copy(j).wait()
    return carry

  lax.fori_loop(0, block_b * slots, start, 0)
  lax.fori_loop(0, block_b * slots, wait, 0)


def segment_rows(starts_smem, pair_hbm, val_hbm, pair_smem, val_smem, buf_ref, sem, *,
                 block_n: int, block_p: int, slots: int, src_row, store, lead=0) -> None:
  """The TPU side of the sort-based scatter (`_segments`): for each of the program's BN output
  rows r, walk its sorted pairs [starts[r], starts[r + 1]) BP at a time (their pair numbers and
  values by DMA into SMEM, then one DMA per live pair of `src_row(b)` into buf_ref [BP, D]),
  accumulate the weighted rows in float32 and `store(r, acc [1, D])` once. The pair and value
  arrays are [problems, M + pad] (rank-1 HBM operands need TPU info to lower); `lead` picks the
  problem (the CLT's source layer)."""

  def row(r, carry):
    begin, end = starts_smem[r], starts_smem[r + 1]

    def chunk(q, acc):
      first = begin + q * block_p
      copy_now(pair_hbm.at[lead, pl.ds(first, block_p)], pair_smem, sem)
      copy_now(val_hbm.at[lead, pl.ds(first, block_p)], val_smem, sem)

      def dma(p):
        return pltpu.make_async_copy(src_row(lax.div(pair_smem[p], slots)),
                                     buf_ref.at[pl.ds(p, 1)], sem)

      def start(p, c):
        pl.when(first + p < end)(lambda: dma(p).start())
        return c

      def wait(p, c):
        pl.when(first + p < end)(lambda: dma(p).wait())
        return c

      def add(p, acc):  # where, not a 0 weight: a dead slot's buffer row may hold garbage
        contrib = val_smem[p] * buf_ref[pl.ds(p, 1), :].astype(jnp.float32)
        return acc + jnp.where(first + p < end, contrib, 0.0)

      lax.fori_loop(0, block_p, start, 0)
      lax.fori_loop(0, block_p, wait, 0)
      return lax.fori_loop(0, block_p, add, acc)

    trips = lax.div(end - begin + block_p - 1, block_p)
    store(r, lax.fori_loop(0, trips, chunk, jnp.zeros((1, buf_ref.shape[1]), jnp.float32)))
    return carry

  lax.fori_loop(0, block_n, row, 0)


def segment_scratch(block_n: int, block_p: int, dim: int, dtype):
  """starts (BN + 1), pair numbers and values (BP) in SMEM; the gathered rows; a DMA semaphore."""
  return [pltpu.SMEM((block_n + 1,), jnp.int32), pltpu.SMEM((block_p,), jnp.int32),
          pltpu.SMEM((block_p,), jnp.float32), pltpu.VMEM((block_p, dim), dtype),
          pltpu.SemaphoreType.DMA(())]
