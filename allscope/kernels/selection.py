"""Selection: which latents of each row are active, as (indices, values) with a fixed capacity.

Every selector returns `Selection(indices [B, C] int32, values [B, C], overflow)`. `values` hold
the pre-activations at the chosen indices and 0 in unused slots, `active` marks the used
slots, `overflow` counts active latents that did not fit in the capacity (0 for TopK). Indices carry no gradient; values
carry the gradient of a gather (scattered back into `pre`), so every selector is differentiable
on its own. The trainers take their gradient through `sparse_encode` instead, which never
builds a dense [B, F] cotangent.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Selection(NamedTuple):
  indices: jax.Array  # [B, C] int32
  values: jax.Array  # [B, C], pre-activation at each index, 0 where the slot is unused
  overflow: jax.Array  # int32 scalar: active latents dropped for lack of capacity
  active: jax.Array  # [B, C] bool, False in unused slots


@jax.custom_vjp
def _gather_rows(pre: jax.Array, indices: jax.Array) -> jax.Array:
  return jnp.take_along_axis(pre, indices, axis=-1)


def _gather_fwd(pre, indices):
  return _gather_rows(pre, indices), (indices, pre.shape)


def _gather_bwd(res, g):
  indices, shape = res
  rows = jnp.arange(shape[0])[:, None]
  dpre = jnp.zeros(shape, g.dtype).at[rows, indices].add(g)
  return dpre, None


_gather_rows.defvjp(_gather_fwd, _gather_bwd)


def topk(pre: jax.Array, k: int) -> Selection:
  """The k largest pre-activations per row (values may be negative; the caller applies ReLU)."""
  _, indices = jax.lax.top_k(jax.lax.stop_gradient(pre), k)
  indices = indices.astype(jnp.int32)
  return Selection(indices, _gather_rows(pre, indices), jnp.zeros((), jnp.int32),
                   jnp.ones(indices.shape, bool))


def _masked_select(pre: jax.Array, keep: jax.Array, capacity: int) -> Selection:
  """The `capacity` largest kept entries per row; unused slots get value 0."""
  sg = jax.lax.stop_gradient(pre)
  scores = jnp.where(keep, sg, -jnp.inf)
  top, indices = jax.lax.top_k(scores, capacity)
  indices = indices.astype(jnp.int32)
  used = top > -jnp.inf
  overflow = jnp.sum(jnp.maximum(jnp.sum(keep, axis=-1) - capacity, 0)).astype(jnp.int32)
  values = jnp.where(used, _gather_rows(pre, indices), 0.0)
  return Selection(indices, values, overflow, used)


def batchtopk(pre: jax.Array, k: int, capacity: int) -> tuple[Selection, jax.Array]:
  """The k*B largest positive pre-activations of the batch, at most `capacity` per row.

  Returns the selection and the batch threshold (the smallest selected value), which the
  trainer averages into the inference-time JumpReLU threshold. Candidates are first cut to the
  top `capacity` of each row, so the global pass sorts B*C values, not B*F. The result is exact
  when no row holds more than `capacity` of the batch's top k*B (overflow == 0); otherwise the
  threshold comes from the capped candidates and the winners beyond a row's capacity are
  counted in `overflow`.
  """
  sg = jax.lax.stop_gradient(jnp.maximum(pre, 0.0))
  row_top, _ = jax.lax.top_k(sg, capacity)
  batch = pre.shape[0]
  n = min(k * batch, row_top.size)
  winners, _ = jax.lax.top_k(row_top.reshape(-1), n)
  threshold = winners[-1]
  keep = (sg >= threshold) & (sg > 0)
  return _masked_select(pre, keep, capacity), threshold


def jumprelu(pre: jax.Array, threshold: jax.Array, capacity: int, window: float = 0.0) -> Selection:
  """Latents with pre > threshold - window/2, the largest `capacity` per row.

  With `window` = the JumpReLU bandwidth, the selection also holds the latents just below their
  threshold, whose pseudo-derivative is non-zero, so the threshold gradient stays sparse.
  """
  keep = jax.lax.stop_gradient(pre) > threshold - 0.5 * window
  return _masked_select(pre, keep, capacity)


def relu(pre: jax.Array, capacity: int) -> Selection:
  """Positive pre-activations, the largest `capacity` per row."""
  return _masked_select(pre, jax.lax.stop_gradient(pre) > 0, capacity)
