"""Measures release-format dictionaries on held-out tokens.

Per dictionary: FVU, L0, dead and dense latents, the latent firing frequencies, and (with the
model) the LM loss with the dictionary spliced into the Gemma 3 forward, beside the clean and the
zero-ablation loss:

  delta_lm_loss           = CE(spliced) - CE(clean)
  fraction_loss_recovered = (CE(zero) - CE(spliced)) / (CE(zero) - CE(clean))
  kl                      = mean over tokens of KL(clean || spliced) next-token distributions

A transcoder replaces mlp_out[l] with its output from mlp_in[l], read from the same forward pass.
A CLT replaces every layer's mlp_out at once, each from the replacement model's own mlp_in of all
layers so far (errors feed forward, as in circuit-tracer's replacement model). BOS and padding
positions are never replaced and never counted, as they are never trained on. Each kind of splice
compiles once: parameters and the layer are traced arguments (the layer picks a `lax.cond`
branch), so 18 per-layer transcoders of one shape cost one compile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from allscope.release import dictionary as dict_math
from allscope.release import export
from allscope.release.config import EvalConfig
from allscope.release.dictionary import CrossLayerTranscoder, Dictionary

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
    return ([("mlp_in", l) for l in d.model_layers], [("mlp_out", l) for l in d.model_layers])
  return [(d.site_in, d.layer)], [(d.site_out, d.layer)]


def _name(d: Dict) -> str:
  if isinstance(d, CrossLayerTranscoder):
    return f"clt over layers {list(d.model_layers)}"
  return f"{d.type} {d.site_in}->{d.site_out} layer {d.layer}"


def check_against_model(dictionaries: Sequence[Dict], model_config: Any) -> None:
  """Layer ranges and widths checked against the model before any forward pass."""
  widths = model_config.site_widths
  for d in dictionaries:
    ins, outs = _sites_and_layers(d)
    name = _name(d)
    pairs = [(p, "w_enc", i) for i, p in enumerate(ins)] + [(p, "w_dec", i) for i, p in enumerate(outs)]
    for (site, layer), key, i in pairs:
      if site not in widths:
        raise ValueError(f"{name}: unknown site {site!r}; the model has {', '.join(widths)}")
      if not 0 <= layer < model_config.n_layers:
        raise ValueError(f"{name}: layer {layer} is out of range; the model has "
                         f"{model_config.n_layers} layers (0..{model_config.n_layers - 1})")
      params = d.layer_params[i] if isinstance(d, CrossLayerTranscoder) else d.params
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
  if not dictionaries:
    raise ValueError("no dictionaries to evaluate")
  for d in dictionaries:
    d.validate(_name(d))
    if d.type == "crosscoder":
      raise ValueError(f"{_name(d)}: evaluating crosscoders is not supported yet")
    _splice_spec(d, mc.n_layers)  # refuses what cannot be spliced before any forward pass
  check_against_model(dictionaries, mc)

  pairs = [p for d in dictionaries for p in sum(_sites_and_layers(d), [])]
  sites = tuple(sorted({s for s, _ in pairs}))
  layers = tuple(sorted({l for _, l in pairs}))
  layer_index = {l: i for i, l in enumerate(layers)}
  stats = [_Stats((d.n_layers, d.width) if isinstance(d, CrossLayerTranscoder) else (d.width,))
           for d in dictionaries]
  jparams = [jax.tree.map(jnp.asarray, dict(d.params)) if isinstance(d, Dictionary)
             else tuple(jax.tree.map(jnp.asarray, dict(p)) for p in d.layer_params)
             for d in dictionaries]
  ablations = {}
  for d in dictionaries:  # zero ablation of exactly what each dictionary replaces
    ablations.setdefault(tuple(_sites_and_layers(d)[1]), None)
  ce = {key: 0.0 for key in ablations}
  ce_dict = [0.0] * len(dictionaries)
  kl = [0.0] * len(dictionaries)
  ce_clean, n_targets = 0.0, 0

  bar = tqdm(range(0, tokens.shape[0], cfg.batch_size), desc="evaluate", unit="batch",
             disable=not progress)
  start = time.perf_counter()
  for b0 in bar:
    rows = tokens[b0:b0 + cfg.batch_size]
    if len(rows) < cfg.batch_size:  # pad the last batch: one batch shape, one compile
      fill = np.full((cfg.batch_size - len(rows), rows.shape[1]), mc.pad_id, np.int32)
      rows = np.concatenate([rows, fill])
    batch = jnp.asarray(rows)
    mask = batch != mc.pad_id
    keep = mask & (batch != mc.bos_id)  # positions that are replaced and counted
    captured = model.capture(batch, sites=sites, layers=layers)
    keep_np = np.asarray(keep)
    for i, d in enumerate(dictionaries):
      x, y = _inputs_targets(d, captured, layer_index, keep_np)
      feats, y_hat = reconstruct(d, x)
      stats[i].add(y, y_hat, feats)
    if cfg.splice:
      nll, clean_logp, valid = _clean_nll(model, batch, mask)
      ce_clean += float(nll)
      n_targets += int(valid)
      for key in ablations:
        spec, layer = _zero_spec(key, mc.n_layers)
        nll, _ = _spliced_nll(model, batch, mask, keep, None, spec, jnp.int32(layer), clean_logp)
        ce[key] += float(nll)
      for i, d in enumerate(dictionaries):
        spec, layer = _splice_spec(d, mc.n_layers)
        nll, kl_sum = _spliced_nll(model, batch, mask, keep, jparams[i], spec, jnp.int32(layer),
                                   clean_logp)
        ce_dict[i] += float(nll)
        kl[i] += float(kl_sum)
      del clean_logp
    done = min(b0 + cfg.batch_size, tokens.shape[0]) * tokens.shape[1]
    bar.set_postfix(tokens_per_s=f"{done / (time.perf_counter() - start):.0f}")

  results = []
  for i, d in enumerate(dictionaries):
    metrics, frequency = stats[i].metrics(cfg.dense_threshold)
    if cfg.splice and n_targets:
      clean = ce_clean / n_targets
      spliced = ce_dict[i] / n_targets
      zero = ce[tuple(_sites_and_layers(d)[1])] / n_targets
      metrics.update({
          "ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero,
          "delta_lm_loss": spliced - clean,
          "fraction_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else math.nan,
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
    idx = [layer_index[l] for l in d.model_layers]
    x = np.asarray(captured["mlp_in"], np.float32)[:, :, idx][keep]
    y = np.asarray(captured["mlp_out"], np.float32)[:, :, idx][keep]
    return x, y
  x = np.asarray(captured[d.site_in][:, :, layer_index[d.layer]], np.float32)[keep]
  y = np.asarray(captured[d.site_out][:, :, layer_index[d.layer]], np.float32)[keep]
  return x, y


_SITE_ORDER = {"attn_out": 0, "mlp_in": 1, "mlp_out": 2, "resid_post": 3}  # order in a block


def _splice_spec(d: Dict, n_model_layers: int) -> tuple[tuple, int]:
  """(spec, layer): a hashable description of a dictionary's splice (the jit cache key) and the
  layer it acts on, which is a traced argument: one compile serves every layer."""
  if isinstance(d, CrossLayerTranscoder):
    return ("clt", d.model_layers, d.architecture, d.k), 0
  if d.type == "crosscoder":
    raise ValueError("splicing a crosscoder is not supported yet; set evaluate.splice=false")
  if d.site_in == d.site_out:
    return ("sae", n_model_layers, d.site_in, d.architecture, d.k), d.layer
  if _SITE_ORDER[d.site_in] >= _SITE_ORDER[d.site_out]:
    raise ValueError(f"a transcoder from {d.site_in} to {d.site_out} cannot be spliced: its input "
                     "is computed after the output it replaces")
  return ("transcoder", n_model_layers, d.site_in, d.site_out, d.architecture, d.k), d.layer


def _zero_spec(outputs: tuple, n_model_layers: int) -> tuple[tuple, int]:
  """Zero ablation of exactly the (site, layer) pairs a dictionary replaces."""
  if len(outputs) == 1:
    (site, layer), = outputs
    return ("zero_at", n_model_layers, site), layer
  return ("zero", outputs), 0


def _splice_fns(spec: tuple, params: Any, keep: Any, layer: Any) -> dict:
  """The splice functions of `spec`, traced inside the caller's jit.

  Per-layer kinds splice every layer through `lax.cond(l == layer, ...)`, so only the chosen
  layer computes anything at run time. A transcoder records its input site as the forward passes
  it (an identity splice at (site_in, l)) and replaces (site_out, l) from it; a CLT does the same
  at every layer, so each layer's input is the replacement model's own mlp_in (errors feed
  forward).
  """
  import jax
  import jax.numpy as jnp

  def keep_where(new, old):
    return jnp.where(keep[..., None], new.astype(old.dtype), old)

  def at_layer(l, replace):
    return lambda a: jax.lax.cond(layer == l, replace, lambda v: v, a)

  def transcode(x, a, arch, k):
    return keep_where(dict_math.decode(params, dict_math.encode(params, x, arch, k, jnp), x), a)

  kind = spec[0]
  if kind == "zero":
    return {p: (lambda a: keep_where(jnp.zeros_like(a), a)) for p in spec[1]}
  if kind == "zero_at":
    _, n, site = spec
    return {(site, l): at_layer(l, lambda a: keep_where(jnp.zeros_like(a), a)) for l in range(n)}
  if kind == "sae":
    _, n, site, arch, k = spec
    sae = lambda a: transcode(a.astype(jnp.float32), a, arch, k)
    return {(site, l): at_layer(l, sae) for l in range(n)}
  stash: dict[int, Any] = {}

  def record(l):
    def fn(a):
      stash[l] = a.astype(jnp.float32)
      return a
    return fn

  if kind == "transcoder":
    _, n, site_in, site_out, arch, k = spec
    fns = {}
    for l in range(n):
      fns[(site_in, l)] = record(l)
      fns[(site_out, l)] = (lambda l: lambda a: jax.lax.cond(
          layer == l, lambda v: transcode(stash[l], v, arch, k), lambda v: v, a))(l)
    return fns
  _, model_layers, arch, k = spec
  feats: dict[int, Any] = {}

  def clt_out(target):  # target: index into the CLT's layers
    def fn(a):
      x = stash[target]
      feats[target] = dict_math.encode(params[target], x, arch, k, jnp)
      y = params[target]["b_dec"]
      for source in range(target + 1):
        y = y + feats[source] @ params[source]["w_dec"][:, target]
      if "affine_skip_connection" in params[target]:
        y = y + x @ params[target]["affine_skip_connection"]
      return keep_where(y, a)
    return fn

  fns = {}
  for i, l in enumerate(model_layers):
    fns[("mlp_in", l)] = record(i)
    fns[("mlp_out", l)] = clt_out(i)
  return fns


def _log_probs_and_valid(logits: Any, mask: Any) -> tuple[Any, Any]:
  import jax
  logp = jax.nn.log_softmax(logits[:, :-1].astype("float32"), axis=-1)
  return logp, mask[:, 1:] & mask[:, :-1]


@functools.partial(nnx.jit, static_argnums=())
def _clean_nll(model: Any, tokens: Any, mask: Any) -> tuple[Any, Any, Any]:
  """Summed next-token NLL of the clean model, its log-probs, and the number of targets."""
  import jax.numpy as jnp
  _, logits = model.forward(tokens, mask, (), (), (), True)
  logp, valid = _log_probs_and_valid(logits, mask)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)), logp, jnp.sum(valid)


@functools.partial(nnx.jit, static_argnums=(5,))
def _spliced_nll(model: Any, tokens: Any, mask: Any, keep: Any, params: Any, spec: tuple,
                 layer: Any, clean_logp: Any) -> tuple[Any, Any]:
  """Summed NLL with the splice of `spec` at `layer`, and summed KL(clean || spliced)."""
  import jax.numpy as jnp
  fns = _splice_fns(spec, params, keep, layer)
  splice = tuple(sorted(fns.items(), key=lambda kv: (kv[0][1], kv[0][0])))
  _, logits = model.forward(tokens, mask, (), (), splice, True)
  logp, valid = _log_probs_and_valid(logits, mask)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  kl = jnp.sum(jnp.exp(clean_logp) * (clean_logp - logp), axis=-1)
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(jnp.where(valid, kl, 0.0))


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
