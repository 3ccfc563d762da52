"""What a compressed activation store costs and what it does to the dictionaries trained on it.

One bf16 store is harvested from the real model (or reused: --store). Its rows are rewritten,
shard by shard and in the same order, with every codec; each store is timed on writing
(encode + ArrayRecord + checksums) and on reading through the trainer's Grain loader (decode
included). Then the same TopK SAE (same seed, same record order) is trained on the bf16, int8
and fp8 stores and evaluated on held-out rows of the *original* bf16 activations: FVU per layer.
zstd is lossless, so its dictionaries are the bf16 ones (checked: the loader's batches are equal).

  PYTHONPATH=. python benchmarks/store_codecs.py                       # CPU defaults
  PYTHONPATH=. python benchmarks/store_codecs.py --tokens 1000000 --steps 2000 --width 16384
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def read_rows(root: str, manifest: dict, sites, layers):
  """Every shard's (index, {site: bf16 [rows, n_layers, width]}) in stored order."""
  from allscope.pipelines import store

  out = []
  for shard in manifest["shards"]:
    name = store.shard_name(shard["shard"])
    index = np.concatenate([np.frombuffer(b, store.INDEX_DTYPE) for b in store.open_reader(
        os.path.join(root, "index", name)).read_all()])
    acts = {}
    for s in sites:
      cols = []
      for l in layers:
        recs = store.open_reader(os.path.join(root, store.layer_dir(s, l), name)).read_all()
        cols.append(np.concatenate([np.frombuffer(b, store.DTYPE).reshape(-1, manifest["widths"][s])
                                    for b in recs]))
      acts[s] = np.stack(cols, axis=1)
    out.append((shard, index, acts))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="gemma3-270m")
  ap.add_argument("--store", default="/tmp/allscope-codec-bench/bf16")
  ap.add_argument("--sites", default="mlp_out,resid_post")
  ap.add_argument("--layers", default="3,9,15")
  ap.add_argument("--tokens", type=int, default=40_000)
  ap.add_argument("--context", type=int, default=256)
  ap.add_argument("--held-out-shards", type=int, default=1)
  ap.add_argument("--width", type=int, default=2048)
  ap.add_argument("--k", type=int, default=32)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--lr", type=float, default=3e-3)
  args = ap.parse_args()

  import jax.numpy as jnp

  from allscope import models, pipelines
  from allscope.pipelines import ActivationStore, job, store
  from allscope.pipelines.config import HarvestConfig
  from allscope.trainers import TrainConfig, dictionaries, train

  sites, layers = tuple(args.sites.split(",")), tuple(int(l) for l in args.layers.split(","))
  if not os.path.exists(os.path.join(args.store, store.MANIFEST)):
    model, tok = models.load(args.model)
    cfg = HarvestConfig(sites=sites, layers=layers, context_length=args.context,
                        token_budget=args.tokens, batch_size=8, sequences_per_shard=16,
                        rows_per_record=32, progress=False)
    job.run(cfg, models.ModelConfig(name=args.model), args.store, model=model, tokenizer=tok)
    del model
  manifest = store.load_manifest(args.store)
  shards = read_rows(args.store, manifest, sites, layers)
  train_shards, held = shards[:-args.held_out_shards], shards[-args.held_out_shards:]
  held_x = {s: np.concatenate([a[s] for _, _, a in held]).astype(np.float32) for s in sites}
  n_train = sum(len(i) for _, i, _ in train_shards)
  floor = 2 * sum(manifest["widths"][s] for s in sites) * len(layers)
  root = os.path.dirname(args.store.rstrip("/"))

  print(f"\nstore codecs: {args.model}, sites {','.join(sites)}, layers {layers}, "
        f"{n_train} training tokens in {len(train_shards)} shards, {len(held_x[sites[0]])} held out")
  print(f"{'codec':10s} {'bytes/token':>12s} {'vs bf16':>8s} {'write tok/s':>12s} {'write MB/s':>11s} "
        f"{'read tok/s':>11s} {'read MB/s':>10s}")
  stores, bf16_bpt = {}, 0.0
  for codec in pipelines.codecs.CODECS:  # bf16 first: the others' size ratio is against it
    out = os.path.join(root, codec + "_train")
    if os.path.exists(os.path.join(out, store.MANIFEST)):
      import shutil
      shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    receipts = []
    for k, (shard, index, acts) in enumerate(train_shards):
      receipt, _ = store.write_shard(out, store.ShardRows(k, index, acts, layers), 32,
                                     {"sequences": shard["sequences"]}, codec=codec)
      receipts.append(receipt)
    write_s = time.perf_counter() - t0
    identity = {"format": store.FORMAT, "schema_version": store.SCHEMA_VERSION, "codec_bench": codec}
    m = store.finish(out, identity, receipts, sites=sites, layers=layers,
                     widths={s: manifest["widths"][s] for s in sites}, rows_per_record=32,
                     context_length=args.context, codec=codec)
    acts_bytes = sum(i["bytes"] for s in m["shards"] for rel, i in s["files"].items()
                     if not rel.startswith("index/"))
    st = ActivationStore(out)
    loader = st.loader(batch_size=args.batch, sites=sites, layers=layers, seed=0, num_epochs=1,
                       verify="size")
    t0 = time.perf_counter()
    served = 0
    for batch in loader:
      served += len(batch[sites[0]])
    read_s = time.perf_counter() - t0
    stores[codec] = st
    bpt = acts_bytes / n_train
    bf16_bpt = bf16_bpt if codec != "bf16" else bpt
    print(f"{codec:10s} {bpt:12.1f} {bf16_bpt / bpt:7.2f}x {n_train / write_s:12.0f} "
          f"{n_train * floor / write_s / 1e6:11.1f} {served / read_s:11.0f} "
          f"{served * floor / read_s / 1e6:10.1f}")
  print(f"(bytes/token: activation files + scales, ArrayRecord overhead included; floor "
        f"{floor} = 2 bytes x widths x layers; MB/s in bf16-equivalent bytes)")

  a = next(iter(stores["bf16"].loader(args.batch, sites, layers, seed=0)))
  b = next(iter(stores["zstd"].loader(args.batch, sites, layers, seed=0)))
  assert all(np.array_equal(a[s], b[s]) for s in sites), "zstd must serve the bf16 rows"

  print(f"\nheld-out FVU, TopK SAE width {args.width} k {args.k}, {args.steps} steps of "
        f"{args.batch}, lr {args.lr} (same seed and record order for every codec)")
  print(f"{'site/layer':16s} {'bf16':>8s} {'int8':>8s} {'fp8':>8s} {'int8/bf16':>10s} {'fp8/bf16':>9s}")
  for site in sites:
    fvu = {}
    for codec in ("bf16", "int8", "fp8"):
      st = stores[codec]
      cfg = TrainConfig(kind="sae", activation="topk", site_in=site, site_out=site, layers=layers,
                        width=args.width, k=args.k, steps=args.steps, batch_size=args.batch,
                        lr=args.lr, lr_warmup_steps=20, log_every=args.steps,
                        checkpoint_every=args.steps, keep_checkpoints=1)
      norm = {site: st.norm_scale(site, layers)}
      out = os.path.join(root, f"sae_{site}_{codec}")
      if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
      result = train(cfg, st.global_batches(args.batch, (site,), layers, seed=0), norm, out,
                     progress=False)
      x = held_x[site] * norm[site][None, :, None]
      recon, _ = dictionaries.forward({k: jnp.asarray(v) for k, v in result.params.items()}, cfg,
                                      jnp.asarray(x))
      recon = np.asarray(recon, np.float64)
      xd = x.astype(np.float64)
      fvu[codec] = np.sum((xd - recon) ** 2, axis=(0, 2)) / np.sum(
          (xd - xd.mean(0, keepdims=True)) ** 2, axis=(0, 2))
    for j, l in enumerate(layers):
      print(f"{site + '/' + str(l):16s} {fvu['bf16'][j]:8.4f} {fvu['int8'][j]:8.4f} "
            f"{fvu['fp8'][j]:8.4f} {fvu['int8'][j] / fvu['bf16'][j]:10.4f} "
            f"{fvu['fp8'][j] / fvu['bf16'][j]:9.4f}")
  print(json.dumps({"train_tokens": n_train}))


if __name__ == "__main__":
  main()
