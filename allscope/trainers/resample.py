"""Dead-latent resampling (Anthropic, "Towards Monosemanticity", 2023; its 2024 update).

At the steps `resample_steps(cfg)` (fixed fractions of train.steps, so a resumed run resamples
at the same steps), every latent silent for `aux_after_tokens` tokens is reinitialized from a
row of the current batch drawn with probability proportional to its squared reconstruction
error:
  encoder column   the centred input row, at the mean norm of the live columns;
  encoder bias     such that the latent's pre-activation on that row equals the row's smallest
                   kept value (it enters the top k on its sample and on rows like it);
  decoder row      the row's residual error, at the mean norm of the live rows;
  Adam moments     of those columns, biases and rows set to zero.
Everything is masked (no dynamic shapes), so it is one jitted branch that works sharded.
TopK and BatchTopK only; not for a CLT (its decoder rows are stored per target layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from allscope.trainers import dictionaries
from allscope.trainers.config import TrainConfig


def resample_steps(cfg: TrainConfig) -> tuple[int, ...]:
  """The step indices (0-based, the step being taken) at which dead latents are resampled."""
  return tuple(sorted({int(round(f * cfg.steps)) for f in cfg.resample_fractions}))


def is_resample_step(cfg: TrainConfig, step: jax.Array) -> jax.Array:
  steps = resample_steps(cfg)
  if not steps:
    return jnp.zeros((), bool)
  return jnp.any(step == jnp.asarray(steps, jnp.int32))


def resample(cfg: TrainConfig, params: dictionaries.Params, opt_state: optax.OptState,
             tx: optax.GradientTransformation, dead: jax.Array, x: jax.Array,
             residual: jax.Array, row_err: jax.Array, row_threshold: jax.Array,
             key: jax.Array) -> tuple[dictionaries.Params, optax.OptState]:
  """Reinitializes the `dead` [G, F] latents (see module docstring).

  x [B, G, d_in] normalized inputs; residual [B, G, d_out] = y - y_hat; row_err [B, G] squared
  error per row; row_threshold [G, B] the smallest kept pre-activation of each row.
  """
  g, f = dead.shape
  keys = jax.random.split(key, g)
  # [G, F] rows drawn with probability proportional to the squared error (Anthropic).
  logits = jnp.log(jnp.maximum(jnp.swapaxes(row_err, 0, 1), 1e-30))  # [G, B]
  rows = jax.vmap(lambda k, l: jax.random.categorical(k, l, shape=(f,)))(keys, logits)

  take = lambda a: jax.vmap(lambda a_g, r: a_g[r])(jnp.swapaxes(a, 0, 1), rows)  # [G, F, d]
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  live = (~dead).astype(jnp.float32)
  n_live = jnp.maximum(jnp.sum(live, axis=-1, keepdims=True), 1.0)  # [G, 1]
  mean_live = lambda norms: jnp.sum(norms * live, axis=-1, keepdims=True) / n_live  # [G, 1]

  x_rows = take(x)  # [G, F, d_in]
  direction = unit(take(x - jnp.mean(x, axis=0, keepdims=True)))
  enc_norm = mean_live(jnp.linalg.norm(params["w_enc"], axis=1))
  w_enc_new = jnp.swapaxes(direction * enc_norm[..., None], 1, 2)  # [G, d_in, F]
  thr = jax.vmap(lambda t, r: t[r])(row_threshold, rows)  # [G, F]
  b_enc_new = thr - jnp.einsum("gfi,gif->gf", x_rows, w_enc_new)
  dec_norm = mean_live(dictionaries.decoder_norms(params["w_dec"], cfg))
  w_dec_new = unit(take(residual)) * dec_norm[..., None]  # [G, F, d_out]

  masks = {"w_enc": dead[:, None, :], "b_enc": dead, "w_dec": dead[:, :, None]}
  new = {"w_enc": w_enc_new, "b_enc": b_enc_new, "w_dec": w_dec_new}
  params = {k: jnp.where(masks[k], new[k], v) if k in masks else v for k, v in params.items()}
  zero = {k: masks.get(k, jnp.zeros((), bool)) for k in params}
  opt_state = optax.tree_map_params(tx, lambda v, m: jnp.where(m, jnp.zeros_like(v), v),
                                    opt_state, zero, transform_non_params=lambda v: v)
  return params, opt_state
