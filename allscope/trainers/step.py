"""The jitted train step: explicit in/out shardings, donated state, non-finite guard."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from allscope.trainers import dictionaries, losses, mesh as mesh_lib, resample, state as state_lib
from allscope.trainers.config import TrainConfig

_SATURATE = 1 << 30
REVIVE_MARGIN = 1e-3  # a revived latent's pre-activation clears its row's cut-off by this much
# JumpReLU's revive: a revived threshold sits REVIVE_LOG_MARGIN (log) under the latent's best
# pre-activation of the batch; at most REVIVE_MAX_FRACTION of the latents per step (those
# nearest their thresholds), so the L0 they add stays within what the controller absorbs
# (all at once: L0 +58-127% and FVU +29%; docs/train.md).
REVIVE_LOG_MARGIN = 0.05
REVIVE_MAX_FRACTION = 1 / 32


def _finite(tree) -> jax.Array:
  # A NaN or Inf anywhere makes the sum non-finite (finite values near float32's max could
  # overflow it too; that is a divergence as well). jnp.all(jnp.isfinite(x)) would materialize
  # a bool copy of every array: XLA on CPU does not fuse an elementwise producer into a reduce.
  return jnp.all(jnp.stack([jnp.isfinite(jnp.sum(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)]))


def train_step(cfg: TrainConfig, st: state_lib.TrainState, x: jax.Array, y: jax.Array,
               norm_in: jax.Array, norm_out: jax.Array) -> tuple[state_lib.TrainState, dict]:
  """One update. x [B, L, d_in], y [B, L, d_out] raw (any float dtype); norm_* [L] scalars.

  A step whose input, loss or gradient is not finite leaves the state unchanged and records the
  step and cause in bad_step/bad_cause, so the host can stop with a clear message at its next
  check; an update that overflows (finite gradient, non-finite parameters) is recorded the same
  way. The loop checks before every save, so no checkpoint ever holds a non-finite value.
  """
  x = dictionaries.prepare(cfg, x.astype(jnp.float32) * norm_in[None, :, None])
  y = dictionaries.prepare(cfg, y.astype(jnp.float32) * norm_out[None, :, None])
  params = st.params
  dead = st.since_fired >= cfg.aux_after_tokens  # AuxK's candidates (dead_tokens: the metric)
  scale = losses.sparsity_scale(cfg, st.step)
  grad_fn = jax.grad(losses.loss_fn, has_aux=True)
  grads, (metrics, extras) = grad_fn(params, cfg, x, y, dead, scale)

  ok_in = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(y))
  ok_loss = jnp.isfinite(metrics["loss"])
  ok_grad = jnp.isfinite(optax.tree.norm(grads))  # finite gradients keep Adam's moments finite
  good = ok_in & ok_loss & ok_grad & (st.bad_step < 0)

  def update(_):
    g = grads
    if cfg.unit_decoder:
      # Remove the gradient component that would only change the decoder rows' norms.
      w = params["w_dec"]
      par = dictionaries.per_row(dictionaries.latent_sums(g["w_dec"] * w, cfg), cfg)
      g = {**g, "w_dec": g["w_dec"] - par * w}
    tx = state_lib.optimizer(cfg)
    updates, opt_state = tx.update(g, st.opt_state, params)
    if "log_threshold" in updates and cfg.threshold_lr_multiple != 1.0:
      updates = {**updates, "log_threshold": updates["log_threshold"] * cfg.threshold_lr_multiple}
    new_params = optax.apply_updates(params, updates)
    if cfg.unit_decoder:
      new_params["w_dec"] = dictionaries.normalize_decoder(new_params["w_dec"], cfg)
    return new_params, opt_state

  # A branch, not a select between old and new: the update runs in place on the donated state
  # and a skipped step copies nothing (a select would read both and write every array again).
  new_params, opt_state = jax.lax.cond(good, update, lambda _: (params, st.opt_state), None)
  if "lift" in extras and cfg.activation == "jumprelu":
    # train.revive: a silent latent's threshold drops to just under its best pre-activation of
    # the batch (its bias and direction untouched; the L0 controller absorbs the extra firing).
    cand = good & dead & (extras["lift"] > 0)
    n = max(1, int(cfg.width * REVIVE_MAX_FRACTION))
    score = jnp.where(cand, -extras["lift"], -jnp.inf)
    kth = jax.lax.top_k(score, n)[0][..., -1:]
    cand = cand & (score >= kth)
    lift = jnp.where(cand, extras["lift"] + REVIVE_LOG_MARGIN, 0.0)
    new_params = {**new_params, "log_threshold": new_params["log_threshold"] - lift}
  elif "lift" in extras:  # train.revive: silent latents into the top k of their best row
    lift = jnp.where(good & dead & (extras["lift"] > 0), extras["lift"] + REVIVE_MARGIN, 0.0)
    new_params = {**new_params, "b_enc": new_params["b_enc"] + lift}
  if cfg.activation == "jumprelu" and cfg.l0_control:
    # Integral control of each dictionary's L0 on its thresholds (one shared shift in log space),
    # at a rate independent of the lr schedule (the penalty alone, through Adam, moves a
    # log-threshold at most lr x threshold_lr_multiple per step and lags the encoder), ramped
    # with the penalty over the sparsity warm-up.
    err = jnp.log(jnp.maximum(metrics["l0_per_group"], 1e-3) / cfg.target_l0)
    shift = jnp.where(good, cfg.l0_control * scale * jnp.clip(err, -1.0, 1.0), 0.0)
    new_params = {**new_params, "log_threshold": new_params["log_threshold"] + shift[:, None]}
  ok_params = _finite(new_params)  # an update can still overflow (a huge learning rate)

  batch = x.shape[0]
  fired = jax.vmap(lambda i, v: jax.ops.segment_max(v.reshape(-1), i.reshape(-1),
                                                    num_segments=cfg.width))(
      extras["indices"], extras["fired"]) > 0  # [G, F]
  since = jnp.where(fired, 0, jnp.minimum(st.since_fired + batch, _SATURATE))
  if cfg.resample_fractions:
    # At the scheduled steps (a function of the step: a resumed run resamples identically).
    silent = since >= cfg.aux_after_tokens
    key = jax.random.split(jax.random.wrap_key_data(st.rng))[1]
    new_params, opt_state = jax.lax.cond(
        good & resample.is_resample_step(cfg, st.step),
        lambda a: resample.resample(cfg, *a, state_lib.optimizer(cfg), silent, x,
                                    extras["residual"], extras["row_err"],
                                    extras["row_threshold"], key),
        lambda a: a, (new_params, opt_state))
    since = jnp.where(silent & resample.is_resample_step(cfg, st.step), 0, since)
  first = st.step == 0
  # BatchTopK's inference threshold: a running mean of each batch's k*B-th value whose horizon
  # is a quarter of the steps so far (at most 100 steps), so the first steps' thresholds, far
  # from the trained encoder's, fade out in short runs too (0 at step 0: the first value).
  decay = jnp.minimum(0.99, 1.0 - 4.0 / (st.step.astype(jnp.float32) + 4.0))
  batch_thr = decay * st.batch_thr + (1.0 - decay) * extras["batch_threshold"]
  l0 = jnp.where(first, metrics["l0_per_group"], 0.99 * st.l0 + 0.01 * metrics["l0_per_group"])

  cause = jnp.where(~ok_in, 1, jnp.where(~ok_loss, 2, jnp.where(~(ok_grad & ok_params), 3, 0)))
  good = good & ok_params
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(good, a, b), new, old)
  new = state_lib.TrainState(
      params=new_params,
      opt_state=opt_state,
      step=st.step + good.astype(jnp.int32),
      rng=keep(jax.random.key_data(jax.random.split(jax.random.wrap_key_data(st.rng))[0]),
               st.rng),
      since_fired=keep(since, st.since_fired),
      batch_thr=keep(batch_thr, st.batch_thr),
      l0=keep(l0, st.l0),
      bad_step=jnp.where((cause != 0) & (st.bad_step < 0), st.step, st.bad_step),
      bad_cause=jnp.where((cause != 0) & (st.bad_step < 0), cause, st.bad_cause),
  )
  out = {k: metrics[k] for k in ("loss", "mse", "fvu", "l0", "overflow", "window_dropped")
         if k in metrics}
  dead_now = (since >= cfg.dead_tokens).astype(jnp.float32)  # [G, F]
  out["dead"] = jnp.mean(dead_now)
  # Per dictionary (output group for FVU): TensorBoard's per-layer curves.
  out["per_group"] = {"fvu": metrics["fvu_per_group"], "l0": metrics["l0_per_group"],
                      "dead": jnp.mean(dead_now, axis=-1)}
  return new, out


def compile_step(cfg: TrainConfig, mesh: Mesh, state_sh: state_lib.TrainState) -> Callable:
  """jit(train_step) with explicit shardings; the state argument is donated."""
  rep = mesh_lib.replicated(mesh)
  batch_sh = mesh_lib.batch_sharding(mesh)

  def fn(st, x, y, ni, no):
    with mesh_lib.tracing(mesh):
      return train_step(cfg, st, x, y, ni, no)

  return jax.jit(fn, in_shardings=(state_sh, batch_sh, batch_sh, rep, rep),
                 out_shardings=(state_sh, rep), donate_argnums=(0,))


def lower_step(cfg: TrainConfig, d_in: int, d_out: int, mesh: Mesh,
               dtype=jnp.bfloat16) -> jax.stages.Lowered:
  """The step lowered on abstract shapes (nothing allocated): for compile-only memory checks.

  `lower_step(...).compile().memory_analysis().temp_size_in_bytes` is what one step needs
  beyond its arguments and outputs.
  """
  abstract_params = jax.eval_shape(
      lambda: dictionaries.init_params(cfg, d_in, d_out, jax.random.key(0)))
  abstract = jax.eval_shape(lambda p: state_lib.init_state(cfg, p, jax.random.key(0)),
                            abstract_params)
  state_sh = state_lib.shardings(cfg, abstract, mesh)
  n = len(cfg.layers)
  x = jax.ShapeDtypeStruct((cfg.batch_size, n, d_in), dtype)
  y = jax.ShapeDtypeStruct((cfg.batch_size, n, d_out), dtype)
  norm = jax.ShapeDtypeStruct((n,), jnp.float32)
  return compile_step(cfg, mesh, state_sh).lower(abstract, x, y, norm, norm)
