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

import jax
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
  """Evaluates every dictionary on `tokens` [N, S] (int) with `model` (the allscope Gemma 3).

  The first `n_sequences` rows give FVU, L0 and dead/dense latents; the first
  `splice_sequences` of them also give the spliced LM losses. Each spliced batch runs the clean
  forward once, caching the residual stream entering every splice layer, and each splice then
  runs only the layers from its own onward plus the unembedding.
  """
  import jax.numpy as jnp
  from tqdm.auto import tqdm

  cfg.validate()
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be an integer array [sequences, positions], got "
                     f"{tokens.dtype} {tokens.shape}")
  check_tokens(cfg, tokens)
  tokens = tokens[:cfg.n_sequences, :cfg.seq_len].astype(np.int32)
  if tokens.shape[1] < 2:
    raise ValueError(f"need sequences of >= 2 tokens, got shape {tokens.shape}")
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
  stats = [_Stats((d.n_layers, d.width) if isinstance(d, CrossLayerTranscoder) else (d.width,))
           for d in dictionaries]
  jparams = [jax.tree.map(jnp.asarray, dict(d.params)) if isinstance(d, Dictionary)
             else tuple(jax.tree.map(jnp.asarray, dict(p)) for p in d.layer_params)
             for d in dictionaries]
  n_splice = 0
  if cfg.splice:
    n_splice = tokens.shape[0] if cfg.splice_sequences < 0 else min(cfg.splice_sequences,
                                                                    tokens.shape[0])
  # Splices: (key, spec, layer, start, params); start None = a full forward (a CLT).
  splices = []
  if cfg.splice:
    if cfg.zero_ablation:  # zero ablation of exactly what each dictionary replaces
      for outputs in dict.fromkeys(tuple(_sites_and_layers(d)[1]) for d in dictionaries):
        spec, layer = _zero_spec(outputs, mc.n_layers)
        splices.append((("zero", outputs), spec, layer, layer if spec[0] == "zero_at" else None,
                        None))
    for i, d in enumerate(dictionaries):
      spec, layer = _splice_spec(d, mc.n_layers)
      splices.append((("dict", i), spec, layer, None if spec[0] == "clt" else layer, jparams[i]))
  # The clean pass caches resid_post[start - 1] for each start > 0 (start 0 is the embedding).
  entries = sorted({start - 1 for *_, start, _ in splices if start})
  clean_sites = tuple(sorted(set(sites) | ({"resid_post"} if entries else set())))
  clean_layers = tuple(sorted(set(layers) | set(entries)))
  layer_index = {l: i for i, l in enumerate(clean_layers)}
  capture_index = {l: i for i, l in enumerate(layers)}
  seq_nll = {key: [] for key, *_ in splices}
  seq_nll["clean"], seq_targets, kl = [], [], {key: 0.0 for key, *_ in splices}

  graphdef, state = nnx.split(model)
  bar = tqdm(range(0, tokens.shape[0], cfg.batch_size), desc="evaluate", unit="batch",
             disable=not progress)
  start_time = time.perf_counter()
  for b0 in bar:
    rows = tokens[b0:b0 + cfg.batch_size]
    n_rows = len(rows)
    if n_rows < cfg.batch_size:  # pad the last batch: one batch shape, one compile
      fill = np.full((cfg.batch_size - n_rows, rows.shape[1]), mc.pad_id, np.int32)
      rows = np.concatenate([rows, fill])
    batch = jnp.asarray(rows)
    mask = batch != mc.pad_id
    keep = mask & (batch != mc.bos_id)  # positions that are replaced and counted
    spliced = b0 < n_splice
    if spliced:
      captured, clean = _clean_pass(graphdef, state, batch, mask, clean_sites, clean_layers)
      n_used = min(n_rows, n_splice - b0)  # rows past splice_sequences are not counted
    else:  # activation metrics only: the capture stops at the deepest layer, no unembedding
      captured = _capture(graphdef, state, batch, mask, sites, layers)
    keep_np = np.asarray(keep)
    for i, d in enumerate(dictionaries):
      x, y = _inputs_targets(d, captured, layer_index if spliced else capture_index, keep_np)
      feats, y_hat = reconstruct(d, x)
      stats[i].add(y, y_hat, feats)
    if spliced:
      embedded, hidden = None, []
      for key, spec, layer, start, params in splices:
        if start is None:
          resid, begin = None, None
        elif start == 0:
          embedded = model.embed(batch) if embedded is None else embedded
          resid, begin = embedded, jnp.int32(0)
        else:
          resid, begin = captured["resid_post"][:, :, layer_index[start - 1]], jnp.int32(start)
        hidden.append(_spliced_hidden(graphdef, state, batch, mask, keep, params, spec,
                                      jnp.int32(layer), begin, resid))
      del captured
      clean_nll, nll, kl_sum, valid = jax.device_get(
          _splice_losses(model.embed_tokens[...], clean, jnp.stack(hidden), batch, mask))
      seq_nll["clean"].append(np.asarray(clean_nll, np.float64)[:n_used])
      seq_targets.append(np.asarray(valid)[:n_used])
      for j, (key, *_) in enumerate(splices):
        seq_nll[key].append(np.asarray(nll[j], np.float64)[:n_used])
        kl[key] += float(np.sum(np.asarray(kl_sum[j], np.float64)[:n_used]))
      del clean, hidden
    done = min(b0 + cfg.batch_size, tokens.shape[0]) * tokens.shape[1]
    bar.set_postfix(tokens_per_s=f"{done / (time.perf_counter() - start_time):.0f}")

  results = []
  targets = np.concatenate(seq_targets) if seq_targets else np.zeros(0)
  n_targets = float(targets.sum())
  for i, d in enumerate(dictionaries):
    metrics, frequency = stats[i].metrics(cfg.dense_threshold)
    if cfg.splice and n_targets:
      clean = np.concatenate(seq_nll["clean"])
      ours = np.concatenate(seq_nll[("dict", i)])
      metrics.update({
          "ce_clean": float(clean.sum() / n_targets), "ce_spliced": float(ours.sum() / n_targets),
          "delta_lm_loss": float((ours - clean).sum() / n_targets),
          "delta_lm_loss_stderr": ratio_stderr(ours - clean, targets),
          "kl": kl[("dict", i)] / n_targets,
          "delta_lm_tokens": int(n_targets), "delta_lm_sequences": int(np.sum(targets > 0)),
      })
      zero_key = ("zero", tuple(_sites_and_layers(d)[1]))
      if zero_key in seq_nll:
        zero = float(np.concatenate(seq_nll[zero_key]).sum() / n_targets)
        spliced_ce, clean_ce = metrics["ce_spliced"], metrics["ce_clean"]
        metrics["ce_zero_ablation"] = zero
        metrics["fraction_loss_recovered"] = ((zero - spliced_ce) / (zero - clean_ce)
                                              if zero != clean_ce else math.nan)
    if isinstance(d, CrossLayerTranscoder):
      metrics["l0_per_layer"] = [float(v) for v in frequency.sum(axis=1)]
    results.append(Evaluation(export.folder_of(d, metrics["l0"]), metrics, frequency))
  if log_dir is not None:
    write_tensorboard(log_dir, results)
  return results


