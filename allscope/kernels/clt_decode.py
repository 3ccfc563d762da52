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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _clt_aux(ops: Ops, indices, values, aux_indices, aux_values, w_dec, use_aux):
  return _clt_aux_fwd(ops, indices, values, aux_indices, aux_values, w_dec, use_aux)[0]


def _clt_aux_fwd(ops, indices, values, aux_indices, aux_values, w_dec, use_aux):
  out = ops.clt_decode(indices, values, w_dec)
  aux = jax.lax.cond(use_aux, lambda: ops.clt_decode(aux_indices, aux_values, w_dec),
                     lambda: jnp.zeros_like(out))
  return (out, aux), (indices, values, aux_indices, aux_values, w_dec, use_aux)


def _clt_aux_bwd(ops, res, cts):
  indices, values, aux_indices, aux_values, w_dec, use_aux = res
  g, g_aux = cts
  dvalues = ops.clt_gather_dot(indices, g, w_dec).astype(values.dtype)
  daux = jax.lax.cond(use_aux, lambda: ops.clt_gather_dot(aux_indices, g_aux, w_dec),
                      lambda: jnp.zeros(aux_values.shape, jnp.float32)).astype(aux_values.dtype)
  dw = ops.clt_scatter_outer(indices, values, g, w_dec.shape[0])
  # The AuxK pairs are added into the main gradient's buffer: a loop of 0 or 1 trips, which XLA
  # runs in place on its carry (a second scatter and a sum would hold 3 decoder-sized arrays).
  dw = jax.lax.fori_loop(0, use_aux.astype(jnp.int32),
                         lambda _, acc: ops.clt_scatter_outer(aux_indices, aux_values, g_aux,
                                                              w_dec.shape[0], acc), dw)
  return None, dvalues, None, daux, dw.astype(w_dec.dtype), None


_clt_aux.defvjp(_clt_aux_fwd, _clt_aux_bwd)


def clt_decode_with_aux(indices: jax.Array, values: jax.Array, aux_indices: jax.Array,
                        aux_values: jax.Array, w_dec: jax.Array, use_aux: jax.Array,
                        ops: Ops = XLA) -> tuple[jax.Array, jax.Array]:
  """Two decodes through one w_dec: (clt_decode(indices, values), clt_decode(aux_indices,
  aux_values)), the second only where the scalar `use_aux` is True (zeros otherwise).

  AuxK's decode next to the main one: their decoder gradients are accumulated into one buffer
  (clt_scatter_outer's `acc`), not two decoder-sized arrays and their sum.
  """
  return _clt_aux(ops, indices, values, aux_indices, aux_values, w_dec, jnp.asarray(use_aux, bool))


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
