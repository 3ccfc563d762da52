"""clt_scatter_outer: out[n, p(s, t)] = sum over (b, j) with indices[s, b, j] == n of
values[s, b, j] * g[b, t] (d w_dec of `clt_decode`).

The sort-based segment reduction of `scatter_outer`, per source layer: one batched XLA sort
orders each source's [B * C] pairs by latent; one program per (latent n, pair p(s, t), d block)
walks latent n's segment of source s, gathers g[b, t] and writes its output row once. Every
row of the causal decoder gradient is written exactly once, zeros where no pair touches it;
with `acc`, each program adds its block of `acc` (aliased to the output, so updated in place).
GPU: Triton. TPU: Mosaic, a program per latent writing its whole [P, d] block, pair lists and
g rows by DMA (`_tpu.segment_rows`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from allscope.kernels import clt_layout, xla
from allscope.kernels.pallas import _common, _segments, _tpu
from allscope.kernels.pallas.clt_decode import pair


def _kernel(src_ref, tgt_ref, starts_ref, pair_ref, val_ref, g_ref, *refs, block_d: int,
            block_p: int, slots: int):
  *acc_ref, out_ref = refs  # acc_ref: the `acc` block this program adds to (aliased to out)
  n, p, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(k * block_d, block_d)
  s, t = src_ref[p], tgt_ref[p]
  start, end = starts_ref[s, n], starts_ref[s, n + 1]

  def body(q, acc):
    first = start + q * block_p
    live = first + jnp.arange(block_p, dtype=jnp.int32) < end
    # Lanes past the segment re-read its first row (cached) instead of another row's.
    b = jnp.where(live, pair_ref[s, pl.ds(first, block_p)], pair_ref[s, start]) // slots
    val = jnp.where(live, val_ref[s, pl.ds(first, block_p)].astype(jnp.float32), 0.0)
    contrib = val[:, None] * g_ref[b, t, cols].astype(jnp.float32)
    return acc + jnp.sum(jnp.where(live[:, None], contrib, 0.0), axis=0)

  trips = (end - start + block_p - 1) // block_p
  acc = lax.fori_loop(0, trips, body, jnp.zeros((block_d,), jnp.float32))
  out_ref[...] = (acc + acc_ref[0][...]) if acc_ref else acc


def _tpu_kernel(starts_hbm, pair_hbm, val_hbm, g_hbm, *refs, block_p: int, slots: int,
                num_layers: int, has_acc: bool):
  acc_ref = refs[0] if has_acc else None  # the `acc` block (aliased to out_ref)
  out_ref, starts_smem, pair_smem, val_smem, buf_ref, sem = refs[int(has_acc):]
  n = pl.program_id(0)  # one latent: its [P, d] output block is whole in the last two dims

  def source(s, carry):
    _tpu.copy_now(starts_hbm.at[s, pl.ds(n, 2)], starts_smem, sem)

    def target(t, carry):
      def store(r, acc):
        row = pl.ds(pair(s, t, num_layers), 1)
        out_ref[row, :] = (acc + acc_ref[row, :]) if has_acc else acc

      _tpu.segment_rows(starts_smem, pair_hbm, val_hbm, pair_smem, val_smem, buf_ref, sem,
                        block_n=1, block_p=block_p, slots=slots, lead=s,
                        src_row=lambda b: g_hbm.at[t, pl.ds(b, 1)], store=store)
      return carry

    return lax.fori_loop(s, num_layers, target, carry)

  lax.fori_loop(0, num_layers, source, 0)


def _tpu_call(indices, values, g, num_rows: int, acc, interpret: bool, block_p: int):
  num_layers, batch, slots = indices.shape
  dim = g.shape[2]
  starts, pairs, vals = _segments.plan(indices.reshape(num_layers, -1),
                                       values.reshape(num_layers, -1).astype(jnp.float32),
                                       num_rows, block_p)
  num_pairs = clt_layout.n_pairs(num_layers)
  block = pl.BlockSpec((None, num_pairs, dim), lambda n: (n, 0, 0))
  extra = () if acc is None else (acc,)
  return pl.pallas_call(
      functools.partial(_tpu_kernel, block_p=block_p, slots=slots, num_layers=num_layers,
                        has_acc=acc is not None),
      name="clt_scatter_outer",
      out_shape=jax.ShapeDtypeStruct((num_rows, num_pairs, dim), jnp.float32),
      grid=(num_rows,),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 4 + [block] * len(extra),
      out_specs=block,
      scratch_shapes=_tpu.segment_scratch(1, block_p, dim, g.dtype),
      input_output_aliases={4: 0} if extra else {},
      compiler_params=_common.tpu_params(1),
      interpret=_common.interpret_mode(interpret, "tpu"),
  )(starts, pairs, vals, jnp.swapaxes(g, 0, 1), *extra)  # g as [L, B, d]: g[:, t] rows by DMA


@functools.partial(jax.jit,
                   static_argnames=("num_rows", "interpret", "block_d", "block_p", "backend"))
def clt_scatter_outer(indices: jax.Array, values: jax.Array, g: jax.Array, num_rows: int,
                      acc: jax.Array | None = None, *, interpret: bool = False,
                      block_d: int = 128, block_p: int = 16,
                      backend: str | None = None) -> jax.Array:
  """indices [L, B, C] int32, values [L, B, C], g [B, L, d] -> float32 [num_rows, P, d];
  plus `acc` (float32 [num_rows, P, d]) when given, updated in its buffer (aliased)."""
  if acc is not None:
    xla.check_acc(acc, (num_rows, clt_layout.n_pairs(indices.shape[0]), g.shape[2]))
  if _common.target(interpret, backend) == "tpu":
    return _tpu_call(indices, values, g, num_rows, acc, interpret, block_p)
  num_layers, batch, slots = indices.shape
  dim = g.shape[2]
  bd = _common.feature_block(dim, block_d, interpret, "clt_scatter_outer")
  starts, pairs, vals = _segments.plan(indices.reshape(num_layers, -1),
                                       values.reshape(num_layers, -1), num_rows, block_p)
  sources, targets = jnp.asarray(clt_layout.pair_source(num_layers)), jnp.asarray(clt_layout.pair_target(num_layers))
  num_pairs = clt_layout.n_pairs(num_layers)
  block = pl.BlockSpec((None, None, bd), lambda n, p, k: (n, p, k))
  extra = () if acc is None else (acc,)
  return pl.pallas_call(
      functools.partial(_kernel, block_d=bd, block_p=block_p, slots=slots),
      name="clt_scatter_outer",
      out_shape=jax.ShapeDtypeStruct((num_rows, num_pairs, dim), jnp.float32),
      grid=(num_rows, num_pairs, dim // bd),
      in_specs=[pl.BlockSpec()] * 6 + [block] * len(extra),
      out_specs=block,
      input_output_aliases={6: 0} if extra else {},
      compiler_params=_common.compiler_params(interpret, num_warps=2),
      interpret=interpret,
  )(sources, targets, starts, pairs, vals, g, *extra)
