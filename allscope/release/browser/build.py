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

from allscope.release import layout
from allscope.release.browser import neuronpedia
from allscope.release.browser import contexts as ctx_lib
from allscope.release.browser.config import BrowseConfig
from allscope.release.browser.logits import Unembedding, logit_effects
from allscope.release.browser.scan import LatentStats, Unit, pair_activations, scan
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
          cfg: BrowseConfig, *, dictionaries: Sequence[Any] | None = None,
          progress: bool = True, verify: str = "checksum") -> dict[str, Any]:
  """Writes `<root>/browser/` for the release at `root` from one pass over `store` (an
  `ActivationStore`). `tokenizer` decodes contexts; `unembed` (None: no logit effects) gives the
  promoted and suppressed tokens. Returns facts about the pass and the output sizes."""
  cfg.validate()
  root = Path(root)
  release = load_release(root, verify=verify != "none")
  if not isinstance(release, Release):
    raise ValueError(f"{root} is a dictionary folder; give the release folder (with manifest.json)")
  entries = release.manifest["dictionaries"]
  units, skipped = units_of(entries, dictionaries or release.dictionaries)
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
  located, windows = _contexts(stats, store, tokenizer, cfg, verify)

  final = root / FOLDER
  tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", suffix=".tmp", dir=root))
  try:
    for name in PAGE_FILES:
      shutil.copyfile(STATIC / name, tmp / name)
    data = tmp / "data"
    data.mkdir()
    catalog = []
    span = int(store.manifest["context_length"])
    np_info = {"model_id": str(release.manifest.get("model_name", "")).split("/")[-1],
               "n_prompts": -(-timing["tokens"] // max(span - 1, 1)), "n_tokens_in_prompt": span,
               "dataset": json.dumps(release.manifest.get("corpus", ""), sort_keys=True),
               "bins": {"min_log10": cfg.min_log10, "per_decade": cfg.bins_per_decade,
                        "n": cfg.n_bins}}
    for i, (u, s, r) in enumerate(zip(units, stats, residual)):
      uid = f"u{i:03d}"
      effects = (logit_effects(r, unembed, cfg.logit_tokens) if r is not None else None)
      acts = _window_acts(u, s, located, windows, store, verify)
      catalog.append(_write_unit(data / uid, uid, u, s, effects, located, windows, acts,
                                 tokenizer, cfg))
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
             "dense_threshold": cfg.dense_threshold, "skipped": skipped,
             "bins": {"min_log10": cfg.min_log10, "per_decade": cfg.bins_per_decade,
                      "n": cfg.n_bins}}
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


def _contexts(stats: Sequence[LatentStats], store: Any, tokenizer: Any, cfg: BrowseConfig,
              verify: str) -> tuple[dict[int, tuple[int, int]], dict[tuple[int, int], tuple]]:
  """pass row -> (sequence, position), and (sequence, position) -> (window token ids, their
  shards, their rows in those shards), for every top row of every unit (one index read)."""
  rows = np.unique(np.concatenate([s.top_rows[s.top_values > 0] for s in stats]))
  if len(rows) == 0:
    return {}, {}
  entries = ctx_lib.locate(store, rows, verify)
  located = {int(r): (int(e["sequence"]), int(e["position"])) for r, e in zip(rows, entries)}
  pairs = np.array(sorted(set(located.values())), np.int64).reshape(-1, 2)
  toks, shards, in_shard = ctx_lib.windows(store, pairs[:, 0], pairs[:, 1], cfg.before, cfg.after,
                                           tokenizer.bos_id, verify)
  return located, {(int(a), int(b)): (t, s, r)
                   for (a, b), t, s, r in zip(pairs, toks, shards, in_shard)}


