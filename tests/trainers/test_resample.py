"""Dead-latent resampling: the recipe at the scheduled step, nothing else touched, exact resume."""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allscope.trainers import TrainConfig, dictionaries, resample, synthetic, train
from allscope.trainers import state as state_lib
from allscope.trainers.step import train_step

B, D_IN, D_OUT, F = 64, 12, 8, 48
CFG = TrainConfig(kind="transcoder", activation="topk", layers=(0, 1), width=F, k=3,
                  batch_size=B, steps=10, lr=3e-3, aux_after_tokens=1000,
                  resample_fractions=(0.5,))  # step 5
OFF = dataclasses.replace(CFG, resample_fractions=())
CFG = dataclasses.replace(CFG, revive=False)  # resampling alone (revive is measured apart)
OFF = dataclasses.replace(OFF, revive=False)


def _setup(seed: int, outlier: bool = False):
  """A state with non-zero Adam moments at step 5, half its latents silent; a fresh batch."""
  rng = np.random.default_rng(seed)
  batch = lambda: (jnp.asarray(rng.normal(size=(B, 2, D_IN)) + 0.3, jnp.float32),
                   jnp.asarray(rng.normal(size=(B, 2, D_OUT)), jnp.float32))
  ones = jnp.ones((2,), jnp.float32)
  params = dictionaries.init_params(OFF, D_IN, D_OUT, jax.random.key(seed))
  st = state_lib.init_state(OFF, params, jax.random.key(seed))
  step = jax.jit(lambda s, x, y: train_step(OFF, s, x, y, ones, ones)[0])
  for _ in range(3):
    st = step(st, *batch())
  silent = rng.random((2, F)) < 0.5
  st = st.replace(step=jnp.asarray(5, jnp.int32),
                  since_fired=jnp.where(silent, CFG.aux_after_tokens, 0).astype(jnp.int32))
  x, y = batch()
  if outlier:  # row 7's error dwarfs every other row's
    y = y.at[7].add(100.0)
  return st, x, y, ones


def _moments(st):
  adam = st.opt_state[1][0]
  return adam.mu, adam.nu


def test_schedule_is_a_function_of_the_step():
  assert resample.resample_steps(dataclasses.replace(CFG, steps=94,
                                                     resample_fractions=(0.25, 0.5))) == (24, 47)
  assert TrainConfig(activation="topk").resample_fractions == ()  # off by default
  with pytest.raises(ValueError, match="resample_fractions"):
    TrainConfig(activation="jumprelu", resample_fractions=(0.5,)).validate()
  with pytest.raises(ValueError, match="resample_fractions"):
    TrainConfig(activation="topk", resample_fractions=(1.5,)).validate()


def test_silent_latents_restart_from_high_error_rows_and_nothing_else_changes():
  st, x, y, ones = _setup(0)
  on, _ = jax.jit(lambda s: train_step(CFG, s, x, y, ones, ones))(st)
  off, _ = jax.jit(lambda s: train_step(OFF, s, x, y, ones, ones))(st)
  # Silent after this batch: the flagged latents that did not fire on it.
  silent = np.asarray(off.since_fired) >= CFG.aux_after_tokens
  assert 0 < silent.sum() < silent.size
  assert np.all(np.asarray(on.since_fired)[silent] == 0)
  live = ~silent
  # Everything outside the silent latents is bitwise what the step without resampling gives.
  p_on, p_off = ({k: np.asarray(v) for k, v in s.params.items()} for s in (on, off))
  np.testing.assert_array_equal(p_on["b_dec"], p_off["b_dec"])
  np.testing.assert_array_equal(p_on["w_enc"].transpose(0, 2, 1)[live],
                                p_off["w_enc"].transpose(0, 2, 1)[live])
  np.testing.assert_array_equal(p_on["b_enc"][live], p_off["b_enc"][live])
  np.testing.assert_array_equal(p_on["w_dec"][live], p_off["w_dec"][live])
  for m_on, m_off in zip(_moments(on), _moments(off)):
    np.testing.assert_array_equal(np.asarray(m_on["w_enc"]).transpose(0, 2, 1)[live],
                                  np.asarray(m_off["w_enc"]).transpose(0, 2, 1)[live])
    np.testing.assert_array_equal(np.asarray(m_on["w_dec"])[live], np.asarray(m_off["w_dec"])[live])
    np.testing.assert_array_equal(np.asarray(m_on["b_enc"])[live], np.asarray(m_off["b_enc"])[live])
    np.testing.assert_array_equal(np.asarray(m_on["b_dec"]), np.asarray(m_off["b_dec"]))
    # The resampled latents' Adam moments restart from zero.
    assert np.all(np.asarray(m_on["w_enc"]).transpose(0, 2, 1)[silent] == 0)
    assert np.all(np.asarray(m_on["w_dec"])[silent] == 0)
    assert np.all(np.asarray(m_on["b_enc"])[silent] == 0)

  # The recipe, in float64 from the batch and the pre-step parameters.
  x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
  y_hat, enc = dictionaries.forward(st.params, CFG, x)
  residual = y64 - np.asarray(y_hat, np.float64)
  acts, fired = np.asarray(enc.acts, np.float64), np.asarray(enc.fired)
  kept = np.min(np.where(fired > 0, acts, np.inf), axis=-1)  # [G, B]
  for g in range(2):
    xc = x64[:, g] - x64[:, g].mean(0)
    w = p_on["w_enc"][g].astype(np.float64)[:, silent[g]]  # [d_in, S]
    cos = (xc / np.linalg.norm(xc, axis=-1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
    rows = np.argmax(cos, axis=0)
    np.testing.assert_allclose(cos[rows, np.arange(len(rows))], 1.0, atol=1e-5)
    enc_norm = np.mean(np.linalg.norm(p_off["w_enc"][g].astype(np.float64), axis=0)[live[g]])
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), enc_norm, rtol=1e-5)
    # Each enters the top k on its own row: its pre-activation there is the row's smallest kept.
    pre = np.sum(x64[rows, g] * w.T, axis=-1) + p_on["b_enc"][g][silent[g]]
    np.testing.assert_allclose(pre, kept[g, rows], rtol=1e-4, atol=1e-6)
    dec_norm = np.mean(np.linalg.norm(p_off["w_dec"][g].astype(np.float64), axis=-1)[live[g]])
    r = residual[rows, g]
    np.testing.assert_allclose(p_on["w_dec"][g][silent[g]],
                               r / np.linalg.norm(r, axis=-1, keepdims=True) * dec_norm,
                               rtol=1e-4, atol=1e-9)


