"""Sort-based reduction plan shared by the scatter kernels: no float atomics.

The (row, b, j) pairs are sorted by destination row with one XLA sort on the [B * C] indices;
each destination row's pairs are then a contiguous segment [starts[n], starts[n + 1]), found by
`searchsorted`, and one kernel program per (row, D block) walks its segment and writes the row
once. Sorted arrays get `pad` zero entries at the end so a program's last chunk of pairs never
reads out of bounds (padding pairs carry value 0 and are masked anyway).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def plan(indices: jax.Array, values: jax.Array, num_rows: int, pad: int):
  """indices, values [..., M] -> (starts [..., num_rows + 1], pairs [..., M + pad],
  vals [..., M + pad]).

  `pairs` is the flat position b * C + j of each sorted pair (the kernels take b = pair // C),
  `vals` its value; leading axes are independent problems (the CLT's source layers).
  """
  keys = indices.astype(jnp.int32)
  pos = lax.broadcasted_iota(jnp.int32, keys.shape, keys.ndim - 1)
  rows, order = lax.sort((keys, pos), dimension=keys.ndim - 1, num_keys=1)
  vals = jnp.take_along_axis(values, order, axis=-1)
  queries = jnp.arange(num_rows + 1, dtype=jnp.int32)
  # Unrolled: jnp's default scan is a while loop, which XLA:GPU drives from the host one trip at
  # a time (at B C = 262144, 19 trips of three tiny kernels and a device-to-host copy: 0.66 ms
  # of the profiled d=640 step on an H200, the GPU idle); unrolled, the halvings fuse.
  search = lambda r: jnp.searchsorted(r, queries, side="left", method="scan_unrolled").astype(
      jnp.int32)
  for _ in range(rows.ndim - 1):
    search = jax.vmap(search)
  starts = search(rows)
  widths = [(0, 0)] * (keys.ndim - 1) + [(0, pad)]
  return starts, jnp.pad(order, widths), jnp.pad(vals, widths)