def check_tokens(cfg: EvalConfig, tokens: np.ndarray) -> None:
  """Enough held-out sequences for evaluate.n_sequences (checked before the model loads)."""
  if tokens.shape[0] < cfg.n_sequences:
    raise ValueError(f"evaluate.n_sequences={cfg.n_sequences} but the held-out tokens hold only "
                     f"{tokens.shape[0]} sequences; lower evaluate.n_sequences or provide more "
                     "held-out text (harvest.heldout_sequences, or a larger evaluate.tokens file)")


def load_tokens(path: str | Path) -> np.ndarray:
  """Held-out token ids [sequences, positions] from a .npy file (numpy.save), read without
  pickle; refuses anything else with a line naming the file."""
  try:
    tokens = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise ValueError(f"evaluate.tokens: {path} does not exist") from None
  except ValueError as e:
    raise ValueError(f"evaluate.tokens: {path} is not a plain .npy array ({e}); write one with "
                     "numpy.save(path, ids) from an integer array [sequences, positions]") from None
  if not isinstance(tokens, np.ndarray) or tokens.ndim != 2 or not np.issubdtype(
      tokens.dtype, np.integer):
    raise ValueError(f"evaluate.tokens: {path} holds {tokens.dtype} {tokens.shape}; it must be an "
                     "integer array [sequences, positions] (BOS first, PAD after the text)")
  return tokens


