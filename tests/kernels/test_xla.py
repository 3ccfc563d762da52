"""The XLA seam primitives against float64 numpy, forward and VJP, with duplicates, empty slots
and ragged capacity; top_k (plain and two-stage) against lax.top_k, ties included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allscope.kernels import clt_layout, xla
from tests.kernels import _pallas_refs as ref
from tests.kernels.conftest import ragged_values, rel, sparse_indices

B, C, N, D = 24, 7, 40, 12
TOL = 1e-5


def np_gather_decode(idx, v, table):
  return np.einsum("bc,bcd->bd", v.astype(np.float64), table.astype(np.float64)[idx])


def np_scatter_outer(idx, v, src, n):
  out = np.zeros((n, src.shape[1]))
  np.add.at(out, idx.reshape(-1), (v[:, :, None].astype(np.float64) * src[:, None, :]).reshape(-1, src.shape[1]))
  return out


def np_clt_decode(idx, v, w_dec):
  n_layers = idx.shape[0]
  out = np.zeros((idx.shape[1], n_layers, w_dec.shape[2]))
  p = clt_layout.pair_index(n_layers)
  for s in range(n_layers):
    for t in range(s, n_layers):
      out[:, t] += np.einsum("bc,bcd->bd", v[s].astype(np.float64), w_dec[:, p[s, t]].astype(np.float64)[idx[s]])
  return out


def _inputs(rng, dtype=np.float32):
  idx = sparse_indices(rng, B, C, N)
  v = ragged_values(rng, B, C)
  table = rng.standard_normal((N, D)).astype(np.float32)
  return idx, jnp.asarray(v, dtype), jnp.asarray(table, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_decode(rng, dtype):
  idx, v, table = _inputs(rng, dtype)
  got = xla.gather_decode(jnp.asarray(idx), v, table)
  assert got.dtype == jnp.float32 and got.shape == (B, D)
  want = np_gather_decode(idx, np.asarray(v, np.float64), np.asarray(table, np.float64))
  assert rel(got, want) <= TOL


def test_gather_dot_and_scatter_outer_are_the_vjp_of_gather_decode(rng):
  idx, v, table = _inputs(rng)
  g = rng.standard_normal((B, D)).astype(np.float32)
  want_dv = np.einsum("bd,bcd->bc", g.astype(np.float64), np.asarray(table, np.float64)[idx])
  want_dt = np_scatter_outer(idx, np.asarray(v), g, N)
  assert rel(xla.gather_dot(jnp.asarray(idx), jnp.asarray(g), table), want_dv) <= TOL
  assert rel(xla.scatter_outer(jnp.asarray(idx), v, jnp.asarray(g), N), want_dt) <= TOL
  # and jax.vjp of the forward (autodiff through the loop) agrees with them
  _, vjp = jax.vjp(lambda v, t: xla.gather_decode(jnp.asarray(idx), v, t), v, table)
  dv, dt = vjp(jnp.asarray(g))
  assert rel(dv, want_dv) <= TOL and rel(dt, want_dt) <= TOL


@pytest.mark.parametrize("d", [1, 5, 8, 37, 640])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_dot_any_width(rng, d, dtype):
  """The column-halving row dot at widths with odd halvings (37 -> 18 + 1 -> 9 -> 4 + 1),
  none (<= 8) and Gemma's 640, under the trainers' vmap over dictionaries."""
  idx = np.stack([sparse_indices(rng, B, C, N) for _ in range(2)])
  g = rng.standard_normal((2, B, d)).astype(np.float32)
  table = jnp.asarray(rng.standard_normal((2, N, d)), dtype)
  want = np.einsum("gbd,gbcd->gbc", g, np.stack([np.asarray(t, np.float64)[i]
                                                 for t, i in zip(table, idx)]))
  got = jax.jit(jax.vmap(xla.gather_dot))(jnp.asarray(idx), jnp.asarray(g), table)
  assert got.dtype == jnp.float32 and got.shape == (2, B, C)
  assert rel(got, want) <= TOL


@pytest.mark.parametrize("b,c,n,d", [
    (24, 7, 40, 12),  # packed (row, pair) sort keys, pieces of 4
    (300, 5, 7, 3),  # a few rows with many pieces of 16 each
    (16, 3, 1000, 5),  # more rows than pairs: most rows empty
    (64, 128, 1 << 20, 2),  # rows and pairs need 33 bits: 2 groups of 64 slots
    (64, 100, 1 << 20, 2),  # 2 groups of 64 slots, the last padded
    (4096, 2, 1 << 21, 2),  # rows alone leave under 12 bits for pairs: the scatter per slot
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scatter_outer_by_sorted_pieces(rng, monkeypatch, b, c, n, d, dtype):
  """scatter_outer sums each row's pairs in pieces after sorting them: any rows per pair,
  duplicates, empty slots, both sort paths, under the trainers' vmap over dictionaries."""
  monkeypatch.setattr(xla, "PIECES_MIN_PRODUCTS", 0)  # the sorted pieces at these small shapes
  idx = np.stack([sparse_indices(rng, b, c, n) for _ in range(2)])
  v = np.stack([ragged_values(rng, b, c) for _ in range(2)])
  src = rng.standard_normal((2, b, d)).astype(np.float32)
  v_in, src_in = jnp.asarray(v, dtype), jnp.asarray(src, dtype)
  got = jax.jit(jax.vmap(xla.scatter_outer, in_axes=(0, 0, 0, None)), static_argnums=3)(
      jnp.asarray(idx), v_in, src_in, n)
  assert got.dtype == jnp.float32 and got.shape == (2, n, d)
  for g in range(2):
    want = np_scatter_outer(idx[g], np.asarray(v_in[g], np.float64), np.asarray(src_in[g]), n)
    assert rel(got[g], want) <= TOL


