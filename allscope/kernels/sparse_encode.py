"""Sparse encoder: the pre-activations of the selected latents, with a sparse gradient.

The dense product `pre = x @ w_enc + b_enc` is computed once, outside any gradient, and drives
the selection. `sparse_encode` then returns pre[b, idx[b, j]] with a custom VJP that updates
only the active columns: d w_enc[:, f] += x_b * g[b, f] for the selected (b, f) pairs, d b_enc
by a segment_sum, d x by a gather-dot with the active columns. A Pallas kernel replaces
`encoder_grad` without touching the callers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def encoder_grad(x: jax.Array, indices: jax.Array, g: jax.Array, width: int) -> jax.Array:
  """d w_enc [D, F] = sum_b x_b (outer) g[b, :], with g non-zero only at `indices`.

  XLA reference: scatter g into a [B, F] block and one matmul. Sparse in what it reads from g;
  a kernel walks only the active (b, f) pairs.
  """
  rows = jnp.arange(indices.shape[0])[:, None]
  dense = jnp.zeros((indices.shape[0], width), g.dtype).at[rows, indices].add(g)
  return x.astype(g.dtype).T @ dense


@jax.custom_vjp
def sparse_encode(x: jax.Array, w_enc: jax.Array, b_enc: jax.Array, pre: jax.Array,
                  indices: jax.Array) -> jax.Array:
  """x [B, D], w_enc [D, F], b_enc [F], pre = x @ w_enc + b_enc [B, F], indices [B, C] -> [B, C]."""
  del x, w_enc, b_enc
  return jnp.take_along_axis(pre, indices, axis=-1)


def _fwd(x, w_enc, b_enc, pre, indices):
  return sparse_encode(x, w_enc, b_enc, pre, indices), (x, w_enc, indices, pre.shape)


def _bwd(res, g):
  x, w_enc, indices, pre_shape = res
  width = w_enc.shape[1]
  dw = encoder_grad(x, indices, g, width).astype(w_enc.dtype)
  db = jax.ops.segment_sum(g.reshape(-1), indices.reshape(-1), num_segments=width)
  dx = jnp.einsum("bc,bcd->bd", g, w_enc.T[indices]).astype(x.dtype)
  return dx, dw, db.astype(w_enc.dtype), jnp.zeros(pre_shape, g.dtype), None


sparse_encode.defvjp(_fwd, _bwd)