def test_rows_are_drawn_by_squared_error():
  st, x, y, ones = _setup(1, outlier=True)
  on, _ = jax.jit(lambda s: train_step(CFG, s, x, y, ones, ones))(st)
  off, _ = jax.jit(lambda s: train_step(OFF, s, x, y, ones, ones))(st)
  silent = np.asarray(off.since_fired) >= CFG.aux_after_tokens
  assert silent.sum() > 4
  xc = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(0)
  for g in range(2):
    w = np.asarray(on.params["w_enc"][g], np.float64)[:, silent[g]]
    cos = (xc[7, g] / np.linalg.norm(xc[7, g])) @ (w / np.linalg.norm(w, axis=0))
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)  # every one of them from row 7


def test_steps_off_the_schedule_are_untouched():
  st, x, y, ones = _setup(2)
  st = st.replace(step=jnp.asarray(4, jnp.int32))
  on, _ = jax.jit(lambda s: train_step(CFG, s, x, y, ones, ones))(st)
  off, _ = jax.jit(lambda s: train_step(OFF, s, x, y, ones, ones))(st)
  for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_interrupted_before_a_resample_step_resumes_exactly(tmp_path):
  from allscope.trainers import preemption
  src = synthetic.SyntheticSource(synthetic.SyntheticSpec(d=16, n_features=32, n_layers=2, l0=3),
                                  n_rows=2048)
  cfg = TrainConfig(kind="transcoder", site_in="resid_post", site_out="resid_post",
                    activation="topk", layers=(0, 1), width=64, k=3, batch_size=64, steps=12,
                    aux_after_tokens=128, resample_fractions=(0.6,), checkpoint_every=4,
                    log_every=100)  # resamples at step 7

  def interrupt(step, ctx):
    if step == 5:
      os.kill(os.getpid(), signal.SIGINT)

  run = lambda c, out, hooks=(): train(c, synthetic.loader(src, 64), src.norm_scale(),
                                       tmp_path / out, hooks=hooks, progress=False)
  straight = run(cfg, "a")
  never = run(dataclasses.replace(cfg, resample_fractions=()), "off")
  assert not np.array_equal(straight.params["w_enc"], never.params["w_enc"])  # it resampled
  with pytest.raises(preemption.Preempted):
    run(cfg, "b", [interrupt])
  resumed = run(cfg, "b")
  assert resumed.resumed_from == 6
  for k, v in straight.params.items():
    assert np.array_equal(v, resumed.params[k]), k


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_revive_puts_each_silent_latent_in_the_top_k_of_its_best_row(activation):
  """train.revive: a silent latent's encoder bias rises (after the Adam update) by what it
  lacked to enter the top k of its best row of the batch, plus REVIVE_MARGIN; nothing else
  changes (float64 reference from the pre-step parameters)."""
  from allscope.trainers import step as step_lib
  st, x, y, ones = _setup(3)
  base = dataclasses.replace(OFF, activation=activation, revive=False)
  cfg = dataclasses.replace(base, revive=True)
  on, _ = jax.jit(lambda s: train_step(cfg, s, x, y, ones, ones))(st)
  off, _ = jax.jit(lambda s: train_step(base, s, x, y, ones, ones))(st)
  dead = np.asarray(st.since_fired) >= CFG.aux_after_tokens  # what the step saw
  x64 = np.asarray(x, np.float64)
  enc = dictionaries.encode(st.params, base, x)
  for g in range(2):
    pre = x64[:, g] @ np.asarray(st.params["w_enc"][g], np.float64) + np.asarray(
        st.params["b_enc"][g], np.float64)  # [B, F]
    if activation == "topk":
      cut = np.maximum(np.sort(pre, axis=-1)[:, -CFG.k], 0.0)  # the row's smallest kept value
    else:
      cut = np.full(B, max(float(enc.batch_threshold[g]), 0.0))
    lift = np.maximum(-np.max(pre - cut[:, None], axis=0), 0.0)
    want = np.where(dead[g] & (lift > 0), lift + step_lib.REVIVE_MARGIN, 0.0)
    assert np.sum(want > 0) > 0
    got = np.asarray(on.params["b_enc"][g], np.float64) - np.asarray(off.params["b_enc"][g])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  for k in ("w_enc", "w_dec", "b_dec"):
    np.testing.assert_array_equal(np.asarray(on.params[k]), np.asarray(off.params[k]))


