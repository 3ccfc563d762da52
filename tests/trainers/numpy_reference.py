"""Independent float64 numpy reference of the dictionary math: dense forward, loss, gradients.

Written from the definitions in DESIGN.md with hand-derived backward passes (the straight-
through rules of the rectangle kernel included), sharing no code with allscope.trainers.
"""

from __future__ import annotations

import numpy as np


def rect(u):
  return (np.abs(u) < 0.5).astype(np.float64)


def select_mask(pre, cfg):
  """[G, B, F] bool: which latents are active (before the activation's own zeroing)."""
  g, b, f = pre.shape
  if cfg.activation == "jumprelu":
    return None  # threshold-based, handled by the caller
  if cfg.activation == "relu":
    return pre > 0
  if cfg.activation == "topk":
    mask = np.zeros(pre.shape, bool)
    order = np.argsort(-pre, axis=-1)[..., :cfg.k]
    np.put_along_axis(mask, order, True, axis=-1)
    return mask & (pre > 0)
  if cfg.activation == "batchtopk":
    mask = np.zeros(pre.shape, bool)
    for i in range(g):
      flat = np.maximum(pre[i], 0).reshape(-1)
      thr = np.sort(flat)[::-1][cfg.k * b - 1]
      mask[i] = (np.maximum(pre[i], 0) >= thr) & (pre[i] > 0)
    return mask
  raise ValueError(cfg.activation)


def prepare(cfg, x):
  return x.reshape(x.shape[0], 1, -1) if cfg.kind == "crosscoder" else x


def decode(p, cfg, f, x):
  """f [G, B, F] -> [B, G_out, d_out]."""
  if cfg.kind == "clt":
    g = f.shape[0]
    y = np.zeros((f.shape[1], g, p["w_dec"].shape[-1]))
    for t in range(g):
      for s in range(t + 1):
        y[:, t] += f[s] @ p["w_dec"][s, :, t, :]
  else:
    y = np.einsum("gbf,gfd->bgd", f, p["w_dec"])
  y = y + p["b_dec"][None]
  if "w_skip" in p:
    y = y + np.einsum("bgi,gio->bgo", x, p["w_skip"])
  return y


def dec_t(p, cfg, dy):
  """Transpose of the latent decode: dy [B, G_out, d] -> df [G, B, F]."""
  if cfg.kind == "clt":
    g = p["w_dec"].shape[0]
    df = np.zeros((g, dy.shape[0], p["w_dec"].shape[1]))
    for s in range(g):
      for t in range(s, g):
        df[s] += dy[:, t] @ p["w_dec"][s, :, t, :].T
    return df
  return np.einsum("bgd,gfd->gbf", dy, p["w_dec"])


def dec_wgrad(p, cfg, f, dy):
  if cfg.kind == "clt":
    g = p["w_dec"].shape[0]
    dw = np.zeros_like(p["w_dec"])
    for s in range(g):
      for t in range(s, g):
        dw[s, :, t, :] += f[s].T @ dy[:, t]
    return dw
  return np.einsum("gbf,bgd->gfd", f, dy)


def dec_norms(p, cfg):
  w = p["w_dec"]
  return np.sqrt(np.sum(w**2, axis=(2, 3))) if cfg.kind == "clt" else np.linalg.norm(w, axis=-1)


