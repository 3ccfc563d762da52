"""The kernel seam's primitives as sparse XLA code (the CPU path and the reference for Pallas).

Every primitive loops over the C slots (`lax.fori_loop`), so one iteration touches one [B, d]
gather or scatter-add and no [B, C, d] (or [B, C, L*d]) block of gathered rows ever exists.
Inputs may be float32 or bfloat16; accumulation and outputs are float32. `indices` are valid
rows (unused slots carry value 0); duplicates are allowed everywhere.

A CLT decoder is stored causally, w_dec [F, P, d] (see clt_layout): latent f of source s owns
the contiguous rows w_dec[f, off(s) : off(s) + L - s], gathered or scattered as one window.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from allscope.kernels import clt_layout

_F32 = jnp.float32
# Rows at least this long use the two-stage top-k off CPU, where lax.top_k sorts whole rows for
# k > 16. On CPU, XLA's TopK costs about its input size again per call whatever k is, so long
# rows with few winners (n / k >= CHUNK_MAX_MIN_RATIO) first cut candidates by chunk maxima.
TWO_STAGE_MIN_ROW = 8192
TWO_STAGE_CHUNK = 1024
CHUNK_MAX_MIN_RATIO = 128
THRESHOLD_MIN_RATIO = 64  # float32 rows: threshold_top_k where N >= THRESHOLD_MIN_RATIO * k
UNROLL = 8


def _unroll(slots: int) -> int:
  """Slots per loop iteration: several fuse into one pass over the accumulator (2x on CPU)."""
  return next(u for u in (UNROLL, 4, 2, 1) if slots % u == 0)


def zeros_after(shape: tuple[int, ...], *xs: jax.Array) -> jax.Array:
  """float32 zeros that XLA computes no earlier than every x (exactly 0, whatever they hold).

  A constant broadcast has no operands, so XLA:CPU's scheduler may place it at the start of the
  step: a scatter's zeroed decoder-sized accumulator, or the CLT decode's per-source ones, then
  stay allocated across the forward's [L, B, F] arrays. A dependence on the op's own inputs
  (the cotangent in a backward) keeps each where it is used.
  """
  ok = jnp.all(jnp.stack([jnp.isfinite(lax.slice(x.reshape(-1), (0,), (1,))[0]) for x in xs]))
  return jnp.full(shape, ok.astype(_F32) * 0.0, _F32)


def only_where(use: jax.Array, update, acc, indices: jax.Array):
  """update(acc, indices) where the scalar `use` is True, else acc, in acc's buffers.

  A loop of 0 or 1 trips, which XLA runs in place on its carry (a cond's untaken branch would
  fill a second acc and a sum would read both). `indices` (valid rows, >= 0) reach `update`
  through the loop counter, unchanged: XLA hoists loop-invariant work out of a loop, so the
  update's gathers and sorts would otherwise run every step, taken or not (AuxK's 256-slot
  encoder gather_decode: 38 ms a layer at B=4096, d=640, with no latent dead).
  """
  return lax.fori_loop(0, use.astype(jnp.int32),
                       lambda i, acc: update(acc, jnp.maximum(indices, -1 - i)), acc)


def row_count(x: jax.Array, keep, offset: jax.Array | None = None, args: tuple = (),
              chunk: int = 1024) -> jax.Array:
  """[..., N] -> [...] int32: how many entries of each row satisfy keep(x + offset, *args).

  `offset` ([N], optional) is added chunk by chunk. keep takes traced values (a threshold) as
  `args`, not from its closure, so a mesh's row_count can pass them on (trainers.sharded_ops).
  Counted in a loop: XLA on CPU does not fuse a mask into a long-row reduction, so a plain
  jnp.sum would materialize the whole [B, N] mask (and x + offset).
  """
  n = x.shape[-1]
  if n <= chunk or n % chunk:
    return jnp.sum(keep(x if offset is None else x + offset, *args), axis=-1, dtype=jnp.int32)

  def body(i, acc):
    part = jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=-1)
    if offset is not None:
      part = part + jax.lax.dynamic_slice_in_dim(offset, i * chunk, chunk)
    return acc + jnp.sum(keep(part, *args), axis=-1, dtype=jnp.int32)

  return jax.lax.fori_loop(0, n // chunk, body, jnp.zeros(x.shape[:-1], jnp.int32))


# compact: entries per bitmask word, and words per group of its first search
COMPACT_WORD = 16
COMPACT_GROUP = 32


def compact(x: jax.Array, keep, capacity: int, offset: jax.Array | None = None,
            args: tuple = ()) -> tuple[jax.Array, jax.Array]:
  """compact_mask(keep(x + offset, *args), capacity): each row's entries where keep holds.

  `offset` ([N], optional) is added as x is read. keep takes traced values as `args`, not from
  its closure (as row_count's), so a mesh's compact can pass them on, split with the latents
  where they are [N] (trainers.sharded_ops).
  """
  return compact_mask(keep(x if offset is None else x + offset, *args), capacity)


def compact_mask(keep: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """[B, N] bool -> (indices [B, capacity] int32, counts [B] int32): each row's True positions
  in ascending order, the first `capacity` of them; slot j >= counts[b] holds min(j, N - 1)
  (unused).

  No sort and no top_k: keep is read once into int32 bitmasks of COMPACT_WORD entries, whose
  popcounts' running sum gives each word its first slot. Slot j then finds its word by counting
  the group ends (every COMPACT_GROUP-th word) at or below j, then the word ends in its group,
  and takes the word's set bit of rank j - (the word's first slot). At B=4096, N=16384 and 384
  slots: 43 ms on 2 CPU cores, where the top 384 of the masked rows took 200 ms.
  """
  b, n = keep.shape
  words = -(-n // COMPACT_WORD)
  groups = -(-words // COMPACT_GROUP)
  pad = words * COMPACT_WORD - n
  keep = jnp.pad(keep, ((0, 0), (0, pad))) if pad else keep
  weights = jnp.left_shift(1, jnp.arange(COMPACT_WORD, dtype=jnp.int32))
  bits = jnp.sum(jnp.where(keep.reshape(b, words, COMPACT_WORD), weights, 0), axis=-1,
                 dtype=jnp.int32)
  bits = jnp.pad(bits, ((0, 0), (0, groups * COMPACT_GROUP - words)))
  ends = jnp.cumsum(lax.population_count(bits), axis=-1, dtype=jnp.int32)  # slots through word w
  slot = jnp.arange(capacity, dtype=jnp.int32)[None, :]  # [1, capacity]
  group_ends = ends[:, COMPACT_GROUP - 1::COMPACT_GROUP]  # [B, groups]
  group = jnp.minimum(jnp.sum(group_ends[:, None, :] <= slot[..., None], axis=-1,
                              dtype=jnp.int32), groups - 1)  # [B, capacity]
  in_group = jnp.take_along_axis(ends.reshape(b, groups, COMPACT_GROUP), group[..., None], axis=1)
  word = group * COMPACT_GROUP + jnp.sum(in_group <= slot[..., None], axis=-1, dtype=jnp.int32)
  word = jnp.minimum(word, groups * COMPACT_GROUP - 1)
  mask = jnp.take_along_axis(bits, word, axis=1)
  rank = slot - (jnp.take_along_axis(ends, word, axis=1) - lax.population_count(mask))
  counts = ends[:, -1]
  used = slot < counts[:, None]
  unused = jnp.minimum(slot, n - 1)
  return jnp.where(used, word * COMPACT_WORD + _set_bit(mask, rank), unused), counts


def _set_bit(mask: jax.Array, rank: jax.Array) -> jax.Array:
  """The position of the set bit of `rank` (0 = the lowest) in each COMPACT_WORD-bit mask."""
  pos = jnp.zeros_like(mask)
  half = COMPACT_WORD // 2
  while half:
    low = mask & ((1 << half) - 1)
    n_low = lax.population_count(low)
    up = rank >= n_low  # the bit lies in the upper half
    pos, rank = jnp.where(up, pos + half, pos), jnp.where(up, rank - n_low, rank)
    mask = jnp.where(up, mask >> half, low)
    half //= 2
  return pos


# column_max on CPU: rows of at least COLUMN_FOLD_MIN_WIDTH entries fold COLUMN_FOLD at a time
COLUMN_FOLD = 16
COLUMN_FOLD_MIN_WIDTH = 32768


def column_max(x: jax.Array, offset: jax.Array | None = None,
               shift: jax.Array | None = None) -> jax.Array:
  """[R, C...] -> [C...]: the maximum over the rows (the batch) of x + offset [C...] - shift [R],
  added and subtracted in that order.

  XLA:CPU's column reduce reads wide rows badly: at [4096, 65536], jnp.max took 494 ms. There,
  each run of COLUMN_FOLD consecutive rows is first folded into one by elementwise maximums and
  only the folded rows are reduced: 128 ms (at 32768 columns 51 against 111 ms; at 16384 and
  below no faster, so narrower rows keep jnp.max). The fold reads x, offset and shift themselves
  (a producer of x, read by all COLUMN_FOLD slices, would be written out whole), and
  consecutive rows, so a batch split over devices folds locally.
  """
  cols = x.shape[1:]
  offset = jnp.zeros(cols, x.dtype) if offset is None else offset
  shift = jnp.zeros(x.shape[:1], x.dtype) if shift is None else shift
  shift = shift.reshape(shift.shape + (1,) * len(cols))
  fold = next(f for f in (COLUMN_FOLD, 8, 4, 2, 1) if x.shape[0] % f == 0)
  if jax.default_backend() != "cpu" or fold == 1 or math.prod(cols) < COLUMN_FOLD_MIN_WIDTH:
    return jnp.max(x + offset - shift, axis=0)
  runs = x.reshape((x.shape[0] // fold, fold) + cols)
  shifts = shift.reshape((x.shape[0] // fold, fold) + shift.shape[1:])
  folded = runs[:, 0] + offset - shifts[:, 0]
  for i in range(1, fold):
    folded = jnp.maximum(folded, runs[:, i] + offset - shifts[:, i])
  return jnp.max(folded, axis=0)


def gather_decode(indices: jax.Array, values: jax.Array, table: jax.Array) -> jax.Array:
  """out[b] = sum_j values[b, j] * table[indices[b, j]]: [B, C], [B, C], [N, D] -> [B, D]."""
  b, c = indices.shape
  u = _unroll(c)

  def body(i, acc):
    for q in range(u):
      j = i * u + q
      rows = jnp.take(table, indices[:, j], axis=0, mode="clip").astype(_F32)
      acc = acc + values[:, j, None].astype(_F32) * rows
    return acc

  return lax.fori_loop(0, c // u, body, jnp.zeros((b, table.shape[1]), _F32))


def _halving_sum(p: jax.Array) -> jax.Array:
  """[..., D] -> [...]: the row sums of p as a tree of column-half additions (see _row_dot)."""
  rest = []
  while p.shape[-1] > 8:
    h = p.shape[-1] // 2
    if p.shape[-1] % 2:
      rest.append(p[..., 2 * h])
    p = p[..., :h] + p[..., h:2 * h]
  # the last few columns added as slices too: a jnp.sum would be a separate (YNNPACK) call
  return sum(rest + [p[..., i] for i in range(1, p.shape[-1])], p[..., 0])


def _row_dot(g: jax.Array, rows: jax.Array) -> jax.Array:
  """[..., D] x [..., D] -> [...]: sum(g * rows) as a tree of column-half additions.

  XLA:CPU fuses the gather of `rows`, the product and all the additions into one elementwise
  pass that writes the [...] sums: 1.3-1.7x faster than a dot (einsum), which
  needs the gathered rows written out first, and than jnp.sum(g * rows), whose fused row
  reduction runs 2.5x slower (and 6x under the trainers' one-group vmap).
  """
  return _halving_sum(g * rows)


def gather_dot(indices: jax.Array, g: jax.Array, table: jax.Array) -> jax.Array:
  """out[b, j] = g[b] . table[indices[b, j]]: [B, C], [B, D], [N, D] -> [B, C]."""
  b, c = indices.shape
  g = g.astype(_F32)

  def body(j, acc):
    rows = jnp.take(table, indices[:, j], axis=0, mode="clip").astype(_F32)
    return lax.dynamic_update_index_in_dim(acc, _row_dot(g, rows), j, 0)

  return lax.fori_loop(0, c, body, jnp.zeros((c, b), _F32)).T


def _bits(n: int) -> int:
  """Bits that hold 0 .. n - 1."""
  return max(n - 1, 1).bit_length()


def _row_pieces(indices: jax.Array, num_rows: int, piece: int,
                pack: bool = True) -> tuple[jax.Array, jax.Array]:
  """The (b, j) pairs of `indices` [B, C] grouped by row into pieces of at most `piece` pairs.

  Returns pairs [V, piece] int32 (flat pair numbers b C + j; B C in unused slots) and rows [V]
  int32 (each piece's row; num_rows for unused pieces), pieces in row order. Row n has
  ceil(count_n / piece) pieces, so V = B C // piece + min(num_rows, B C) bounds them all.
  With `pack`, and where row and pair numbers fit in 32 bits together, the pairs are ordered by
  one sort of packed uint32 keys: XLA:CPU sorts a lone primitive key about 6x faster than a key
  with a payload operand (lax.sort_key_val, the other path).
  """
  n_pairs = indices.size
  flat = indices.reshape(-1)
  pair_bits = _bits(n_pairs)
  if pack and _bits(num_rows) + pair_bits <= 32:
    key = jnp.sort((flat.astype(jnp.uint32) << pair_bits) | jnp.arange(n_pairs, dtype=jnp.uint32))
    rows = (key >> pair_bits).astype(jnp.int32)
    order = (key & ((1 << pair_bits) - 1)).astype(jnp.int32)
  else:
    rows, order = lax.sort_key_val(flat, jnp.arange(n_pairs, dtype=jnp.int32))
  starts = jnp.searchsorted(rows, jnp.arange(num_rows + 1, dtype=jnp.int32)).astype(jnp.int32)
  counts = (starts[1:] - starts[:-1] + piece - 1) // piece  # pieces per row
  ends = jnp.cumsum(counts, dtype=jnp.int32)
  rank = jnp.arange(n_pairs, dtype=jnp.int32) - starts[rows]  # position in the row's run
  n_pieces = n_pairs // piece + min(num_rows, n_pairs)
  pairs = jnp.full((n_pieces, piece), n_pairs, jnp.int32).at[
      ends[rows] - counts[rows] + rank // piece, rank % piece].set(
          order, mode="drop", unique_indices=True)
  piece_rows = jnp.searchsorted(ends, jnp.arange(n_pieces, dtype=jnp.int32), side="right")
  return pairs, piece_rows.astype(jnp.int32)


# Below this many products B C D the scatter per slot is the faster one (the sort is a fixed
# cost: crossover at about 10 M on 2 cores, B=512, C=32, D=640) and it compiles 5-7x faster
# (0.3 s against 1.8 s), which is most of a small CPU train step's compile time.
PIECES_MIN_PRODUCTS = 1 << 23


def _add_sorted_rows(acc: jax.Array, rows: jax.Array, sums: jax.Array) -> jax.Array:
  return acc.at[rows].add(sums, mode="drop", indices_are_sorted=True)


def _set_pieces(indices: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """_row_pieces of S slot sets [S, B, C]: pairs [S, V, piece], rows [S, V], in one batched sort."""
  b, c = indices.shape[1:]
  # pieces of about the mean pairs per row: fewer wasted slots where rows are sparse
  piece = int(np.clip(2 ** round(np.log2(max(b * c / num_rows, 1.0))), 4, 16))
  # One set unbatched: under the trainers' vmap over layers, the encoder's sort is then the same
  # HLO as a CLT decoder's batched one over its sources, and XLA computes it once.
  if indices.shape[0] == 1:
    return tuple(a[None] for a in _row_pieces(indices[0], num_rows, piece))
  return jax.vmap(lambda i: _row_pieces(i, num_rows, piece))(indices)


def _piece_sums(indices, values, takes, num_rows: int, acc: jax.Array, adds,
                pieces=None) -> jax.Array:
  """The sorted-piece scatter of S slot sets (see _sorted_scatter) into acc.

  indices, values [S, B, C]; set i's pieces sum the token rows takes[i](tokens) ([n] -> [n, ...])
  and go into acc by adds[i](acc, rows, sums), rows sorted. `pieces`: _set_pieces(indices), if
  the caller sorted them already.
  """
  b, c = indices.shape[1:]
  n_pairs = b * c
  all_pairs, all_rows = _set_pieces(indices, num_rows) if pieces is None else pieces
  piece = all_pairs.shape[2]
  block = min(all_pairs.shape[1], b)  # [b, ...] sums per step: no larger than a slot's products
  n_blocks = -(-all_pairs.shape[1] // block)
  pad = n_blocks * block - all_pairs.shape[1]
  if pad:
    all_pairs = jnp.pad(all_pairs, ((0, 0), (0, pad), (0, 0)), constant_values=n_pairs)
    all_rows = jnp.pad(all_rows, ((0, 0), (0, pad)), constant_values=num_rows)
  for pairs, piece_rows, flat_values, take, add_rows in zip(
      all_pairs, all_rows, values.reshape(len(takes), -1).astype(_F32), takes, adds):

    def body(i, acc, pairs=pairs, piece_rows=piece_rows, flat_values=flat_values, take=take,
             add_rows=add_rows):
      # weights and token rows looked up per block (fused into the sum): no table of each kept
      blk = lax.dynamic_slice_in_dim(pairs, i * block, block)
      w = jnp.take(flat_values, blk, mode="fill", fill_value=0)
      t = blk // c
      part = None
      for q in range(piece):
        rows = take(t[:, q])
        term = w[:, q].reshape((-1,) + (1,) * (rows.ndim - 1)) * rows
        part = term if part is None else part + term
      return add_rows(acc, lax.dynamic_slice_in_dim(piece_rows, i * block, block), part)

    acc = lax.fori_loop(0, n_blocks, body, acc)
  return acc


def _sorted_scatter(indices, values, takes, row_size: int, num_rows: int, acc: jax.Array,
                    adds):
  """acc + the scatters of S slot sets by sorted row pieces, or None (then scatter per slot).

  Set i ([B, C] of indices [S, B, C] and values) adds values[i, b, j] takes[i](b) at row
  indices[i, b, j] through adds[i]; row_size is the elements of all S sets' token rows together.

  None where the scatter per slot is the better one: small problems (PIECES_MIN_PRODUCTS), and
  rows too many to leave 32-bit keys room for one slot of every token. Where row and pair
  numbers need more than 32 bits together (BatchTopK's 256 slots or JumpReLU's 384 at F = 16384,
  B = 4096), the slots go in groups that fit, one after another into the same sums: 3.4x faster
  than the scatter per slot at B=4096, C=256, N=16384, D=640. One loop over the groups, so the
  sums stay in one buffer (unrolled, XLA kept a copy of them per group: the 18-layer JumpReLU
  step's memory went from 2.2x to 4.2x).
  """
  b, c = indices.shape[1:]
  group = (1 << max(32 - _bits(num_rows), 0)) // b
  if b * c * row_size < PIECES_MIN_PRODUCTS or group < 1:
    return None
  if c <= group:
    return _piece_sums(indices, values, takes, num_rows, acc, adds)
  n_groups = -(-c // group)
  pad = ((0, 0), (0, 0), (0, n_groups * group - c))  # padded slots add 0 x a row to row 0
  indices, values = jnp.pad(indices, pad), jnp.pad(values, pad)
  part = lambda a, g: lax.dynamic_slice_in_dim(a, g * group, group, axis=2)
  pieces = None
  if indices.shape[0] == 1:
    # One slot set: every group's sort before the loop, so the two scatters of a step's slots
    # (d w_dec, d w_enc) are the same sorts, which XLA computes once (inside two loops it cannot
    # merge them). Several sets (a CLT's sources) have no such twin: their sorts stay in the
    # loop, and only one group's pieces exist at a time.
    split = jnp.moveaxis(indices.reshape(indices.shape[:2] + (n_groups, group)), 2, 0)
    pieces = jax.vmap(lambda i: _set_pieces(i, num_rows))(split)

  def per_group(g, acc):
    at = lambda a: lax.dynamic_index_in_dim(a, g, keepdims=False)
    return _piece_sums(part(indices, g), part(values, g), takes, num_rows, acc, adds,
                       None if pieces is None else jax.tree.map(at, pieces))

  return lax.fori_loop(0, n_groups, per_group, acc)


def scatter_outer(indices: jax.Array, values: jax.Array, src: jax.Array, num_rows: int,
                  acc: jax.Array | None = None) -> jax.Array:
  """out[n] = sum_{(b, j): indices[b, j] = n} values[b, j] * src[b]: -> [num_rows, D].

  With `acc` (float32 [num_rows, D]) the sums are added to it, in its buffer when the caller no
  longer needs it: two slot sets (the main and AuxK decodes) share one gradient buffer.

  Not a scatter-add per slot (XLA:CPU writes each slot's [B, D] products out for the scatter,
  which cannot fuse them): the pairs are sorted by row (_row_pieces) and each piece of up to 16
  pairs of one row is summed in a fused gather-multiply-add, as in gather_decode; only those
  sums are scattered, about 16 times fewer rows (_sorted_scatter). 2x faster at B=4096, C=64,
  N=16384, D=640, and the two scatters of a step (d w_dec, d w_enc) share the sort of their
  indices.
  """
  b, c = indices.shape
  shape = (num_rows, src.shape[1])
  if acc is not None:
    check_acc(acc, shape)
  src = src.astype(_F32)
  out = zeros_after(shape, values, src) if acc is None else acc
  take = lambda t: jnp.take(src, t, axis=0, mode="clip")
  sums = _sorted_scatter(indices[None], values[None], [take], src.shape[1], num_rows, out,
                         [_add_sorted_rows])
  if sums is not None:
    return sums

  def body(j, acc):
    return acc.at[indices[:, j]].add(values[:, j, None].astype(_F32) * src, mode="drop")

  return lax.fori_loop(0, c, body, out)


def top_k(x: jax.Array, k: int, offset: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Exactly `lax.top_k(x, k)` (ties to the lower index), indices int32; with `offset` [..., N]
  (one row per [B, N] matrix of x, -inf allowed), of `x + offset[..., None, :]`.

  Long rows take an exact form that ranks few candidates: off CPU two_stage_top_k; on CPU
  threshold_top_k (float32), chunk_max_top_k (other dtypes).
  """
  n = x.shape[-1]
  if jax.default_backend() == "cpu" and x.dtype == _F32 and n >= THRESHOLD_MIN_RATIO * k:
    return threshold_top_k(x, k, offset)
  if offset is not None:  # fused by XLA into the passes that read it
    x = x + jnp.expand_dims(offset, -2)
  if jax.default_backend() == "cpu":
    return _ranked_top_k(x, k)
  if n >= TWO_STAGE_MIN_ROW and k <= TWO_STAGE_CHUNK // 4:
    return two_stage_top_k(x, k, TWO_STAGE_CHUNK)
  return _fenced_top_k(x, k)


def _ranked_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """top_k on CPU without a floor: chunk_max_top_k for rows of N >= CHUNK_MAX_MIN_RATIO k, else
  lax.top_k (other dtypes, and threshold_top_k's rows that its candidates do not hold)."""
  n = x.shape[-1]
  if n >= CHUNK_MAX_MIN_RATIO * k:
    # chunk ~ sqrt(n / k) balances the two lax.top_k calls (n / chunk and k * chunk wide)
    return chunk_max_top_k(x, k, int(np.clip(2 ** int(np.log2(np.sqrt(n / k))), 8, 32)))
  return _fenced_top_k(x, k)


def _fenced_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """lax.top_k (int32 indices) with each output behind its own barrier.

  XLA:CPU turns lax.top_k's sort into its TopK call only while every user slices the sort's
  first k columns, and a caller's static slice of the indices (a CLT's indices[s]) merges into
  that slice: then it sorts whole rows (the 4-layer CLT step 4x). One barrier per array: XLA's
  SPMD partitioner aborts on a barrier over the (values, indices) tuple of a top_k whose rows are
  sharded (latents on `model`: "cannot be downcasted to HloGetTupleElementInstruction").
  """
  values, indices = lax.top_k(x, k)
  return lax.optimization_barrier(values), lax.optimization_barrier(indices)


def order_key(x: jax.Array) -> jax.Array:
  """float32 -> int32 keys ordered as lax.top_k orders floats (-0.0 < +0.0; NaN by sign)."""
  bits = lax.bitcast_convert_type(x, jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negatives: flip the magnitude bits


LOWEST_KEY = np.iinfo(np.int32).min  # the order key below every other (a negative NaN)


def from_order_key(key: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(key ^ ((key >> 31) & 0x7FFFFFFF), jnp.float32)


def chunk_max_keys(x: jax.Array, chunk: int) -> jax.Array:
  """[..., N] float32 -> [..., N / chunk]: the largest order_key of each run of `chunk` entries
  (chunk a power of two dividing N), in reduces of at most 32 entries.

  XLA:CPU rewrites a reduce of more than 32 entries into a reduce-window that needs its input
  written out whole: at B=4096, N=16384 and chunks of 128, 78 ms against 13-18 ms in two steps,
  where x's producer (a bias add) and the keys fuse into the first.
  """
  keys = order_key(x).reshape(x.shape[:-1] + (-1, chunk))
  while keys.shape[-1] > 32:
    keys = jnp.max(keys.reshape(keys.shape[:-1] + (-1, 32)), axis=-1)
  return jnp.max(keys, axis=-1)


# nth_largest of float32 rows at least this long: bisection over the order keys' bits
NTH_BISECT_MIN_ROW = 4096


def nth_largest(x: jax.Array, n: int) -> jax.Array:
  """[..., N] -> [...]: the n-th largest entry of each row (1 <= n <= N), as jnp.sort(x)[..., -n].

  float32 rows are ranked by int32 order keys: -0.0 ranks below +0.0 (they compare equal); rows
  hold no NaN. Rows of NTH_BISECT_MIN_ROW or more find the n-th largest key bit by bit, from
  the top: a bit is set where at least n keys reach the prefix with it, 32 fused counting passes
  and no sort (XLA:CPU sorts on one thread: over 2^20 entries 3.7 against 38.7 ms). Shorter rows
  are sorted as keys, which XLA:CPU sorts 5-8x faster than floats.
  """
  if not 1 <= n <= x.shape[-1]:
    raise ValueError(f"nth_largest: n={n} outside 1..{x.shape[-1]}")
  if x.dtype != jnp.float32:
    return jnp.sort(x, axis=-1)[..., x.shape[-1] - n]
  if x.shape[-1] < NTH_BISECT_MIN_ROW:
    return from_order_key(jnp.sort(order_key(x), axis=-1)[..., x.shape[-1] - n])
  sign = np.uint32(1 << 31)  # flipped: unsigned order of the keys is their signed order
  keys = lax.bitcast_convert_type(order_key(x), jnp.uint32) ^ sign
  prefix = jnp.zeros(x.shape[:-1], jnp.uint32)
  for bit in range(31, -1, -1):
    wider = prefix | np.uint32(1 << bit)
    reach = jnp.sum(keys >= wider[..., None], axis=-1, dtype=jnp.int32)
    prefix = jnp.where(reach >= n, wider, prefix)
  return from_order_key(lax.bitcast_convert_type(prefix ^ sign, jnp.int32))


def chunk_max_top_k(x: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
  """The top k chunks of each row by their maxima, then the top k of their elements: lax.top_k.

  Exact: if element e (chunk c) is not in a chosen chunk, k chunks rank before c by (max desc,
  chunk asc), and each one's maximum beats e by value, or ties it from a lower index; so k
  elements beat e and it is not among the winners. Ties: the chosen chunks are put back in
  ascending order, so candidate positions follow the original indices and the second
  lax.top_k (lower position wins) prefers the lower index. Padding is -inf at the row's end.

  float32 rows first drop, as the lowest value, what k known elements beat: chunks whose maximum
  is below the least maximum of k disjoint chunk groups, and candidates below the k-th chunk
  maximum. XLA's TopK heap then takes few replacements: 97 to 60 ms for both calls at B=4096,
  N=16384, k=64.
  """
  lead, n = x.shape[:-1], x.shape[-1]
  n_chunks = -(-n // chunk)
  if k > n_chunks:
    raise ValueError(f"chunk_max_top_k: k={k} exceeds the {n_chunks} chunks of {chunk}")
  pad = n_chunks * chunk - n
  if pad:
    x = jnp.concatenate([x, jnp.full(lead + (pad,), -jnp.inf, x.dtype)], axis=-1)
  blocks = x.reshape(lead + (n_chunks, chunk))
  exact = lambda a: _fenced_top_k(a, k)
  if x.dtype != jnp.float32:
    _, best = exact(jnp.max(blocks, axis=-1))
    best = jnp.sort(best, axis=-1)
    cand = jnp.take_along_axis(blocks, best[..., None], axis=-2).reshape(lead + (k * chunk,))
    values, pos = exact(cand)
  else:
    # The chunk maxima as a reduce over int32 order keys (lax.top_k's total order), not jnp.max:
    # XLA:CPU hands a float max-reduce to YNNPACK, which first writes x out whole (the trainers'
    # `product + b_enc`, a [B, F] pass), while it fuses x's producer into this one.
    keys = jnp.max(order_key(blocks), axis=-1)
    groups = -(-n_chunks // k)  # group j: chunks j, j + k, ...; each holds one at least
    spread = jnp.pad(keys, [(0, 0)] * len(lead) + [(0, groups * k - n_chunks)],
                     constant_values=LOWEST_KEY).reshape(lead + (groups, k))
    floor = jnp.min(jnp.max(spread, axis=-2), axis=-1, keepdims=True)
    top, best = exact(from_order_key(jnp.where(keys >= floor, keys, LOWEST_KEY)))
    best = jnp.sort(best, axis=-1)
    cand = order_key(jnp.take_along_axis(blocks, best[..., None], axis=-2)).reshape(
        lead + (k * chunk,))
    values, pos = exact(from_order_key(
        jnp.where(cand >= order_key(top[..., -1:]), cand, LOWEST_KEY)))
  indices = jnp.take_along_axis(best, pos // chunk, axis=-1) * chunk + pos % chunk
  return values, indices.astype(jnp.int32)


# threshold_top_k: bisection steps toward each row's k-th chunk maximum (its floor), and the
# most maxima a row that they read (longer rows fold chunks' maxima together first)
THRESHOLD_STEPS = 10
THRESHOLD_ROW = 1024


def threshold_top_k(x: jax.Array, k: int, offset: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """Exactly lax.top_k(x + offset[..., None, :], k) for float32 rows of at least 4 k chunks of
  COMPACT_WORD entries, ranking about k candidates a row.

  Each row gets a floor: a key that at least k of its chunk maxima (chunks of COMPACT_WORD)
  reach, bisected from the least of k disjoint groups' maxima toward the k-th chunk maximum
  (rows of over THRESHOLD_ROW chunks: over the maxima of up to 32 chunks each, so that a step
  reads about THRESHOLD_ROW keys a row). k entries reach the floor, so every winner does, and
  so does its chunk's maximum. The chunks at or above the floor (compact_mask, in latent order;
  C = 2 k slots), then their entries at or above it (C slots), hold every winner in ascending
  index order, so lax.top_k of the candidates ties to the lower index as lax.top_k of the row
  does. A row with more candidate chunks or entries than slots is ranked whole, as are up to
  max(8, R / 64) rows apart; beyond that every row is ranked by _ranked_top_k (chunk_max_top_k,
  or lax.top_k below N = CHUNK_MAX_MIN_RATIO k), in a loop of 0 or 1 trips whose input takes a
  -inf from the counter (by a maximum), so XLA hoists no [R, N] array out of it. Rows with fewer
  than about k finite entries (a mask of most columns) take that path after the floor's cost:
  the trainers' AuxK ranks only where more columns are dead than that.

  One pass reads x + offset whole (the chunk maxima, behind a barrier: XLA otherwise recomputes
  them in every bisection step); the rest reads [R, N / 16] keys and the candidate chunks. At
  B=4096, k=64 on 2 CPU cores, against chunk_max_top_k: 45 against 88 ms at N=16384, 122
  against 152 ms at N=65536.
  """
  lead, n = x.shape[:-1], x.shape[-1]
  n_chunks = -(-n // COMPACT_WORD)
  if n_chunks < 4 * k:
    raise ValueError(f"threshold_top_k: k={k} needs {4 * k} chunks of {COMPACT_WORD}, "
                     f"N={n} has {n_chunks}")
  capacity = 2 * k
  pad = n_chunks * COMPACT_WORD - n

  def rows(lowest=None):  # x + offset as [R, N]; with lowest (-inf from a counter), max'd in
    if offset is None:
      y = x if lowest is None else jnp.maximum(x, lowest)
    else:
      y = x + jnp.expand_dims(offset if lowest is None else jnp.maximum(offset, lowest), -2)
    return y.reshape(-1, n)

  y = rows()
  b = y.shape[0]
  padded = jnp.pad(y, ((0, 0), (0, pad)), constant_values=-jnp.inf) if pad else y
  keys = lax.optimization_barrier(chunk_max_keys(padded, COMPACT_WORD))  # [R, n_chunks]
  # the floor is bisected over maxima of `fold` chunks (a reduce of at most 32: chunk_max_keys)
  fold = max(1, min(n_chunks // THRESHOLD_ROW, n_chunks // (4 * k), 32))
  coarse = keys
  if fold > 1:
    coarse = jnp.pad(keys, ((0, 0), (0, -n_chunks % fold)), constant_values=LOWEST_KEY)
    coarse = lax.optimization_barrier(jnp.max(coarse.reshape(b, -1, fold), axis=-1))
  m = coarse.shape[1]
  groups = -(-m // k)  # group j: maxima j, j + k, ...; each holds one at least
  spread = jnp.pad(coarse, ((0, 0), (0, groups * k - m)), constant_values=LOWEST_KEY)
  group_max = jnp.max(spread.reshape(b, groups, k), axis=1)
  lo, hi = _row_min(group_max), ~_row_min(~group_max)  # ~key reverses the keys' order
  for _ in range(THRESHOLD_STEPS):  # invariant: at least k of the maxima reach lo
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
    up = jnp.sum(coarse >= mid[:, None], axis=1, dtype=jnp.int32) >= k
    lo, hi = jnp.where(up, mid, lo), jnp.where(up, hi, mid)
  chunks, chunk_count = compact_mask(keys >= lo[:, None], capacity)
  block_keys = order_key(jnp.take_along_axis(padded.reshape(b, n_chunks, COMPACT_WORD),
                                             chunks[..., None], axis=1))  # [R, C, WORD]
  live = (jnp.arange(capacity) < chunk_count[:, None])[..., None]
  pos, count = compact_mask(((block_keys >= lo[:, None, None]) & live).reshape(b, -1), capacity)
  cand = jnp.where(jnp.arange(capacity) < count[:, None],
                   jnp.take_along_axis(block_keys.reshape(b, -1), pos, axis=1), LOWEST_KEY)
  values, at = _fenced_top_k(from_order_key(cand), k)
  indices = jnp.take_along_axis(jnp.take_along_axis(chunks, pos // COMPACT_WORD, axis=1)
                                * COMPACT_WORD + pos % COMPACT_WORD, at, axis=1)
  over = (chunk_count > capacity) | (count > capacity)
  apart = max(8, b // 64)
  over_rows, n_over = compact_mask(over[None], min(apart, b))
  over_rows = jnp.where(jnp.arange(over_rows.shape[1]) < n_over[0], over_rows[0], b)
  top, idx = _fenced_top_k(jnp.take(y, over_rows, axis=0, mode="clip"), k)
  values = values.at[over_rows].set(top, mode="drop")
  indices = indices.at[over_rows].set(idx, mode="drop")

  every_row = lambda i, _: _ranked_top_k(rows(-jnp.inf * (i + 1).astype(_F32)), k)
  values, indices = lax.fori_loop(0, (n_over[0] > apart).astype(jnp.int32), every_row,
                                  (values, indices))
  return values.reshape(lead + (k,)), indices.reshape(lead + (k,))


def _row_min(x: jax.Array) -> jax.Array:
  """[R, M] int32 -> [R]: row minima in reduces of at most 32 entries (see chunk_max_keys)."""
  while x.shape[1] > 32:
    x = jnp.pad(x, ((0, 0), (0, -x.shape[1] % 32)), constant_values=np.iinfo(np.int32).max)
    x = jnp.min(x.reshape(x.shape[0], -1, 32), axis=-1)
  return jnp.min(x, axis=1)


def two_stage_top_k(x: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
  """Per-chunk top-k candidates, then the top k of the candidates: the same result as lax.top_k.

  Exact: an element among a row's k winners (ordered by value, then lower index) has fewer than
  k elements beating it in its own chunk, so it is a candidate. Ties: candidates lie chunk by
  chunk and, within a chunk, equal values by ascending index, so the second lax.top_k (lower
  position wins) prefers the lower original index, as lax.top_k does. Padding is -inf at the
  end of the row, behind every real element in that order.
  """
  n = x.shape[-1]
  if k > chunk:
    raise ValueError(f"two_stage_top_k: k={k} exceeds the chunk {chunk}")
  lead = x.shape[:-1]
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n
  if pad:
    x = jnp.concatenate([x, jnp.full(lead + (pad,), -jnp.inf, x.dtype)], axis=-1)
  cand_v, cand_i = lax.top_k(x.reshape(lead + (n_chunks, chunk)), k)
  cand_i = cand_i + (jnp.arange(n_chunks, dtype=jnp.int32) * chunk)[:, None]
  values, pos = lax.top_k(cand_v.reshape(lead + (n_chunks * k,)), k)
  indices = jnp.take_along_axis(cand_i.reshape(lead + (n_chunks * k,)), pos, axis=-1)
  return values, indices.astype(jnp.int32)


def _window_starts(rows: jax.Array, start: int) -> jax.Array:
  return jnp.stack([rows, jnp.full_like(rows, start)], axis=1)  # [n, 2]: (row, first column)


def _windows(a: jax.Array, rows: jax.Array, start: int, size: int) -> jax.Array:
  """a [N, P, d], rows [n] -> a[rows, start:start + size] [n, size, d] in float32: one gather of
  contiguous (size, d) blocks."""
  dnums = lax.GatherDimensionNumbers(offset_dims=(1, 2), collapsed_slice_dims=(0,),
                                     start_index_map=(0, 1))
  return lax.gather(a, _window_starts(rows, start), dnums, slice_sizes=(1, size, a.shape[2]),
                    mode=lax.GatherScatterMode.CLIP).astype(_F32)


def _clt_rows(w_dec: jax.Array, rows: jax.Array, source: int, n_layers: int) -> jax.Array:
  """[B] latent rows -> [B, L - s, d]: each latent's window of target rows for source s
  (w_dec[f, off(s):off(s) + L - s] is contiguous)."""
  return _windows(w_dec, rows, clt_layout.offset(source, n_layers), n_layers - source)


def _clt_add_rows(acc: jax.Array, rows: jax.Array, upd: jax.Array, source: int, n_layers: int,
                  indices_are_sorted: bool = False) -> jax.Array:
  """acc[rows[b], off(s):off(s) + L - s] += upd[b] ([B, L - s, d]), duplicates accumulating."""
  dnums = lax.ScatterDimensionNumbers(update_window_dims=(1, 2), inserted_window_dims=(0,),
                                      scatter_dims_to_operand_dims=(0, 1))
  return lax.scatter_add(acc, _window_starts(rows, clt_layout.offset(source, n_layers)), upd,
                         dnums, indices_are_sorted=indices_are_sorted,
                         mode=lax.GatherScatterMode.FILL_OR_DROP)


def _check_clt(indices: jax.Array, w_dec_pairs: int) -> int:
  n_layers = indices.shape[0]
  if clt_layout.n_pairs(n_layers) != w_dec_pairs:
    raise ValueError(f"clt: {n_layers} source layers need w_dec [F, {clt_layout.n_pairs(n_layers)}, d] "
                     f"(causal pairs), got {w_dec_pairs} pairs")
  return n_layers


def check_acc(acc: jax.Array, shape: tuple[int, ...]) -> None:
  """A scatter's `acc` must be its float32 output shape (it is updated, not cast or broadcast)."""
  if acc.shape != shape or acc.dtype != _F32:
    raise ValueError(f"acc is {acc.dtype}{list(acc.shape)}; the scatter adds into "
                     f"float32{list(shape)}")


def clt_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array) -> jax.Array:
  """out[b, t] = sum_{s <= t} sum_j values[s, b, j] w_dec[indices[s, b, j], p(s, t)] -> [B, L, d]."""
  n_layers = _check_clt(indices, w_dec.shape[1])
  b, c = indices.shape[1:]
  out = jnp.zeros((b, n_layers, w_dec.shape[2]), _F32)
  u = _unroll(c)
  for s in range(n_layers):
    def body(i, acc, s=s):
      for q in range(u):
        rows = _clt_rows(w_dec, indices[s, :, i * u + q], s, n_layers)
        acc = acc + values[s, :, i * u + q, None, None].astype(_F32) * rows
      return acc
    # zeros after the previous source's sum: one [B, L - s, d] accumulator live at a time
    part = lax.fori_loop(0, c // u, body,
                         zeros_after((b, n_layers - s, w_dec.shape[2]), values[s], out))
    out = out.at[:, s:].add(part)
  return out


# clt_gather_dot's tokens per block: the block's g windows ([256, L - s, d], 5 MB at L - s = 8,
# d = 640) stay in cache across the slots: 1.4x at B = 4096, 8 layers, F = 8192 per layer.
CLT_DOT_TOKENS = 256


def clt_gather_dot(indices: jax.Array, g: jax.Array, w_dec: jax.Array) -> jax.Array:
  """out[s, b, j] = sum_{t >= s} g[b, t] . w_dec[indices[s, b, j], p(s, t)] -> [L, B, C].

  Per slot, the window's products are summed over targets, then over d by column halvings
  (_halving_sum): one fused pass over the gathered window, 1.8x faster than a dot over it.
  Tokens go in blocks of CLT_DOT_TOKENS, each block's slots in turn.
  """
  n_layers = _check_clt(indices, w_dec.shape[1])
  b, c = indices.shape[1:]
  bt = CLT_DOT_TOKENS if b % CLT_DOT_TOKENS == 0 else b
  g = g.astype(_F32)
  out = []
  for s in range(n_layers):
    # Sliced after the previous source's loop, or XLA computes every source's slice at once
    # (18 layers: 0.3x the step's [L, B, F] pre-activations more temporary memory).
    gs = g[:, s:] + zeros_after((b, n_layers - s, g.shape[2]), *out[-1:], g)
    gs, ids = gs.reshape(b // bt, bt, n_layers - s, -1), indices[s].reshape(b // bt, bt, c)

    def block(k, acc, s=s, gs=gs, ids=ids):
      gk, ik = gs[k], ids[k]

      def slot(j, acc):
        rows = _clt_rows(w_dec, ik[:, j], s, n_layers)
        p = gk[:, 0] * rows[:, 0]
        for t in range(1, n_layers - s):
          p = p + gk[:, t] * rows[:, t]
        return lax.dynamic_update_index_in_dim(acc, _halving_sum(p), j, 0)
      return acc.at[k].set(lax.fori_loop(0, c, slot, jnp.zeros((c, bt), _F32)))
    dots = lax.fori_loop(0, b // bt, block, jnp.zeros((b // bt, c, bt), _F32))
    out.append(jnp.swapaxes(dots, 1, 2).reshape(b, c))
  return jnp.stack(out)


def clt_scatter_outer(indices: jax.Array, values: jax.Array, g: jax.Array, num_rows: int,
                      acc: jax.Array | None = None) -> jax.Array:
  """out[n, p(s, t)] = sum_{(b, j): indices[s, b, j] = n} values[s, b, j] g[b, t] -> [F, P, d].

  With `acc` (float32 [F, P, d]) the sums are added to it, in its buffer when the caller no
  longer needs it: two slot sets (a CLT's main and AuxK decodes) share one gradient buffer.
  Each source's pairs go by sorted row pieces as in scatter_outer, each piece summing g's
  [L - s, d] windows: 3.5x faster than the scatter per slot at L=8, B=1024, C=64, F=4096, d=640.
  """
  n_layers, _, c = indices.shape
  shape = (num_rows, clt_layout.n_pairs(n_layers), g.shape[2])
  if acc is not None:
    check_acc(acc, shape)
  g = g.astype(_F32)
  out = zeros_after(shape, g) if acc is None else acc
  adds = [functools.partial(_clt_add_rows, source=s, n_layers=n_layers, indices_are_sorted=True)
          for s in range(n_layers)]
  # g's windows gathered per piece, not sliced per source (XLA would keep every slice alive)
  takes = [functools.partial(_windows, g, start=s, size=n_layers - s) for s in range(n_layers)]
  sums = _sorted_scatter(indices, values, takes, clt_layout.n_pairs(n_layers) * g.shape[2],
                         num_rows, out, adds)
  if sums is not None:
    return sums
  for s in range(n_layers):
    def body(j, acc, s=s):
      upd = values[s, :, j, None, None].astype(_F32) * g[:, s:]
      return _clt_add_rows(acc, indices[s, :, j], upd, s, n_layers)
    out = lax.fori_loop(0, c, body, out)
  return out
