"""Selection: which latents of each row are active, as (indices, values) with a fixed capacity.

Every selector returns `Selection(indices [B, C] int32, values [B, C], overflow, active)`. TopK
ranks with the seam's `top_k` (exactly lax.top_k: ties to the lower index); the threshold
selectors (JumpReLU, ReLU), and BatchTopK's candidates on CPU, compact the entries they keep
(the seam's `compact`, in latent order) and rank only the rows that keep more than the
capacity. Slots are not in value order, and unused slots may repeat a used index. `values` hold the
pre-activations at the chosen indices and 0 in unused slots, `active` marks the used slots,
`overflow` counts active latents that did not fit in the capacity (0 for TopK). Indices carry
no gradient; values carry the gradient of a gather. The trainers pass a pre without gradient
and take theirs through `sparse_encode`, which never builds a dense [B, F] cotangent.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from allscope.kernels import xla
from allscope.kernels.dispatch import XLA, Ops


class Selection(NamedTuple):
  indices: jax.Array  # [B, C] int32
  values: jax.Array  # [B, C], pre-activation at each index, 0 where the slot is unused
  overflow: jax.Array  # int32 scalar: active latents dropped for lack of capacity
  active: jax.Array  # [B, C] bool, False in unused slots


def _at(pre: jax.Array, offset: jax.Array | None, indices: jax.Array) -> jax.Array:
  """(pre + offset)[b, indices[b, j]], gathered from pre (offset: None or [N])."""
  values = jnp.take_along_axis(pre, indices, axis=-1)
  return values if offset is None else values + offset[indices]


def _rows(pre: jax.Array, offset: jax.Array | None, rows: jax.Array) -> jax.Array:
  """(pre + offset)[rows]: [R] rows of [B, N], gathered from pre."""
  return pre[rows] if offset is None else pre[rows] + offset


def topk(pre: jax.Array, k: int, ops: Ops = XLA, offset: jax.Array | None = None) -> Selection:
  """The k largest pre-activations per row (values may be negative; the caller applies ReLU).

  With `offset` [N] (-inf allowed), of `pre + offset`, which the seam's top_k adds as it reads
  pre (a bias, or a mask of columns); values are `pre + offset` at the chosen indices.
  """
  _, indices = ops.top_k(jax.lax.stop_gradient(pre), k,
                         None if offset is None else jax.lax.stop_gradient(offset))
  return Selection(indices, _at(pre, offset, indices), jnp.zeros((), jnp.int32),
                   jnp.ones(indices.shape, bool))


def _over_rows(batch: int) -> int:
  """Rows over capacity that the compacted selections rank apart (more: every row is ranked).

  Real activations hold rows far above the rest (a sequence's first token among them): with
  Gemma 3 270M's (context 128) at layers 3, 9 and 15, a BatchTopK transcoder (k=32, 128 slots)
  had 82-105 of 4096 rows over capacity at its floor, some with over 2000 entries above the
  threshold. Ranking B/16 rows costs about B/16 of ranking them all.
  """
  return min(batch, max(8, batch // 16))


def _rank_over(over: jax.Array, scores, capacity: int, ops: Ops):
  """The top `capacity` of scores(rows) [R, N] for the first R rows where `over` [B] is True:
  (rows [R], B where unused, so a scatter with mode="drop" skips them; the scores; values;
  indices)."""
  rows, n_over = xla.compact_mask(over[None], _over_rows(over.shape[0]))
  x = scores(rows[0])
  top, idx = ops.top_k(x, capacity)
  return jnp.where(jnp.arange(x.shape[0]) < n_over[0], rows[0], over.shape[0]), x, top, idx


def _masked_select(pre: jax.Array, keep, args: tuple, capacity: int, ops: Ops,
                   offset: jax.Array | None) -> Selection:
  """The entries of `pre + offset` where keep(pre + offset, *args), in ascending latent order
  (ops.compact); in a row that keeps more than `capacity`, its `capacity` largest kept entries by
  the seam's top_k (unused slots last), for up to _over_rows rows; beyond that, for every row.
  Unused slots get value 0.

  pre + offset is recomputed by each pass that reads it (XLA fuses it), never written out. The
  every-row top_k runs in a loop of 0 or 1 trips whose scores take a -inf from the loop counter
  (maximum with it changes nothing), else XLA would hoist the ranking, or pre + offset and the
  mask as [B, N] arrays, out of the loop.
  """
  sg = jax.lax.stop_gradient
  indices, counts = ops.compact(sg(pre), keep, capacity, None if offset is None else sg(offset),
                                args)
  used = jnp.arange(capacity) < counts[:, None]
  over = counts > capacity

  def scores(x, lowest=-jnp.inf):
    return jnp.where(keep(x, *args), x, lowest)

  rows, _, top, idx = _rank_over(over, lambda r: scores(sg(_rows(pre, offset, r))), capacity, ops)
  indices = indices.at[rows].set(idx, mode="drop")
  used = used.at[rows].set(top > -jnp.inf, mode="drop")

  def ranked(i, _):
    lowest = -jnp.inf * (i + 1).astype(pre.dtype)
    x = sg(jnp.maximum(pre, lowest) if offset is None else pre + jnp.maximum(offset, lowest))
    top, idx = ops.top_k(scores(x, lowest), capacity)
    return idx, top > -jnp.inf

  indices, used = jax.lax.fori_loop(
      0, (jnp.sum(over) > rows.shape[0]).astype(jnp.int32), ranked, (indices, used))
  overflow = jnp.sum(jnp.maximum(counts - capacity, 0)).astype(jnp.int32)
  return Selection(indices, jnp.where(used, _at(pre, offset, indices), 0.0), overflow, used)


def batchtopk(pre: jax.Array, k: int, capacity: int, ops: Ops = XLA,
              offset: jax.Array | None = None) -> tuple[Selection, jax.Array]:
  """The k*B largest positive pre-activations of the batch, at most `capacity` per row; with
  `offset` [N], of pre + offset (values too), which each pass adds as it reads pre.

  Returns the selection and the batch threshold (the smallest selected value), which the
  trainer averages into the inference-time JumpReLU threshold. Candidates are first cut to at
  most `capacity` per row, so the global pass sorts B*C values, not B*F. The result is exact
  when no row holds more than `capacity` of the batch's top k*B (overflow == 0); otherwise the
  threshold comes from each row's top `capacity` and the winners beyond a row's capacity are
  counted in `overflow`. The selection is then a mask of the row candidates (no second pass
  over [B, F]).
  """
  batch = pre.shape[0]
  n = min(k * batch, batch * capacity)
  row_top, row_idx, threshold, overflow = _capped_candidates(pre, offset, capacity, n, ops)
  used = (row_top >= threshold) & (row_top > 0)
  values = jnp.where(used, _at(pre, offset, row_idx), 0.0)
  return Selection(row_idx, values, overflow, used), threshold


def _capped_candidates(pre: jax.Array, offset: jax.Array | None, capacity: int, n: int,
                       ops: Ops) -> tuple[jax.Array, ...]:
  """Candidates of relu(pre + offset) [B, F], at most `capacity` a row (values, 0 in unused
  slots, and indices), the n-th largest of them all (the threshold), and the overflow.

  Off CPU: each row's top `capacity`. On CPU the candidates are the entries at or above a floor,
  compacted (ops.compact) in latent order, and for the few rows holding more than `capacity` of
  them (_over_rows), their top `capacity`. The floor is the n-th largest maximum of chunks of
  about F / 2k, so n distinct entries reach it. While n candidates stay at or above the floor, so
  does the threshold; every row's top `capacity` then holds all its entries at or above the
  threshold, so threshold and selection are the ranked form's, and only the rows ranked apart
  can overflow (at B=4096, F=16384, capacity 256, k=64 the selection took 121 against 355 ms on
  2 CPU cores). Otherwise (more rows over capacity, or fewer than n candidates at the floor) the
  ranked form runs, in a loop of 0 or 1 trips: each row's top `capacity` of the entries at or
  above the floor, the rest turned into the lowest value, which XLA's TopK heap passes over
  (404 -> 213 ms), exact whenever n of them reach the floor; where they do not, of
  relu(pre + offset), in a nested loop of 0 or 1 trips. The loops' inputs take a -inf from their
  counter by a maximum, so XLA hoists neither them nor their [B, F] operands out of the loops.
  """
  def shifted(lowest):  # pre + offset, recomputed; lowest: -inf, from the counter in a loop
    return jax.lax.stop_gradient(
        jnp.maximum(pre, lowest) if offset is None else pre + jnp.maximum(offset, lowest))

  def ranked(x, lowest):  # lowest: -inf, from a loop counter inside a loop
    top, idx = ops.top_k(x, capacity)
    threshold = xla.nth_largest(top.reshape(-1), n)
    kept = ops.row_count(shifted(lowest), lambda v, t: (v >= t) & (v > 0), args=(threshold,))
    return top, idx, threshold, jnp.sum(jnp.maximum(kept - capacity, 0)).astype(jnp.int32)

  counter = lambda i: (i + 1).astype(pre.dtype)
  if jax.default_backend() != "cpu" or pre.dtype != jnp.float32:
    return ranked(jnp.maximum(shifted(-jnp.inf), 0.0), -jnp.inf)
  b, f = pre.shape
  chunk = 2 ** int(np.log2(max(f * b / (2 * n), 1.0)))  # 2n chunk maxima or more
  pad = -f % chunk
  maxima = xla.chunk_max_keys(jnp.pad(pre if offset is None else pre + offset, ((0, 0), (0, pad)),
                                      constant_values=-jnp.inf), chunk)
  maxima = jnp.maximum(jax.lax.stop_gradient(maxima), 0).reshape(-1)
  # a key of relu(pre): order_key(+0.0) = 0
  floor = xla.order_key(xla.nth_largest(xla.from_order_key(maxima), n))
  # compared as floats: not the maxima's keys, which XLA would then write out to share; -0.0
  # also passes a floor of +0.0 (a candidate of value 0, like an unused slot)
  idx, counts = ops.compact(jax.lax.stop_gradient(pre), lambda v, t: v >= t, capacity,
                            None if offset is None else jax.lax.stop_gradient(offset),
                            (xla.from_order_key(floor),))
  top = jnp.where(jnp.arange(capacity) < counts[:, None],
                  jnp.maximum(jax.lax.stop_gradient(_at(pre, offset, idx)), 0.0), 0.0)
  over = counts > capacity
  rows, x, row_top, row_idx = _rank_over(
      over, lambda r: jnp.maximum(jax.lax.stop_gradient(_rows(pre, offset, r)), 0.0), capacity,
      ops)
  top, idx = top.at[rows].set(row_top, mode="drop"), idx.at[rows].set(row_idx, mode="drop")
  threshold = xla.nth_largest(top.reshape(-1), n)
  kept = jnp.sum((x >= threshold) & (x > 0), axis=-1) * (rows < b)  # other rows: <= capacity
  compacted = (top, idx, threshold, jnp.sum(jnp.maximum(kept - capacity, 0)).astype(jnp.int32))

  def over_capacity(i, _):
    lowest = -jnp.inf * counter(i)
    keys = xla.order_key(shifted(lowest))
    found = ranked(xla.from_order_key(jnp.where(keys >= floor, keys, xla.LOWEST_KEY)), lowest)
    short = xla.order_key(found[2]) < floor  # fewer than n candidates at or above the floor
    return jax.lax.fori_loop(
        0, short.astype(jnp.int32),
        lambda j, _: ranked(jnp.maximum(shifted(-jnp.inf * counter(j)), 0.0),
                            -jnp.inf * counter(j)), found)

  # more rows over capacity than ranked apart, or fewer than n candidates at or above the floor
  rank_all = (jnp.sum(over) > rows.shape[0]) | (xla.order_key(threshold) < floor)
  return jax.lax.fori_loop(0, rank_all.astype(jnp.int32), over_capacity, compacted)


def jumprelu(pre: jax.Array, threshold: jax.Array, capacity: int, window: float = 0.0,
             ops: Ops = XLA, offset: jax.Array | None = None) -> Selection:
  """Latents with pre > threshold - window/2, the largest `capacity` per row; with `offset` [N],
  of pre + offset (values too), which each pass adds as it reads pre.

  With `window` = the JumpReLU bandwidth, the selection also holds the latents just below their
  threshold, whose pseudo-derivative is non-zero, so the threshold gradient stays sparse.
  """
  return _masked_select(pre, lambda v, t: v > t, (threshold - 0.5 * window,), capacity, ops,
                        offset)


def relu(pre: jax.Array, capacity: int, ops: Ops = XLA,
         offset: jax.Array | None = None) -> Selection:
  """Positive pre-activations (of pre + offset, with `offset`), the largest `capacity` per row."""
  return _masked_select(pre, lambda v: v > 0, (), capacity, ops, offset)