def _window_acts(u: Unit, s: LatentStats, located, windows, store: Any,
                 verify: str) -> np.ndarray:
  """The latent's activation on every token of each of its context windows: [F, N, W], NaN
  where there is no stored row (BOS, outside the sequence, padding)."""
  n_top, width = s.top_values.shape[1], len(next(iter(windows.values()))[0]) if windows else 0
  acts = np.full((u.width, n_top, width), np.nan, np.float32)
  f_idx, r_idx = np.nonzero(s.top_values > 0)
  if len(f_idx) == 0:
    return acts
  where = [windows[located[int(row)]] for row in s.top_rows[f_idx, r_idx]]
  shards = np.stack([w[1] for w in where])  # [contexts, W]
  rows = np.stack([w[2] for w in where])
  ok = shards != ctx_lib.MISSING
  keys = np.stack([shards[ok], rows[ok]], axis=1)
  unique, inverse = np.unique(keys, axis=0, return_inverse=True)
  x = ctx_lib.read_rows(store, u.site, u.layer, unique[:, 0], unique[:, 1], verify)
  latents = np.broadcast_to(f_idx[:, None], ok.shape)[ok]
  values = pair_activations(u, x, inverse.reshape(-1).astype(np.int32), latents.astype(np.int32))
  ctx = np.full(ok.shape, np.nan, np.float32)
  ctx[ok] = values
  acts[f_idx, r_idx] = ctx
  return acts


def _write_unit(folder: Path, uid: str, u: Unit, s: LatentStats, effects, located, windows,
                window_acts: np.ndarray, tokenizer, cfg: BrowseConfig) -> dict[str, Any]:
  folder.mkdir()
  freq = s.frequency
  mean = np.where(s.fired > 0, s.act_sum / np.maximum(s.fired, 1), 0.0)
  peak = s.top_values[:, 0]
  dead = np.flatnonzero(s.fired == 0)
  dense = np.flatnonzero(freq > cfg.dense_threshold)
  texts: dict[int, str] = {}

  def text(token: int) -> str:
    if token not in texts:
      texts[token] = tokenizer.piece_text(token) if token >= 0 else ""
    return texts[token]

  top_token = []
  latents = []
  for f in range(u.width):
    contexts = []
    for v, row in zip(s.top_values[f], s.top_rows[f]):
      if v <= 0:
        break
      seq, pos = located[int(row)]
      contexts.append((float(v), seq, pos))
    items = []
    for rank, (v, seq, pos) in enumerate(contexts):
      ids = windows[(seq, pos)][0]
      acts = _g_list(window_acts[f, rank])
      acts[cfg.before] = _g(v)  # the pass's own value at the peak
      items.append({"act": _g(v), "seq": seq, "pos": pos, "toks": [int(t) for t in ids],
                    "acts": acts})
      for t in ids:
        text(int(t))
    top_token.append(text(int(windows[(contexts[0][1], contexts[0][2])][0][cfg.before]))
                     if contexts else "")
    latent = {"i": f, "freq": _g(freq[f]), "max": _g(peak[f]), "mean": _g(mean[f]),
              "hist": [int(c) for c in s.hist[f]], "contexts": items}
    if effects is not None:
      pos_i, pos_v, neg_i, neg_v = effects
      latent["promoted"] = [[int(t), _g(v)] for t, v in zip(pos_i[f], pos_v[f])]
      latent["suppressed"] = [[int(t), _g(v)] for t, v in zip(neg_i[f], neg_v[f])]
      for t in list(pos_i[f]) + list(neg_i[f]):
        text(int(t))
    latents.append(latent)

  n_blocks = -(-u.width // cfg.block_size)
  for b in range(n_blocks):
    block = latents[b * cfg.block_size:(b + 1) * cfg.block_size]
    used = {t for lat in block for c in lat["contexts"] for t in c["toks"]}
    used |= {t for lat in block for key in ("promoted", "suppressed") for t, _ in lat.get(key, ())}
    payload = {"start": b * cfg.block_size, "texts": {str(t): texts[t] for t in sorted(used)
                                                      if t >= 0},
               "latents": block}
    (folder / f"block_{b}.js").write_text(_script(f"{uid}/block_{b}", payload))
  promoted = ([text(int(t)) for t in effects[0][:, 0]] if effects is not None else [])
  summary = {"freq": [_g(v) for v in freq], "max": [_g(v) for v in peak],
             "top_token": top_token, "promoted": promoted,
             "dead": dead.tolist(), "dense": dense.tolist()}
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
  layout.inside(root, FOLDER)
  store = pipelines.open_store(store_path)
  if model_name is None:
    model_name = json.loads((root / "manifest.json").read_text()).get("allscope_model")
  if tokenizer is None:
    _, tokenizer = models.describe(model_name)
  unembed = None
  if cfg.logits:
    if model is None:
      model, _ = models.load(model_name, dtype="float32")
    unembed = Unembedding.from_model(model)
  return build(root, store, tokenizer, unembed, cfg, progress=progress)
