"""Measures release-format dictionaries on held-out tokens.

Per dictionary: FVU, L0, dead and dense latents, the latent firing frequencies, and (with the
model) the LM loss with the dictionary spliced into the Gemma 3 forward, beside the clean and the
zero-ablation loss:

  delta_lm_loss           = CE(spliced) - CE(clean)
  fraction_loss_recovered = (CE(zero) - CE(spliced)) / (CE(zero) - CE(clean))
  kl                      = mean over tokens of KL(clean || spliced) next-token distributions

A transcoder replaces mlp_out[l] with its output from mlp_in[l]; mlp_in[l] lies upstream of the
splice, so the clean capture of it is exactly what the spliced forward sees. A CLT replaces every
layer's mlp_out at once from the clean mlp_in of every layer (an open-loop replacement: errors
do not feed forward into later layers' inputs). BOS and padding positions are never replaced and
never counted, as they are never trained on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allscope.release import dictionary as dict_math
from allscope.release.config import EvalConfig
from allscope.release.dictionary import CrossLayerTranscoder, Dictionary
from allscope.release import export

Dict = Dictionary | CrossLayerTranscoder


@dataclasses.dataclass
class Evaluation:
  """One dictionary's results: `path` is its release folder, `frequency` the fraction of tokens
  on which each latent fired ([F], or [L, F] for a CLT)."""

  path: str
  metrics: dict[str, float]
  frequency: np.ndarray


class _Stats:
  """Running sums for FVU, L0 and firing counts, in float64."""

  def __init__(self, width_shape: tuple[int, ...]):
    self.tokens = 0
    self.sq_err = 0.0
    self.sum_y: np.ndarray | float = 0.0
    self.sum_sq_y = 0.0
    self.active = 0.0
    self.fired = np.zeros(width_shape, np.int64)

  def add(self, y: np.ndarray, y_hat: np.ndarray, feats: np.ndarray) -> None:
    """y, y_hat [T, ..., d] targets and reconstructions; feats [T, ..., F] latent activations."""
    y64 = y.astype(np.float64)
    self.tokens += y.shape[0]
    self.sq_err += float(np.sum((y64 - y_hat.astype(np.float64)) ** 2))
    self.sum_y = self.sum_y + y64.sum(axis=0)
    self.sum_sq_y += float(np.sum(y64 ** 2))
    on = feats != 0
    self.active += float(on.sum())
    self.fired += on.sum(axis=0)

  def metrics(self, dense_threshold: float) -> tuple[dict[str, float], np.ndarray]:
    n = max(self.tokens, 1)
    total_var = self.sum_sq_y - float(np.sum(np.asarray(self.sum_y) ** 2)) / n
    frequency = self.fired / n
    return {
        "fvu": self.sq_err / total_var if total_var > 0 else math.nan,
        "l0": self.active / n,
        "dead_fraction": float(np.mean(self.fired == 0)),
        "dense_fraction": float(np.mean(frequency > dense_threshold)),
        "n_dead": int(np.sum(self.fired == 0)),
        "n_dense": int(np.sum(frequency > dense_threshold)),
        "n_tokens": int(self.tokens),
    }, frequency


def reconstruct(d: Dict, x: Any, xp: Any = np) -> tuple[Any, Any]:
  """(features, reconstruction) of a per-layer dictionary on x [..., d_in], or of a CLT on
  x [..., L, d] (mlp_in of every layer) giving [..., L, F] and [..., L, d]."""
  if isinstance(d, CrossLayerTranscoder):
    feats, outs = dict_math.clt_forward(d, [x[..., l, :] for l in range(d.n_layers)], xp)
    return xp.stack(feats, axis=-2), xp.stack(outs, axis=-2)
  f = dict_math.encode(d.params, x, d.architecture, d.k, xp)
  return f, dict_math.decode(d.params, f, x)


def activation_metrics(d: Dict, x: np.ndarray, y: np.ndarray, dense_threshold: float = 0.1,
                       batch: int = 4096) -> tuple[dict[str, float], np.ndarray]:
  """FVU, L0, dead/dense latents and firing frequencies of `d` on inputs x and targets y [T, ...]."""
  stats = _Stats((d.n_layers, d.width) if isinstance(d, CrossLayerTranscoder) else (d.width,))
  for start in range(0, x.shape[0], batch):
    xb, yb = x[start:start + batch], y[start:start + batch]
    feats, y_hat = reconstruct(d, xb)
    stats.add(yb, y_hat, feats)
  return stats.metrics(dense_threshold)


def _sites_and_layers(d: Dict) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
  """(inputs, outputs) as (site, layer) pairs a dictionary reads and writes."""
  if isinstance(d, CrossLayerTranscoder):
    return ([("mlp_in", l) for l in range(d.n_layers)], [("mlp_out", l) for l in range(d.n_layers)])
  return [(d.site_in, d.layer)], [(d.site_out, d.layer)]


def check_against_model(dictionaries: Sequence[Dict], model_config: Any) -> None:
  """Layer ranges and widths checked against the model before any forward pass."""
  widths = model_config.site_widths
  for d in dictionaries:
    ins, outs = _sites_and_layers(d)
    name = export.folder_of(d, 0.0)
    for (site, layer), key in [(p, "w_enc") for p in ins] + [(p, "w_dec") for p in outs]:
      if site not in widths:
        raise ValueError(f"{name}: unknown site {site!r}; the model has {', '.join(widths)}")
      if not 0 <= layer < model_config.n_layers:
        raise ValueError(f"{name}: layer {layer} is out of range; the model has "
                         f"{model_config.n_layers} layers (0..{model_config.n_layers - 1})")
      params = d.layer_params[layer] if isinstance(d, CrossLayerTranscoder) else d.params
      width = params[key].shape[0] if key == "w_enc" else params[key].shape[-1]
      if width != widths[site]:
        raise ValueError(f"{name}: {key} has width {width} but {site} of the model has "
                         f"{widths[site]}; was it trained on another model?")


def evaluate(cfg: EvalConfig, dictionaries: Sequence[Dict], model: Any, tokens: np.ndarray, *,
             log_dir: str | Path | None = None, progress: bool = True) -> list[Evaluation]:
  """Evaluates every dictionary on `tokens` [N, S] (int) with `model` (the allscope Gemma 3)."""
  import jax
  import jax.numpy as jnp
  from tqdm.auto import tqdm

  cfg.validate()
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be an integer array [sequences, positions], got "
                     f"{tokens.dtype} {tokens.shape}")
  tokens = tokens[:cfg.n_sequences, :cfg.seq_len].astype(np.int32)
  if tokens.shape[0] == 0 or tokens.shape[1] < 2:
    raise ValueError(f"need at least one sequence of >= 2 tokens, got shape {tokens.shape}")
  mc = model.config
  if tokens.max() >= mc.vocab_size or tokens.min() < 0:
    raise ValueError(f"token ids must lie in [0, {mc.vocab_size}); got {tokens.min()}..{tokens.max()}")
  for d in dictionaries:
    d.validate(export.folder_of(d, 0.0))
  check_against_model(dictionaries, mc)

  sites = sorted({s for d in dictionaries for s, _ in sum(_sites_and_layers(d), [])})
  layers = sorted({l for d in dictionaries for _, l in sum(_sites_and_layers(d), [])})
  layer_index = {l: i for i, l in enumerate(layers)}
  stats = [_Stats((d.n_layers, d.width) if isinstance(d, CrossLayerTranscoder) else (d.width,))
           for d in dictionaries]
  ablations = sorted({p for d in dictionaries for p in _sites_and_layers(d)[1]})
  ce = {"clean": 0.0, **{f"zero/{s}/{l}": 0.0 for s, l in ablations},
        **{f"dict/{i}": 0.0 for i in range(len(dictionaries))}}
  kl = {i: 0.0 for i in range(len(dictionaries))}
  n_targets = 0
  jparams = [jax.tree.map(jnp.asarray, dict(d.params)) if isinstance(d, Dictionary)
             else tuple(jax.tree.map(jnp.asarray, dict(p)) for p in d.layer_params)
             for d in dictionaries]

  batches = range(0, tokens.shape[0], cfg.batch_size)
  bar = tqdm(batches, desc="evaluate", unit="batch", disable=not progress)
  start = time.perf_counter()
  for b0 in bar:
    batch = jnp.asarray(tokens[b0:b0 + cfg.batch_size])
    keep = (batch != mc.pad_id) & (batch != mc.bos_id)  # positions that are replaced and counted
    captured = model.capture(batch, sites=tuple(sites), layers=tuple(layers))
    keep_np = np.asarray(keep)
    for i, d in enumerate(dictionaries):
      x, y = _inputs_targets(d, captured, layer_index, keep_np)
      feats, y_hat = reconstruct(d, x)
      stats[i].add(y, y_hat, feats)

    if cfg.splice:
      targets = batch[:, 1:]
      tmask = targets != mc.pad_id
      n_targets += int(tmask.sum())
      clean = model.logits(batch)
      clean_lp = jax.nn.log_softmax(clean[:, :-1], axis=-1)
      ce["clean"] += _nll_sum(clean_lp, targets, tmask)
      for site, layer in ablations:
        fn = _masked(lambda a: jnp.zeros_like(a), keep)
        logits = model.logits(batch, splice={(site, layer): fn})
        ce[f"zero/{site}/{layer}"] += _nll_sum(jax.nn.log_softmax(logits[:, :-1], -1), targets, tmask)
      for i, d in enumerate(dictionaries):
        logits = model.logits(batch, splice=_splice(d, jparams[i], captured, layer_index, keep))
        lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        ce[f"dict/{i}"] += _nll_sum(lp, targets, tmask)
        kl[i] += float(jnp.sum(jnp.where(tmask, jnp.sum(jnp.exp(clean_lp) * (clean_lp - lp), -1), 0)))
    done = min(b0 + cfg.batch_size, tokens.shape[0]) * tokens.shape[1]
    bar.set_postfix(tokens_per_s=f"{done / (time.perf_counter() - start):.0f}")

  results = []
  for i, d in enumerate(dictionaries):
    metrics, frequency = stats[i].metrics(cfg.dense_threshold)
    if cfg.splice and n_targets:
      _, outs = _sites_and_layers(d)
      clean_ce = ce["clean"] / n_targets
      spliced = ce[f"dict/{i}"] / n_targets
      if isinstance(d, CrossLayerTranscoder):
        zero = _zero_all_mlp_out(model, tokens, cfg, d.n_layers, mc) if cfg.clt_kl else math.nan
      else:
        zero = ce[f"zero/{outs[0][0]}/{outs[0][1]}"] / n_targets
      metrics.update({
          "ce_clean": clean_ce, "ce_spliced": spliced, "ce_zero_ablation": zero,
          "delta_lm_loss": spliced - clean_ce,
          "fraction_loss_recovered": (zero - spliced) / (zero - clean_ce) if zero != clean_ce else math.nan,
          "kl": kl[i] / n_targets,
      })
    if isinstance(d, CrossLayerTranscoder):
      metrics["l0_per_layer"] = [float(v) for v in frequency.sum(axis=1)]
    results.append(Evaluation(export.folder_of(d, metrics["l0"]), metrics, frequency))
  if log_dir is not None:
    write_tensorboard(log_dir, results)
  return results


def _inputs_targets(d: Dict, captured: dict, layer_index: dict[int, int],
                    keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Inputs and targets [T, ...] at the kept positions, as float32 numpy."""
  if isinstance(d, CrossLayerTranscoder):
    idx = [layer_index[l] for l in range(d.n_layers)]
    x = np.asarray(captured["mlp_in"], np.float32)[:, :, idx][keep]
    y = np.asarray(captured["mlp_out"], np.float32)[:, :, idx][keep]
    return x, y
  x = np.asarray(captured[d.site_in][:, :, layer_index[d.layer]], np.float32)[keep]
  y = np.asarray(captured[d.site_out][:, :, layer_index[d.layer]], np.float32)[keep]
  return x, y


