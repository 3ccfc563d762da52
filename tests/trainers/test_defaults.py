"""Training defaults: the learning-rate rule, the per-activation optimizer and decoder defaults,
the transcoder encoder init, the true L0."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allscope.trainers import dictionaries, losses, state as state_lib
from allscope.trainers.config import ACTIVATION_DEFAULTS, LR_BASE, TrainConfig, default_lr


def test_unset_lr_follows_the_batch_rule_at_every_width():
  topk = dict(activation="topk", k=32)
  cfg = TrainConfig(width=2 ** 12, batch_size=1024, **topk)
  assert cfg.lr is None and cfg.learning_rate == pytest.approx(LR_BASE)
  # The sweep's best lr was the same at widths 1k-16k (docs/train.md): no width term, unlike
  # sparsify's 1/sqrt(F) (which would halve it from 4k to 16k). sqrt(B): 4x the batch doubles it.
  for width in (2 ** 10, 2 ** 14, 2 ** 16):
    assert default_lr(TrainConfig(width=width, batch_size=1024, **topk)) == pytest.approx(LR_BASE)
  assert default_lr(TrainConfig(width=2 ** 14, batch_size=4096, **topk)) == pytest.approx(
      2 * LR_BASE)
  # JumpReLU follows the same rule (its thresholds are calibrated and controlled, docs/train.md).
  for width in (2 ** 10, 2 ** 12):
    assert default_lr(TrainConfig(width=width, batch_size=1024, activation="jumprelu")) == (
        pytest.approx(LR_BASE))
  assert TrainConfig(width=2 ** 12, lr=1e-4).learning_rate == 1e-4
  sched = state_lib.schedule(TrainConfig(width=2 ** 12, batch_size=1024, steps=100,
                                         lr_warmup_steps=10, **topk))
  assert float(sched(50)) == pytest.approx(LR_BASE)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_topk_and_jumprelu_train_a_free_decoder_with_low_momentum_and_no_warmup(activation):
  cfg = TrainConfig(kind="transcoder", activation=activation, width=64, steps=100)
  assert (cfg.warmup_steps, cfg.b1, cfg.unit_decoder) == (0, 0.5, False)
  assert float(state_lib.schedule(cfg)(0)) == pytest.approx(cfg.learning_rate)  # full lr at once
  params = dictionaries.init_params(cfg, 16, 24, jax.random.key(0))
  np.testing.assert_allclose(np.linalg.norm(params["w_dec"], axis=-1), cfg.init_decoder_norm,
                             rtol=1e-5)
  # The optimizer runs Adam with b1 = 0.5: after a gradient of 1 and then one of 0, the second
  # update is (b1 / (1 + b1)) / sqrt(b2 / (1 + b2)) of the first (0.47; 0.67 with b1 = 0.9).
  tx = state_lib.optimizer(cfg)
  p = {"w": jnp.zeros(3)}
  s = tx.init(p)
  u1, s = tx.update({"w": jnp.full(3, 0.1)}, s, p)
  u2, _ = tx.update({"w": jnp.zeros(3)}, s, p)
  b1, b2 = 0.5, cfg.adam_b2
  want = (b1 / (1 + b1)) / np.sqrt(b2 / (1 + b2))
  assert float(u2["w"][0] / u1["w"][0]) == pytest.approx(want, rel=1e-4)


def test_relu_keeps_a_unit_decoder_and_warmup_and_explicit_values_win():
  relu = TrainConfig(activation="relu")
  assert (relu.warmup_steps, relu.b1, relu.unit_decoder) == (100, 0.9, True)
  jr = TrainConfig(activation="jumprelu")
  assert (jr.threshold_init, jr.init_l0_multiple, jr.revives) == (0.0, 1.0, True)
  topk = TrainConfig(activation="topk", lr_warmup_steps=7, adam_b1=0.8, decoder_norm="unit")
  assert (topk.warmup_steps, topk.b1, topk.unit_decoder) == (7, 0.8, True)
  assert TrainConfig(activation="jumprelu", decoder_norm="unit").unit_decoder


def test_sparsity_coefficient_defaults_by_activation():
  # JumpReLU's L0 coefficient is Gemma Scope's 1; ReLU's L1 coefficient is 0.05 (1 killed every
  # latent of a one-pass F = 4096 transcoder on normalized activations; docs/train.md).
  assert TrainConfig(activation="jumprelu").sparsity_coef == 1.0
  assert TrainConfig(activation="relu").sparsity_coef == 0.05
  assert TrainConfig(activation="topk").sparsity_coef == 0.0
  assert TrainConfig(activation="relu", l0_coef=0.3).sparsity_coef == 0.3


@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_a_non_positive_lr_is_refused(lr):
  with pytest.raises(ValueError, match="train.lr"):
    TrainConfig(lr=lr).validate()


def test_transcoders_get_an_independent_encoder_saes_a_tied_one():
  key = jax.random.key(0)
  # Tied: the encoder is the transpose of the decoder's unit directions (free decoders, as
  # JumpReLU's and TopK's, start at norm init_decoder_norm).
  unit_t = lambda w: np.swapaxes(w / np.linalg.norm(w, axis=-1, keepdims=True), 1, 2)
  sae = dictionaries.init_params(TrainConfig(kind="sae", width=64), 16, 16, key)
  np.testing.assert_allclose(sae["w_enc"], unit_t(sae["w_dec"]), rtol=1e-5)
  tc = dictionaries.init_params(TrainConfig(kind="transcoder", width=64), 16, 16, key)
  cos = np.abs(np.sum(tc["w_enc"][0] * tc["w_dec"][0].T, axis=0))
  assert np.max(cos) < 0.95  # not the decoder's transpose
  np.testing.assert_allclose(np.linalg.norm(tc["w_enc"][0], axis=0).mean(), 1.0, rtol=0.2)
  forced = dictionaries.init_params(
      TrainConfig(kind="transcoder", width=64, encoder_init="transpose"), 16, 16, key)
  np.testing.assert_allclose(forced["w_enc"], unit_t(forced["w_dec"]), rtol=1e-5)


def test_l0_counts_the_latents_dropped_for_lack_of_capacity():
  rng = np.random.default_rng(1)
  b, d, f = 64, 8, 32
  cfg = TrainConfig(kind="sae", activation="jumprelu", width=f, target_l0=4.0, capacity=8,
                    threshold_init=0.01)
  params = dictionaries.init_params(cfg, d, d, jax.random.key(1))
  params["b_enc"] = jnp.full((1, f), 1.0)  # every latent fires on every row: 32 > 8 slots
  x = jnp.asarray(rng.normal(size=(b, 1, d)) * 0.01, jnp.float32)
  _, (metrics, _) = losses.loss_fn(params, cfg, x, x, jnp.zeros((1, f), bool), jnp.ones(()))
  pre = np.asarray(x[:, 0] @ params["w_enc"][0] + params["b_enc"][0])
  true_l0 = np.mean(np.sum(pre > np.exp(np.asarray(params["log_threshold"][0])), axis=-1))
  assert int(metrics["overflow"]) == b * (f - 8)
  assert float(metrics["l0"]) == pytest.approx(true_l0, rel=1e-6)
  # The quadratic penalty sees that L0, not the capped one.
  assert float(metrics["sparsity"]) == pytest.approx((true_l0 / 4.0 - 1.0) ** 2, rel=1e-5)