def test_jumprelu_revive_lowers_the_nearest_silent_thresholds_under_their_best_pre_activation():
  """train.revive for JumpReLU: after the update, the REVIVE_MAX_FRACTION x width silent latents
  nearest their thresholds (in log units, over the batch's best pre-activation) get the
  log-threshold log(best pre) - REVIVE_LOG_MARGIN; a silent latent whose pre-activations are
  all <= 0, or beyond that count, keeps its threshold, and nothing else changes (float64
  reference from the pre-step parameters)."""
  from allscope.trainers import step as step_lib
  f = 256  # 8 revived per step
  base = TrainConfig(kind="transcoder", activation="jumprelu", layers=(0, 1), width=f,
                     target_l0=8.0, batch_size=B, steps=10, lr=3e-3, aux_after_tokens=1000,
                     revive=False)
  cfg = dataclasses.replace(base, revive=True)
  assert TrainConfig(activation="jumprelu").revives  # on by default
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(B, 2, D_IN)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(B, 2, D_OUT)), jnp.float32)
  ones = jnp.ones((2,), jnp.float32)
  params = dictionaries.init_params(base, D_IN, D_OUT, jax.random.key(4))
  b_enc = rng.normal(0.0, 0.5, size=(2, f))
  b_enc[:, ::16] = -20.0  # pre-activations <= 0 on every row: no threshold reaches them
  params["b_enc"] = jnp.asarray(b_enc, jnp.float32)
  x64 = np.asarray(x, np.float64)
  pre = np.einsum("bgi,gif->gbf", x64, np.asarray(params["w_enc"], np.float64)) + np.asarray(
      params["b_enc"], np.float64)[:, None]  # [G, B, F]
  best = pre.max(axis=1)
  silent = rng.random((2, f)) < 0.5
  # Live latents fire on their top tenth of rows; silent ones sit above their best row.
  thr = np.where(silent, np.abs(best) * np.exp(rng.uniform(0.1, 2.0, (2, f))),
                 np.maximum(np.quantile(pre, 0.9, axis=1), 1e-3))
  params["log_threshold"] = jnp.asarray(np.log(thr), jnp.float32)
  st = state_lib.init_state(base, params, jax.random.key(4))
  st = st.replace(step=jnp.asarray(5, jnp.int32),
                  since_fired=jnp.where(silent, 1000, 0).astype(jnp.int32))
  on, _ = jax.jit(lambda s: train_step(cfg, s, x, y, ones, ones))(st)
  off, _ = jax.jit(lambda s: train_step(base, s, x, y, ones, ones))(st)
  n = int(f * step_lib.REVIVE_MAX_FRACTION)
  log_thr = np.log(np.asarray(np.exp(params["log_threshold"]), np.float64))
  for g in range(2):
    gap = np.where(silent[g] & (best[g] > 0), log_thr[g] - np.log(np.maximum(best[g], 1e-30)),
                   np.inf)
    assert np.sum(np.isfinite(gap)) > n and np.sum(silent[g] & (best[g] <= 0)) > 0  # both cases
    chosen = np.argsort(gap)[:n]
    want = np.zeros(f)
    want[chosen] = -(gap[chosen] + step_lib.REVIVE_LOG_MARGIN)
    got = (np.asarray(on.params["log_threshold"][g], np.float64)
           - np.asarray(off.params["log_threshold"][g], np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
  for k in ("w_enc", "b_enc", "w_dec", "b_dec"):
    np.testing.assert_array_equal(np.asarray(on.params[k]), np.asarray(off.params[k]))