def test_row_pieces_packed_keys_equal_the_payload_sort(rng):
  """Both sort paths of scatter_outer's grouping give the same pieces, in row order."""
  idx = jnp.asarray(sparse_indices(rng, 50, 9, 30))
  packed = xla._row_pieces(idx, 30, 4)
  payload = xla._row_pieces(idx, 30, 4, pack=False)
  for a, b in zip(packed, payload):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  pairs, rows = map(np.asarray, packed)
  used = rows < 30
  assert np.all(np.diff(rows) >= 0) and used.sum() <= pairs.shape[0]
  flat = np.asarray(idx).reshape(-1)
  # every pair exactly once, in a piece of its own row
  assert sorted(pairs[pairs < flat.size].tolist()) == list(range(flat.size))
  assert np.all(flat[pairs[used][pairs[used] < flat.size]] ==
                np.repeat(rows[used], (pairs[used] < flat.size).sum(axis=1)))


def test_scatter_outer_many_duplicates(rng):
  idx = rng.integers(0, 3, (B, C)).astype(np.int32)  # every row hits the same 3 rows
  v = ragged_values(rng, B, C)
  src = rng.standard_normal((B, D)).astype(np.float32)
  got = xla.scatter_outer(jnp.asarray(idx), jnp.asarray(v), jnp.asarray(src), N)
  assert rel(got, np_scatter_outer(idx, v, src, N)) <= TOL
  assert not np.any(np.asarray(got)[3:])


