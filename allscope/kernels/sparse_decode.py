"""Sparse decode y[b] = sum_j v[b, j] w_dec[idx[b, j]] with a custom VJP over the seam.

Forward `gather_decode`; backward d v = `gather_dot(idx, g, w_dec)` and
d w_dec = `scatter_outer(idx, v, g, F)`. Both directions call only `Ops` primitives, so a
Pallas seam runs in both; no [B, C, d] block and no dense [B, F] array exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from allscope.kernels.dispatch import XLA, Ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(ops: Ops, indices, values, w_dec):
  return ops.gather_decode(indices, values, w_dec)


def _fwd(ops, indices, values, w_dec):
  return ops.gather_decode(indices, values, w_dec), (indices, values, w_dec)


def _bwd(ops, res, g):
  indices, values, w_dec = res
  dvalues = ops.gather_dot(indices, g, w_dec).astype(values.dtype)
  dw = ops.scatter_outer(indices, values, g, w_dec.shape[0]).astype(w_dec.dtype)
  return None, dvalues, dw


_decode.defvjp(_fwd, _bwd)


def sparse_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array,
                  ops: Ops = XLA) -> jax.Array:
  """indices [B, C] int32, values [B, C], w_dec [F, D] -> [B, D] float32."""
  return _decode(ops, indices, values, w_dec)


def dense_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array) -> jax.Array:
  """The dense equivalent (scatter to [B, F], then a matmul), for tests and small widths."""
  rows = jnp.arange(indices.shape[0])[:, None]
  dense = jnp.zeros((indices.shape[0], w_dec.shape[0]), values.dtype).at[rows, indices].add(values)
  return dense @ w_dec
