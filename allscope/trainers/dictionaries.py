"""Sparse dictionaries as Flax NNX modules over stacked parameters, plus their pure forward.

Every kind is a stack of G encoders over [B, G, d_in] inputs (G = the trained layers; 1 for a
crosscoder, which reads all its layers flattened into one input):

  pre_g = x_g @ w_enc[g] + b_enc[g]                (dense: the one unavoidable product)
  (idx, f) = select(pre_g)                         (kernels: TopK / BatchTopK / JumpReLU / ReLU)
  y_g = sum_j f[j] w_dec[g, idx[j]] + b_dec[g]     (kernels.sparse_decode)
        (+ x_g @ w_skip[g] for a skip-transcoder)

A CLT's decoder w_dec [G, F, G, d] writes from source layer s to every target t >= s
(kernels.clt_decode). Shapes of the parameters:

  w_enc [G, d_in, F]   b_enc [G, F]   log_threshold [G, F] (JumpReLU)
  w_dec [G, F, d_out] or [G, F, G, d] (CLT)   b_dec [G, d_out]   w_skip [G, d_in, d_out]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allscope import kernels
from allscope.trainers import activations
from allscope.trainers.config import TrainConfig

Params = dict[str, jax.Array]


class Encoding(NamedTuple):
  indices: jax.Array  # [G, B, C] int32
  pre: jax.Array  # [G, B, C] pre-activations at the indices, differentiable (sparse gradient)
  acts: jax.Array  # [G, B, C] activation values f (0 where inactive)
  fired: jax.Array  # [G, B, C] 1.0 where the latent is active (STE step for JumpReLU)
  overflow: jax.Array  # int32: active latents dropped for lack of capacity
  batch_threshold: jax.Array  # [G] BatchTopK's smallest kept value (0 for other activations)
  dense_pre: jax.Array  # [G, B, F] without gradient, for AuxK and calibration


def shapes(cfg: TrainConfig, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
  """Parameter shapes; d_in/d_out are the per-layer site widths."""
  g, f = cfg.n_groups, cfg.width
  n_layers = len(cfg.layers)
  if cfg.kind == "crosscoder":
    d_in, d_out = n_layers * d_in, n_layers * d_out
  out = {"w_enc": (g, d_in, f), "b_enc": (g, f), "b_dec": (g, d_out)}
  out["w_dec"] = (g, f, g, d_out) if cfg.kind == "clt" else (g, f, d_out)
  if cfg.activation == "jumprelu":
    out["log_threshold"] = (g, f)
  if cfg.kind == "skip_transcoder":
    out["w_skip"] = (g, d_in, d_out)
  return out


def init_params(cfg: TrainConfig, d_in: int, d_out: int, key: jax.Array) -> Params:
  """Random unit-norm decoder rows, encoder = decoder transpose where the shapes allow."""
  shp = shapes(cfg, d_in, d_out)
  k_dec, k_enc = jax.random.split(key)
  g, f = cfg.n_groups, cfg.width
  w_dec = jax.random.normal(k_dec, shp["w_dec"], jnp.float32)
  if cfg.kind == "clt":
    w_dec = w_dec * kernels.causal_mask(g)[:, None, :, None]
  w_dec = w_dec / _expand(decoder_norms(w_dec, cfg), w_dec)
  if cfg.decoder_norm == "none":
    w_dec = w_dec * cfg.init_decoder_norm
  din_g = shp["w_enc"][1]
  if cfg.kind == "clt" and d_in == d_out:
    own = w_dec[jnp.arange(g), :, jnp.arange(g), :]  # [G, F, d]: each source's own layer
    w_enc = jnp.swapaxes(own / jnp.linalg.norm(own, axis=-1, keepdims=True), 1, 2)
  elif cfg.kind != "clt" and shp["w_dec"][-1] == din_g:
    w_enc = jnp.swapaxes(w_dec, 1, 2) / (cfg.init_decoder_norm if cfg.decoder_norm == "none" else 1.0)
  else:
    w_enc = jax.random.normal(k_enc, shp["w_enc"], jnp.float32) / np.sqrt(din_g)
  params = {"w_enc": w_enc, "b_enc": jnp.zeros((g, f)), "w_dec": w_dec,
            "b_dec": jnp.zeros(shp["b_dec"])}
  if "log_threshold" in shp:
    params["log_threshold"] = jnp.full((g, f), np.log(max(cfg.threshold_init, 1e-3)), jnp.float32)
  if "w_skip" in shp:
    params["w_skip"] = jnp.zeros(shp["w_skip"])
  return params


def decoder_norms(w_dec: jax.Array, cfg: TrainConfig) -> jax.Array:
  """[G, F] norm of each latent's full decoder row (all targets for a CLT)."""
  if cfg.kind == "clt":
    return jnp.sqrt(jnp.sum(jnp.square(w_dec), axis=(2, 3)))
  return jnp.linalg.norm(w_dec, axis=-1)