def ratio_stderr(sums: np.ndarray, counts: np.ndarray) -> float:
  """Standard error over sequences of the token-weighted mean sum(sums) / sum(counts).

  `sums[s]` is a per-sequence total (e.g. of spliced minus clean NLL) over `counts[s]` tokens;
  sequences with no tokens are left out. Tokens within a sequence are correlated, so the
  sequence is the independent unit: the ratio estimator's delta-method (cluster-robust) error,
  sqrt(n / (n - 1) * sum((sums - r * counts)^2)) / sum(counts), which for equal counts is the
  usual standard error of the per-sequence means. NaN with fewer than two sequences.
  """
  sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
  sums, counts = sums[counts > 0], counts[counts > 0]
  n = len(counts)
  if n < 2:
    return math.nan
  r = sums.sum() / counts.sum()
  return float(math.sqrt(n / (n - 1) * np.sum((sums - r * counts) ** 2)) / counts.sum())


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


VOCAB_CHUNK = 512  # vocabulary rows per step of the streamed unembedding (see _vocab_stats)


def _vocab_stats(h: Any, embed: Any, targets: Any, n_clean: int, chunk: int = VOCAB_CHUNK):
  """One streamed pass over the vocabulary for rows h [M, d] (logits z = h . embed_v), the first
  `n_clean` rows clean and the rest n blocks of as many spliced rows in the same order. Returns
  per row (max, log_sum) with logsumexp_v z = max + log_sum, and the logit of the row's target
  [M]; per spliced row, sum_v p_v (z_clean,v - z_row,v) [n, n_clean] with p the clean row's
  softmax.

  The vocabulary goes by in chunks of `chunk` rows with an online (rescaled) log-sum-exp, so the
  [M, V] logits never exist: each [M, chunk] block is used while it is hot, and the pass runs at
  the GEMM's own rate (the last, shorter chunk, when V is not a multiple, runs outside the scan).
  Everything comes from the same float32 logits, as the materialized log-softmax did: a logit
  near the max is ~40 on Gemma 3 (a float32 ulp is 4e-6) and the product's rounding of it
  enters the max, the target logit and the p-weighted difference alike, so it cancels in
  NLL = lse - z_target and KL = sum_v p_v (z_p,v - z_q,v) + lse_q - lse_p.
  """
  import jax.numpy as jnp

  f32 = jnp.float32
  vocab, d = embed.shape
  rows = h.shape[0]
  n = rows // n_clean - 1
  chunk = min(chunk, vocab)

  def step(carry, xs):
    m, s, target, diff = carry
    e, first = xs
    z = jnp.einsum("md,cd->mc", h, e, preferred_element_type=f32)
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    scale = jnp.exp(m - m_new)
    w = jnp.exp(z - m_new[:, None])
    s = s * scale + jnp.sum(w, axis=1)
    ids = first + jnp.arange(e.shape[0])
    target = target + jnp.sum(jnp.where(ids[None] == targets[:, None], z, 0.0), axis=1)
    zc = z[:n_clean]
    gap = jnp.sum(w[None, :n_clean] * (zc[None] - z[n_clean:].reshape(n, n_clean, -1)), axis=2)
    diff = diff * scale[None, :n_clean] + gap
    return (m_new, s, target, diff), None

  carry = (jnp.full((rows,), -jnp.inf, f32), jnp.zeros((rows,), f32), jnp.zeros((rows,), f32),
           jnp.zeros((n, n_clean), f32))
  k = vocab // chunk
  carry, _ = jax.lax.scan(step, carry, (embed[:k * chunk].reshape(k, chunk, d),
                                        jnp.arange(k, dtype=jnp.int32) * chunk))
  if k * chunk < vocab:
    carry, _ = step(carry, (embed[k * chunk:], jnp.int32(k * chunk)))
  m, s, target, diff = carry
  return m, jnp.log(s), target, diff / s[None, :n_clean]


