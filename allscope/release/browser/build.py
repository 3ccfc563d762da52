"""Writes `<release>/browser/`: a static feature browser that opens from disk, no server.

  browser/index.html, app.js, style.css       the page (copied from static/)
  browser/data/catalog.js                     the dictionaries, pass facts
  browser/data/<unit>/summary.js              per latent: frequency, max, search text; dead/dense
  browser/data/<unit>/block_<b>.js            `block_size` latents: contexts, histogram, logits

A data file is a script, `allscopeData("<key>", "<base64 gzip JSON>")`, because pages opened from
file:// may not fetch() files but may load scripts; the page inserts one on demand (lazy) and
inflates it with the browser's DecompressionStream. Corpus text is data inside JSON strings and
reaches the page only through textContent, never as markup.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allscope.release.browser import neuronpedia
from allscope.release.browser import contexts as ctx_lib
from allscope.release.browser.config import BrowseConfig
from allscope.release.browser.logits import Unembedding, logit_effects
from allscope.release.browser.scan import LatentStats, Unit, check, pair_activations, scan
from allscope.release.dictionary import CrossLayerTranscoder, Dictionary
from allscope.release.load import Release
from allscope.release.load import load as load_release

log = logging.getLogger(__name__)

FOLDER = "browser"
STATIC = Path(__file__).parent / "static"
PAGE_FILES = ("index.html", "app.js", "style.css")


def units_of(entries: Sequence[dict], dictionaries: Sequence[Any]) -> tuple[list[Unit], list[str]]:
  """Browser units of a release (manifest entries beside their loaded dictionaries), and notes
  on what is left out (crosscoders, which read several layers at once)."""
  units, skipped = [], []
  for entry, d in zip(entries, dictionaries):
    path = entry["path"]
    if isinstance(d, CrossLayerTranscoder):
      for i, layer in enumerate(d.model_layers):
        p = d.layer_params[i]
        units.append(Unit(f"{path}/layer_{layer}", f"{path} (source layer {layer})", "mlp_in",
                          layer, p, d.architecture, d.k, "mlp_out", layer,
                          p["w_dec"][:, i:].sum(axis=1)))
    elif isinstance(d, Dictionary) and d.type != "crosscoder":
      units.append(Unit(path, path, d.site_in, d.layer, d.params, d.architecture, d.k,
                        d.site_out, d.layer, d.params["w_dec"]))
    else:
      skipped.append(f"{path}: crosscoders are not browsed yet")
  return units, skipped


def _g(x: float) -> float:
  """4 significant digits: the page shows no more, and the shards shrink."""
  return float(f"{float(x):.4g}")


def _g_list(a: np.ndarray) -> list[float | None]:
  """`_g` over an array (NaN -> None), vectorized: the window activations are most of the data."""
  a = np.asarray(a, np.float64)
  finite = np.isfinite(a) & (a != 0)
  digits = np.where(finite, 3 - np.floor(np.log10(np.abs(np.where(finite, a, 1.0)))), 0)
  scale = 10.0 ** digits
  rounded = np.round(a * scale) / scale
  return [None if v != v else v for v in rounded.tolist()]


def _script(key: str, payload: Any) -> str:
  data = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode()
  return (f'allscopeData("{key}", "{base64.b64encode(gzip.compress(data, 6, mtime=0)).decode()}");\n')


def read_script(path: str | Path) -> tuple[str, Any]:
  """(key, payload) of a data file written by `_script` (for tools and tests)."""
  text = Path(path).read_text()
  prefix = 'allscopeData("'
  if not text.startswith(prefix):
    raise ValueError(f"{path}: not an allscope browser data file")
  key, _, rest = text[len(prefix):].partition('", "')
  return key, json.loads(gzip.decompress(base64.b64decode(rest[:rest.index('"')])))


def build(root: str | Path, store: Any, tokenizer: Any, unembed: Unembedding | None,
          cfg: BrowseConfig, *, progress: bool = True, verify: str = "checksum"
          ) -> dict[str, Any]:
  """Writes `<root>/browser/` for the release at `root` from one pass over `store` (an
  `ActivationStore`). `tokenizer` decodes contexts; `unembed` (None: no logit effects) gives the
  promoted and suppressed tokens. Returns facts about the pass and the output sizes."""
  cfg.validate()
  root = Path(root)
  release = load_release(root, verify=verify != "none")
  if not isinstance(release, Release):
    raise ValueError(f"{root} is a dictionary folder; give the release folder (with manifest.json)")
  entries = release.manifest["dictionaries"]
  units, skipped = units_of(entries, release.dictionaries)
  if not units:
    raise ValueError(f"{root}: nothing to browse ({'; '.join(skipped)})")
  residual = []
  if unembed is not None and cfg.logits:
    for u in units:  # every shape checked before the pass
      r = unembed.residual_directions(u.directions, u.out_site, u.out_layer)
      if r is not None and r.shape[1] != unembed.embed.shape[1]:
        raise ValueError(f"{u.key}: decoder width {r.shape[1]} does not match the model's "
                         f"d_model {unembed.embed.shape[1]}")
      residual.append(r)
  else:
    residual = [None] * len(units)

  stats, timing = scan(units, store, cfg, progress=progress, verify=verify)
  start = time.perf_counter()
  ctx = _contexts(stats, store, tokenizer, cfg, verify)

  final = root / FOLDER
  tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", suffix=".tmp", dir=root))
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the published folder from other readers
    for name in PAGE_FILES:
      shutil.copyfile(STATIC / name, tmp / name)
    data = tmp / "data"
    data.mkdir()
    catalog = []
    span = int(store.manifest["context_length"])
    bins = {"min_log10": cfg.min_log10, "per_decade": cfg.bins_per_decade, "n": cfg.n_bins}
    np_info = {"model_id": str(release.manifest.get("model_name", "")).split("/")[-1],
               "n_prompts": -(-timing["tokens"] // max(span - 1, 1)), "n_tokens_in_prompt": span,
               "dataset": json.dumps(release.manifest.get("corpus", ""), sort_keys=True),
               "bins": bins}
    for i, (u, s, r) in enumerate(zip(units, stats, residual)):
      uid = f"u{i:03d}"
      effects = (logit_effects(r, unembed, cfg.logit_tokens) if r is not None else None)
      acts = _window_acts(u, s, ctx, store, verify)
      catalog.append(_write_unit(data / uid, uid, u, s, effects, ctx, acts, tokenizer, cfg))
      if cfg.neuronpedia:
        _, blocks = zip(*(read_script(f) for f in sorted((data / uid).glob("block_*.js"),
                                                            key=lambda f: int(f.stem[6:]))))
        texts = {int(t): v for b in blocks for t, v in b["texts"].items()}
        neuronpedia.write_batches(
            tmp / "neuronpedia" / uid, [lat for b in blocks for lat in b["latents"]], texts,
            layer=u.layer, sae_set=u.key, per_batch=cfg.block_size, before=cfg.before, **np_info)
    facts = {"release": release.manifest.get("name", root.name), "store": str(store.path),
             "tokens": timing["tokens"], "tokens_per_s": _g(timing["tokens_per_s"]),
             "top_n": cfg.top_n, "before": cfg.before, "after": cfg.after,
             "dense_threshold": cfg.dense_threshold, "skipped": skipped, "bins": bins}
    (data / "catalog.js").write_text(_script("catalog", {"facts": facts, "units": catalog}))
    old = None
    if final.exists():
      old = root / f".{FOLDER}.old-{os.getpid()}"
      final.rename(old)
    tmp.rename(final)
    if old is not None:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
  weights = sum(f.stat().st_size for f in root.rglob("*.safetensors")
                if FOLDER not in f.relative_to(root).parts[:1])
  out = {**timing, "write_seconds": time.perf_counter() - start, "bytes": size,
         "weights_bytes": weights, "path": final, "units": len(units), "skipped": skipped}
  log.info("wrote %s: %d dictionaries, %d tokens at %.0f tokens/s, %.1f MB (weights %.1f MB)",
           final, len(units), timing["tokens"], timing["tokens_per_s"], size / 1e6, weights / 1e6)
  return out


@dataclasses.dataclass
class _Contexts:
  """Every top row of every unit (sorted `rows`), with its (sequence, position) [n, 2] and its
  window: token ids, their shard and row in that shard [n, W] (MISSING where not stored)."""

  rows: np.ndarray
  seqpos: np.ndarray
  tokens: np.ndarray
  shards: np.ndarray
  in_shard: np.ndarray

  def at(self, rows: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.rows, rows)


def _contexts(stats: Sequence[LatentStats], store: Any, tokenizer: Any, cfg: BrowseConfig,
              verify: str) -> _Contexts:
  """The windows of all top rows, from one read of the index."""
  rows = np.unique(np.concatenate([s.top_rows[s.top_values > 0] for s in stats]))
  width = cfg.before + 1 + cfg.after
  if len(rows) == 0:
    empty = np.zeros((0, width), np.int64)
    return _Contexts(rows, np.zeros((0, 2), np.int64), empty, empty, empty)
  entries = ctx_lib.locate(store, rows, verify)
  seqpos = np.stack([entries["sequence"], entries["position"]], axis=1).astype(np.int64)
  toks, shards, in_shard = ctx_lib.windows(store, seqpos[:, 0], seqpos[:, 1], cfg.before,
                                           cfg.after, tokenizer.bos_id, verify)
  return _Contexts(rows, seqpos, toks, shards, in_shard)


def _window_acts(u: Unit, s: LatentStats, ctx: _Contexts, store: Any, verify: str) -> np.ndarray:
  """The latent's activation on every token of each of its context windows: [F, N, W], NaN
  where there is no stored row (BOS, outside the sequence, padding)."""
  acts = np.full(s.top_values.shape + (ctx.tokens.shape[1],), np.nan, np.float32)
  f_idx, r_idx = np.nonzero(s.top_values > 0)
  if len(f_idx) == 0:
    return acts
  k = ctx.at(s.top_rows[f_idx, r_idx])
  shards, rows = ctx.shards[k], ctx.in_shard[k]  # [contexts, W]
  ok = shards != ctx_lib.MISSING
  keys = shards[ok] * (1 << 40) + rows[ok]  # one int64 key per stored row
  unique, inverse = np.unique(keys, return_inverse=True)
  x = ctx_lib.read_rows(store, u.site, u.layer, unique >> 40, unique & ((1 << 40) - 1), verify)
  latents = np.broadcast_to(f_idx[:, None], ok.shape)[ok]
  values = pair_activations(u, x, inverse.reshape(-1).astype(np.int32), latents.astype(np.int32))
  window = np.full(ok.shape, np.nan, np.float32)
  window[ok] = values
  acts[f_idx, r_idx] = window
  return acts


def _nested(a: np.ndarray) -> list:
  """`_g_list` of an array of any shape, as nested lists (NaN -> None)."""
  flat = _g_list(a.reshape(-1))
  out = np.empty(len(flat), object)
  out[:] = flat
  return out.reshape(a.shape).tolist()


def _write_unit(folder: Path, uid: str, u: Unit, s: LatentStats, effects, ctx: _Contexts,
                window_acts: np.ndarray, tokenizer, cfg: BrowseConfig) -> dict[str, Any]:
  folder.mkdir()
  freq = s.frequency
  mean = np.where(s.fired > 0, s.act_sum / np.maximum(s.fired, 1), 0.0)
  peak = s.top_values[:, 0]
  dead = np.flatnonzero(s.fired == 0)
  dense = np.flatnonzero(freq > cfg.dense_threshold)
  valid = s.top_values > 0  # [F, N], a prefix of each row (top_k sorts)
  k = ctx.at(np.where(valid, s.top_rows, ctx.rows[0] if len(ctx.rows) else 0))
  window_acts[:, :, cfg.before] = np.where(valid, s.top_values, np.nan)  # the pass's own peak
  acts = _nested(window_acts)
  values = _g_list(s.top_values.reshape(-1))
  tokens = ctx.tokens[k] if len(ctx.rows) else np.zeros(valid.shape + (0,), np.int64)
  ids = [tokens[valid].reshape(-1)]
  if effects is not None:
    ids += [effects[0].reshape(-1), effects[2].reshape(-1)]
  texts = {t: tokenizer.piece_text(t) for t in np.unique(np.concatenate(ids)).tolist() if t >= 0}
  texts[ctx_lib.MISSING] = ""
  n_top = valid.shape[1]

  latents = []
  for f in range(u.width):
    n = int(valid[f].sum())
    items = [{"act": values[f * n_top + r], "seq": int(ctx.seqpos[k[f, r], 0]),
              "pos": int(ctx.seqpos[k[f, r], 1]), "toks": tokens[f, r].tolist(),
              "acts": acts[f][r]} for r in range(n)]
    latent = {"i": f, "freq": _g(freq[f]), "max": _g(peak[f]), "mean": _g(mean[f]),
              "hist": s.hist[f].tolist(), "contexts": items}
    if effects is not None:
      pos_i, pos_v, neg_i, neg_v = effects
      latent["promoted"] = [[int(t), _g(v)] for t, v in zip(pos_i[f], pos_v[f])]
      latent["suppressed"] = [[int(t), _g(v)] for t, v in zip(neg_i[f], neg_v[f])]
    latents.append(latent)
  top_token = [texts[int(tokens[f, 0, cfg.before])] if valid[f, 0] else "" for f in range(u.width)]

  n_blocks = -(-u.width // cfg.block_size)
  for b in range(n_blocks):
    block = latents[b * cfg.block_size:(b + 1) * cfg.block_size]
    used = {t for lat in block for c in lat["contexts"] for t in c["toks"]}
    used |= {t for lat in block for key in ("promoted", "suppressed") for t, _ in lat.get(key, ())}
    payload = {"start": b * cfg.block_size, "texts": {str(t): texts[t] for t in sorted(used)
                                                      if t >= 0},
               "latents": block}
    (folder / f"block_{b}.js").write_text(_script(f"{uid}/block_{b}", payload))
  promoted = ([texts[int(t)] for t in effects[0][:, 0]] if effects is not None else [])
  summary = {"freq": _g_list(freq), "max": _g_list(peak), "top_token": top_token,
             "promoted": promoted, "dead": dead.tolist(), "dense": dense.tolist()}
  (folder / "summary.js").write_text(_script(f"{uid}/summary", summary))
  return {"id": uid, "key": u.key, "label": u.label, "site": u.site, "layer": u.layer,
          "out_site": u.out_site, "width": u.width, "n_tokens": s.n_tokens,
          "block_size": cfg.block_size, "n_blocks": n_blocks, "n_dead": int(len(dead)),
          "n_dense": int(len(dense)), "logits": effects is not None}


def browse(release_root: str | Path, store_path: str | Path, cfg: BrowseConfig, *,
           model_name: str | None = None, model: Any = None, tokenizer: Any = None,
           progress: bool = True) -> dict[str, Any]:
  """`allscope browse`: (re)writes the browser of an existing release from a store.

  The tokenizer comes from the model's metadata (`models.describe`); the weights are read only for
  the logit effects (`cfg.logits`), unless `model` is given.
  """
  from allscope import models, pipelines

  cfg.validate()
  root = Path(release_root)
  if not (root / "manifest.json").exists():
    raise FileNotFoundError(f"{root}: no manifest.json; give a release folder written by "
                            "`allscope release`")
  store = pipelines.open_store(store_path)
  release = load_release(root)
  check(units_of(release.manifest["dictionaries"], release.dictionaries)[0], store)  # before loads
  model_name = model_name or release.manifest.get("allscope_model")
  if not model_name:
    raise ValueError(f"{root}/manifest.json names no allscope_model; pass the model (model.name)")
  if tokenizer is None:
    _, tokenizer = models.describe(model_name)
  unembed = None
  if cfg.logits:
    if model is None:
      model, _ = models.load(model_name, dtype="float32")
    unembed = Unembedding.from_model(model)
  return build(root, store, tokenizer, unembed, cfg, progress=progress)
