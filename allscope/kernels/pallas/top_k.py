"""top_k: exactly `lax.top_k(x, k)` (values descending, ties to the lower index), in two stages.

XLA's GPU top_k sorts whole rows for k > 16. Stage 1, a kernel, streams x once: each program
takes R rows by a chunk of S columns and extracts the chunk's top m by m rounds of
(max, lowest index at the max) in registers. Stage 2 is a small `lax.top_k` over the
[B, (N / S) m] candidates. Candidates are laid out chunk by chunk in index order, and each
chunk's in (value desc, index asc) order, so stage 2's own ties-to-lower-position are ties to
the lower index.

Exactness: an element missing from its chunk's candidates ranks below that chunk's m-th
candidate, so the result is exact unless some chunk's m-th candidate was selected (the chunk
may hold more than m of the top k). That is checked, and the whole batch then falls back to
`lax.top_k` (a `lax.cond`: the fallback costs only when taken). m is chosen from S, k, N and B
so that this happens with probability < 1e-3 per call when the top k sit at random positions.
-inf is the exception (masked selectors fill short rows with -inf ties, all in the first
chunk): -inf slots are refilled exactly from the row's first 2k columns (`_fill_neg_inf`).

An `offset` row (the encoder bias, or AuxK's -inf mask of live latents) is added as the kernel
reads x, so `x + offset` is never written: a [B, F] f32 write and read less (0.5 ms at
B=4096, F=65536 on an H200).

Cost at B=4096, N=65536, k=64 (S=256, m=8): stage 1 reads x once (1.07 GB f32: 0.25 ms at
4.3 TB/s) and does 6 m = 48 simple ops per element (1.3e10); the whole top_k took 1.38 ms on an
H200 (`gpu_blocks`), against 1.5 ms for the bf16 encoder product; stage 2 top-k's a
[4096, 2048] array (1/32 of x). NaN is not supported (lax.top_k ranks NaN first).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from allscope.kernels.pallas import _common

_NO_INDEX = 2**31 - 1


def candidates_per_chunk(batch: int, n: int, k: int, chunk: int, miss: float = 1e-3) -> int:
  """The smallest power-of-2 m such that, with the top k at random positions, the expected
  number of chunks holding >= m of them (each a Poisson(k S / N) count) is below `miss`."""
  lam = k * chunk / n
  chunks = batch * math.ceil(n / chunk)
  m = 1
  while m < min(k, chunk):
    tail = 1.0 - sum(math.exp(-lam) * lam**i / math.factorial(i) for i in range(m))
    if chunks * max(tail, 0.0) < miss:
      break
    m *= 2
  return m


def _kernel(x_ref, *refs, chunk: int, m: int, n: int):
  *off_ref, val_ref, idx_ref = refs
  c = pl.program_id(1)
  x = x_ref[...].astype(jnp.float32)  # [R, S]
  if off_ref:  # the rows' shared offset [1, S] (a bias): x + offset is never written out
    x = x + off_ref[0][pl.ds(0, 1), :].astype(jnp.float32)
  col = c * chunk + lax.broadcasted_iota(jnp.int32, x.shape, 1)  # 2-D iota: Mosaic needs it
  vals = jnp.where(col < n, x, -jnp.inf)
  slot = lax.broadcasted_iota(jnp.int32, (x.shape[0], m), 1)
  out_v = jnp.full((x.shape[0], m), -jnp.inf, jnp.float32)
  out_i = jnp.full((x.shape[0], m), _NO_INDEX, jnp.int32)
  # Each round: 6 ops per element. Extracted entries become -inf, so a round that finds only
  # -inf left records some -inf position, possibly a repeat: -inf slots are refilled after
  # stage 2, so only finite candidates need to be right (they are never repeated).
  for r in range(m):  # m is small: unrolled
    best = jnp.max(vals, axis=1, keepdims=True)
    pos = jnp.min(jnp.where(vals == best, col, _NO_INDEX), axis=1, keepdims=True)
    out_v = jnp.where(slot == r, best, out_v)
    out_i = jnp.where(slot == r, pos, out_i)
    vals = jnp.where(col == pos, -jnp.inf, vals)
  val_ref[...] = out_v.astype(val_ref.dtype)
  idx_ref[...] = out_i


def top_k(x: jax.Array, k: int, offset: jax.Array | None = None, *, interpret: bool = False,
          chunk: int | None = None, rows: int | None = None, num_warps: int = 1,
          backend: str | None = None) -> tuple[jax.Array, jax.Array]:
  """x [..., B, N] -> (values [..., B, k], indices [..., B, k] int32), as `lax.top_k`.

  With `offset` [..., N] (one row per [B, N] matrix; -inf allowed), the top k of
  `x + offset[..., None, :]`, added inside the kernel (values in the sum's dtype): a bias add
  over [B, F], or a mask of columns (-inf), costs no pass of its own.
  GPU: Triton, blocks from `gpu_blocks` unless `chunk`/`rows` are given; TPU: Mosaic (the same
  kernel body; blocks of at least (16, 256), which the (8, 128) tiling and bf16's (16, 128)
  packing both accept). `backend` overrides jax.default_backend().
  """
  if not 0 < k <= x.shape[-1]:
    raise ValueError(f"top_k: k={k} must be in [1, N={x.shape[-1]}]")
  if offset is not None and offset.shape != x.shape[:-2] + x.shape[-1:]:
    raise ValueError(f"top_k: offset {offset.shape} must be x's {x.shape} without its rows")
  n = x.shape[-1]
  values, indices = _rows_top_k(k, interpret, chunk, rows, num_warps, backend)(
      x.reshape(-1, n), None if offset is None else offset.reshape(-1, 1, n))
  return values.reshape(x.shape[:-1] + (k,)), indices.reshape(x.shape[:-1] + (k,))


@functools.cache
def _rows_top_k(k: int, interpret: bool, chunk: int | None, rows: int | None, num_warps: int,
                backend: str | None):
  """The jitted top-k of x [R, N] with offsets [G, 1, N] (row r takes offset r // (R / G)),
  batched by folding any vmapped axes into the rows (and groups).

  Under a plain vmap, the fallback's `lax.cond` on a batched predicate would become a select
  that always runs the full `lax.top_k`; folding the vmapped axes into R keeps one scalar
  predicate, so the fallback still costs only when taken.
  """

  @jax.custom_batching.custom_vmap
  @jax.jit
  def rows_top_k(x, offset):
    staged = two_stage(x, k, offset, interpret=interpret, chunk=chunk, rows=rows,
                       num_warps=num_warps, backend=backend)
    if staged is None:
      return tuple(lax.top_k(_offset_rows(x, offset), k))  # too small to split
    values, indices, overflow = staged
    return lax.cond(overflow, lambda: _blockwise_top_k(_offset_rows(x, offset), k),
                    lambda: (values, indices))

  @rows_top_k.def_vmap
  def _fold(axis_size, in_batched, x, offset):
    x_batched, off_batched = in_batched[0], offset is not None and in_batched[1]
    if not (x_batched or off_batched):
      return rows_top_k(x, offset), (False, False)
    x = x if x_batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
    if offset is not None:  # one offset group per mapped matrix
      offset = offset if off_batched else jnp.broadcast_to(offset, (axis_size,) + offset.shape)
      offset = offset.reshape(-1, *offset.shape[2:])
    values, indices = rows_top_k(x.reshape(-1, x.shape[-1]), offset)
    shape = (axis_size,) + x.shape[1:-1] + (k,)
    return (values.reshape(shape), indices.reshape(shape)), (True, True)

  return rows_top_k


def _offset_rows(x: jax.Array, offset: jax.Array | None) -> jax.Array:
  """x [R, N] + its groups' offsets [G, 1, N], materialized (fallbacks only)."""
  if offset is None:
    return x
  g = offset.shape[0]
  return (x.reshape(g, -1, x.shape[-1]) + offset).reshape(x.shape)


def _blockwise_top_k(x: jax.Array, k: int, rows: int = 256) -> tuple[jax.Array, jax.Array]:
  """lax.top_k a block of rows at a time: the fallback's sort buffers are one block, not x.

  `lax.cond` reserves memory for both branches, so a whole-array sort here would cost two
  copies of x in every step's temporaries even though it almost never runs.
  """
  values, indices = lax.map(lambda row: lax.top_k(row, k), x, batch_size=min(rows, x.shape[0]))
  return values, indices.astype(jnp.int32)


def gpu_blocks(batch: int, n: int, k: int) -> tuple[int, int]:
  """(chunk, rows) of a Triton program, which runs as one warp (num_warps=1).

  A program holds 1024 elements, 32 per thread, so each round's max and min reduce within the
  warp, with no shared-memory barrier; the chunk is 512 unless that needs more candidates per
  chunk than 256 does (fewer, longer chunks shrink stage 2). Swept on an H200
  (benchmarks/top_k_blocks.py): B=4096, k=64 at N=16384 (512, 2) 0.65 ms and at N=65536 (256, 4)
  1.38 ms, AuxK's k=256 at N=65536 (512, 2) 2.35 ms, each with an offset row, against
  1.6 / 2.9 / 5.8 ms for (256, 8) over 4 warps.
  """
  chunk = 512 if candidates_per_chunk(batch, n, k, 512) <= candidates_per_chunk(
      batch, n, k, 256) else 256
  return chunk, 1024 // chunk


def two_stage(x: jax.Array, k: int, offset: jax.Array | None = None, *, interpret: bool,
              chunk: int | None = None, rows: int | None = None, num_warps: int = 1,
              backend: str | None = None):
  """(values, indices, overflow) of x [R, N] (+ offsets [G, 1, N]) from the candidates, or None
  when x is too small to split. The result is exact wherever `overflow` is False.
  """
  batch, n = x.shape
  where = _common.target(interpret, backend)
  if where == "tpu":  # Mosaic tiles: rows a multiple of 16 (bf16 packing), columns of 128
    rows, chunk = max(rows or 16, 16), max(chunk or 256, 256)
  elif chunk is None or rows is None:
    auto_chunk, auto_rows = gpu_blocks(batch, n, k)
    chunk, rows = chunk or auto_chunk, rows or auto_rows
  chunk = min(chunk, 1 << (n - 1).bit_length())
  m = candidates_per_chunk(batch, n, k, chunk)
  num_chunks = -(-n // chunk)
  if num_chunks * m < k or num_chunks == 1:
    return None
  r = rows if where == "tpu" else _common.row_block(batch, rows)
  groups = 1 if offset is None else offset.shape[0]
  per_group = batch // groups
  if groups > 1 and per_group % r:  # a row block would straddle two groups: add the offsets
    x, offset, groups = _offset_rows(x, offset), None, 1
  xp = _common.pad_to(_common.pad_to(x, 1, chunk), 0, r)
  padded = xp.shape[0]
  operands, in_specs = [xp], [pl.BlockSpec((r, chunk), lambda i, c: (i, c))]
  if offset is not None:
    blocks_per_group = -(-per_group // r)
    tile = 8 if where == "tpu" else 1  # Mosaic blocks: second-minor dim a multiple of 8
    operands.append(jnp.broadcast_to(_common.pad_to(offset, 2, chunk),
                                     (groups, tile, xp.shape[1])))
    in_specs.append(pl.BlockSpec((None, tile, chunk),
                                 lambda i, c: (lax.div(i, blocks_per_group), 0, c)))
  dtype = x.dtype if offset is None else jnp.result_type(x.dtype, offset.dtype)
  cand_v, cand_i = pl.pallas_call(
      functools.partial(_kernel, chunk=chunk, m=m, n=n),
      name="top_k",
      out_shape=(jax.ShapeDtypeStruct((num_chunks, padded, m), dtype),
                 jax.ShapeDtypeStruct((num_chunks, padded, m), jnp.int32)),
      grid=(padded // r, num_chunks),
      in_specs=in_specs,
      out_specs=(pl.BlockSpec((None, r, m), lambda i, c: (c, i, 0)),
                 pl.BlockSpec((None, r, m), lambda i, c: (c, i, 0))),
      compiler_params=(_common.tpu_params(2) if where == "tpu"
                       else _common.compiler_params(interpret, num_warps=num_warps)),
      interpret=_common.interpret_mode(interpret, where),
  )(*operands)
  # [B, num_chunks * m], chunk-major: candidate order among equal values is index order.
  cand_v = jnp.swapaxes(cand_v[:, :batch], 0, 1).reshape(batch, -1)
  cand_i = jnp.swapaxes(cand_i[:, :batch], 0, 1).reshape(batch, -1)
  values, pos = lax.top_k(cand_v, k)
  indices = jnp.take_along_axis(cand_i, pos, axis=1)
  # A chunk can hold more than m of the top k only if its m-th candidate was selected (never
  # when m >= k). For -inf that is the common case, not a rare one: a masked selector (JumpReLU,
  # ReLU under a capacity) scores dropped latents -inf, and a row with fewer than k finite
  # scores fills its last slots with the lowest-index -inf entries, all in the first chunk. So
  # only finite overflows count, and -inf slots are refilled from the row's first 2k columns.
  finite = values > -jnp.inf
  overflow = jnp.asarray(False) if m >= k else jnp.any(finite & (pos % m == m - 1))
  window = min(n, 2 * k)
  head = x[:, :window] if offset is None else _offset_rows(x[:, :window], offset[..., :window])
  return values, _fill_neg_inf(head, k, indices, jnp.sum(finite, axis=1)), overflow


def _fill_neg_inf(x: jax.Array, k: int, indices: jax.Array, num_finite: jax.Array):
  """Slots r >= num_finite take the (r - num_finite)-th -inf position of the row, as lax.top_k.

  They lie in the first 2k columns: a row with f < k finite entries has at least 2k - f > k - f
  -inf entries there. (NaN is not supported.)
  """
  window = min(x.shape[1], 2 * k)
  col = lax.broadcasted_iota(jnp.int32, (x.shape[0], window), 1)
  is_inf = x[:, :window] == -jnp.inf
  first, _ = lax.top_k(jnp.where(is_inf, -col, -window), k)  # -inf positions, ascending, negated
  slot = lax.broadcasted_iota(jnp.int32, indices.shape, 1)
  need = slot - num_finite[:, None]
  fill = -jnp.take_along_axis(first, jnp.clip(need, 0, k - 1), axis=1)
  return jnp.where(need >= 0, fill, indices)
