"""Selection: which latents of each row are active, as (indices, values) with a fixed capacity.

Every selector returns `Selection(indices [B, C] int32, values [B, C], overflow, active)` and is
built on the seam's `top_k` (exactly lax.top_k: ties to the lower index). `values` hold the
pre-activations at the chosen indices and 0 in unused slots, `active` marks the used slots,
`overflow` counts active latents that did not fit in the capacity (0 for TopK). Indices carry
no gradient; values carry the gradient of a gather. The trainers pass a pre without gradient
and take theirs through `sparse_encode`, which never builds a dense [B, F] cotangent.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from allscope.kernels import xla
from allscope.kernels.dispatch import XLA, Ops


def row_count(x: jax.Array, keep, offset: jax.Array | None = None, chunk: int = 1024) -> jax.Array:
  """[..., N] -> [...] int32: how many entries of each row satisfy keep(x + offset).

  `offset` ([N], optional) is added chunk by chunk. Counted in a loop: XLA on CPU does not fuse a
  mask into a long-row reduction, so a plain jnp.sum would materialize the whole [B, N] mask (and
  x + offset).
  """
  n = x.shape[-1]
  if n <= chunk or n % chunk:
    return jnp.sum(keep(x if offset is None else x + offset), axis=-1, dtype=jnp.int32)

  def body(i, acc):
    part = jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=-1)
    if offset is not None:
      part = part + jax.lax.dynamic_slice_in_dim(offset, i * chunk, chunk)
    return acc + jnp.sum(keep(part), axis=-1, dtype=jnp.int32)

  return jax.lax.fori_loop(0, n // chunk, body, jnp.zeros(x.shape[:-1], jnp.int32))


class Selection(NamedTuple):
  indices: jax.Array  # [B, C] int32
  values: jax.Array  # [B, C], pre-activation at each index, 0 where the slot is unused
  overflow: jax.Array  # int32 scalar: active latents dropped for lack of capacity
  active: jax.Array  # [B, C] bool, False in unused slots


def topk(pre: jax.Array, k: int, ops: Ops = XLA) -> Selection:
  """The k largest pre-activations per row (values may be negative; the caller applies ReLU)."""
  _, indices = ops.top_k(jax.lax.stop_gradient(pre), k)
  return Selection(indices, jnp.take_along_axis(pre, indices, axis=-1), jnp.zeros((), jnp.int32),
                   jnp.ones(indices.shape, bool))


def _masked_select(pre: jax.Array, keep: jax.Array, capacity: int, ops: Ops) -> Selection:
  """The `capacity` largest kept entries per row; unused slots get value 0."""
  scores = jnp.where(keep, jax.lax.stop_gradient(pre), -jnp.inf)
  top, indices = ops.top_k(scores, capacity)
  used = top > -jnp.inf
  overflow = jnp.sum(jnp.maximum(row_count(scores, lambda v: v > -jnp.inf) - capacity, 0))
  values = jnp.where(used, jnp.take_along_axis(pre, indices, axis=-1), 0.0)
  return Selection(indices, values, overflow.astype(jnp.int32), used)


def batchtopk(pre: jax.Array, k: int, capacity: int, ops: Ops = XLA) -> tuple[Selection, jax.Array]:
  """The k*B largest positive pre-activations of the batch, at most `capacity` per row.

  Returns the selection and the batch threshold (the smallest selected value), which the
  trainer averages into the inference-time JumpReLU threshold. Candidates are first cut to the
  top `capacity` of each row, so the global pass sorts B*C values, not B*F. The result is exact
  when no row holds more than `capacity` of the batch's top k*B (overflow == 0); otherwise the
  threshold comes from the capped candidates and the winners beyond a row's capacity are
  counted in `overflow`. The selection is then a mask of the row candidates (no second pass
  over [B, F]).
  """
  sg = jax.lax.stop_gradient(jnp.maximum(pre, 0.0))
  row_top, row_idx = ops.top_k(sg, capacity)
  batch = pre.shape[0]
  n = min(k * batch, row_top.size)
  threshold = xla.nth_largest(row_top.reshape(-1), n)  # the n-th largest candidate
  used = (row_top >= threshold) & (row_top > 0)
  # counted on pre (equal where positive), so relu(pre) is only the top_k operand, not kept
  kept = row_count(jax.lax.stop_gradient(pre), lambda v: (v >= threshold) & (v > 0))
  overflow = jnp.sum(jnp.maximum(kept - capacity, 0))
  values = jnp.where(used, jnp.take_along_axis(pre, row_idx, axis=-1), 0.0)
  return Selection(row_idx, values, overflow.astype(jnp.int32), used), threshold


def jumprelu(pre: jax.Array, threshold: jax.Array, capacity: int, window: float = 0.0,
             ops: Ops = XLA) -> Selection:
  """Latents with pre > threshold - window/2, the largest `capacity` per row.

  With `window` = the JumpReLU bandwidth, the selection also holds the latents just below their
  threshold, whose pseudo-derivative is non-zero, so the threshold gradient stays sparse.
  """
  keep = jax.lax.stop_gradient(pre) > threshold - 0.5 * window
  return _masked_select(pre, keep, capacity, ops)


def relu(pre: jax.Array, capacity: int, ops: Ops = XLA) -> Selection:
  """Positive pre-activations, the largest `capacity` per row."""
  return _masked_select(pre, jax.lax.stop_gradient(pre) > 0, capacity, ops)