@pytest.mark.parametrize("n_layers", [1, 3, 5])
def test_clt_primitives_match_numpy_and_masked_dense(rng, monkeypatch, n_layers):
  f, d = 16, 6
  p = clt_layout.n_pairs(n_layers)
  idx = np.stack([sparse_indices(rng, B, C, f) for _ in range(n_layers)])
  v = np.stack([ragged_values(rng, B, C) for _ in range(n_layers)])
  w = rng.standard_normal((f, p, d)).astype(np.float32)
  g = rng.standard_normal((B, n_layers, d)).astype(np.float32)
  ji, jv, jw, jg = map(jnp.asarray, (idx, v, w, g))
  want = np_clt_decode(idx, v, w)
  assert rel(xla.clt_decode(ji, jv, jw), want) <= TOL
  # VJP: d values and d w_dec by float64 autodiff-free formulas over the dense masked layout
  dense = np.zeros((n_layers, f, n_layers, d))
  pi = clt_layout.pair_index(n_layers)
  for s in range(n_layers):
    for t in range(s, n_layers):
      dense[s, :, t] = w[:, pi[s, t]]
  want_dv = np.stack([np.einsum("btd,bctd->bc", g[:, :], dense[s][idx[s]]) for s in range(n_layers)])
  want_dw_dense = np.zeros_like(dense)
  for s in range(n_layers):
    np.add.at(want_dw_dense[s], idx[s].reshape(-1),
              (v[s][:, :, None, None] * g[:, None]).reshape(-1, n_layers, d))
  want_dw = np.concatenate([want_dw_dense[s][:, s:] for s in range(n_layers)], axis=1)
  assert rel(xla.clt_gather_dot(ji, jg, jw), want_dv) <= TOL
  monkeypatch.setattr(xla, "CLT_DOT_TOKENS", 8)  # the gather-dot in 3 blocks of 8 tokens
  assert rel(xla.clt_gather_dot(ji, jg, jw), want_dv) <= TOL
  assert rel(xla.clt_scatter_outer(ji, jv, jg, f), want_dw) <= TOL
  np.testing.assert_array_equal(clt_layout.from_dense(dense), w)
  for s in range(n_layers):
    np.testing.assert_array_equal(clt_layout.to_dense(w, s), dense[s])


@pytest.mark.parametrize("b,c,f,n_layers", [
    (24, 7, 16, 3),  # pieces of 8 (about the mean pairs per latent)
    (300, 5, 7, 2),  # a few latents with many pieces each
    (16, 3, 1000, 3),  # most latents empty
    (64, 100, 1 << 20, 2),  # latents and pairs need 33 bits: 2 groups of 64 slots, padded
])
def test_clt_scatter_outer_by_sorted_pieces(rng, monkeypatch, b, c, f, n_layers):
  """clt_scatter_outer sums each latent's pairs in pieces of g's [L - s, d] windows, per source,
  as scatter_outer does: duplicates, empty slots, both slot-group cases; with `acc`."""
  monkeypatch.setattr(xla, "PIECES_MIN_PRODUCTS", 0)
  d = 3
  idx = np.stack([sparse_indices(rng, b, c, f) for _ in range(n_layers)])
  v = np.stack([ragged_values(rng, b, c) for _ in range(n_layers)])
  g = rng.standard_normal((b, n_layers, d)).astype(np.float32)
  got = jax.jit(xla.clt_scatter_outer, static_argnums=3)(*map(jnp.asarray, (idx, v, g)), f)
  assert got.dtype == jnp.float32 and got.shape == (f, clt_layout.n_pairs(n_layers), d)
  want = ref.clt_scatter_outer(idx, v, g, f)
  assert rel(got, want) <= TOL
  acc = rng.standard_normal(want.shape).astype(np.float32)
  got = jax.jit(xla.clt_scatter_outer, static_argnums=3)(*map(jnp.asarray, (idx, v, g)), f,
                                                         jnp.asarray(acc))
  assert rel(got, acc + want) <= TOL


def test_clt_layout_pairs():
  n = 4
  pi = clt_layout.pair_index(n)
  flat = [(s, t) for s in range(n) for t in range(s, n)]
  assert [pi[s, t] for s, t in flat] == list(range(clt_layout.n_pairs(n)))
  assert list(clt_layout.pair_source(n)) == [s for s, _ in flat]
  assert list(clt_layout.pair_target(n)) == [t for _, t in flat]
  assert clt_layout.n_layers_of(10) == 4
  with pytest.raises(ValueError, match="L \\(L \\+ 1\\) / 2"):
    clt_layout.n_layers_of(11)


def _tied_rows(rng, b, n):
  """Rows with many ties: a few distinct values (and -inf) over long rows."""
  levels = np.array([-np.inf, -1.0, 0.0, 0.5, 2.0, 3.0], np.float32)
  return levels[rng.integers(0, len(levels), (b, n))]


