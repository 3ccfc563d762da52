"""Each kernel against its dense reference, forward and VJP, on fresh random inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allscope import kernels

B, C, F, D = 32, 6, 96, 20


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def _indices(rng, b=B, c=C, f=F):
  return jnp.asarray(np.stack([rng.choice(f, c, replace=False) for _ in range(b)]), jnp.int32)


def test_sparse_decode_matches_dense_forward_and_vjp(rng):
  idx = _indices(rng)
  vals = jnp.asarray(rng.standard_normal((B, C)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((F, D)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
  y, vjp = jax.vjp(lambda v, w: kernels.sparse_decode(idx, v, w), vals, w)
  y_ref, vjp_ref = jax.vjp(lambda v, w: kernels.dense_decode(idx, v, w), vals, w)
  # Float64 numpy as the independent check of the dense path.
  dense = np.zeros((B, F))
  np.put_along_axis(dense, np.asarray(idx), np.asarray(vals, np.float64), axis=1)
  assert rel(y, dense @ np.asarray(w, np.float64)) < 1e-6
  assert rel(y, y_ref) < 1e-6
  for a, b in zip(vjp(g), vjp_ref(g)):
    assert rel(a, b) < 1e-6
  dw = np.asarray(vjp(g)[1])
  untouched = np.setdiff1d(np.arange(F), np.asarray(idx).ravel())
  assert untouched.size and np.all(dw[untouched] == 0)


def test_sparse_encode_gradient_matches_dense_gather(rng):
  x = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((D, F)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((F,)), jnp.float32)
  idx = _indices(rng)
  g = jnp.asarray(rng.standard_normal((B, C)), jnp.float32)

  def sparse(x, w, b):
    pre = jax.lax.stop_gradient(x @ w + b)
    return kernels.sparse_encode(x, w, b, pre, idx)

  def dense(x, w, b):
    return jnp.take_along_axis(x @ w + b, idx, axis=-1)

  out, vjp = jax.vjp(sparse, x, w, b)
  out_ref, vjp_ref = jax.vjp(dense, x, w, b)
  assert rel(out, out_ref) < 1e-6
  for name, a, r in zip(("dx", "dw", "db"), vjp(g), vjp_ref(g)):
    assert rel(a, r) < 1e-5, name
  enc = np.asarray(kernels.encoder_grad(x, idx, g, F), np.float64)
  dense_g = np.zeros((B, F))
  np.put_along_axis(dense_g, np.asarray(idx), np.asarray(g, np.float64), axis=1)
  assert rel(enc, np.asarray(x, np.float64).T @ dense_g) < 1e-6


def test_topk_selection(rng):
  pre = jnp.asarray(rng.standard_normal((B, F)), jnp.float32)
  sel = kernels.topk(pre, C)
  want = np.sort(np.asarray(pre), axis=1)[:, ::-1][:, :C]
  assert np.array_equal(np.sort(np.asarray(sel.values), axis=1)[:, ::-1], want)
  assert int(sel.overflow) == 0 and bool(np.all(sel.active))
  g = jnp.asarray(rng.standard_normal((B, C)), jnp.float32)
  dpre = jax.vjp(lambda p: kernels.topk(p, C).values, pre)[1](g)[0]
  ref = np.zeros((B, F))
  np.put_along_axis(ref, np.asarray(sel.indices), np.asarray(g), axis=1)
  assert np.array_equal(np.asarray(dpre), ref)


def test_jumprelu_selection_keeps_window_and_counts_overflow(rng):
  pre = jnp.asarray(rng.standard_normal((B, F)), jnp.float32)
  thr = jnp.asarray(rng.uniform(1.0, 2.0, F), jnp.float32)
  window = 0.4
  keep = np.asarray(pre) > np.asarray(thr) - window / 2
  cap = int(keep.sum(1).max())
  sel = kernels.jumprelu(pre, thr, cap, window)
  got = np.zeros((B, F), bool)
  rows = np.arange(B)[:, None]
  got[rows, np.asarray(sel.indices)] |= np.asarray(sel.active)
  assert np.array_equal(got, keep) and int(sel.overflow) == 0
  assert np.all(np.asarray(sel.values)[~np.asarray(sel.active)] == 0)
  small = kernels.jumprelu(pre, thr, 2, window)
  assert int(small.overflow) == int(np.maximum(keep.sum(1) - 2, 0).sum()) > 0


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


def test_clt_decode_matches_dense_loop(rng):
  n = 4
  idx = jnp.stack([_indices(rng) for _ in range(n)])
  vals = jnp.asarray(rng.standard_normal((n, B, C)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((n, F, n, D)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((B, n, D)), jnp.float32)

  def dense(v, w):
    out = jnp.zeros((B, n, D))
    for s in range(n):
      f = kernels.dense_decode(idx[s], v[s], w[s].reshape(F, n * D)).reshape(B, n, D)
      out = out + f * (jnp.arange(n) >= s)[None, :, None]
    return out

  y, vjp = jax.vjp(lambda v, w: kernels.clt_decode(idx, v, w), vals, w)
  y_ref, vjp_ref = jax.vjp(dense, vals, w)
  assert rel(y, y_ref) < 1e-6
  for a, b in zip(vjp(g), vjp_ref(g)):
    assert rel(a, b) < 1e-6
  # Source layer 2 never writes to layers 0 and 1.
  assert np.all(np.asarray(vjp(g)[1])[2, :, :2] == 0)
