"""Cross-layer transcoder decode: every source layer writes to itself and all later layers.

out[b, t] = sum_{s <= t} sum_j v[s, b, j] * w_dec[s, idx[s, b, j], t]. The XLA reference gathers,
for each source layer, the [L, d] decoder rows of its active latents in one go (the sparse
decode over the flattened [F, L*d] matrix), masks the earlier target layers and sums over
sources; its gradient is the sparse decode's custom VJP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from allscope.kernels.sparse_decode import sparse_decode


def causal_mask(n_layers: int, dtype=jnp.float32) -> jax.Array:
  """[source, target] = 1 where target >= source."""
  return jnp.triu(jnp.ones((n_layers, n_layers), dtype))


def clt_decode(indices: jax.Array, values: jax.Array, w_dec: jax.Array) -> jax.Array:
  """indices, values [L, B, C]; w_dec [L, F, L, d] -> [B, L, d] (before b_dec)."""
  n_src, width, n_tgt, d = w_dec.shape
  flat = w_dec.reshape(n_src, width, n_tgt * d)
  per_source = jax.vmap(sparse_decode)(indices, values, flat).reshape(n_src, -1, n_tgt, d)
  mask = causal_mask(n_src, per_source.dtype)[:, None, :, None]
  return jnp.sum(per_source * mask, axis=0)