@pytest.mark.parametrize("two_stage,n,k,chunk", [
    (xla.two_stage_top_k, 1000, 17, 64), (xla.two_stage_top_k, 4096, 64, 256),
    (xla.two_stage_top_k, 300, 300, 512), (xla.two_stage_top_k, 513, 8, 8),
    (xla.chunk_max_top_k, 1000, 17, 16), (xla.chunk_max_top_k, 4096, 64, 16),
    (xla.chunk_max_top_k, 513, 8, 8), (xla.chunk_max_top_k, 256, 32, 8)])
def test_two_stage_top_k_equals_lax_top_k_with_ties(rng, two_stage, n, k, chunk):
  normal = rng.standard_normal((16, n)).astype(np.float32)
  # sorted rows put the winners in few chunks, all at one end
  for x in (_tied_rows(rng, 16, n), normal, np.sort(normal), -np.sort(normal)):
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
    got_v, got_i = two_stage(jnp.asarray(x), k, chunk)
    assert got_i.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunk_max_top_k_total_order(rng, dtype):
  """Signed zeros, infinities and ties rank as in lax.top_k (-0.0 below +0.0), in float32 (the
  maxima over int32 order keys) and bfloat16 (a plain max)."""
  levels = np.array([-np.inf, -1.0, -0.0, 0.0, 0.5, np.inf], np.float32)
  for x in (levels[rng.integers(0, len(levels), (16, 1000))], rng.standard_normal((16, 1000))):
    x = jnp.asarray(x, dtype)
    want_v, want_i = jax.lax.top_k(x, 17)
    got_v, got_i = xla.chunk_max_top_k(x, 17, 16)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.signbit(np.asarray(got_v, np.float32)),
                                  np.signbit(np.asarray(want_v, np.float32)))


def test_chunk_max_top_k_reads_its_input_once():
  """The chunk maxima fuse x's producer: top_k(product + bias) never writes the [B, N] sum out
  (the trainers' encoder bias pass); only the small candidate arrays are temporaries."""
  b, n = 512, 4096
  f = jax.jit(jax.vmap(lambda p, bias: xla.chunk_max_top_k(p + bias, 16, 16)))
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  temp = f.lower(shape(2, b, n), shape(2, n)).compile().memory_analysis().temp_size_in_bytes
  assert temp < b * n * 4, temp


def test_top_k_stays_a_top_k_under_a_static_slice_of_its_indices():
  """A caller slicing the indices statically (a CLT's indices[s]) still gets XLA:CPU's TopK
  call, not a sort of whole rows."""
  f = jax.jit(lambda x: xla.top_k(x, 8)[1][1] * 2)
  hlo = f.lower(jax.ShapeDtypeStruct((4, 64, 256), jnp.float32)).compile().as_text()
  assert 'custom_call_target="TopK"' in hlo and " sort(" not in hlo


def test_only_where_updates_only_where_asked_and_keeps_the_update_in_its_loop(rng):
  """only_where(use, update, acc, idx) is update(acc, idx) or acc; XLA does not hoist the
  update's work on idx (here a sort) out of its loop, where it would run when use is False."""
  idx = jnp.asarray(sparse_indices(rng, 64, 32, 1000))
  acc = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  update = lambda a, i: a + jnp.sort(i, axis=-1).astype(jnp.float32)
  f = jax.jit(lambda use, a, i: xla.only_where(use, update, a, i))
  np.testing.assert_array_equal(f(True, acc, idx), update(acc, idx))
  np.testing.assert_array_equal(f(False, acc, idx), acc)
  hlo = f.lower(True, acc, idx).compile().as_text()
  assert " sort(" in hlo and " sort(" not in hlo[hlo.index("\nENTRY"):]


@pytest.mark.parametrize("b, n, capacity", [(6, 96, 6), (5, 1000, 40), (4, 33, 33),
                                             (3, 16384 + 7, 384), (2, 20, 30)])
