"""Float64 numpy references of the kernel seam and the random inputs the Pallas tests share."""

from __future__ import annotations

import numpy as np

from allscope.kernels import clt_layout


def sparse_inputs(rng, batch: int, slots: int, rows: int, *, lead: tuple[int, ...] = ()):
  """Indices with duplicates (within and across rows: rows << batch * slots), zero-value slots."""
  shape = lead + (batch, slots)
  indices = rng.integers(0, rows, shape).astype(np.int32)
  indices[..., 1] = indices[..., 0]  # a duplicate inside every row
  values = rng.normal(size=shape).astype(np.float32)
  values[rng.random(shape) < 0.25] = 0.0  # empty slots
  return indices, values


def gather_decode(indices, values, table):
  return np.einsum("bc,bcd->bd", values.astype(np.float64), table.astype(np.float64)[indices])


def gather_dot(indices, g, table):
  return np.einsum("bd,bcd->bc", g.astype(np.float64), table.astype(np.float64)[indices])


def scatter_outer(indices, values, src, num_rows):
  out = np.zeros((num_rows, src.shape[1]))
  contrib = values.astype(np.float64)[:, :, None] * src.astype(np.float64)[:, None, :]
  np.add.at(out, indices.reshape(-1), contrib.reshape(-1, src.shape[1]))
  return out


def clt_decode(indices, values, w_dec):
  num_layers = indices.shape[0]
  pairs = clt_layout.pair_index(num_layers)
  out = np.zeros((indices.shape[1], num_layers, w_dec.shape[2]))
  for s in range(num_layers):
    for t in range(s, num_layers):
      out[:, t] += gather_decode(indices[s], values[s], w_dec[:, pairs[s, t]])
  return out


def clt_gather_dot(indices, g, w_dec):
  num_layers = indices.shape[0]
  pairs = clt_layout.pair_index(num_layers)
  out = np.zeros(indices.shape)
  for s in range(num_layers):
    for t in range(s, num_layers):
      out[s] += gather_dot(indices[s], g[:, t], w_dec[:, pairs[s, t]])
  return out


def clt_scatter_outer(indices, values, g, num_rows):
  num_layers = indices.shape[0]
  pairs = clt_layout.pair_index(num_layers)
  out = np.zeros((num_rows, clt_layout.n_pairs(num_layers), g.shape[2]))
  for s in range(num_layers):
    for t in range(s, num_layers):
      out[:, pairs[s, t]] = scatter_outer(indices[s], values[s], g[:, t], num_rows)
  return out


def top_k(x, k):
  """Stable descending sort: ties to the lower index, as lax.top_k."""
  order = np.argsort(-x.astype(np.float64), axis=1, kind="stable")[:, :k]
  return np.take_along_axis(x, order, axis=1), order.astype(np.int32)


def rel_err(got, want) -> float:
  want = np.asarray(want, np.float64)
  return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))
