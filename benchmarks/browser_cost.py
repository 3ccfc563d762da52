"""Feature-browser cost: the pass's tokens/s against its floors, and output size against weights.

A synthetic store (random bf16 mlp_in rows, real ArrayRecord shards, token ids of the built-in
English corpus so that token texts repeat as in real text) and a
release of random JumpReLU transcoders (one per layer, ~2% of latents firing) go through
`allscope.release.browser.build`. Floors, on the same batches:

  read    reading the store's records into host batches (what any pass must do)
  encode  the dense encoder product x @ w_enc + b_enc for every dictionary, on device-resident
          batches (the only unavoidable FLOPs)

and `pass / (read + encode)` is the overhead ratio of the pass (heaps, histograms, counts).
Then the rest of `build` (contexts, per-token window activations, logit effects, gzip shards)
and the browser's size against the release's weights, with the size per latent.

  PYTHONPATH=. python benchmarks/browser_cost.py                     # CPU defaults (small)
  PYTHONPATH=. python benchmarks/browser_cost.py --layers 18 --width 16384 --tokens 1000000 \\
      --batch 4096 --logits                                          # a GPU-sized run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from allscope.launch import host_memory


def corpus_tokens(tokenizer, n: int) -> np.ndarray:
  """The first n tokens of the built-in corpus (CPython's English documentation)."""
  from allscope.pipelines import corpus
  from allscope.pipelines.config import CorpusConfig
  cfg, ids = CorpusConfig(kind="builtin"), []
  for unit in corpus.units(cfg):
    for text in corpus.documents(cfg, unit):
      ids += tokenizer.encode(text)
      if len(ids) >= n:
        return np.asarray(ids[:n])
  return np.resize(np.asarray(ids), n)


def write_store(root: Path, tokens: int, layers: int, d: int, context: int, rows_per_record: int,
                seqs_per_shard: int, stream: np.ndarray, seed: int = 0) -> None:
  from allscope.pipelines import store
  rng = np.random.default_rng(seed)
  n_seqs = -(-tokens // (context - 1))
  stream = np.resize(stream, n_seqs * (context - 1))
  receipts = []
  for k, first in enumerate(range(0, n_seqs, seqs_per_shard)):
    n = min(seqs_per_shard, n_seqs - first)
    index = np.zeros(n * (context - 1), store.INDEX_DTYPE)
    index["sequence"] = first + np.repeat(np.arange(n), context - 1)
    index["position"] = np.tile(np.arange(1, context), n)
    index["token"] = stream[first * (context - 1):(first + n) * (context - 1)]
    index = index[rng.permutation(len(index))]
    acts = {"mlp_in": rng.normal(0, 1, (len(index), layers, d)).astype(store.DTYPE)}
    receipt, _ = store.write_shard(str(root), store.ShardRows(k, index, acts, tuple(range(layers))),
                                   rows_per_record, {"sequences": [first, first + n]})
    receipts.append(receipt)
  identity = {"format": store.FORMAT, "schema_version": store.SCHEMA_VERSION, "benchmark": True}
  store.finish(str(root), identity, receipts, sites=("mlp_in",), layers=tuple(range(layers)),
               widths={"mlp_in": d}, rows_per_record=rows_per_record, context_length=context)


def write_release(root: Path, layers: int, d: int, width: int, seed: int = 1) -> Path:
  from allscope.release import Dictionary, ReleaseConfig, write_release as write
  rng = np.random.default_rng(seed)
  dicts = []
  for layer in range(layers):
    params = {"w_enc": rng.normal(0, d ** -0.5, (d, width)), "b_enc": np.full(width, -1.0),
              "threshold": np.full(width, 1.0), "w_dec": rng.normal(0, width ** -0.5, (width, d)),
              "b_dec": np.zeros(d)}
    dicts.append(Dictionary({k: v.astype(np.float32) for k, v in params.items()}, "transcoder",
                            "jump_relu", "gemma3-270m", layer, "mlp_in", "mlp_out", l0=0.02 * width))
  return write(ReleaseConfig(directory="release", plots=False, model_card=False), dicts, root)


def main() -> None:
  host_memory.keep_freed_memory()  # as the CLI runs: freed memory reused
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--tokens", type=int, default=16384)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--width", type=int, default=4096)
  ap.add_argument("--d", type=int, default=640)
  ap.add_argument("--context", type=int, default=128)
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--vocab", type=int, default=262144)
  ap.add_argument("--logits", action="store_true", help="logit effects through a random [V, d] "
                  "unembedding (F x V x d FLOPs per dictionary)")
  ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  from allscope import models, pipelines
  from allscope.release.browser import BrowseConfig, Unembedding, build

  work = Path(args.dir or tempfile.mkdtemp(prefix="allscope-browser-bench-"))
  _, tokenizer = models.describe("gemma3-270m")
  t = time.perf_counter()
  write_store(work / "store", args.tokens, args.layers, args.d, args.context, 32, 16,
              corpus_tokens(tokenizer, args.tokens))
  root = write_release(work, args.layers, args.d, args.width)
  print(f"store + release written in {time.perf_counter() - t:.0f}s under {work}")
  store = pipelines.open_store(work / "store")
  cfg = BrowseConfig(max_tokens=args.tokens, batch_size=args.batch, logits=args.logits)

  # floor 1: reading the batches
  src = store.source(("mlp_in",), tuple(range(args.layers)), verify="size")
  per = args.batch // store.rows_per_record
  n_rec = min(len(src), -(-args.tokens // store.rows_per_record))
  t = time.perf_counter()
  batches = 0
  for r0 in range(0, n_rec, per):
    np.concatenate([src[i]["mlp_in"] for i in range(r0, min(r0 + per, n_rec))])
    batches += 1
  read_s = time.perf_counter() - t
  # floor 2: the encoder GEMMs on a device-resident batch, as many batches as the pass
  w = [jnp.asarray(np.random.default_rng(l).normal(size=(args.d, args.width)), jnp.float32)
       for l in range(args.layers)]
  b = jnp.zeros(args.width, jnp.float32)
  x = jnp.asarray(np.random.default_rng(9).normal(size=(args.batch, args.layers, args.d)),
                  jnp.bfloat16)
  gemm = jax.jit(lambda x, w: sum(jnp.sum(x[:, l].astype(jnp.float32) @ w[l] + b)
                                  for l in range(len(w))))
  gemm(x, w).block_until_ready()
  t = time.perf_counter()
  for _ in range(batches):
    out = gemm(x, w)
  out.block_until_ready()
  gemm_s = time.perf_counter() - t

  unembed = None
  if args.logits:
    rng = np.random.default_rng(3)
    unembed = Unembedding(rng.normal(0, 1, (args.vocab, args.d)).astype(np.float32),
                          np.ones(args.d, np.float32))
  t = time.perf_counter()
  out = build(root, store, tokenizer, unembed, cfg, progress=False, verify="size")
  total_s = time.perf_counter() - t
  n, latents = out["tokens"], args.layers * args.width
  rows = [
      ("device", jax.devices()[0].device_kind),
      ("dictionaries x width", f"{args.layers} x {args.width} (d={args.d})"),
      ("tokens in the pass", f"{n}"),
      ("read floor tokens/s", f"{n / read_s:,.0f}"),
      ("encode floor tokens/s", f"{n / gemm_s:,.0f}"),
      ("pass tokens/s (compile incl.)", f"{out['tokens_per_s']:,.0f}"),
      ("pass / (read + encode)", f"{out['seconds'] / (read_s + gemm_s):.2f}x"),
      ("rest of build (s)", f"{out['write_seconds']:.1f}" + (" incl. logits" if args.logits else "")),
      ("build total (s)", f"{total_s:.1f}"),
      ("browser MB", f"{out['bytes'] / 1e6:.1f}"),
      ("weights MB", f"{out['weights_bytes'] / 1e6:.1f}"),
      ("browser / weights", f"{out['bytes'] / out['weights_bytes']:.3f}"),
      ("browser bytes per latent", f"{out['bytes'] / latents:,.0f}"),
      ("18 x 16k latents: browser GB", f"{out['bytes'] / latents * 18 * 16384 / 1e9:.2f}"),
  ]
  for name, value in rows:
    print(f"{name:32s} {value}")


if __name__ == "__main__":
  main()