# The forwards below take the model as (graphdef, state) = nnx.split(model), split once per
# evaluation: under nnx.jit each call's handling of the model's state cost about 0.9 CPU-seconds
# on the 270M (more than a one-layer splice tail), 19 times per batch.


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _capture(graphdef: Any, state: Any, tokens: Any, mask: Any, sites: tuple, layers: tuple):
  """Activations of `sites` x `layers`, stopping at the deepest of those layers."""
  return nnx.merge(graphdef, state).forward(tokens, mask, sites, layers, (), False)[0]


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _clean_pass(graphdef: Any, state: Any, tokens: Any, mask: Any, sites: tuple, layers: tuple):
  """The clean forward, once per batch: activations of `sites` x `layers` (the dictionaries'
  inputs and targets and the cached residuals) and the final hidden state at the predicting
  positions [B, S - 1, d]; the vocabulary is left to `_splice_losses`."""
  model = nnx.merge(graphdef, state)
  captured, h = model.forward(tokens, mask, sites, layers, (), True, final_hidden=True)
  return captured, h[:, :-1]


@functools.partial(jax.jit, static_argnums=(0, 6))
def _spliced_hidden(graphdef: Any, state: Any, tokens: Any, mask: Any, keep: Any, params: Any,
                    spec: tuple, layer: Any, start: Any = None, resid: Any = None):
  """The final hidden state [B, S - 1, d] (predicting positions) with the splice of `spec` at
  `layer`. With `resid` (the clean residual entering layer `start`) only layers >= start run;
  `start` and `layer` are traced, so one compile serves every layer."""
  model = nnx.merge(graphdef, state)
  fns = _splice_fns(spec, params, keep, layer)
  splice = tuple(sorted(fns.items(), key=lambda kv: (kv[0][1], kv[0][0])))
  _, h = model.forward(tokens, mask, (), (), splice, True, start, resid, final_hidden=True)
  return h[:, :-1]


@functools.partial(jax.jit, static_argnames=("chunk",))
def _splice_losses(embed: Any, clean: Any, hidden: Any, tokens: Any, mask: Any,
                   chunk: int = VOCAB_CHUNK):
  """Per-sequence summed next-token NLL of the clean model [B] and of n splices [n, B], their
  KL(clean || spliced) [n, B], and the target counts [B], from the final hidden states `clean`
  [B, S - 1, d] and `hidden` [n, B, S - 1, d]: one streamed pass over the vocabulary for all of
  them (stacked into one [(n + 1) * B * (S - 1), d] x [d, V] product, see `_vocab_stats`), in
  place of n + 1 materialized [B, S - 1, V] log-softmaxes.
  """
  import jax.numpy as jnp
  n, b, s, d = hidden.shape
  rows = jnp.concatenate([clean[None], hidden.astype(clean.dtype)]).reshape(-1, d)
  targets = jnp.broadcast_to(tokens[None, :, 1:], (n + 1, b, s)).reshape(-1)
  top, log_sum, target, gap = _vocab_stats(rows, embed, targets, b * s, chunk)
  top, log_sum = top.reshape(n + 1, b, s), log_sum.reshape(n + 1, b, s)
  nll = (top - target.reshape(n + 1, b, s)) + log_sum
  kl = gap.reshape(n, b, s) + (top[1:] - top[:1]) + (log_sum[1:] - log_sum[:1])
  valid = mask[:, 1:] & mask[:, :-1]
  nll, kl = jnp.sum(jnp.where(valid, nll, 0.0), axis=2), jnp.sum(jnp.where(valid, kl, 0.0), axis=2)
  return nll[0], nll[1:], kl, jnp.sum(valid, axis=1)


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
