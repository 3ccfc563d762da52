"""Independent float64 reference of the released dictionary math (from the Gemma Scope 2
definitions, not allscope's code), and the error measure the tests assert on."""

from __future__ import annotations

import numpy as np


def ref_encode(p, x, architecture="jump_relu", k=None):
  x = np.asarray(x, np.float64)
  pre = x @ p["w_enc"].astype(np.float64) + p["b_enc"].astype(np.float64)
  if architecture == "jump_relu":
    return np.where(pre > p["threshold"].astype(np.float64), pre, 0.0)
  if architecture == "relu":
    return np.maximum(pre, 0.0)
  out = np.zeros_like(pre)
  top = np.argsort(-pre, axis=-1)[..., :k]
  np.put_along_axis(out, top, np.maximum(np.take_along_axis(pre, top, -1), 0.0), -1)
  return out


def ref_decode(p, f, x=None):
  y = f @ p["w_dec"].astype(np.float64) + p["b_dec"].astype(np.float64)
  if "affine_skip_connection" in p:
    y = y + np.asarray(x, np.float64) @ p["affine_skip_connection"].astype(np.float64)
  return y


def ref_clt(layer_params, xs):
  """Features [L, T, F] and outputs [L, T, d] of a CLT on inputs xs [L, T, d]."""
  n = len(layer_params)
  feats = np.stack([ref_encode(layer_params[l], xs[l]) for l in range(n)])
  outs = []
  for t in range(n):
    y = np.broadcast_to(layer_params[t]["b_dec"].astype(np.float64), xs[t].shape).copy()
    for s in range(t + 1):
      y += feats[s] @ layer_params[s]["w_dec"][:, t].astype(np.float64)
    if "affine_skip_connection" in layer_params[t]:
      y += xs[t].astype(np.float64) @ layer_params[t]["affine_skip_connection"].astype(np.float64)
    outs.append(y)
  return feats, np.stack(outs)


def well_posed_inputs(rng, params_list, n, d, margin=1e-3):
  """Random inputs [n, d] whose pre-activations keep `margin` from every JumpReLU threshold, so
  float32 clients and the float64 reference cannot disagree on which latents fire."""
  rows = []
  while sum(len(r) for r in rows) < n:
    x = rng.normal(0, 1, (4 * n, d)).astype(np.float32)
    ok = np.ones(len(x), bool)
    for p in params_list:
      pre = x.astype(np.float64) @ p["w_enc"].astype(np.float64) + p["b_enc"]
      ok &= np.all(np.abs(pre - p.get("threshold", 0.0)) > margin, axis=1)
    rows.append(x[ok])
  return np.concatenate(rows)[:n]


def rel_err(actual, expected):
  expected = np.asarray(expected, np.float64)
  return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))
