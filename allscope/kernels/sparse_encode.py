"""Sparse encoder: the selected pre-activations, with a gradient over the active pairs only.

The dense product `pre = x @ w_enc + b_enc` runs once, without gradient, and drives the
selection; `sparse_encode` returns its values at the selected indices and a custom VJP:
  d w_enc = scatter_outer(idx, g, x, F).T     (d w_enc[:, f] += x_b g[b, f], active pairs only)
  d b_enc = segment_sum(g, idx)
  d x     = gather_decode(idx, g, w_enc.T)
so the backward never builds a dense [B, F] cotangent nor runs a second dense GEMM.
`dense_encode` is its dense twin for AuxK at small widths (see its docstring).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from allscope.kernels import xla
from allscope.kernels.dispatch import XLA, Ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _encode(ops: Ops, x, w_enc, b_enc, indices, pre_at):
  del ops, x, w_enc, b_enc, indices
  return pre_at


def _fwd(ops, x, w_enc, b_enc, indices, pre_at):
  return pre_at, (x, w_enc, b_enc, indices, pre_at)


def _bwd(ops, res, g):
  x, w_enc, b_enc, indices, pre_at = res
  width = w_enc.shape[1]
  dw = ops.scatter_outer(indices, g, x, width).T.astype(w_enc.dtype)
  db = jax.ops.segment_sum(g.reshape(-1).astype(jnp.float32), indices.reshape(-1),
                           num_segments=width).astype(b_enc.dtype)
  dx = ops.gather_decode(indices, g, w_enc.T).astype(x.dtype)
  return dx, dw, db, None, jnp.zeros_like(pre_at)


_encode.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _encode_aux(ops: Ops, x, w_enc, b_enc, indices, pre_at, aux_indices, aux_pre_at, use_aux):
  del ops, x, w_enc, b_enc, indices, aux_indices, use_aux
  return pre_at, aux_pre_at


def _aux_fwd(ops, x, w_enc, b_enc, indices, pre_at, aux_indices, aux_pre_at, use_aux):
  return (pre_at, aux_pre_at), (x, w_enc, b_enc, indices, aux_indices, use_aux)


def _aux_bwd(ops, res, cts):
  x, w_enc, b_enc, indices, aux_indices, use_aux = res
  g, g_aux = cts
  width = w_enc.shape[1]
  segments = lambda v, i: jax.ops.segment_sum(v.reshape(-1).astype(jnp.float32), i.reshape(-1),
                                               num_segments=width)
  # AuxK's scatters added into the main slots' gradients, only where use_aux
  dw, db, dx = xla.only_where(
      use_aux,
      lambda acc, idx: (ops.scatter_outer(idx, g_aux, x, width, acc[0]),
                        acc[1] + segments(g_aux, idx),
                        acc[2] + ops.gather_decode(idx, g_aux, w_enc.T)),
      (ops.scatter_outer(indices, g, x, width), segments(g, indices),
       ops.gather_decode(indices, g, w_enc.T)),
      aux_indices)
  return (dx.astype(x.dtype), dw.T.astype(w_enc.dtype), db.astype(b_enc.dtype), None,
          jnp.zeros(g.shape, g.dtype), None, jnp.zeros(g_aux.shape, g_aux.dtype), None)


_encode_aux.defvjp(_aux_fwd, _aux_bwd)


def sparse_encode(x: jax.Array, w_enc: jax.Array, b_enc: jax.Array, indices: jax.Array,
                  pre_at: jax.Array, ops: Ops = XLA) -> jax.Array:
  """x [B, D], w_enc [D, F], b_enc [F], indices [B, C], pre_at [B, C] -> pre_at.

  pre_at must be (x @ w_enc + b_enc) at `indices` (what the selection returned); it is the
  forward value, and the gradient flows into x, w_enc and b_enc.
  """
  return _encode(ops, x, w_enc, b_enc, indices, pre_at)


def sparse_encode_with_aux(x: jax.Array, w_enc: jax.Array, b_enc: jax.Array, indices: jax.Array,
                           pre_at: jax.Array, aux_indices: jax.Array, aux_pre_at: jax.Array,
                           use_aux: jax.Array, ops: Ops = XLA) -> tuple[jax.Array, jax.Array]:
  """`sparse_encode` of two slot sets, the main one and AuxK's [B, aux_k]: (pre_at, aux_pre_at).

  AuxK's encoder gradient is added into the main one's buffer and runs only where the scalar
  `use_aux` is True; the caller's cotangent of aux_pre_at must then be 0 where it is False (AuxK
  contributes nothing while no latent is dead).
  """
  return _encode_aux(ops, x, w_enc, b_enc, indices, pre_at, aux_indices, aux_pre_at,
                     jnp.asarray(use_aux, bool))


def gather_pre(pre: jax.Array, indices: jax.Array) -> jax.Array:
  """pre [B, F] at indices [B, C], without gradient (the input of sparse_encode)."""
  return jnp.take_along_axis(jax.lax.stop_gradient(pre), indices, axis=-1)


def encoder_grad(x: jax.Array, indices: jax.Array, g: jax.Array, width: int, ops: Ops = XLA) -> jax.Array:
  """d w_enc [D, F] = sum_b x_b (outer) g[b, :], g non-zero only at `indices` (active pairs)."""
  return ops.scatter_outer(indices, g, x, width).T


@jax.custom_vjp
def dense_encode(x, w_enc, b_enc, pre):
  """pre [B, F] (= x @ w_enc + b_enc wherever its cotangent is non-zero) with that product's
  dense gradient, without computing the product again: AuxK's path when aux_k is a sizeable
  fraction of F, where [B, F] matmuls beat aux_k gather/scatter slots."""
  del x, w_enc, b_enc
  return pre


def _dense_fwd(x, w_enc, b_enc, pre):
  return pre, (x, w_enc)


def _dense_bwd(res, g):
  x, w_enc = res
  dx = jnp.matmul(g, w_enc.T.astype(g.dtype), preferred_element_type=jnp.float32)
  dw = jnp.matmul(x.T.astype(g.dtype), g, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w_enc.dtype), jnp.sum(g, axis=0), jnp.zeros_like(g)


dense_encode.defvjp(_dense_fwd, _dense_bwd)
