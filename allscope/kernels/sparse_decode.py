"""Sparse decode: y[b] = sum_j v[b, j] * w_dec[idx[b, j]], touching only the active rows.

XLA reference: a row gather and a weighted sum forward; the VJP gives d v as a gather-dot and
d w_dec as a segment_sum (scatter-add) over the active rows, never a dense [B, F] array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def sparse_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array) -> jax.Array:
  """indices [B, C] int32, values [B, C], w_dec [F, D] -> [B, D]."""
  return jnp.einsum("bc,bcd->bd", values, w_dec[indices])


def _fwd(indices, values, w_dec):
  return sparse_decode(indices, values, w_dec), (indices, values, w_dec)


def _bwd(res, g):
  indices, values, w_dec = res
  rows = w_dec[indices]  # [B, C, D]
  dvalues = jnp.einsum("bd,bcd->bc", g, rows).astype(values.dtype)
  contrib = values[:, :, None].astype(g.dtype) * g[:, None, :]  # [B, C, D]
  dw = jax.ops.segment_sum(contrib.reshape(-1, g.shape[-1]), indices.reshape(-1),
                           num_segments=w_dec.shape[0])
  return None, dvalues, dw.astype(w_dec.dtype)


sparse_decode.defvjp(_fwd, _bwd)


def dense_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array) -> jax.Array:
  """The dense equivalent (scatter to [B, F], then a matmul), for tests and small widths."""
  rows = jnp.arange(indices.shape[0])[:, None]
  dense = jnp.zeros((indices.shape[0], w_dec.shape[0]), values.dtype).at[rows, indices].add(values)
  return dense @ w_dec
