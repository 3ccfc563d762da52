"""Sparse decode y[b] = sum_j v[b, j] w_dec[idx[b, j]] with a custom VJP over the seam.

Forward `gather_decode`; backward d v = `gather_dot(idx, g, w_dec)` and
d w_dec = `scatter_outer(idx, v, g, F)`. Both directions call only `Ops` primitives, so a
Pallas seam runs in both; no [B, C, d] block and no dense [B, F] array exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from allscope.kernels import xla
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


def _prims(ops: Ops, clt: bool):
  """(decode, gather_dot, scatter_outer) of a per-layer or a CLT decoder."""
  if clt:
    return ops.clt_decode, ops.clt_gather_dot, ops.clt_scatter_outer
  return ops.gather_decode, ops.gather_dot, ops.scatter_outer


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _with_aux(ops: Ops, clt: bool, indices, values, aux_indices, aux_values, w_dec, use_aux):
  return _aux_fwd(ops, clt, indices, values, aux_indices, aux_values, w_dec, use_aux)[0]


def _aux_fwd(ops, clt, indices, values, aux_indices, aux_values, w_dec, use_aux):
  decode, _, _ = _prims(ops, clt)
  out = decode(indices, values, w_dec)
  aux = jax.lax.cond(use_aux, lambda: decode(aux_indices, aux_values, w_dec),
                     lambda: jnp.zeros_like(out))
  return (out, aux), (indices, values, aux_indices, aux_values, w_dec, use_aux)


def _aux_bwd(ops, clt, res, cts):
  indices, values, aux_indices, aux_values, w_dec, use_aux = res
  g, g_aux = cts
  _, gather_dot, scatter_outer = _prims(ops, clt)
  dvalues = gather_dot(indices, g, w_dec).astype(values.dtype)
  daux = jax.lax.cond(use_aux, lambda: gather_dot(aux_indices, g_aux, w_dec),
                      lambda: jnp.zeros(aux_values.shape, jnp.float32)).astype(aux_values.dtype)
  dw = scatter_outer(indices, values, g, w_dec.shape[0])
  # The AuxK pairs are added into the main gradient's buffer
  dw = xla.only_where(use_aux, lambda acc, idx: scatter_outer(idx, aux_values, g_aux,
                                                              w_dec.shape[0], acc), dw, aux_indices)
  return None, dvalues, None, daux, dw.astype(w_dec.dtype), None


_with_aux.defvjp(_aux_fwd, _aux_bwd)


def decode_with_aux(indices: jax.Array, values: jax.Array, aux_indices: jax.Array,
                    aux_values: jax.Array, w_dec: jax.Array, use_aux: jax.Array,
                    ops: Ops = XLA, clt: bool = False) -> tuple[jax.Array, jax.Array]:
  """Two decodes through one w_dec: (decode(indices, values), decode(aux_indices, aux_values)),
  the second only where the scalar `use_aux` is True (zeros otherwise).

  AuxK's decode next to the main one: their decoder gradients are accumulated into one buffer
  (the scatter's `acc`), not two decoder-sized arrays and their sum. `clt=False`: sparse_decode
  ([B, C] slots, w_dec [F, d]); `clt=True`: clt_decode ([L, B, C] slots, w_dec [F, P, d]).
  """
  return _with_aux(ops, clt, indices, values, aux_indices, aux_values, w_dec,
                   jnp.asarray(use_aux, bool))


def sparse_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array,
                  ops: Ops = XLA) -> jax.Array:
  """indices [B, C] int32, values [B, C], w_dec [F, D] -> [B, D] float32."""
  return _decode(ops, indices, values, w_dec)


def dense_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array) -> jax.Array:
  """The dense equivalent (scatter to [B, F], then a matmul), for tests and small widths."""
  rows = jnp.arange(indices.shape[0])[:, None]
  dense = jnp.zeros((indices.shape[0], w_dec.shape[0]), values.dtype).at[rows, indices].add(values)
  return dense @ w_dec
