"""Training objectives on normalized activations.

  loss = mse (+ Matryoshka prefixes) + sparsity + frequency + AuxK

mse is the squared error summed over features, averaged over tokens, summed over dictionaries
(each layer's dictionary gets its own gradient). Sparsity, per dictionary:
  JumpReLU  linear:    c * L0                    quadratic: c * (L0 / target - 1)^2
            (L0 through the step's pseudo-derivative, so only thresholds feel it)
  ReLU      c * sum_f f * |w_dec_f|   (L1 weighted by decoder norm)
  TopK/BatchTopK: none; AuxK: the top aux_k dead latents reconstruct the residual error,
            aux_coef * |e - e_hat|^2 / |e - mean e|^2.
Frequency (JumpReLU): freq_coef * sum_f relu(p_f - freq_max)^2, p_f = the batch firing rate
through the step's pseudo-derivative. c ramps linearly over sparsity_warmup_steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from allscope import kernels
from allscope.trainers import dictionaries, mesh as mesh_lib
from allscope.trainers.config import TrainConfig


def sparsity_scale(cfg: TrainConfig, step: jax.Array) -> jax.Array:
  warm = max(cfg.sparsity_warmup_steps, 1)
  return jnp.minimum(1.0, (step.astype(jnp.float32) + 1.0) / warm)


def _sq(v: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(v), axis=-1)  # over features -> [B, G]


def loss_fn(params: dictionaries.Params, cfg: TrainConfig, x: jax.Array, y: jax.Array,
            dead: jax.Array, scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """x [B, G, d_in], y [B, G_out, d_out] (normalized); dead [G, F] bool; scale: sparsity ramp."""
  enc = dictionaries.encode(params, cfg, x, dead)
  # AuxK's sparse path decodes its latents together with the main ones, so both decoder
  # gradients share one buffer (a CLT's decoder is 1.5x the [L, B, F] pre-activations at 18
  # layers) and no zeroed gradient or sum exists while no latent is dead.
  joint_aux = enc.aux_indices is not None
  ranked, columns = dictionaries.aux_regimes(cfg, dead)
  if joint_aux:
    y_hat, e_hat = _decode_with_aux(params, cfg, x, enc, ranked)
  else:
    y_hat = dictionaries.decode(params, cfg, x, enc.indices, enc.acts)
  err = _sq(y - y_hat)  # [B, G_out]
  mse = jnp.sum(jnp.mean(err, axis=0))
  var = jnp.sum(jnp.square(y - jnp.mean(y, axis=0, keepdims=True)), axis=(0, 2))  # [G_out]
  metrics = {"mse": mse, "fvu": jnp.sum(err) / jnp.maximum(jnp.sum(var), 1e-12),
             "fvu_per_group": jax.lax.stop_gradient(jnp.sum(err, axis=0) / jnp.maximum(var, 1e-12))}
  loss = mse

  for m in cfg.matryoshka:
    acts_m = enc.acts * (enc.indices < m)
    y_m = dictionaries.decode(params, cfg, x, enc.indices, acts_m)
    loss = loss + jnp.sum(jnp.mean(_sq(y - y_m), axis=0))

  # Firing latents dropped for lack of capacity fired too: without them a JumpReLU pinned at
  # its capacity would see an L0 of at most `slots` and its penalty would stop pushing.
  batch = x.shape[0]
  dropped = jax.lax.stop_gradient(enc.overflow.astype(jnp.float32)) / batch
  l0 = jnp.mean(jnp.sum(enc.fired, axis=-1), axis=-1) + dropped  # [G]
  metrics["l0"] = jnp.mean(l0)
  metrics["l0_per_group"] = jax.lax.stop_gradient(l0)
  if cfg.activation == "jumprelu":
    if cfg.l0_penalty == "linear":
      sparsity = cfg.sparsity_coef * jnp.sum(l0)
    else:
      sparsity = cfg.sparsity_coef * jnp.sum(jnp.square(l0 / cfg.target_l0 - 1.0))
    loss = loss + scale * sparsity
    metrics["sparsity"] = sparsity
    metrics["window_dropped"] = jnp.sum(enc.window_dropped)
    if cfg.freq_coef:
      freq = jax.vmap(lambda i, v: jax.ops.segment_sum(v.reshape(-1), i.reshape(-1),
                                                       num_segments=cfg.width))(
          enc.indices, enc.fired) / batch  # [G, F]
      freq_pen = cfg.freq_coef * jnp.sum(jnp.square(jax.nn.relu(freq - cfg.freq_max)))
      loss = loss + scale * freq_pen
      metrics["freq_penalty"] = freq_pen
  elif cfg.activation == "relu":
    norms = dictionaries.decoder_norms(params["w_dec"], cfg)  # [G, F]
    w = jax.vmap(lambda n, i: n[i])(norms, enc.indices)  # [G, B, C]
    sparsity = cfg.sparsity_coef * jnp.sum(jnp.mean(jnp.sum(enc.acts * w, axis=-1), axis=-1))
    loss = loss + scale * sparsity
    metrics["sparsity"] = sparsity
  elif cfg.auxk:
    # AuxK only matters once latents die; skipping it until then saves its aux_k-wide encoder
    # gradient and decode (both sparse, so the untaken branch costs little memory). Its two
    # regimes (dictionaries.aux_regimes) exclude each other.
    residual = jax.lax.stop_gradient(y - y_hat)
    if joint_aux:
      aux = jnp.where(ranked, _aux_ratio(residual, e_hat), 0.0)
    else:
      aux = jax.lax.cond(ranked, lambda p: _auxk(p, cfg, x, enc, residual),
                         lambda p: jnp.zeros((), jnp.float32), params)
    if cfg.kind != "clt":
      aux = aux + _auxk_columns(params, cfg, x, dead, residual, columns)
    loss = loss + cfg.aux_coef * aux
    metrics["auxk"] = aux

  metrics["overflow"] = jnp.sum(enc.overflow)
  metrics["loss"] = loss
  extras = {"indices": enc.indices, "fired": jax.lax.stop_gradient(enc.fired),
            "batch_threshold": enc.batch_threshold}
  if enc.lift is not None:
    extras["lift"] = jax.lax.stop_gradient(enc.lift)
  if cfg.resample_fractions:  # trainers.resample: rows by error, their residuals and top-k cut-offs
    kept = jnp.min(jnp.where(enc.fired > 0, enc.acts, jnp.inf), axis=-1)  # [G, B]
    extras.update(residual=jax.lax.stop_gradient(y - y_hat), row_err=jax.lax.stop_gradient(err),
                  row_threshold=jax.lax.stop_gradient(jnp.where(jnp.isfinite(kept), kept, 0.0)))
  return loss, (metrics, extras)


def _auxk(params, cfg: TrainConfig, x, enc: dictionaries.Encoding, residual) -> jax.Array:
  """The top aux_k dead latents of each row reconstruct the residual error (Gao et al. 2024);
  the dense path (dictionaries.aux_dense): [B, F] activations, zero off the candidates, through
  matmuls, cheaper once aux_k is a sizeable fraction of F. The sparse path is _decode_with_aux.
  """
  xg = jnp.swapaxes(x, 0, 1)
  pre = jax.vmap(kernels.dense_encode)(xg, params["w_enc"], params["b_enc"], enc.aux_pre)
  acts = jnp.where(enc.aux_ok, jax.nn.relu(pre), 0.0)
  e_hat = jnp.einsum("gbf,gfo->bgo", acts, params["w_dec"], preferred_element_type=jnp.float32)
  return _aux_ratio(residual, e_hat)


def _auxk_columns(params, cfg: TrainConfig, x, dead, residual, columns) -> jax.Array:
  """AuxK in its columns regime (0 outside it): every group's silent latents fit in n columns,
  n the smallest of dictionaries.aux_column_sizes that holds them, and AuxK is the dense problem
  over those columns (a B x d x n encode and decode) with autodiff's gradients: _auxk's value
  without its [B, F] products. Up to n = aux_k every row keeps all of them (no ranking); above,
  each row keeps those at or above its aux_k-th value among them, as _auxk's dense path.

  The columns are gathered outside the switch, so its branches take and return [G, d, n]
  blocks, not parameter-sized gradients (one scatter into them, outside too).
  """
  k_aux = min(cfg.aux_k, cfg.width)
  sizes = dictionaries.aux_column_sizes(cfg)
  compute = jnp.bfloat16 if cfg.matmul_dtype == "bfloat16" else jnp.float32
  xg = jnp.swapaxes(x, 0, 1).astype(compute)  # [G, B, d_in]
  ids = jax.lax.top_k(dead.astype(jnp.int32), sizes[-1])[1]  # [G, n]: the silent latents first
  # Outside the regime every id is out of range: the gathers read nothing and their transposed
  # scatters (into parameter-sized gradients, every step) write nothing.
  ids = jnp.where(columns, ids, cfg.width)
  take = functools.partial(jnp.take_along_axis, mode="fill", fill_value=0)
  ok = take(dead, ids, axis=1)[:, None, :]
  cols = (take(params["w_enc"], ids[:, None, :], axis=2),  # [G, d_in, n]
          take(params["b_enc"], ids, axis=1)[:, None, :],  # [G, 1, n]
          take(params["w_dec"], ids[:, :, None], axis=1))  # [G, n, d_out]

  def ratio(n: int, c) -> jax.Array:
    w_enc, b_enc, w_dec = c[0][..., :n], c[1][..., :n], c[2][:, :n]
    pre = jnp.einsum("gbi,gin->gbn", xg, w_enc.astype(compute),
                     preferred_element_type=jnp.float32) + b_enc
    keep = ok[..., :n]
    if n > k_aux:  # a tie at the row's aux_k-th value keeps every tied latent
      scores = jnp.where(keep, jax.lax.stop_gradient(pre), -jnp.inf)
      keep = keep & (scores >= kernels.nth_largest(scores, k_aux)[..., None])
    acts = jnp.where(keep, jax.nn.relu(pre), 0.0)
    e_hat = jnp.einsum("gbn,gno->bgo", acts, w_dec, preferred_element_type=jnp.float32)
    return _aux_ratio(residual, e_hat)

  widest = jnp.max(jnp.sum(dead, axis=-1))
  size = jnp.sum(widest > jnp.asarray(sizes[:-1], jnp.int32)) if len(sizes) > 1 else 0
  branches = [lambda c: jnp.zeros((), jnp.float32)] + [
      lambda c, n=n: ratio(n, c) for n in sizes]
  return jax.lax.switch(jnp.where(columns, 1 + size, 0), branches, cols)


def _aux_ratio(residual: jax.Array, e_hat: jax.Array) -> jax.Array:
  num = jnp.sum(jnp.square(residual - e_hat))
  den = jnp.sum(jnp.square(residual - jnp.mean(residual, axis=0, keepdims=True)))
  return num / jnp.maximum(den, 1e-12)


def _decode_with_aux(params, cfg: TrainConfig, x, enc: dictionaries.Encoding,
                     use_aux: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The reconstruction and AuxK's e_hat (zeros while no latent is dead) from one decode,
  whose backward adds AuxK's pairs into the main decoder gradient."""
  ops = dictionaries.kernel_ops(cfg)
  acts = jnp.where(enc.aux_ok, jax.nn.relu(enc.aux_pre), 0.0)
  if cfg.kind == "clt":
    y_lat, e_hat = kernels.clt_decode_with_aux(enc.indices, enc.acts, enc.aux_indices, acts,
                                               params["w_dec"], use_aux, ops)
  else:
    y_lat, e_hat = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), mesh_lib.group_vmap(
        lambda i, v, ai, av, w: kernels.decode_with_aux(i, v, ai, av, w, use_aux, ops))(
            enc.indices, enc.acts, enc.aux_indices, acts, params["w_dec"]))
  return dictionaries.add_bias_and_skip(params, x, y_lat), e_hat