def _expand(norms: jax.Array, w_dec: jax.Array) -> jax.Array:
  return norms.reshape(norms.shape + (1,) * (w_dec.ndim - norms.ndim))


def normalize_decoder(w_dec: jax.Array, cfg: TrainConfig) -> jax.Array:
  return w_dec / jnp.maximum(_expand(decoder_norms(w_dec, cfg), w_dec), 1e-8)


def prepare(cfg: TrainConfig, x: jax.Array) -> jax.Array:
  """[B, L, d] site activations -> [B, G, d_in] encoder inputs (a crosscoder flattens)."""
  if cfg.kind == "crosscoder":
    return x.reshape(x.shape[0], 1, -1)
  return x


def encode(params: Params, cfg: TrainConfig, x: jax.Array) -> Encoding:
  """x [B, G, d_in] (normalized) -> the sparse code of every group."""
  compute = jnp.bfloat16 if cfg.matmul_dtype == "bfloat16" else jnp.float32
  xg = jnp.swapaxes(x, 0, 1)  # [G, B, d_in]
  threshold = (jnp.exp(params["log_threshold"]) if "log_threshold" in params
               else jnp.zeros(params["b_enc"].shape))

  def one(x_g, w_enc, b_enc, thr):
    dense = jnp.matmul(x_g.astype(compute), w_enc.astype(compute),
                       preferred_element_type=jnp.float32) + b_enc
    dense = jax.lax.stop_gradient(dense)
    batch_thr = jnp.zeros((), jnp.float32)
    if cfg.activation == "topk":
      sel = kernels.topk(dense, cfg.k)
    elif cfg.activation == "batchtopk":
      sel, batch_thr = kernels.batchtopk(dense, cfg.k, cfg.slots)
    elif cfg.activation == "jumprelu":
      sel = kernels.jumprelu(dense, jax.lax.stop_gradient(thr), cfg.slots, cfg.bandwidth)
    else:
      sel = kernels.relu(dense, cfg.slots)
    pre = kernels.sparse_encode(x_g, w_enc, b_enc, dense, sel.indices)
    return sel.indices, pre, sel.active, sel.overflow, batch_thr, dense

  idx, pre, active, overflow, batch_thr, dense = jax.vmap(one)(
      xg, params["w_enc"], params["b_enc"], threshold)
  if cfg.activation == "jumprelu":
    thr_sel = jnp.take_along_axis(threshold[:, None, :], idx, axis=-1)
    acts = activations.jumprelu(pre, thr_sel, cfg.bandwidth)
    fired = activations.step(pre, thr_sel, cfg.bandwidth) * active
    acts = acts * active
  else:
    acts = jnp.where(active, jax.nn.relu(pre), 0.0)
    fired = (acts > 0).astype(acts.dtype)
  return Encoding(idx, pre, acts, fired, jnp.sum(overflow), batch_thr, dense)


def decode_latents(params: Params, cfg: TrainConfig, indices: jax.Array, acts: jax.Array) -> jax.Array:
  """The latents' contribution [B, G_out, d_out], without b_dec or the skip term."""
  if cfg.kind == "clt":
    return kernels.clt_decode(indices, acts, params["w_dec"])
  out = jax.vmap(kernels.sparse_decode)(indices, acts, params["w_dec"])  # [G, B, d_out]
  return jnp.swapaxes(out, 0, 1)


def decode(params: Params, cfg: TrainConfig, x: jax.Array, indices: jax.Array,
           acts: jax.Array) -> jax.Array:
  y = decode_latents(params, cfg, indices, acts) + params["b_dec"][None]
  if "w_skip" in params:
    y = y + jnp.einsum("bgi,gio->bgo", x, params["w_skip"])
  return y


def forward(params: Params, cfg: TrainConfig, x: jax.Array) -> tuple[jax.Array, Encoding]:
  """x [B, G, d_in] -> reconstruction [B, G, d_out] (CLT: [B, L, d]) and the code."""
  enc = encode(params, cfg, x)
  return decode(params, cfg, x, enc.indices, enc.acts), enc


class Dictionary(nnx.Module):
  """A stack of sparse dictionaries of one kind (see module docstring) as an NNX module."""

  def __init__(self, cfg: TrainConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs | None = None,
               params: Params | None = None):
    self.cfg = cfg
    if params is None:
      params = init_params(cfg, d_in, d_out, (rngs or nnx.Rngs(cfg.seed)).params())
    for name, value in params.items():
      setattr(self, name, nnx.Param(jnp.asarray(value)))

  def params(self) -> Params:
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Site activations [B, L, d_in] (normalized) -> reconstruction [B, G, d_out]."""
    return forward(self.params(), self.cfg, prepare(self.cfg, x))[0]
