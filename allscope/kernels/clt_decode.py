"""Cross-layer transcoder decode over the causal decoder w_dec [F, P, d] (see clt_layout).

out[b, t] = sum_{s <= t} sum_j v[s, b, j] w_dec[idx[s, b, j], p(s, t)], with a custom VJP:
d v = clt_gather_dot(idx, g, w_dec), d w_dec = clt_scatter_outer(idx, v, g, F). Each active
latent's rows for all its targets are read (and written) once, as one contiguous window.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from allscope.kernels import clt_layout
from allscope.kernels.dispatch import XLA, Ops
from allscope.kernels.sparse_decode import decode_with_aux


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _clt(ops: Ops, indices, values, w_dec):
  return ops.clt_decode(indices, values, w_dec)


def _fwd(ops, indices, values, w_dec):
  return ops.clt_decode(indices, values, w_dec), (indices, values, w_dec)


def _bwd(ops, res, g):
  indices, values, w_dec = res
  dvalues = ops.clt_gather_dot(indices, g, w_dec).astype(values.dtype)
  dw = ops.clt_scatter_outer(indices, values, g, w_dec.shape[0]).astype(w_dec.dtype)
  return None, dvalues, dw


_clt.defvjp(_fwd, _bwd)


def clt_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array, ops: Ops = XLA) -> jax.Array:
  """indices, values [L, B, C]; w_dec [F, L (L + 1) / 2, d] -> [B, L, d] (before b_dec)."""
  return _clt(ops, indices, values, w_dec)


def clt_decode_with_aux(indices: jax.Array, values: jax.Array, aux_indices: jax.Array,
                        aux_values: jax.Array, w_dec: jax.Array, use_aux: jax.Array,
                        ops: Ops = XLA) -> tuple[jax.Array, jax.Array]:
  """`sparse_decode.decode_with_aux` for a CLT: (clt_decode(indices, values),
  clt_decode(aux_indices, aux_values) where `use_aux`), one decoder-gradient buffer."""
  return decode_with_aux(indices, values, aux_indices, aux_values, w_dec, use_aux, ops, clt=True)


def causal_mask(n_layers: int, dtype=jnp.float32) -> jax.Array:
  """[source, target] = 1 where target >= source (for dense [L, F, L, d] references)."""
  return jnp.triu(jnp.ones((n_layers, n_layers), dtype))


def dense_clt_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array) -> jax.Array:
  """Reference: expand w_dec to the masked dense [L, F, L, d], then decode every source densely."""
  n = indices.shape[0]
  dense = causal_to_dense(w_dec)
  rows = jnp.arange(indices.shape[1])[:, None]
  out = 0.0
  for s in range(n):
    f = jnp.zeros((indices.shape[1], w_dec.shape[0]), values.dtype).at[rows, indices[s]].add(values[s])
    out = out + jnp.einsum("bf,ftd->btd", f, dense[s])
  return out


def causal_to_dense(w_dec: jax.Array) -> jax.Array:
  """[F, P, d] -> [L, F, L, d] with zeros where target < source."""
  n = clt_layout.n_layers_of(w_dec.shape[1])
  idx = clt_layout.pair_index(n)  # [L, L], -1 below the diagonal
  dense = w_dec[:, np.maximum(idx, 0)]  # [F, L, L, d]
  return jnp.moveaxis(dense * jnp.asarray(idx >= 0, w_dec.dtype)[None, :, :, None], 1, 0)