def test_compact_mask_lists_each_rows_kept_positions_in_order(rng, b, n, capacity):
  """compact_mask(keep, C): row b's first C True positions, ascending, then min(j, N - 1) in
  unused slot j, and each row's count; rows sparse, dense (over capacity), empty and full, widths
  that neither COMPACT_WORD nor COMPACT_GROUP divide, more slots than entries."""
  density = np.array([0.02, 0.3, 0.0, 1.0, 0.005, 0.1])[np.arange(b) % 6, None]
  keep = rng.random((b, n)) < density
  indices, counts = jax.jit(xla.compact_mask, static_argnums=1)(jnp.asarray(keep), capacity)
  np.testing.assert_array_equal(counts, keep.sum(1))
  for row, idx in zip(keep, np.asarray(indices)):
    kept = np.flatnonzero(row)[:capacity]
    unused = np.minimum(np.arange(len(kept), capacity), n - 1)
    np.testing.assert_array_equal(idx, np.concatenate([kept, unused]))


def test_chunk_max_top_k_needs_k_chunks():
  with pytest.raises(ValueError, match="exceeds"):
    xla.chunk_max_top_k(jnp.zeros((2, 64)), 9, 8)


@pytest.mark.parametrize("rows", [1, 7, 24, 64])
@pytest.mark.parametrize("columns", [(3, 40), (xla.COLUMN_FOLD_MIN_WIDTH,)])
def test_column_max_is_the_max_over_rows_of_the_shifted_entries(rng, rows, columns):
  """Bitwise (x + offset - shift[:, None]).max(axis=0) in float32, summed in that order (a row's
  own cut-off gives exactly 0), folded (wide rows) or not, for row counts the fold does and does
  not divide, with -inf and ties, over one or more column axes; bfloat16 without a shift."""
  x = rng.standard_normal((rows,) + columns).astype(np.float32)
  x[rng.random(x.shape) < 0.2] = -np.inf
  x.reshape(rows, -1)[:, :5] = 1.5  # a tie in every row
  offset = rng.standard_normal(columns).astype(np.float32)
  shift = (x + offset).reshape(rows, -1)[:, 2]  # a (finite) entry of its own row: 0 there
  want = (x + offset - shift.reshape((rows,) + (1,) * len(columns))).max(axis=0)
  f = jax.jit(xla.column_max)
  np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x), jnp.asarray(offset),
                                             jnp.asarray(shift))), want)
  x16 = jnp.asarray(x, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(f(x16), np.float32),
                                np.asarray(x16, np.float32).max(axis=0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nth_largest_is_the_sorted_rows_entry(rng, dtype):
  """Equal to jnp.sort(x)[..., -n] on random and tied rows (infinities, signed zeros), any n;
  rows sorted, and rows long enough for the bisection over the keys' bits."""
  levels = np.array([-np.inf, -1.0, -0.0, 0.0, 0.5, np.inf], np.float32)
  for shape in ((3, 16, 300), (2, xla.NTH_BISECT_MIN_ROW + 3)):
    width = shape[-1]
    for x in (levels[rng.integers(0, len(levels), shape)],
              rng.standard_normal(shape).astype(np.float32)):
      x = jnp.asarray(x, dtype)
      for n in (1, 17, width // 2, width):
        np.testing.assert_array_equal(np.asarray(xla.nth_largest(x, n), np.float32),
                                      np.asarray(jnp.sort(x, axis=-1)[..., width - n], np.float32))
  with pytest.raises(ValueError, match="n=301"):
    xla.nth_largest(jnp.zeros((2, 300)), 301)


def test_top_k_is_lax_top_k(rng):
  x = jnp.asarray(_tied_rows(rng, 8, 20000))
  for k in (1, 64):
    got, want = xla.top_k(x, k), jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


@pytest.mark.parametrize("k", [1, 17, 64])
def test_threshold_top_k_is_lax_top_k_on_every_path(rng, k):
  """Bitwise lax.top_k(x + offset, k): rows that fit their candidate slots; a few tied rows
  (more candidates than slots) ranked apart; too many tied rows, every row ranked whole;
  rows with their winners in the last chunks, with -inf entries, with fewer finite entries than
  k, widths COMPACT_WORD does not divide, rows long enough to bisect over folded maxima, and
  leading axes with one offset row each."""
  n = 64 * 64 + 7
  normal = rng.standard_normal((200, n)).astype(np.float32)
  normal[:, rng.integers(0, n, 40)] = -np.inf
  few_tied = np.concatenate([_tied_rows(rng, 3, n), normal])  # 3 rows apart (of up to 8)
  many_tied = np.concatenate([_tied_rows(rng, 12, n), normal[:20]])  # 12 rows: every row
  wide = rng.standard_normal((8, 3 * 16 * xla.THRESHOLD_ROW + 5)).astype(np.float32)  # fold 3
  masked = np.where(rng.random((16, n)) < 0.995, -np.inf, normal[:16])  # ~20 finite: -inf floors
  for x in (normal, few_tied, many_tied, np.sort(normal[:16]), normal.reshape(2, 100, n), wide,
            masked):
    offset = rng.standard_normal(x.shape[:-2] + x.shape[-1:]).astype(np.float32)
    for off in (None, offset):
      want_v, want_i = jax.lax.top_k(jnp.asarray(x if off is None else x + off[..., None, :]), k)
      got_v, got_i = jax.jit(xla.threshold_top_k, static_argnums=1)(
          jnp.asarray(x), k, None if off is None else jnp.asarray(off))
      np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
      np.testing.assert_array_equal(np.asarray(got_v).view(np.int32),
                                    np.asarray(want_v).view(np.int32))
  with pytest.raises(ValueError, match="k=65 needs 260 chunks"):
    xla.threshold_top_k(jnp.zeros((2, n)), 65)


def test_top_k_on_cpu_reads_its_input_once():
  """top_k(product, k, bias) at the trainers' proportions never writes the [B, N] sum out: each
  pass over it (the chunk maxima, the candidate chunks) adds the bias as it reads."""
  b, n = 512, 8192
  f = jax.jit(lambda p, bias: xla.top_k(p, 64, bias))
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  compiled = f.lower(shape(b, n), shape(n)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < b * n * 4 / 2


def test_scatter_outer_adds_into_acc(rng):
  """With `acc`, the scatter adds its sums to acc (AuxK's slots into the main gradient)."""
  idx, v = sparse_indices(rng, B, C, N), ragged_values(rng, B, C)
  src = rng.standard_normal((B, D)).astype(np.float32)
  acc = rng.standard_normal((N, D)).astype(np.float32)
  out = jax.jit(xla.scatter_outer, static_argnums=3)(*map(jnp.asarray, (idx, v, src)), N,
                                                     jnp.asarray(acc))
  assert rel(out, acc + np_scatter_outer(idx, v, src, N)) <= TOL
  with pytest.raises(ValueError, match=r"acc is float32\[%d, %d\]" % (N, D - 1)):
    xla.scatter_outer(*map(jnp.asarray, (idx, v, src)), N, jnp.asarray(acc[:, 1:]))


def test_clt_scatter_outer_adds_into_acc(rng):
  """With `acc`, the scatter adds its sums to acc (a second slot set into the same gradient)."""
  n_layers, f, d = 3, 16, 6
  idx = np.stack([sparse_indices(rng, B, C, f) for _ in range(n_layers)])
  v = np.stack([ragged_values(rng, B, C) for _ in range(n_layers)])
  g = rng.standard_normal((B, n_layers, d)).astype(np.float32)
  acc = rng.standard_normal((f, clt_layout.n_pairs(n_layers), d)).astype(np.float32)
  out = jax.jit(xla.clt_scatter_outer, static_argnums=3)(*map(jnp.asarray, (idx, v, g)), f,
                                                         jnp.asarray(acc))
  want = acc + np.asarray(xla.clt_scatter_outer(*map(jnp.asarray, (idx, v, g)), f), np.float64)
  assert rel(out, want) <= TOL
  with pytest.raises(ValueError, match=r"acc is float32\[16, 5, 6\].*float32\[16, 6, 6\]"):
    xla.clt_scatter_outer(*map(jnp.asarray, (idx, v, g)), f, jnp.asarray(acc[:, :5]))
