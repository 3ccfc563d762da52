"""The TPU side of the row-gather kernels: table rows come from HBM by DMA, not by BlockSpec.

A BlockSpec can fetch one data-dependent block per grid step (one row: far too many steps), so
the table stays in HBM (`memory_space=pl.ANY`) and each program starts one DMA per (token, slot)
into a VMEM buffer [C, BB, D] laid out slot-major, so that slot c's rows for the BB tokens are
one (BB, D) tile for the vector units. All DMAs share one semaphore: each wait consumes one
row's worth.
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
