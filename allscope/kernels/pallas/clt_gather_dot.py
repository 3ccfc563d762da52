"""clt_gather_dot: out[s, b, j] = sum_{t >= s} g[b, t] . w_dec[indices[s, b, j], p(s, t)].

d values of `clt_decode`. Grid over (row block of B, source layer s, slot j); each program walks
the active latent's contiguous rows p(s, s) .. p(s, L - 1) block by block along d, reducing them
against g in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from allscope.kernels.pallas import _common
from allscope.kernels.pallas.clt_decode import pair


def _kernel(idx_ref, g_ref, w_ref, out_ref, *, block_b: int, block_d: int, num_d: int,
            num_layers: int):
  i, s, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(i * block_b, block_b)
  idx = idx_ref[s, c, rows]  # [BB]
  p0 = pair(s, s, num_layers)

  def target(t, acc):
    p = p0 + t - s

    def block(k, acc):
      cols = pl.ds(k * block_d, block_d)
      prod = g_ref[rows, t, cols].astype(jnp.float32) * w_ref[idx, p, cols].astype(jnp.float32)
      return acc + jnp.sum(prod, axis=1)

    return lax.fori_loop(0, num_d, block, acc)

  acc = lax.fori_loop(s, num_layers, target, jnp.zeros((block_b,), jnp.float32))
  out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("interpret", "block_b", "block_d", "backend"))
def clt_gather_dot(indices: jax.Array, g: jax.Array, w_dec: jax.Array, *,
                   interpret: bool = False, block_b: int = 16, block_d: int = 128,
                   backend: str | None = None) -> jax.Array:
  """indices [L, B, C] int32, g [B, L, d], w_dec [F, P, d] -> float32 [L, B, C]."""
  num_layers, batch, slots = indices.shape
  dim = w_dec.shape[2]
  bb = _common.row_block(batch, block_b)
  bd = _common.feature_block(dim, block_d, interpret, "clt_gather_dot")
  idx_t = _common.pad_to(jnp.swapaxes(indices.astype(jnp.int32), 1, 2), 2, bb)  # [L, C, B]
  g = _common.pad_to(g, 0, bb)
  padded = idx_t.shape[2]
  out = pl.pallas_call(
      functools.partial(_kernel, block_b=bb, block_d=bd, num_d=dim // bd, num_layers=num_layers),
      out_shape=jax.ShapeDtypeStruct((num_layers, slots, padded), jnp.float32),
      grid=(padded // bb, num_layers, slots),
      in_specs=[pl.BlockSpec()] * 3,
      out_specs=pl.BlockSpec((None, None, bb), lambda i, s, c: (s, c, i)),
      compiler_params=_common.compiler_params(interpret, backend=backend),
      interpret=interpret,
  )(idx_t, g, w_dec)
  return jnp.swapaxes(out[:, :, :batch], 1, 2)
