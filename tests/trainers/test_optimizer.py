"""The optimizer: global-norm clipping then Adam, against a float64 numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from allscope.trainers import state as state_lib
from allscope.trainers.config import TrainConfig

SHAPES = {"w_enc": (3, 8, 32), "b_enc": (3, 32), "w_dec": (32, 6, 8), "b_dec": (3, 8)}


def _tree(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
  return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # global norm below and above max_norm
def test_clip_by_global_norm_matches_float64_and_optax(scale):
  rng = np.random.default_rng(int(scale * 1000))
  g = _tree(rng, scale)
  max_norm = 1.0
  norm = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in g.values()))
  expected = {k: v * min(1.0, max_norm / norm) for k, v in g.items()}
  tx = state_lib.clip_by_global_norm(max_norm)
  got, _ = tx.update(jax.tree.map(jnp.asarray, g), tx.init(g))
  ref, _ = optax.clip_by_global_norm(max_norm).update(jax.tree.map(jnp.asarray, g), ())
  for k in g:
    assert _rel(got[k], expected[k]) <= 1e-6, k
    assert _rel(got[k], ref[k]) <= 1e-6, k


def test_optimizer_is_clipped_adam_with_the_schedule():
  """Three updates of state.optimizer against clipping + Adam + the lr schedule in float64."""
  cfg = TrainConfig(lr=3e-3, lr_warmup_steps=2, steps=10, grad_clip=1.0)
  tx = state_lib.optimizer(cfg)
  rng = np.random.default_rng(0)
  params = _tree(rng, 1.0)
  st = tx.init(jax.tree.map(jnp.asarray, params))
  mu = {k: np.zeros(s) for k, s in SHAPES.items()}
  nu = {k: np.zeros(s) for k, s in SHAPES.items()}
  b1, b2, eps = cfg.b1, cfg.adam_b2, 1e-8
  for step, scale in enumerate((5.0, 0.01, 3.0)):
    g = _tree(rng, scale)
    upd, st = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), st)
    norm = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in g.values()))
    lr = float(state_lib.schedule(cfg)(step))
    for k in g:
      gk = g[k].astype(np.float64) * min(1.0, cfg.grad_clip / norm)
      mu[k] = b1 * mu[k] + (1 - b1) * gk
      nu[k] = b2 * nu[k] + (1 - b2) * gk ** 2
      # optax computes 1 - b^t in float32 (its rounding is ~3e-5 of 1 - 0.999^2): so does this.
      bc1, bc2 = (float(np.float32(1) - np.float32(b) ** np.float32(step + 1)) for b in (b1, b2))
      m_hat, v_hat = mu[k] / bc1, nu[k] / bc2
      expected = -lr * m_hat / (np.sqrt(v_hat) + eps)
      if lr == 0.0:
        assert np.all(np.asarray(upd[k]) == 0.0), k
      else:
        assert _rel(upd[k], expected) <= 1e-6, (step, k)


def test_optimizer_state_has_optax_adams_structure():
  """Our first-moment form keeps optax.adam's state, so checkpoints of either restore into the
  other."""
  cfg = TrainConfig(activation="topk")
  params = jax.tree.map(jnp.asarray, _tree(np.random.default_rng(1), 1.0))
  ours = state_lib.optimizer(cfg).init(params)
  theirs = optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adam(state_lib.schedule(cfg), b1=cfg.b1, b2=cfg.adam_b2)).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])  # b1 = 0.5 and 0.9
def test_adam_update_runs_in_place_on_donated_state(activation):
  """Compile only: the update of a donated parameter and its moments, under the step's guard
  (lax.cond), needs no parameter-sized temporary (optax's first moment at b1 = 0.5 needed one)."""
  cfg = TrainConfig(activation=activation)
  tx = state_lib.optimizer(cfg)
  params = {"w": jax.ShapeDtypeStruct((256, 21, 64), jnp.float32)}
  opt = jax.eval_shape(tx.init, params)

  def step(p, o, g, good):
    def update(_):
      u, o2 = tx.update(g, o, p)
      return optax.apply_updates(p, u), o2
    return jax.lax.cond(good, update, lambda _: (p, o), None)

  mem = (jax.jit(step, donate_argnums=(0, 1, 2))
         .lower(params, opt, params, jax.ShapeDtypeStruct((), bool)).compile().memory_analysis())
  assert mem.temp_size_in_bytes < 0.01 * 256 * 21 * 64 * 4, mem.temp_size_in_bytes