def loss_and_grads(p, cfg, x, y, dead, scale):
  """Returns (loss, metrics, grads) in float64 for the objective of allscope.trainers.losses."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = prepare(cfg, np.asarray(x, np.float64))
  y = prepare(cfg, np.asarray(y, np.float64))
  bsz = x.shape[0]
  pre = np.einsum("bgi,gif->gbf", x, p["w_enc"]) + p["b_enc"][:, None, :]
  if cfg.activation == "jumprelu":
    thr = np.exp(p["log_threshold"])[:, None, :]
    mask = pre > thr
    f = pre * mask
  else:
    mask = select_mask(pre, cfg)
    f = np.where(mask, pre, 0.0)
  y_hat = decode(p, cfg, f, x)
  grads = {k: np.zeros_like(v) for k, v in p.items()}
  err = np.sum((y - y_hat) ** 2, axis=-1)
  loss = np.sum(np.mean(err, axis=0))
  metrics = {"mse": loss, "fvu": np.sum(err) / np.sum((y - y.mean(0, keepdims=True)) ** 2)}
  dy_total = 2 * (y_hat - y) / bsz
  df = dec_t(p, cfg, dy_total)
  grads["w_dec"] += dec_wgrad(p, cfg, f, dy_total)
  grads["b_dec"] += dy_total.sum(0)
  if "w_skip" in p:
    grads["w_skip"] += np.einsum("bgi,bgo->gio", x, dy_total)
  idx = np.arange(p["w_enc"].shape[-1])
  for m in cfg.matryoshka:
    keep = (idx < m)[None, None, :]
    y_m = decode(p, cfg, f * keep, x)
    loss += np.sum(np.mean(np.sum((y - y_m) ** 2, axis=-1), axis=0))
    dy_m = 2 * (y_m - y) / bsz
    df += dec_t(p, cfg, dy_m) * keep
    grads["w_dec"] += dec_wgrad(p, cfg, f * keep, dy_m)
    grads["b_dec"] += dy_m.sum(0)
    if "w_skip" in p:
      grads["w_skip"] += np.einsum("bgi,bgo->gio", x, dy_m)

  dpre = df * mask
  if cfg.activation == "jumprelu":
    eps = cfg.bandwidth
    kern = rect((pre - thr) / eps)
    dthr = np.sum(df * (-(thr / eps) * kern), axis=1)  # [G, F]
    l0 = np.mean(np.sum(mask, axis=-1), axis=-1)  # [G]
    dl0_dthr = np.mean(-(1.0 / eps) * kern, axis=1)  # [G, F]: d L0_g / d thr_gf
    if cfg.l0_penalty == "linear":
      pen = cfg.sparsity_coef * np.sum(l0)
      dthr += scale * cfg.sparsity_coef * dl0_dthr
    else:
      pen = cfg.sparsity_coef * np.sum((l0 / cfg.target_l0 - 1) ** 2)
      dthr += scale * cfg.sparsity_coef * (2 * (l0 / cfg.target_l0 - 1) / cfg.target_l0)[:, None] * dl0_dthr
    loss += scale * pen
    if cfg.freq_coef:
      freq = np.mean(mask, axis=1)  # [G, F]
      over = np.maximum(freq - cfg.freq_max, 0)
      loss += scale * cfg.freq_coef * np.sum(over**2)
      dthr += scale * cfg.freq_coef * 2 * over * dl0_dthr
    grads["log_threshold"] = dthr * thr[:, 0, :]
    metrics["l0"] = np.mean(l0)
  elif cfg.activation == "relu":
    n = dec_norms(p, cfg)  # [G, F]
    pen = cfg.sparsity_coef * np.sum(np.mean(np.sum(f * n[:, None, :], axis=-1), axis=-1))
    loss += scale * pen
    dpre += scale * cfg.sparsity_coef * mask * n[:, None, :] / bsz
    coef = scale * cfg.sparsity_coef * np.mean(f, axis=1) / n  # [G, F]
    grads["w_dec"] += p["w_dec"] * coef.reshape(coef.shape + (1,) * (p["w_dec"].ndim - 2))
    metrics["l0"] = np.mean(np.sum(mask, axis=-1))
  else:
    metrics["l0"] = np.mean(np.sum(mask, axis=-1))
    if np.any(dead) and cfg.auxk:
      e = y - y_hat
      k_aux = min(cfg.aux_k, pre.shape[-1])
      masked = np.where(dead[:, None, :], pre, -np.inf)
      amask = np.zeros(pre.shape, bool)
      np.put_along_axis(amask, np.argsort(-masked, axis=-1)[..., :k_aux], True, axis=-1)
      amask &= dead[:, None, :] & (pre > 0)
      fa = np.where(amask, pre, 0.0)
      zero_b = {**p, "b_dec": np.zeros_like(p["b_dec"])}
      zero_b.pop("w_skip", None)
      e_hat = decode(zero_b, cfg, fa, x)
      den = np.sum((e - e.mean(0, keepdims=True)) ** 2)
      aux = np.sum((e - e_hat) ** 2) / den
      metrics["auxk"] = aux
      loss += cfg.aux_coef * aux
      de = cfg.aux_coef * 2 * (e_hat - e) / den
      grads["w_dec"] += dec_wgrad(p, cfg, fa, de)
      dpre += dec_t(p, cfg, de) * amask
  grads["w_enc"] += np.einsum("bgi,gbf->gif", x, dpre)
  grads["b_enc"] += dpre.sum(1)
  return loss, metrics, grads
