"""clt_gather_dot: out[s, b, j] = sum_{t >= s} g[b, t] . w_dec[indices[s, b, j], p(s, t)].

d values of `clt_decode`. GPU (Triton): grid over (row block of B, source layer s, slot j); each
program walks the active latent's contiguous rows p(s, s) .. p(s, L - 1) block by block along
d, reducing them against g in float32. TPU (Mosaic): grid over (row block, s); per target t >= s
the program DMAs its BB x C rows p(s, t) into VMEM (`_tpu`) and reduces them against g[:, t].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from allscope.kernels.pallas import _common, _tpu
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


def _tpu_kernel(idx_ref, g_ref, w_hbm, out_ref, rows_ref, sem, *, block_b: int, slots: int,
                num_layers: int):
  s = pl.program_id(1)
  out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)  # [C, BB, 1]

  def target(t, carry):
    _tpu.gather_rows(idx_ref, w_hbm, rows_ref, sem, block_b=block_b, slots=slots,
                     pair=pair(s, t, num_layers))
    g = g_ref[t].astype(jnp.float32)  # [BB, d]

    def slot(c, carry):
      out_ref[c] += jnp.sum(g * rows_ref[c].astype(jnp.float32), axis=1, keepdims=True)
      return carry

    return lax.fori_loop(0, slots, slot, carry)

  lax.fori_loop(s, num_layers, target, 0)


def _tpu_call(indices, g, w_dec, interpret: bool):
  num_layers, batch, slots = indices.shape
  dim = w_dec.shape[2]
  bb = _tpu.row_block(w_dec.dtype)
  idx = _common.pad_to(indices.astype(jnp.int32), 1, bb)  # [L, B, C]: SMEM blocks
  g_t = _common.pad_to(jnp.swapaxes(g, 0, 1), 1, bb)  # [L, B, d]: g[:, t] is one tile row
  padded = idx.shape[1]
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, block_b=bb, slots=slots, num_layers=num_layers),
      name="clt_gather_dot",
      out_shape=jax.ShapeDtypeStruct((num_layers, slots, padded, 1), jnp.float32),
      grid=(padded // bb, num_layers),
      in_specs=[pl.BlockSpec((None, bb, slots), lambda i, s: (s, i, 0),
                             memory_space=pltpu.SMEM),
                pl.BlockSpec((num_layers, bb, dim), lambda i, s: (0, i, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((None, slots, bb, 1), lambda i, s: (s, 0, i, 0)),
      scratch_shapes=_tpu.rows_scratch(slots, bb, dim, w_dec.dtype),
      compiler_params=_common.tpu_params(2),
      interpret=_common.interpret_mode(interpret, "tpu"),
  )(idx, g_t, w_dec)
  return jnp.swapaxes(out[:, :, :batch, 0], 1, 2)


@functools.partial(jax.jit, static_argnames=("interpret", "block_b", "block_d", "backend"))
def clt_gather_dot(indices: jax.Array, g: jax.Array, w_dec: jax.Array, *,
                   interpret: bool = False, block_b: int = 16, block_d: int = 128,
                   backend: str | None = None) -> jax.Array:
  """indices [L, B, C] int32, g [B, L, d], w_dec [F, P, d] -> float32 [L, B, C]."""
  if _common.target(interpret, backend) == "tpu":
    return _tpu_call(indices, g, w_dec, interpret)
  num_layers, batch, slots = indices.shape
  dim = w_dec.shape[2]
  bb = _common.row_block(batch, block_b)
  bd = _common.feature_block(dim, block_d, interpret, "clt_gather_dot")
  idx_t = _common.pad_to(jnp.swapaxes(indices.astype(jnp.int32), 1, 2), 2, bb)  # [L, C, B]
  g = _common.pad_to(g, 0, bb)
  padded = idx_t.shape[2]
  out = pl.pallas_call(
      functools.partial(_kernel, block_b=bb, block_d=bd, num_d=dim // bd, num_layers=num_layers),
      name="clt_gather_dot",
      out_shape=jax.ShapeDtypeStruct((num_layers, slots, padded), jnp.float32),
      grid=(padded // bb, num_layers, slots),
      in_specs=[pl.BlockSpec()] * 3,
      out_specs=pl.BlockSpec((None, None, bb), lambda i, s, c: (s, c, i)),
      compiler_params=_common.compiler_params(interpret),
      interpret=interpret,
  )(idx_t, g, w_dec)
  return jnp.swapaxes(out[:, :, :batch], 1, 2)
