"""JumpReLU's L0 controller: after each update every log-threshold of a dictionary moves by
l0_control * log(batch L0 / target_l0), clipped to +-1 and ramped like the penalty over the
sparsity warm-up, and nothing else changes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allscope.trainers import TrainConfig, dictionaries
from allscope.trainers import state as state_lib
from allscope.trainers.step import train_step

B, D_IN, D_OUT, F = 128, 12, 8, 64
CFG = TrainConfig(kind="transcoder", activation="jumprelu", layers=(0, 1, 2), width=F,
                  target_l0=6.0, batch_size=B, steps=10, lr=3e-3, l0_control=0.05,
                  sparsity_warmup_steps=4)  # step 0: the controller at a quarter of its gain
OFF = dataclasses.replace(CFG, l0_control=0.0)


def _true_l0(params, x) -> np.ndarray:
  """Per dictionary, the mean number of latents over their thresholds, in float64."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  pre = np.einsum("bgi,gif->gbf", np.asarray(x, np.float64), p["w_enc"]) + p["b_enc"][:, None]
  return np.mean(np.sum(pre > np.exp(p["log_threshold"])[:, None], axis=-1), axis=-1)


@pytest.mark.parametrize("seed", [0])
def test_each_step_moves_a_dictionarys_thresholds_by_its_log_l0_error(seed):
  rng = np.random.default_rng(seed)
  params = dictionaries.init_params(CFG, D_IN, D_OUT, jax.random.key(seed))
  # Three dictionaries far above, near and far below the target (the last one clipped at -1).
  thr = np.exp(rng.normal(np.log([0.05, 0.8, 3.0]), 0.1, size=(F, 3)).T)
  params["log_threshold"] = jnp.asarray(np.log(thr), jnp.float32)
  x = jnp.asarray(rng.normal(size=(B, 3, D_IN)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(B, 3, D_OUT)), jnp.float32)
  ones = jnp.ones((3,), jnp.float32)
  st = state_lib.init_state(CFG, params, jax.random.key(seed))
  on, m_on = jax.jit(lambda s: train_step(CFG, s, x, y, ones, ones))(st)
  st = state_lib.init_state(OFF, params, jax.random.key(seed))
  off, _ = jax.jit(lambda s: train_step(OFF, s, x, y, ones, ones))(st)

  l0 = _true_l0(params, x)
  assert l0[0] > 2 * CFG.target_l0 and l0[2] < CFG.target_l0 / 3, l0  # the setup spans the clip
  np.testing.assert_allclose(np.asarray(m_on["per_group"]["l0"]), l0, rtol=1e-6)
  want = CFG.l0_control / 4 * np.clip(np.log(np.maximum(l0, 1e-3) / CFG.target_l0), -1.0, 1.0)
  shift = np.asarray(on.params["log_threshold"]) - np.asarray(off.params["log_threshold"])
  np.testing.assert_allclose(shift, np.broadcast_to(want[:, None], shift.shape), atol=2e-6)
  for name in ("w_enc", "b_enc", "w_dec", "b_dec"):  # the controller touches thresholds only
    np.testing.assert_array_equal(np.asarray(on.params[name]), np.asarray(off.params[name]))


def test_the_controller_is_on_by_default_and_checked():
  assert TrainConfig(activation="jumprelu").l0_control == 0.1
  for bad in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="train.l0_control"):
      TrainConfig(activation="jumprelu", l0_control=bad).validate()
