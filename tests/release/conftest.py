"""Random release-format dictionaries and an independent float64 reference of their math."""

from __future__ import annotations

import numpy as np
import pytest

from allscope.release import CrossLayerTranscoder, Dictionary


def random_params(rng: np.random.Generator, d_in: int, width: int, d_out: int,
                  affine: bool = False, clt_layers: int | None = None, source: int = 0):
  """Fresh random float32 tensors; thresholds in [0.05, 0.6] so that roughly a third fire."""
  p = {
      "w_enc": rng.normal(0, d_in ** -0.5, (d_in, width)),
      "b_enc": rng.normal(0, 0.1, (width,)),
      "threshold": rng.uniform(0.05, 0.6, (width,)),
      "b_dec": rng.normal(0, 0.1, (d_out,)),
  }
  if clt_layers is None:
    p["w_dec"] = rng.normal(0, width ** -0.5, (width, d_out))
  else:
    w_dec = rng.normal(0, width ** -0.5, (width, clt_layers, d_out))
    w_dec[:, :source] = 0.0  # a CLT writes only to its own and later layers
    p["w_dec"] = w_dec
  if affine:
    p["affine_skip_connection"] = rng.normal(0, d_in ** -0.5, (d_in, d_out))
  return {k: v.astype(np.float32) for k, v in p.items()}


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


@pytest.fixture
def make_dict(rng):
  def make(type_="sae", site="resid_post", layer=1, d=16, width=64, architecture="jump_relu",
           affine=False, l0=7.3, k=None, l0_tag=None, metadata=None):
    site_in, site_out = ("mlp_in", "mlp_out") if type_ == "transcoder" else (site, site)
    params = random_params(rng, d, width, d, affine)
    if architecture != "jump_relu":  # TopK has no threshold; a ReLU's would be 0
      del params["threshold"]
    return Dictionary(params, type_, architecture, "gemma3-270m",
                      layer, site_in, site_out, l0=l0, k=k, l0_tag=l0_tag,
                      metadata=metadata or {})
  return make


@pytest.fixture
def make_clt(rng):
  def make(n_layers=3, d=16, width=32, affine=False, l0=11.0):
    layers = tuple(random_params(rng, d, width, d, affine, clt_layers=n_layers, source=l)
                   for l in range(n_layers))
    return CrossLayerTranscoder(layers, "jump_relu", "gemma3-270m", l0=l0)
  return make
