"""A real activation store of tokenized text (random activations, one planted feature) and a
release of random dictionaries over it: the browser's fixtures, no model forward needed."""

from __future__ import annotations

import numpy as np

from allscope.pipelines import store
from allscope.release import CrossLayerTranscoder, Dictionary, ReleaseConfig, write_release
from tests.release.conftest import random_params

D = 24
LAYERS = (1, 4)
SITES = ("mlp_in", "mlp_out")
R = 4  # rows per record
CONTEXT = 16  # BOS + 15 tokens per sequence
TEXTS = [
    "The lighthouse keeper climbed the narrow stairs at dusk to light the great lamp.",
    "Corpus text can hold markup: <script>alert(1)</script> and <img src=x onerror=alert(2)>.",
    "Rivers carry silt down to the sea, where it settles into wide green deltas over time.",
    "A quiet library keeps its oldest maps in drawers that smell of cedar and dust.",
] * 3
PLANT = "script"  # latent 0 of every dictionary reads the direction planted on this token


def write_text_store(root, tokenizer, seed=0, seqs_per_shard=3):
  """Packs TEXTS into sequences, shuffles rows within shards, writes them with random
  activations (+ a planted direction on every `PLANT` token). Returns (manifest, truth) where
  truth holds the rows the browser pass serves (full records, in order): index, and per
  site float32 [rows, n_layers, D]; `sequences`, the packed token lists; and `by_position`,
  every stored row (partial records too) as (sequence, position) -> {site: [n_layers, D]}."""
  rng = np.random.default_rng(seed)
  ids = [t for text in TEXTS for t in tokenizer.encode(text)]
  seqs = [ids[i:i + CONTEXT - 1] for i in range(0, len(ids) - CONTEXT + 1, CONTEXT - 1)]
  plant_ids = {i for i in set(ids) if tokenizer.piece_text(i) == PLANT}
  assert plant_ids, "the tokenizer has no 'script' piece"
  direction = planted_direction()
  receipts, truth = [], {"index": [], **{s: [] for s in SITES}}
  by_position = {}
  for k, first in enumerate(range(0, len(seqs), seqs_per_shard)):
    group = seqs[first:first + seqs_per_shard]
    index = np.zeros(sum(map(len, group)), store.INDEX_DTYPE)
    index["sequence"] = np.concatenate([np.full(len(s), first + j) for j, s in enumerate(group)])
    index["position"] = np.concatenate([np.arange(1, len(s) + 1) for s in group])
    index["token"] = np.concatenate(group)
    index = index[rng.permutation(len(index))]
    acts = {s: rng.normal(0, 1, (len(index), len(LAYERS), D)) for s in SITES}
    hit = np.isin(index["token"], list(plant_ids))
    acts["mlp_in"][hit] += 8.0 * direction
    acts = {s: a.astype(store.DTYPE) for s, a in acts.items()}
    receipt, _ = store.write_shard(str(root), store.ShardRows(k, index, acts, LAYERS), R,
                                   {"sequences": [first, first + len(group)]})
    receipts.append(receipt)
    for i, e in enumerate(index):
      by_position[(int(e["sequence"]), int(e["position"]))] = {
          s: acts[s][i].astype(np.float32) for s in SITES}
    full = len(index) // R * R
    truth["index"].append(index[:full])
    for s in SITES:
      truth[s].append(acts[s][:full].astype(np.float32))
  identity = {"format": store.FORMAT, "schema_version": store.SCHEMA_VERSION, "test": True}
  manifest = store.finish(str(root), identity, receipts, sites=SITES, layers=LAYERS,
                          widths={s: D for s in SITES}, rows_per_record=R, context_length=CONTEXT)
  return manifest, {**{k: np.concatenate(v) for k, v in truth.items()}, "sequences": seqs,
                    "by_position": by_position}


def planted_direction():
  v = np.ones(D) / np.sqrt(D)
  return v


def random_release(root, seed=1):
  """A transcoder (jump_relu, layer 1), a TopK SAE (mlp_out, layer 4) and a CLT over (1, 4),
  each with latent 0 reading the planted direction."""
  rng = np.random.default_rng(seed)

  def plant(p):
    p["w_enc"][:, 0] = planted_direction()
    p["b_enc"][0], p["threshold"][0] = -2.0, 0.5  # fires only on the planted token
    return p

  tc = Dictionary(plant(random_params(rng, D, 40, D)), "transcoder", "jump_relu", "gemma3-270m",
                  1, "mlp_in", "mlp_out", l0=5)
  topk = random_params(rng, D, 32, D)
  del topk["threshold"]  # a TopK has none
  sae = Dictionary(topk, "sae", "topk", "gemma3-270m", 4, "mlp_out", "mlp_out", l0=4, k=4)
  sae.params["b_enc"][5] = -100.0  # a dead latent
  sae.params["b_enc"][6] = 100.0  # a dense one
  clt = CrossLayerTranscoder(
      tuple(plant(random_params(rng, D, 20, D, clt_layers=2, source=i)) for i in range(2)),
      "jump_relu", "gemma3-270m", l0=3, layers=LAYERS)
  dicts = [tc, sae, clt]
  return write_release(ReleaseConfig(directory="release", plots=False), dicts, root), dicts