def _masked(fn, keep):
  import jax.numpy as jnp
  return lambda a: jnp.where(keep[..., None], fn(a).astype(a.dtype), a)


def _splice(d: Dict, params: Any, captured: dict, layer_index: dict[int, int], keep: Any) -> dict:
  import jax.numpy as jnp
  if isinstance(d, CrossLayerTranscoder):
    xs = [captured["mlp_in"][:, :, layer_index[l]].astype(jnp.float32) for l in range(d.n_layers)]
    _, outs = dict_math.clt_forward(d, xs, jnp, params)
    return {("mlp_out", l): _masked(lambda a, y=outs[l]: y, keep) for l in range(d.n_layers)}
  if d.site_in == d.site_out:
    fn = lambda a: dict_math.decode(params, dict_math.encode(params, a.astype(jnp.float32),
                                                             d.architecture, d.k, jnp),
                                    a.astype(jnp.float32))
    return {(d.site_out, d.layer): _masked(fn, keep)}
  x = captured[d.site_in][:, :, layer_index[d.layer]].astype(jnp.float32)
  y = dict_math.decode(params, dict_math.encode(params, x, d.architecture, d.k, jnp), x)
  return {(d.site_out, d.layer): _masked(lambda a: y, keep)}


def _nll_sum(log_probs: Any, targets: Any, mask: Any) -> float:
  import jax.numpy as jnp
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return float(-jnp.sum(jnp.where(mask, picked, 0.0)))


