"""The NNX module, shapes and initialization of every kind."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from allscope.kernels import clt_layout
from allscope.trainers import dictionaries
from allscope.trainers.config import KINDS, TrainConfig


@pytest.mark.parametrize("kind", KINDS)
def test_module_matches_pure_forward_and_initialization_conventions(kind):
  cfg = TrainConfig(kind=kind, activation="topk", layers=(0, 3, 5), width=32, k=4)
  module = dictionaries.Dictionary(cfg, 12, 12, rngs=nnx.Rngs(0))
  params = module.params()
  assert {k: v.shape for k, v in params.items()} == dictionaries.shapes(cfg, 12, 12)
  x = jax.random.normal(jax.random.key(1), (8, 3, 12))
  want, _ = dictionaries.forward(params, cfg, dictionaries.prepare(cfg, x))
  np.testing.assert_array_equal(module(x), want)
  norms = np.asarray(dictionaries.decoder_norms(params["w_dec"], cfg))
  row = 1.0 if cfg.unit_decoder else cfg.init_decoder_norm  # TopK: a free decoder, small at init
  np.testing.assert_allclose(norms, row, rtol=1e-5)
  if kind == "clt":  # causal storage [F, P, d]: rows only for targets at or after the source
    assert params["w_dec"].shape == (32, 6, 12)
  w_enc, w_dec = np.asarray(params["w_enc"]), np.asarray(params["w_dec"])
  if cfg.tied_init:  # saes and crosscoders: the encoder starts as the decoder's transpose
    np.testing.assert_allclose(np.swapaxes(w_enc, 1, 2), w_dec / row, atol=1e-5)
  else:  # transcoders (input and output spaces differ): independent columns of norm ~1
    assert kind in ("transcoder", "skip_transcoder", "clt")
    if kind != "clt":
      assert not np.allclose(np.swapaxes(w_enc, 1, 2), w_dec / row, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(w_enc, axis=1).mean(), 1.0, rtol=0.1)
  rebuilt = dictionaries.Dictionary(cfg, 12, 12, params=params)
  np.testing.assert_array_equal(rebuilt(x), want)


def test_bfloat16_encoder_product_stays_close_to_float32():
  cfg = TrainConfig(kind="sae", activation="jumprelu", layers=(0,), width=64, capacity=64,
                    threshold_init=0.05)
  params = dictionaries.init_params(cfg, 32, 32, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (16, 1, 32)) / np.sqrt(32)
  y32, _ = dictionaries.forward(params, cfg, x)

  y16, _ = dictionaries.forward(params, dataclasses.replace(cfg, matmul_dtype="bfloat16"), x)
  assert float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32)) < 0.05
