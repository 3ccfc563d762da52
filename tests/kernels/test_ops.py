"""The differentiable ops (sparse_decode, sparse_encode, clt_decode) over every available Ops,
forward and VJP against float64 numpy, with duplicate indices, empty slots and ragged rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allscope import kernels
from allscope.kernels import clt_layout
from tests.kernels.conftest import ragged_values, rel, sparse_indices

B, C, F, D = 32, 6, 50, 20
TOL = 1e-5


def _ops(name: str) -> kernels.Ops:
  if name == "xla":
    return kernels.XLA
  pytest.importorskip("allscope.kernels.pallas")
  return kernels.resolve("pallas", interpret=True)


OPS = ["xla", "pallas-interpret"]


@pytest.mark.parametrize("ops_name", OPS)
def test_sparse_decode_forward_and_vjp(rng, ops_name):
  ops = _ops(ops_name)
  idx = sparse_indices(rng, B, C, F)
  v = ragged_values(rng, B, C)
  w = rng.standard_normal((F, D)).astype(np.float32)
  g = rng.standard_normal((B, D)).astype(np.float32)
  y, vjp = jax.vjp(lambda v, w: kernels.sparse_decode(jnp.asarray(idx), v, w, ops),
                   jnp.asarray(v), jnp.asarray(w))
  dv, dw = vjp(jnp.asarray(g))
  w64, v64, g64 = w.astype(np.float64), v.astype(np.float64), g.astype(np.float64)
  assert rel(y, np.einsum("bc,bcd->bd", v64, w64[idx])) <= TOL
  assert rel(dv, np.einsum("bd,bcd->bc", g64, w64[idx])) <= TOL
  want_dw = np.zeros((F, D))
  np.add.at(want_dw, idx.reshape(-1), (v64[:, :, None] * g64[:, None]).reshape(-1, D))
  assert rel(dw, want_dw) <= TOL
  untouched = np.setdiff1d(np.arange(F), idx[v != 0])
  assert untouched.size and np.all(np.asarray(dw)[untouched] == 0)
  assert rel(y, kernels.dense_decode(jnp.asarray(idx), jnp.asarray(v), jnp.asarray(w))) <= TOL


@pytest.mark.parametrize("ops_name", OPS)
def test_sparse_encode_vjp_is_the_gradient_over_active_pairs(rng, ops_name):
  ops = _ops(ops_name)
  x = rng.standard_normal((B, D)).astype(np.float32)
  w = rng.standard_normal((D, F)).astype(np.float32)
  b = rng.standard_normal(F).astype(np.float32)
  idx = sparse_indices(rng, B, C, F)
  g = ragged_values(rng, B, C)  # cotangents, zero in unused slots

  def fn(x, w, b):
    pre_at = kernels.gather_pre(x @ w + b, jnp.asarray(idx))
    return kernels.sparse_encode(x, w, b, jnp.asarray(idx), pre_at, ops)

  out, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
  dx, dw, db = vjp(jnp.asarray(g))
  x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
  pre = x64 @ w64 + b
  assert rel(out, np.take_along_axis(pre, idx, axis=1)) <= TOL
  dense_g = np.zeros((B, F))
  np.add.at(dense_g, (np.repeat(np.arange(B), C), idx.reshape(-1)), g64.reshape(-1))
  assert rel(dx, dense_g @ w64.T) <= TOL
  assert rel(dw, x64.T @ dense_g) <= TOL
  assert rel(db, dense_g.sum(0)) <= TOL
  assert rel(kernels.encoder_grad(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(g), F, ops),
             x64.T @ dense_g) <= TOL


@pytest.mark.parametrize("ops_name", OPS)
@pytest.mark.parametrize("n_layers", [1, 4])
def test_clt_decode_matches_masked_dense_reference(rng, ops_name, n_layers):
  ops = _ops(ops_name)
  p = clt_layout.n_pairs(n_layers)
  idx = np.stack([sparse_indices(rng, B, C, F) for _ in range(n_layers)])
  v = np.stack([ragged_values(rng, B, C) for _ in range(n_layers)])
  w = rng.standard_normal((F, p, D)).astype(np.float32)
  g = rng.standard_normal((B, n_layers, D)).astype(np.float32)
  y, vjp = jax.vjp(lambda v, w: kernels.clt_decode(jnp.asarray(idx), v, w, ops),
                   jnp.asarray(v), jnp.asarray(w))
  dv, dw = vjp(jnp.asarray(g))
  # float64 over the dense [L, F, L, d] layout, masked to t >= s
  dense = np.zeros((n_layers, F, n_layers, D))
  for s in range(n_layers):
    dense[s, :, s:] = clt_layout.to_dense(w.astype(np.float64), s)[:, s:]
  f = np.zeros((n_layers, B, F))
  for s in range(n_layers):
    np.add.at(f[s], (np.repeat(np.arange(B), C), idx[s].reshape(-1)), v[s].reshape(-1).astype(np.float64))
  want = np.einsum("sbf,sftd->btd", f, dense)
  assert rel(y, want) <= TOL
  assert rel(y, kernels.dense_clt_decode(jnp.asarray(idx), jnp.asarray(v), jnp.asarray(w))) <= TOL
  mask = np.triu(np.ones((n_layers, n_layers)))[:, None, :, None]
  want_dv = np.stack([np.einsum("btd,bctd->bc", g, (dense * mask)[s][idx[s]]) for s in range(n_layers)])
  want_dw_dense = np.einsum("sbf,btd->sftd", f, g.astype(np.float64)) * mask
  assert rel(dv, want_dv) <= TOL
  assert rel(dw, clt_layout.from_dense(want_dw_dense)) <= TOL


def test_ops_are_one_static_argument_per_choice():
  assert kernels.resolve("xla") is kernels.XLA and kernels.resolve("auto", backend="cpu") == kernels.XLA
  assert hash(kernels.resolve("xla")) == hash(kernels.XLA)


@pytest.mark.parametrize("ops_name", OPS)
@pytest.mark.parametrize("use_aux", [True, False])
def test_clt_decode_with_aux_is_two_decodes_with_one_gradient(rng, ops_name, use_aux):
  """(main, AuxK) decodes through one w_dec: each output and the summed d w_dec match two
  separate float64 decodes; with use_aux False the AuxK output and its d values are 0."""
  ops, n_layers, ca = _ops(ops_name), 3, 2 * C + 1  # AuxK capacity ragged against the main one
  p = clt_layout.n_pairs(n_layers)
  idx = np.stack([sparse_indices(rng, B, C, F) for _ in range(n_layers)])
  v = np.stack([ragged_values(rng, B, C) for _ in range(n_layers)])
  aidx = np.stack([sparse_indices(rng, B, ca, F) for _ in range(n_layers)])
  av = np.stack([ragged_values(rng, B, ca) for _ in range(n_layers)])
  w = rng.standard_normal((F, p, D)).astype(np.float32)
  g, ga = (rng.standard_normal((B, n_layers, D)).astype(np.float32) for _ in range(2))
  fn = lambda v, av, w: kernels.clt_decode_with_aux(jnp.asarray(idx), v, jnp.asarray(aidx), av,
                                                    w, use_aux, ops)
  (y, e), vjp = jax.vjp(jax.jit(fn), *map(jnp.asarray, (v, av, w)))
  dv, dav, dw = vjp((jnp.asarray(g), jnp.asarray(ga)))
  w64 = w.astype(np.float64)
  # float64: each decode as its own dense [B, F] code times the causal decoder
  def dense(i, val):
    f = np.zeros((n_layers, B, F))
    for s in range(n_layers):
      np.add.at(f[s], (np.repeat(np.arange(B), i.shape[2]), i[s].reshape(-1)),
                val[s].reshape(-1).astype(np.float64))
    return f
  full = np.stack([clt_layout.to_dense(w64, s) for s in range(n_layers)])  # [L, F, L, d]
  f, fa = dense(idx, v), dense(aidx, av) * use_aux
  assert rel(y, np.einsum("sbf,sftd->btd", f, full)) <= TOL
  want_e = np.einsum("sbf,sftd->btd", fa, full)
  assert rel(e, want_e) <= TOL if use_aux else np.all(np.asarray(e) == 0)
  mask = np.triu(np.ones((n_layers, n_layers)))[:, None, :, None]
  dw_dense = (np.einsum("sbf,btd->sftd", f, g) + np.einsum("sbf,btd->sftd", fa, ga)) * mask
  assert rel(dw, clt_layout.from_dense(dw_dense)) <= TOL
  want_dv = np.stack([np.einsum("btd,bctd->bc", g, full[s][idx[s]]) for s in range(n_layers)])
  assert rel(dv, want_dv) <= TOL
  want_dav = np.stack([np.einsum("btd,bctd->bc", ga, full[s][aidx[s]]) for s in range(n_layers)])
  assert rel(dav, want_dav) <= TOL if use_aux else np.all(np.asarray(dav) == 0)


@pytest.mark.parametrize("ops_name", OPS)
@pytest.mark.parametrize("use_aux", [True, False])
def test_decode_with_aux_is_two_decodes_with_one_gradient(rng, ops_name, use_aux):
  """The per-layer (main, AuxK) decodes through one w_dec: each output and the summed d w_dec
  match two float64 decodes; with use_aux False the AuxK output and its d values are 0."""
  ops, ca = _ops(ops_name), 2 * C + 1
  idx, aidx = sparse_indices(rng, B, C, F), sparse_indices(rng, B, ca, F)
  v, av = ragged_values(rng, B, C), ragged_values(rng, B, ca)
  w = rng.standard_normal((F, D)).astype(np.float32)
  g, ga = (rng.standard_normal((B, D)).astype(np.float32) for _ in range(2))
  fn = lambda v, av, w: kernels.decode_with_aux(jnp.asarray(idx), v, jnp.asarray(aidx), av, w,
                                                use_aux, ops)
  (y, e), vjp = jax.vjp(jax.jit(fn), *map(jnp.asarray, (v, av, w)))
  dv, dav, dw = vjp((jnp.asarray(g), jnp.asarray(ga)))
  w64, g64, ga64 = (a.astype(np.float64) for a in (w, g, ga))
  assert rel(y, np.einsum("bc,bcd->bd", v, w64[idx])) <= TOL
  want_e = np.einsum("bc,bcd->bd", av, w64[aidx])
  assert rel(e, want_e) <= TOL if use_aux else np.all(np.asarray(e) == 0)
  want_dw = np.zeros((F, D))
  np.add.at(want_dw, idx.reshape(-1), (v[..., None] * g64[:, None]).reshape(-1, D))
  if use_aux:
    np.add.at(want_dw, aidx.reshape(-1), (av[..., None] * ga64[:, None]).reshape(-1, D))
  assert rel(dw, want_dw) <= TOL
  assert rel(dv, np.einsum("bd,bcd->bc", g64, w64[idx])) <= TOL
  want_dav = np.einsum("bd,bcd->bc", ga64, w64[aidx])
  assert rel(dav, want_dav) <= TOL if use_aux else np.all(np.asarray(dav) == 0)


@pytest.mark.parametrize("ops_name", OPS)
@pytest.mark.parametrize("use_aux", [True, False])
def test_sparse_encode_with_aux_is_one_encoder_gradient(rng, ops_name, use_aux):
  """(main, AuxK) slot sets of one encoder: the values pass through, and d x, d w_enc, d b_enc
  are float64's dense gradient of both sets where use_aux, of the main set alone where not."""
  ops, ca = _ops(ops_name), 2 * C + 1
  x = rng.standard_normal((B, D)).astype(np.float32)
  w = rng.standard_normal((D, F)).astype(np.float32)
  b = rng.standard_normal(F).astype(np.float32)
  idx, aidx = sparse_indices(rng, B, C, F), sparse_indices(rng, B, ca, F)
  g, ga = ragged_values(rng, B, C), ragged_values(rng, B, ca)
  pre = x @ w + b
  pre_at, aux_at = (np.take_along_axis(pre, i, axis=1) for i in (idx, aidx))
  fn = lambda x, w, b: kernels.sparse_encode_with_aux(
      x, w, b, jnp.asarray(idx), jnp.asarray(pre_at), jnp.asarray(aidx), jnp.asarray(aux_at),
      use_aux, ops)
  (out, aux), vjp = jax.vjp(jax.jit(fn), *map(jnp.asarray, (x, w, b)))
  assert np.array_equal(out, pre_at) and np.array_equal(aux, aux_at)
  dx, dw, db = vjp((jnp.asarray(g), jnp.asarray(ga)))
  dense = np.zeros((B, F))  # the [B, F] cotangent of pre
  np.add.at(dense, (np.repeat(np.arange(B), C), idx.reshape(-1)), g.reshape(-1))
  if use_aux:
    np.add.at(dense, (np.repeat(np.arange(B), ca), aidx.reshape(-1)), ga.reshape(-1))
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  assert rel(dw, x64.T @ dense) <= TOL and rel(db, dense.sum(0)) <= TOL
  assert rel(dx, dense @ w64.T) <= TOL
