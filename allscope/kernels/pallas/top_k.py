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

Cost at B=4096, N=65536, k=64 (S=256, m=8): stage 1 reads x once (1.07 GB f32: 0.32 ms at
3.35 TB/s; bf16 half that) and does 6 m = 48 simple ops per element (1.3e10: 0.4 ms at the
H100's 33 T fp32 lane-ops/s, up to twice that where the int32 compare/selects run at half
rate), against 1.6 ms for the bf16 encoder product; stage 2 top-k's a [4096, 2048] array
(1/32 of x). NaN is not supported (lax.top_k ranks NaN first).
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


def _kernel(x_ref, val_ref, idx_ref, *, chunk: int, m: int, n: int):
  c = pl.program_id(1)
  x = x_ref[...].astype(jnp.float32)  # [R, S]
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


def top_k(x: jax.Array, k: int, *, interpret: bool = False, chunk: int = 256, rows: int = 8,
          backend: str | None = None) -> tuple[jax.Array, jax.Array]:
  """x [B, N] -> (values [B, k] in x's dtype, indices [B, k] int32), as `lax.top_k`.

  GPU: Triton; TPU: Mosaic (the same kernel body; blocks of at least (16, 256), which the (8, 128)
  tiling and bf16's (16, 128) packing both accept). `backend` overrides jax.default_backend().
  """
  if not 0 < k <= x.shape[-1]:
    raise ValueError(f"top_k: k={k} must be in [1, N={x.shape[-1]}]")
  return _rows_top_k(k, interpret, chunk, rows, backend)(x)


@functools.cache
def _rows_top_k(k: int, interpret: bool, chunk: int, rows: int, backend: str | None):
  """The jitted [B, N] top-k, batched by folding any vmapped axes into the rows.

  Under a plain vmap, the fallback's `lax.cond` on a batched predicate would become a select
  that always runs the full `lax.top_k`; folding the vmapped axes into B keeps one scalar
  predicate, so the fallback still costs only when taken.
  """

  @jax.custom_batching.custom_vmap
  @jax.jit
  def rows_top_k(x):
    staged = two_stage(x, k, interpret=interpret, chunk=chunk, rows=rows, backend=backend)
    if staged is None:
      return tuple(lax.top_k(x, k))  # too small to split
    values, indices, overflow = staged
    return lax.cond(overflow, lambda: _blockwise_top_k(x, k), lambda: (values, indices))

  @rows_top_k.def_vmap
  def _fold(axis_size, in_batched, x):
    if not in_batched[0]:
      return rows_top_k(x), (False, False)
    values, indices = rows_top_k(x.reshape(-1, x.shape[-1]))
    shape = (axis_size,) + x.shape[1:-1] + (k,)
    return (values.reshape(shape), indices.reshape(shape)), (True, True)

  return rows_top_k


def _blockwise_top_k(x: jax.Array, k: int, rows: int = 256) -> tuple[jax.Array, jax.Array]:
  """lax.top_k a block of rows at a time: the fallback's sort buffers are one block, not x.

  `lax.cond` reserves memory for both branches, so a whole-array sort here would cost two
  copies of x in every step's temporaries even though it almost never runs.
  """
  values, indices = lax.map(lambda row: lax.top_k(row, k), x, batch_size=min(rows, x.shape[0]))
  return values, indices.astype(jnp.int32)


def two_stage(x: jax.Array, k: int, *, interpret: bool, chunk: int, rows: int,
              backend: str | None = None):
  """(values, indices, overflow) from the candidates, or None when x is too small to split.

  The result is exact wherever `overflow` is False.
  """
  batch, n = x.shape
  where = _common.target(interpret, backend)
  if where == "tpu":  # Mosaic tiles: rows a multiple of 16 (bf16 packing), columns of 128
    rows, chunk = max(rows, 16), max(chunk, 256)
  chunk = min(chunk, 1 << (n - 1).bit_length())
  m = candidates_per_chunk(batch, n, k, chunk)
  num_chunks = -(-n // chunk)
  if num_chunks * m < k or num_chunks == 1:
    return None
  r = rows if where == "tpu" else _common.row_block(batch, rows)
  xp = _common.pad_to(_common.pad_to(x, 1, chunk), 0, r)
  padded = xp.shape[0]
  cand_v, cand_i = pl.pallas_call(
      functools.partial(_kernel, chunk=chunk, m=m, n=n),
      name="top_k",
      out_shape=(jax.ShapeDtypeStruct((num_chunks, padded, m), x.dtype),
                 jax.ShapeDtypeStruct((num_chunks, padded, m), jnp.int32)),
      grid=(padded // r, num_chunks),
      in_specs=[pl.BlockSpec((r, chunk), lambda i, c: (i, c))],
      out_specs=(pl.BlockSpec((None, r, m), lambda i, c: (c, i, 0)),
                 pl.BlockSpec((None, r, m), lambda i, c: (c, i, 0))),
      compiler_params=(_common.tpu_params(2) if where == "tpu"
                       else _common.compiler_params(interpret)),
      interpret=_common.interpret_mode(interpret, where),
  )(xp)
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
  return values, _fill_neg_inf(x, k, indices, jnp.sum(finite, axis=1)), overflow


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
