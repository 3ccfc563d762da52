"""Selectors over the seam's top_k: TopK, BatchTopK, JumpReLU (with window), ReLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from allscope import kernels
from allscope.kernels import selection

B, F, C = 32, 96, 6


def test_topk_selection_and_ties(rng):
  pre = jnp.asarray(rng.standard_normal((B, F)), jnp.float32)
  sel = kernels.topk(pre, C)
  want = np.sort(np.asarray(pre), axis=1)[:, ::-1][:, :C]
  assert np.array_equal(np.asarray(sel.values), want)
  assert sel.indices.dtype == jnp.int32
  assert int(sel.overflow) == 0 and bool(np.all(sel.active))
  g = jnp.asarray(rng.standard_normal((B, C)), jnp.float32)
  dpre = jax.vjp(lambda p: kernels.topk(p, C).values, pre)[1](g)[0]
  ref = np.zeros((B, F))
  np.put_along_axis(ref, np.asarray(sel.indices), np.asarray(g), axis=1)
  assert np.array_equal(np.asarray(dpre), ref)
  tied = jnp.asarray(rng.integers(0, 3, (B, F)), jnp.float32)  # ties go to the lower index
  np.testing.assert_array_equal(np.asarray(kernels.topk(tied, C).indices),
                                np.argsort(-np.asarray(tied), axis=1, kind="stable")[:, :C])


def test_jumprelu_selection_keeps_window_and_counts_overflow(rng):
  pre = jnp.asarray(rng.standard_normal((B, F)), jnp.float32)
  thr = jnp.asarray(rng.uniform(1.0, 2.0, F), jnp.float32)
  window = 0.4
  keep = np.asarray(pre) > np.asarray(thr) - window / 2
  sel = kernels.jumprelu(pre, thr, F, window)
  got = np.zeros((B, F), bool)
  rows = np.broadcast_to(np.arange(B)[:, None], sel.indices.shape)
  np.logical_or.at(got, (rows, np.asarray(sel.indices)), np.asarray(sel.active))
  assert np.array_equal(got, keep) and int(sel.overflow) == 0
  assert np.all(np.asarray(sel.values)[~np.asarray(sel.active)] == 0)
  small = kernels.jumprelu(pre, thr, 2, window)
  assert int(small.overflow) == int(np.maximum(keep.sum(1) - 2, 0).sum()) > 0


def test_threshold_selection_ranks_only_the_rows_over_capacity(rng):
  """Rows within capacity keep their entries in latent order; a row that keeps more, its
  `capacity` largest kept entries as lax.top_k ranks them; where more rows than _over_rows
  overflow, every row is ranked. That every-row top_k (in a loop of 0 or 1 trips) stays in its
  loop: XLA does not hoist it to run every step."""
  pre = jnp.asarray(rng.standard_normal((B, F)), jnp.float32)
  thr = jnp.asarray(rng.uniform(0.5, 1.5, F), jnp.float32)
  keep = pre > thr
  counts = np.asarray(keep).sum(1)
  top, idx = jax.lax.top_k(jnp.where(keep, pre, -jnp.inf), F)
  select = jax.jit(lambda p, c: kernels.jumprelu(p, thr, c), static_argnums=1)
  for capacity in (int(np.sort(counts)[-3]), 2):  # at most 2 rows over; every row over
    sel = select(pre, capacity)
    every = (counts > capacity).sum() > selection._over_rows(B)
    assert every == (capacity == 2)
    for r, row in enumerate(np.asarray(keep)):
      active = np.asarray(sel.active[r])
      if counts[r] > capacity or every:
        want = np.asarray(idx[r, :capacity])[np.asarray(top[r, :capacity]) > -np.inf]
        np.testing.assert_array_equal(np.asarray(sel.indices[r])[active], want)
      else:
        np.testing.assert_array_equal(np.asarray(sel.indices[r])[active], np.flatnonzero(row))
      np.testing.assert_array_equal(np.asarray(sel.values[r]),
                                    np.where(active, np.asarray(pre[r])[sel.indices[r]], 0))
    assert int(sel.overflow) == int(np.maximum(counts - capacity, 0).sum())
  hlo = select.lower(pre, 2).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  every_row = f"f32[{B},2]{{1,0}}, s32[{B},2]{{1,0}}) custom-call"  # the top_k of all B rows
  assert every_row in hlo and every_row not in entry and " sort(" not in entry


def test_batchtopk_selection_matches_global_threshold(rng):
  pre = jnp.asarray(rng.standard_normal((B, F)), jnp.float32)
  k = 4
  sel, thr = kernels.batchtopk(pre, k, capacity=F)
  relu = np.maximum(np.asarray(pre), 0)
  want_thr = np.sort(relu.ravel())[::-1][k * B - 1]
  assert float(thr) == want_thr
  assert int(np.asarray(sel.active).sum()) == k * B
  assert np.allclose(np.sort(np.asarray(sel.values)[np.asarray(sel.active)]),
                     np.sort(relu[relu >= want_thr]))
  # With rows capped below their share, the threshold comes from the capped candidates and
  # every winner beyond a row's capacity is counted as overflow.
  capped, capped_thr = kernels.batchtopk(pre, k, capacity=k)
  per_row = (relu >= float(capped_thr)).sum(1)
  assert float(capped_thr) <= want_thr
  assert int(capped.overflow) == int(np.maximum(per_row - k, 0).sum()) > 0
  assert np.array_equal(np.asarray(capped.active).sum(1), np.minimum(per_row, k))


def test_relu_selection(rng):
  pre = jnp.asarray(rng.standard_normal((B, F)), jnp.float32)
  sel = kernels.relu(pre, F)
  assert int(np.asarray(sel.active).sum()) == int((np.asarray(pre) > 0).sum())


def test_row_count_in_chunks_matches_a_dense_count(rng):
  x = jnp.asarray(rng.standard_normal((5, 4096)), jnp.float32)
  off = jnp.asarray(rng.standard_normal(4096), jnp.float32)
  for chunk in (512, 1024, 3000):  # 3000 does not divide 4096: the one-pass fallback
    np.testing.assert_array_equal(kernels.row_count(x, lambda v: v > 0.5, chunk=chunk),
                                  (np.asarray(x) > 0.5).sum(-1))
    np.testing.assert_array_equal(kernels.row_count(x, lambda v: v > 0, off, chunk=chunk),
                                  (np.asarray(x) + np.asarray(off) > 0).sum(-1))


def _plain_batchtopk(pre, k, capacity):
  """BatchTopK ranked, without the CPU floor: each row's top `capacity`, the n-th largest of all;
  the selection per row as {latent: value} and the overflow."""
  top, idx = jax.lax.top_k(jnp.maximum(pre, 0.0), capacity)
  n = min(k * pre.shape[0], top.size)
  thr = float(jnp.sort(top.reshape(-1))[top.size - n])
  used = np.asarray((top >= thr) & (top > 0))
  at = np.take_along_axis(np.asarray(pre), np.asarray(idx), axis=1)
  rows = [dict(zip(i[u].tolist(), v[u].tolist())) for i, v, u in zip(np.asarray(idx), at, used)]
  kept = ((np.asarray(pre) >= thr) & (np.asarray(pre) > 0)).sum(1)
  return rows, thr, int(np.maximum(kept - capacity, 0).sum())


def test_batchtopk_on_cpu_is_the_ranked_form(rng):
  """The CPU candidates (the entries at or above a floor, compacted; the top `capacity` of the
  few rows holding more; where more rows do, or fewer than n candidates remain at or above the
  floor, the top `capacity` of the floor-masked rows, else of whole rows) give the ranked form's
  threshold, selection and overflow: on random rows (compacted), 4 louder rows (ranked apart),
  tied rows and a tight capacity (every row over), and 4 rows holding the batch's top entries
  beyond their capacity (whole rows); with an offset, the same as on pre + offset."""
  b, f = 64, 512
  normal = rng.standard_normal((b, f))
  tied = rng.integers(-2, 3, (b, f)).astype(np.float64)
  loud = normal + np.where(np.arange(b)[:, None] < 4, 50.0, 0.0)  # 4 rows far above the rest
  louder = normal + np.where(np.arange(b)[:, None] % 16 == 3, 2.0, 0.0)  # 4 rows over capacity
  offset = rng.standard_normal(f).astype(np.float32)
  for x, k, capacity in ((normal, 8, 32), (louder, 8, 32), (tied, 8, 32), (normal, 8, 8),
                         (loud, 8, 16), (loud, 4, 4)):
    pre = jnp.asarray(x, jnp.float32)
    for shift in (None, jnp.asarray(offset)):
      sel, thr = kernels.batchtopk(pre, k, capacity, offset=shift)
      want, want_thr, want_overflow = _plain_batchtopk(pre if shift is None else pre + shift, k,
                                                       capacity)
      assert float(thr) == want_thr and int(sel.overflow) == want_overflow
      active = np.asarray(sel.active)
      got = [dict(zip(i[a].tolist(), v[a].tolist())) for i, v, a in
             zip(np.asarray(sel.indices), np.asarray(sel.values), active)]
      assert got == want
      assert np.all(np.asarray(sel.values)[~active] == 0)


def test_selectors_lower_for_cuda_on_the_pallas_seam():
  """The compacting selectors trace and lower for a GPU at the trainers' shapes (the encoder
  product and its bias): the rows over capacity and the every-row fallback rank with Pallas's
  top_k (Triton), the rest is XLA."""
  ops = kernels.resolve("pallas", backend="cuda")
  shapes = (jax.ShapeDtypeStruct((4096, 16384), jnp.float32),
            jax.ShapeDtypeStruct((16384,), jnp.float32))
  for select in (lambda p, b: kernels.jumprelu(p, jnp.zeros(()), 384, 0.1, ops, offset=b),
                 lambda p, b: kernels.relu(p, 256, ops, offset=b),
                 lambda p, b: kernels.batchtopk(p, 64, 256, ops, offset=b)):
    hlo = jax.jit(select).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in hlo
