"""clt_decode: out[b, t] = sum_{s <= t} sum_j values[s, b, j] * w_dec[indices[s, b, j], p(s, t)].

w_dec [F, P, d] is the causal CLT decoder (`allscope.kernels.clt_layout`). GPU (Triton): grid
over (row block of B, target layer t, block of d); each program loops over the sources s <= t
and their C slots, gathering row p(s, t) of each active latent straight from w_dec, so every
(latent, target) row is read once per token and no [B, C, L * d] block exists. TPU (Mosaic):
grid over (row block, t); per source s <= t the program DMAs that source's index and value
blocks, then its BB x C rows p(s, t) from HBM into VMEM (`_tpu`), and accumulates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from allscope.kernels.pallas import _common, _tpu


def pair(s, t, num_layers: int):
  """p(s, t) on traced scalars (see clt_layout); lax.div: s (s - 1) >= 0, and Mosaic has no
  sign op for jnp's floor division."""
  return s * num_layers - lax.div(s * (s - 1), 2) + (t - s)


def _kernel(idx_ref, val_ref, w_ref, out_ref, *, block_b: int, block_d: int, slots: int,
            num_layers: int):
  i, t, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(i * block_b, block_b)
  cols = pl.ds(k * block_d, block_d)

  def source(s, acc):
    p = pair(s, t, num_layers)

    def slot(c, acc):
      idx = idx_ref[s, c, rows]
      val = val_ref[s, c, rows].astype(jnp.float32)
      return acc + val[:, None] * w_ref[idx, p, cols].astype(jnp.float32)

    return lax.fori_loop(0, slots, slot, acc)

  acc = lax.fori_loop(0, t + 1, source, jnp.zeros((block_b, block_d), jnp.float32))
  out_ref[...] = acc


def _tpu_kernel(idx_hbm, val_hbm, w_hbm, out_ref, idx_smem, val_vmem, rows_ref, sem, *,
                block_b: int, slots: int, num_layers: int):
  i, t = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(i * block_b, block_b)

  def source(s, acc):
    _tpu.copy_now(idx_hbm.at[s, rows], idx_smem, sem)  # [BB, C] -> SMEM
    _tpu.copy_now(val_hbm.at[s, pl.ds(0, slots), rows], val_vmem, sem)  # [C, BB, 1]
    _tpu.gather_rows(idx_smem, w_hbm, rows_ref, sem, block_b=block_b, slots=slots,
                     pair=pair(s, t, num_layers))

    def slot(c, acc):
      return acc + val_vmem[c] * rows_ref[c].astype(jnp.float32)

    return lax.fori_loop(0, slots, slot, acc)

  out_ref[...] = lax.fori_loop(0, t + 1, source, jnp.zeros(out_ref.shape, jnp.float32))


def _tpu_call(indices, values, w_dec, interpret: bool):
  num_layers, batch, slots = indices.shape
  dim = w_dec.shape[2]
  bb = _tpu.row_block(w_dec.dtype)
  idx = _common.pad_to(indices.astype(jnp.int32), 1, bb)  # [L, B, C]
  val = _common.pad_to(jnp.swapaxes(values.astype(jnp.float32), 1, 2), 2, bb)[..., None]
  padded = idx.shape[1]
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, block_b=bb, slots=slots, num_layers=num_layers),
      name="clt_decode",
      out_shape=jax.ShapeDtypeStruct((num_layers, padded, dim), jnp.float32),  # [L, B, d]
      grid=(padded // bb, num_layers),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 3,
      out_specs=pl.BlockSpec((None, bb, dim), lambda i, t: (t, i, 0)),
      scratch_shapes=[pltpu.SMEM((bb, slots), jnp.int32),
                      pltpu.VMEM((slots, bb, 1), jnp.float32),
                      *_tpu.rows_scratch(slots, bb, dim, w_dec.dtype)],
      compiler_params=_common.tpu_params(2),
      interpret=_common.interpret_mode(interpret, "tpu"),
  )(idx, val, w_dec)
  return jnp.swapaxes(out[:, :batch], 0, 1)


@functools.partial(jax.jit, static_argnames=("interpret", "block_b", "block_d", "backend"))
def clt_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array, *,
               interpret: bool = False, block_b: int = 16, block_d: int = 128,
               backend: str | None = None) -> jax.Array:
  """indices [L, B, C] int32, values [L, B, C], w_dec [F, P, d] -> float32 [B, L, d]."""
  if _common.target(interpret, backend) == "tpu":
    return _tpu_call(indices, values, w_dec, interpret)
  num_layers, batch, slots = indices.shape
  dim = w_dec.shape[2]
  bb = _common.row_block(batch, block_b)
  bd = _common.feature_block(dim, block_d, interpret, "clt_decode")
  idx_t = _common.pad_to(jnp.swapaxes(indices.astype(jnp.int32), 1, 2), 2, bb)  # [L, C, B]
  val_t = _common.pad_to(jnp.swapaxes(values, 1, 2), 2, bb)
  padded = idx_t.shape[2]
  out = pl.pallas_call(
      functools.partial(_kernel, block_b=bb, block_d=bd, slots=slots, num_layers=num_layers),
      name="clt_decode",
      out_shape=jax.ShapeDtypeStruct((padded, num_layers, dim), jnp.float32),
      grid=(padded // bb, num_layers, dim // bd),
      in_specs=[pl.BlockSpec()] * 3,
      out_specs=pl.BlockSpec((bb, None, bd), lambda i, t, k: (i, t, k)),
      compiler_params=_common.compiler_params(interpret),
      interpret=interpret,
  )(idx_t, val_t, w_dec)
  return out[:batch]