def _zero_all_mlp_out(model: Any, tokens: np.ndarray, cfg: EvalConfig, n_layers: int, mc: Any) -> float:
  """CE with every layer's mlp_out zeroed: the CLT's zero-ablation baseline."""
  import jax
  import jax.numpy as jnp
  total, count = 0.0, 0
  for b0 in range(0, tokens.shape[0], cfg.batch_size):
    batch = jnp.asarray(tokens[b0:b0 + cfg.batch_size])
    keep = (batch != mc.pad_id) & (batch != mc.bos_id)
    fn = _masked(lambda a: jnp.zeros_like(a), keep)
    logits = model.logits(batch, splice={("mlp_out", l): fn for l in range(n_layers)})
    targets = batch[:, 1:]
    mask = targets != mc.pad_id
    total += _nll_sum(jax.nn.log_softmax(logits[:, :-1], -1), targets, mask)
    count += int(mask.sum())
  return total / max(count, 1)


def write_tensorboard(log_dir: str | Path, results: Sequence[Evaluation]) -> None:
  from tensorboardX import SummaryWriter
  with SummaryWriter(str(log_dir)) as writer:
    for r in results:
      for name, value in r.metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          writer.add_scalar(f"eval/{r.path}/{name}", value, 0)
      freq = r.frequency.reshape(-1)
      writer.add_histogram(f"eval/{r.path}/log10_frequency", np.log10(freq[freq > 0] + 1e-12)
                           if np.any(freq > 0) else np.zeros(1), 0)
