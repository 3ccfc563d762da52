"""The NNX module, shapes and initialization of every kind."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from allscope import kernels
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


@pytest.mark.parametrize("capacity", [3, 6])
def test_jumprelu_firing_latents_take_the_slots_before_window_entries(capacity):
  """Selection ranks by the margin over the threshold: a window entry (just under a high
  threshold, large pre) never displaces a firing latent; `overflow` counts only firing latents
  dropped, `window_dropped` the window entries dropped (float64 numpy reference)."""
  rng = np.random.default_rng(capacity)
  b, f, eps = 64, 32, 0.4
  cfg = TrainConfig(kind="sae", activation="jumprelu", width=f, capacity=capacity, bandwidth=eps)
  thr = rng.uniform(0.1, 1.5, f)
  params = {"w_enc": jnp.eye(f)[None], "b_enc": jnp.zeros((1, f)),
            "log_threshold": jnp.asarray(np.log(thr), jnp.float32)[None],
            "w_dec": jnp.eye(f)[None], "b_dec": jnp.zeros((1, f))}
  x = rng.normal(0.0, 0.6, (b, f)).astype(np.float32)  # pre = x (identity encoder)
  enc = dictionaries.encode(params, cfg, jnp.asarray(x)[:, None])

  fired = x.astype(np.float64) > thr
  window = x.astype(np.float64) > thr - eps / 2
  n_fired, n_window = fired.sum(-1), window.sum(-1)
  assert (n_window > n_fired).any() and (n_window > capacity).any()  # the case under test
  assert int(enc.overflow[0]) == np.maximum(n_fired - capacity, 0).sum()
  assert int(enc.window_dropped[0]) == (np.maximum(n_window - capacity, 0).sum()
                                        - np.maximum(n_fired - capacity, 0).sum())
  idx, acts = np.asarray(enc.indices[0]), np.asarray(enc.acts[0])
  for row in range(b):
    kept = set(idx[row][acts[row] != 0])
    if n_fired[row] <= capacity:  # every firing latent holds a slot, with its pre as value
      assert kept == set(np.flatnonzero(fired[row]))
    else:  # the largest margins fire
      margin = x[row] - thr
      assert kept == set(np.argsort(-margin)[:capacity])
    np.testing.assert_allclose(acts[row][acts[row] != 0], x[row][idx[row][acts[row] != 0]],
                               rtol=1e-6)


@pytest.mark.parametrize("width", [24, 80])  # fewer latents than rows, and more (rows reused)
def test_data_init_columns_are_centred_batch_rows_at_the_random_spread(width):
  """encoder_init="data": column f is the unit centred input row i(f) scaled to the random
  init's mean pre-activation spread; decoder row f is that row's unit centred output at the
  init decoder norm (float64 numpy reference on a fresh batch)."""
  rng = np.random.default_rng(width)
  b, d_in, d_out = 32, 10, 6
  cfg = TrainConfig(kind="transcoder", activation="topk", layers=(0, 1), width=width, k=3,
                    encoder_init="data")
  x = rng.normal(size=(b, 2, d_in)) * rng.uniform(0.1, 3.0, size=d_in) + 0.5
  y = rng.normal(size=(b, 2, d_out)) + 1.0
  random = dictionaries.init_params(cfg, d_in, d_out, jax.random.key(0))
  got = dictionaries.data_init(random, cfg, jnp.asarray(x, jnp.float32),
                               jnp.asarray(y, jnp.float32), jax.random.key(1))
  xc, yc = x - x.mean(0), y - y.mean(0)
  for g in range(2):
    w = np.asarray(got["w_enc"][g], np.float64)  # [d_in, F]
    units = xc[:, g] / np.linalg.norm(xc[:, g], axis=-1, keepdims=True)  # [B, d_in]
    cos = units @ (w / np.linalg.norm(w, axis=0))  # [B, F]
    rows = np.argmax(cos, axis=0)
    np.testing.assert_allclose(cos[rows, np.arange(width)], 1.0, atol=1e-5)
    counts = np.bincount(rows, minlength=b)  # a permutation of the batch, reused evenly
    assert counts.max() == -(-width // b) and counts.min() == width // b
    target = np.mean(np.std(xc[:, g] @ np.asarray(random["w_enc"][g], np.float64), axis=0))
    np.testing.assert_allclose(np.std(xc[:, g] @ w, axis=0), target, rtol=1e-4)
    dec = yc[rows, g] / np.linalg.norm(yc[rows, g], axis=-1, keepdims=True) * cfg.init_decoder_norm
    np.testing.assert_allclose(np.asarray(got["w_dec"][g]), dec, rtol=1e-4, atol=1e-9)


def test_training_starts_from_data_init_when_asked():
  """The train loop's first-batch initialization applies encoder_init="data" (then centres the
  biases as for any untied encoder)."""
  from allscope.trainers import loop
  rng = np.random.default_rng(5)
  cfg = TrainConfig(kind="transcoder", activation="topk", layers=(0,), width=16, k=2,
                    encoder_init="data")
  x = rng.normal(size=(32, 1, 6)) + 0.2
  y = rng.normal(size=(32, 1, 5))
  st = loop._initial_state(cfg, 6, 5, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                           jnp.ones(1), jnp.ones(1))
  w = np.asarray(st.params["w_enc"][0], np.float64)
  xc = x[:, 0] - x[:, 0].mean(0)
  cos = (xc / np.linalg.norm(xc, axis=-1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
  np.testing.assert_allclose(np.max(cos, axis=0), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(st.params["b_enc"][0]), -x[:, 0].mean(0) @ w,
                             rtol=1e-4, atol=1e-6)


def test_topk_and_auxk_hand_top_k_the_encoder_product_and_the_bias_row(monkeypatch):
  """The seam's top_k adds the bias (AuxK: the bias at silent latents, -inf elsewhere) as it reads
  the product: no [B, F] score array is written for either selection (a Pallas kernel reads its
  operands from memory; on an H200 each such array cost 0.5 ms at B=4096, F=65536)."""
  calls = []

  def top_k(x, k, offset=None):
    calls.append((k, x.shape, None if offset is None else offset.shape))
    return kernels.XLA.top_k(x, k, offset)

  recording = dataclasses.replace(kernels.XLA, name="recording", top_k=top_k)
  monkeypatch.setattr(dictionaries, "kernel_ops", lambda cfg: recording)
  cfg = TrainConfig(kind="sae", activation="topk", layers=(0,), width=1024, k=4, aux_k=8)
  params = dictionaries.init_params(cfg, 16, 16, jax.random.key(0))
  dead = jnp.arange(1024)[None, :] % 2 == 0  # more silent latents than the columns regime takes
  x = jax.random.normal(jax.random.key(1), (32, 1, 16))
  jax.make_jaxpr(lambda p, x: dictionaries.encode(p, cfg, x, dead))(params, x)
  assert sorted(calls) == [(4, (32, 1024), (1024,)), (8, (32, 1024), (1024,))]
