"""Gemma 3 text decoder in Flax NNX, with activation capture and splicing at four sites.

Parameters are stored as Hugging Face stores them, transposed to `[in, out]`: norm weights are the
raw `w` of `x * rsqrt(mean(x^2) + eps) * (1 + w)`. Layers run in a Python loop under `jit`, so a
capture stops at the deepest layer asked for and a splice can replace any site at any layer.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allscope.models.presets import Gemma3Config
from allscope.models.sites import SITES

Splice = Mapping[tuple[str, int], Callable[[jax.Array], jax.Array]]


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float, scaling: float) -> jax.Array:
  """Rotary embedding, half-split (rotate_half) layout; linear scaling divides the positions."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (base ** (np.arange(0, half, dtype=np.float32) * 2 / x.shape[-1])) / scaling
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, half]
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, scale: float) -> nnx.Param:
  return nnx.Param((scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


class Block(nnx.Module):
  """One decoder layer: attention and gated-GELU MLP, each with pre- and post-norms."""

  def __init__(self, cfg: Gemma3Config, layer: int, dtype, rngs: nnx.Rngs):
    d, h, k, hd, ff = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    norm = lambda n: _param(rngs, (n,), dtype, 0.1)
    self.cfg, self.layer = cfg, layer
    self.input_layernorm = norm(d)
    self.q_proj = _param(rngs, (d, h * hd), dtype, d**-0.5)
    self.k_proj = _param(rngs, (d, k * hd), dtype, d**-0.5)
    self.v_proj = _param(rngs, (d, k * hd), dtype, d**-0.5)
    self.o_proj = _param(rngs, (h * hd, d), dtype, (h * hd) ** -0.5)
    self.q_norm = norm(hd)
    self.k_norm = norm(hd)
    self.post_attention_layernorm = norm(d)
    self.pre_feedforward_layernorm = norm(d)
    self.gate_proj = _param(rngs, (d, ff), dtype, d**-0.5)
    self.up_proj = _param(rngs, (d, ff), dtype, d**-0.5)
    self.down_proj = _param(rngs, (ff, d), dtype, ff**-0.5)
    self.post_feedforward_layernorm = norm(d)

  def attention(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """Returns z, the per-head outputs concatenated before o_proj: [B, S, n_heads * head_dim]."""
    cfg = self.cfg
    b, s, _ = x.shape
    h, k, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = (x @ self.q_proj[...]).reshape(b, s, h, hd)
    kk = (x @ self.k_proj[...]).reshape(b, s, k, hd)
    v = (x @ self.v_proj[...]).reshape(b, s, k, hd)
    q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
    kk = rms_norm(kk, self.k_norm[...], cfg.rms_norm_eps)
    if cfg.is_global(self.layer):
      base, scaling = cfg.rope_global_base, cfg.rope_global_scaling
    else:
      base, scaling = cfg.rope_local_base, 1.0
    q = rope(q, positions, base, scaling) * jnp.asarray(cfg.query_pre_attn_scalar**-0.5, x.dtype)
    kk = rope(kk, positions, base, scaling)
    q = q.reshape(b, s, k, h // k, hd)  # grouped-query: g query heads share one kv head
    scores = jnp.einsum("bskgd,btkd->bkgst", q, kk, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    z = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return z.reshape(b, s, h * hd)

  def mlp(self, x: jax.Array) -> jax.Array:
    gate = jax.nn.gelu(x @ self.gate_proj[...], approximate=True)
    return (gate * (x @ self.up_proj[...])) @ self.down_proj[...]


class Gemma3(nnx.Module):
  """Gemma 3 text decoder. `capture` and `logits` are the public forward passes."""

  def __init__(self, cfg: Gemma3Config, dtype=jnp.float32, *, rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = jnp.dtype(dtype)
    self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.d_model), dtype, 1.0)
    self.layers = nnx.List([Block(cfg, i, dtype, rngs) for i in range(cfg.n_layers)])
    self.norm = _param(rngs, (cfg.d_model,), dtype, 0.1)

  # -- public API -------------------------------------------------------------------------------

  def capture(
      self,
      tokens: jax.Array,
      sites: Sequence[str] = SITES,
      layers: Sequence[int] | None = None,
      mask: jax.Array | None = None,
  ) -> dict[str, jax.Array]:
    """Activations `{site: [batch, seq, len(layers), width]}`; runs no deeper than max(layers)."""
    sites, layers = self.check_sites(sites), self.check_layers(layers)
    tokens, mask = self._inputs(tokens, mask)
    captured, _ = _run(self, tokens, mask, sites, layers, (), False)
    return captured

  def logits(
      self, tokens: jax.Array, mask: jax.Array | None = None, splice: Splice | None = None
  ) -> jax.Array:
    """Float32 next-token logits `[batch, seq, vocab]`, with `splice[(site, layer)](act)`
    replacing that site's activation during the forward."""
    splice = tuple(sorted((splice or {}).items(), key=lambda kv: (kv[0][1], kv[0][0])))
    for (site, layer), _ in splice:
      self.check_sites((site,))
      self.check_layers((layer,))
    tokens, mask = self._inputs(tokens, mask)
    _, logits = _run(self, tokens, mask, (), (), splice, True)
    return logits

  def check_sites(self, sites: Sequence[str]) -> tuple[str, ...]:
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
      raise ValueError(f"unknown site(s) {unknown or sites!r}; valid sites: {', '.join(SITES)}")
    return sites

  def check_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
    n = self.config.n_layers
    layers = tuple(range(n)) if layers is None else tuple(int(l) for l in np.atleast_1d(layers))
    bad = [l for l in layers if not 0 <= l < n]
    if bad or not layers:
      raise ValueError(f"layer(s) {bad or layers} out of range: this model has layers 0..{n - 1}")
    return layers

  # -- forward ----------------------------------------------------------------------------------

  def _inputs(self, tokens, mask):
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    mask = tokens != self.config.pad_id if mask is None else jnp.asarray(mask, bool)
    if mask.shape != tokens.shape:
      raise ValueError(f"mask shape {mask.shape} does not match tokens {tokens.shape}")
    return tokens, mask

  def embed(self, tokens: jax.Array) -> jax.Array:
    """The residual stream entering layer 0: scaled token embeddings [batch, seq, d_model]."""
    return self.embed_tokens[...][tokens] * jnp.asarray(self.config.d_model**0.5, self.dtype)

  def forward(self, tokens, mask, sites, layers, splice, with_logits, start=None, resid=None,
              final_hidden=False):
    """The traced forward pass behind `capture` and `logits` (call those instead).

    With `resid`, the residual stream entering layer `start` (`embed(tokens)` for 0, else a
    clean run's resid_post at start - 1), only layers >= start run: `start` may be traced, as
    each layer sits in a `lax.cond`, so one compile serves every start. Nothing is captured then.
    With `final_hidden` (and `with_logits`), the final-norm hidden state [batch, seq, d_model]
    comes back in place of the logits, which are `hidden @ embed_tokens.T` (tied, no softcap):
    callers that only need log-sum-exps stream the vocabulary themselves.
    """
    cfg = self.config
    splice = dict(splice)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # left padding shifts positions
    idx = jnp.arange(tokens.shape[1])
    causal = idx[:, None] >= idx[None, :]
    local = causal & (idx[:, None] - idx[None, :] < cfg.sliding_window)
    keys = mask[:, None, :]
    masks = {False: causal[None] & keys, True: local[None] & keys}  # keyed by "is sliding"

    if resid is not None and sites:
      raise ValueError("a forward from a cached residual captures nothing")
    x = self.embed(tokens) if resid is None else resid.astype(self.dtype)
    wanted = set(layers)
    depth = cfg.n_layers if with_logits else max(layers) + 1
    captured = {s: {} for s in sites}

    def site(name, layer, act):
      if (name, layer) in splice:
        act = splice[(name, layer)](act).astype(act.dtype)
      if layer in wanted and name in captured:
        captured[name][layer] = act
      return act

    def block(i, x):
      blk = self.layers[i]
      z = blk.attention(
          rms_norm(x, blk.input_layernorm[...], cfg.rms_norm_eps), positions,
          masks[not cfg.is_global(i)])
      z = site("attn_out", i, z)
      x = x + rms_norm(z @ blk.o_proj[...], blk.post_attention_layernorm[...], cfg.rms_norm_eps)
      h = site("mlp_in", i, rms_norm(x, blk.pre_feedforward_layernorm[...], cfg.rms_norm_eps))
      out = rms_norm(blk.mlp(h), blk.post_feedforward_layernorm[...], cfg.rms_norm_eps)
      x = x + site("mlp_out", i, out)
      return site("resid_post", i, x)

    for i in range(depth):
      if resid is None:
        x = block(i, x)
      else:  # layers before `start` were run by the clean pass that cached `resid`
        x = jax.lax.cond(i >= start, functools.partial(block, i), lambda v: v, x)

    result = {s: jnp.stack([acts[l] for l in layers], axis=2) for s, acts in captured.items()}
    if not with_logits:
      return result, None
    x = rms_norm(x, self.norm[...], cfg.rms_norm_eps)
    if final_hidden:
      return result, x
    logits = jnp.einsum("bsd,vd->bsv", x, self.embed_tokens[...],
                        preferred_element_type=jnp.float32)
    return result, logits


@functools.partial(nnx.jit, static_argnums=(3, 4, 5, 6))
def _run(model: Gemma3, tokens, mask, sites, layers, splice, with_logits):
  return model.forward(tokens, mask, sites, layers, splice, with_logits)


def cross_entropy(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats over positions whose target is a real token."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  valid = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
  return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def generate(model: Gemma3, tokens: Sequence[int], steps: int) -> list[int]:
  """Greedy continuation. Re-runs the prefix each step (no KV cache) on one fixed-size, padded
  buffer, so it compiles once; for sanity checks, not serving."""
  n = len(tokens)
  buf = np.full((1, n + steps), model.config.pad_id, np.int32)
  buf[0, :n] = tokens
  for t in range(n, n + steps):
    mask = np.arange(n + steps)[None] < t
    logits = model.logits(buf, mask=mask)
    buf[0, t] = int(jnp.argmax(logits[0, t - 1]))
  return buf[0, n:].tolist()
