"""Selectors over the seam's top_k: TopK, BatchTopK, JumpReLU (with window), ReLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from allscope import kernels

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


def test_threshold_selection_over_capacity_ranks_every_row_and_only_then(rng):
  """Rows within capacity keep their entries in latent order; where any row keeps more, every
  row's `capacity` largest kept entries, as lax.top_k ranks them. The ranking (a top_k in a loop
  of 0 or 1 trips) stays in its loop: XLA does not hoist it to run every step."""
  pre = jnp.asarray(rng.standard_normal((B, F)), jnp.float32)
  thr = jnp.asarray(rng.uniform(0.5, 1.5, F), jnp.float32)
  keep = pre > thr
  over = int(np.asarray(keep).sum(1).max()) - 1
  sel = jax.jit(lambda p: kernels.jumprelu(p, thr, over))(pre)
  top, idx = jax.lax.top_k(jnp.where(keep, pre, -jnp.inf), over)
  np.testing.assert_array_equal(sel.active, top > -jnp.inf)
  np.testing.assert_array_equal(np.where(sel.active, sel.indices, -1), np.where(sel.active, idx, -1))
  np.testing.assert_array_equal(sel.values, np.where(sel.active, top, 0))
  fits = kernels.jumprelu(pre, thr, over + 1)
  for row, i, a in zip(np.asarray(keep), np.asarray(fits.indices), np.asarray(fits.active)):
    np.testing.assert_array_equal(i[a], np.flatnonzero(row))
  hlo = jax.jit(lambda p: kernels.jumprelu(p, thr, over)).lower(pre).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  assert "TopK" in hlo and "TopK" not in entry and " sort(" not in entry


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
  rows = [dict(zip(i[u].tolist(), v[u].tolist()))
          for i, v, u in zip(np.asarray(idx), np.asarray(pre)[np.arange(len(pre))[:, None], idx], used)]
  kept = ((np.asarray(pre) >= thr) & (np.asarray(pre) > 0)).sum(1)
  return rows, thr, int(np.maximum(kept - capacity, 0).sum())


def test_batchtopk_on_cpu_is_the_ranked_form(rng):
  """The CPU candidates (the entries at or above a floor, compacted; where some row holds more
  than its capacity of them, the top `capacity` of the floor-masked rows; where those hold fewer
  than n, of whole rows) give the ranked form's threshold, selection and overflow: on random
  rows (compacted), tied rows and a tight capacity (over capacity), and where a few rows hold
  the batch's top entries beyond their capacity (the floor is above the capped threshold: the
  whole rows); with an offset, the same as on pre + offset."""
  b, f = 64, 512
  normal = rng.standard_normal((b, f))
  tied = rng.integers(-2, 3, (b, f)).astype(np.float64)
  loud = normal + np.where(np.arange(b)[:, None] < 4, 50.0, 0.0)  # 4 rows far above the rest
  offset = rng.standard_normal(f).astype(np.float32)
  for x, k, capacity in ((normal, 8, 32), (tied, 8, 32), (normal, 8, 8), (loud, 8, 16),
                         (loud, 4, 4)):
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
