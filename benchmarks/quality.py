"""Dictionary quality against EleutherAI sparsify, trained on identical batches from one store.

Both sides train TopK transcoders (mlp_in -> mlp_out) of width F with k latents on the same
global batches of a store of the bundled Gemma 3 270M (normalized by the store's per-(site,
layer) scalars, which sparsify does not do by itself but which only helps it at deep layers), at
their own default settings:
  allscope  `TrainConfig(kind="transcoder", activation="topk")` with everything else left unset
            (so the learning rate comes from `trainers.config.default_lr`);
  sparsify  `sparsify.SparseCoder` with its Trainer's default step for a transcoder: Signum in a
            schedule-free wrapper (momentum 0.95), lr = 5e-3 / sqrt(F / 2^14), zero decoder,
            encoder bias centred on the first batch, b_dec = first batch mean, loss = FVU, no
            AuxK, no decoder-norm constraint (sparsify/trainer.py, `fit` and its hook).
Both are converted to release dictionaries (normalization folded) and measured by one float64
evaluator on held-out rows (the store's last records, never trained on): FVU, L0 and the dead
fraction (no firing on any held-out row); then `release.evaluate` splices each into the model on
held-out text (stdlib docstrings, not in the store) for the delta LM loss.

  python benchmarks/quality.py                 # ~10 min on 2 cores: F=4096, k=32, 3 layers
  python benchmarks/quality.py --epochs 3      # the issue's 3 passes
Harvests the store first when --store does not exist (mlp_in/mlp_out of layers 3, 9, 15 on the
built-in corpus, ~110k tokens). Needs the `bench` extra (eai-sparsify).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import tempfile
import time

import numpy as np

from allscope.launch import host_memory
from quality_data import Split


def harvest_store(path: str, layers: tuple[int, ...], tokens: int) -> None:
  from allscope.models import ModelConfig
  from allscope.pipelines import CorpusConfig, HarvestConfig, job
  cfg = HarvestConfig(corpus=CorpusConfig(kind="builtin"), sites=("mlp_in", "mlp_out"),
                      layers=layers, context_length=128, token_budget=tokens, batch_size=16,
                      progress=False)
  job.harvest(cfg, ModelConfig(name="gemma3-270m", dtype="float32"), path)


def train_allscope_cfg(split: Split, cfg):
  """Release dictionaries of allscope dictionaries trained with `cfg` on the split's batches."""
  from allscope.release import convert
  from allscope.trainers import export, train
  with tempfile.TemporaryDirectory() as out:
    res = train(cfg, split.batches(cfg.batch_size), split.norm_scale, out, progress=False)
  return convert.from_exported(export.release_arrays(cfg, res.state, split.norm_scale,
                                                     split.model_name))


def train_allscope(split: Split, width: int, k: int, batch: int, steps: int):
  """allscope TopK transcoders at its defaults (the lr from `trainers.config.default_lr`)."""
  from allscope.trainers import TrainConfig
  return train_allscope_cfg(split, TrainConfig(
      kind="transcoder", activation="topk", layers=split.layers, width=width, k=k,
      batch_size=batch, steps=steps, checkpoint_every=10 ** 9, log_every=50))


def train_sparsify(split: Split, width: int, k: int, batch: int, steps: int):
  """Release dictionaries of sparsify TopK transcoders, its Trainer's default step per layer."""
  import torch
  from schedulefree import ScheduleFreeWrapper
  from sparsify.config import TranscoderConfig
  from sparsify.sign_sgd import SignSGD
  from sparsify.sparse_coder import SparseCoder

  from allscope.release.dictionary import Dictionary
  batches = split.batches(batch).local(0, batch)
  s_in, s_out = (np.asarray(split.norm_scale[s], np.float32) for s in split.sites)
  d = split.held_out[split.sites[0]].shape[-1]
  saes, opts = [], []
  for _ in split.layers:
    torch.manual_seed(0)  # Trainer: init_seeds = [0]
    sae = SparseCoder(d, TranscoderConfig(num_latents=width, k=k), "cpu", dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(),
                                        "lr": 5e-3 / (width / 2 ** 14) ** 0.5}]), momentum=0.95)
    opt.train()
    saes.append(sae)
    opts.append(opt)
  for step in range(steps):
    rows = batches[step]
    for g, (sae, opt) in enumerate(zip(saes, opts)):
      x = torch.from_numpy(rows[split.sites[0]][:, g].astype(np.float32) * s_in[g])
      y = torch.from_numpy(rows[split.sites[1]][:, g].astype(np.float32) * s_out[g])
      if step == 0:  # the Trainer's first-batch initialization for transcoders
        sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
        sae.b_dec.data = y.mean(0)
      out = sae(x=x, y=y, dead_mask=None, total_variance=(y - y.mean(0)).pow(2).sum())
      (out.fvu + out.multi_topk_fvu / 8).backward()
      opt.step()
      opt.zero_grad()
  out = []
  for g, (layer, sae, opt) in enumerate(zip(split.layers, saes, opts)):
    opt.eval()  # schedule-free: the averaged weights, as sparsify saves them
    w = {n: p.detach().numpy().astype(np.float64) for n, p in sae.named_parameters()}
    params = {"w_enc": w["encoder.weight"].T * s_in[g], "b_enc": w["encoder.bias"],
              "w_dec": w["W_dec"] / s_out[g], "b_dec": w["b_dec"] / s_out[g]}  # TopK: no threshold
    out.append(Dictionary({n: v.astype(np.float32) for n, v in params.items()}, "transcoder",
                          "topk", split.model_name, layer, *split.sites, k=k))
  return out


def held_out_metrics(split: Split, dicts) -> list[dict]:
  """FVU, L0, dead fraction of each dictionary in float64 on the held-out rows of its own sites
  (an SAE over mlp_in reconstructs mlp_in; a transcoder predicts mlp_out from mlp_in)."""
  from allscope.release.evaluate import activation_metrics
  out = []
  for g, dct in enumerate(dicts):
    d64 = dataclasses.replace(dct, params={n: v.astype(np.float64) for n, v in dct.params.items()})
    x = split.held_out[dct.site_in][:, g].astype(np.float64)
    m, _ = activation_metrics(d64, x, split.held_out[dct.site_out][:, g].astype(np.float64))
    out.append(m)
  return out


def eval_text() -> str:
  """English held out from the store: docstrings of stdlib modules (the store holds pydoc topics)."""
  import argparse as a, collections, functools, itertools, json, pathlib, re, string, textwrap
  docs = []
  for mod in (a, collections, functools, itertools, json, pathlib, re, string, textwrap):
    docs.append(inspect.getdoc(mod) or "")
    docs += [inspect.getdoc(obj) or "" for name, obj in sorted(vars(mod).items())
             if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))]
  return "\n\n".join(d for d in docs if d)


def delta_lm(dicts, n_sequences: int, seq_len: int) -> list[dict]:
  from allscope import models
  from allscope.release import EvalConfig, evaluate
  model, tok = models.load("gemma3-270m", dtype="float32")
  ids = tok.encode(eval_text())
  n = min(n_sequences, len(ids) // (seq_len - 1))
  bos = model.config.bos_id
  tokens = np.asarray([[bos] + ids[i * (seq_len - 1):(i + 1) * (seq_len - 1)] for i in range(n)],
                      np.int32)
  cfg = EvalConfig(n_sequences=n, seq_len=seq_len, batch_size=8)
  return [e.metrics for e in evaluate(cfg, dicts, model, tokens, progress=False)]


def main() -> None:
  host_memory.keep_freed_memory()  # as the CLI runs: freed memory reused
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--store", default="outputs/bench/quality_store")
  ap.add_argument("--layers", default="3,9,15")
  ap.add_argument("--tokens", type=int, default=110_000, help="harvest budget (new store only)")
  ap.add_argument("--width", type=int, default=4096)
  ap.add_argument("--k", type=int, default=32)
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--epochs", type=float, default=1.0)
  ap.add_argument("--held-out", type=int, default=12_288, help="held-out rows (FVU, L0, dead)")
  ap.add_argument("--lm-sequences", type=int, default=16, help="x 128 tokens for delta LM; 0: skip")
  args = ap.parse_args()
  layers = tuple(int(l) for l in args.layers.split(","))
  if not os.path.exists(os.path.join(args.store, "manifest.json")):
    print(f"harvesting {args.store} ...", flush=True)
    harvest_store(args.store, layers, args.tokens)
  split = Split(args.store, layers, args.held_out)
  steps = max(1, int(args.epochs * split.train.n_rows // args.batch))
  print(f"store {args.store}: {split.train.n_rows} training rows, "
        f"{split.held_out['mlp_in'].shape[0]} held-out rows; transcoders F={args.width} "
        f"k={args.k}, batch {args.batch} x {steps} steps, layers {layers}", flush=True)
  sides, seconds = {}, {}
  for name, fn in (("allscope", train_allscope), ("sparsify", train_sparsify)):
    t = time.perf_counter()
    sides[name] = fn(split, args.width, args.k, args.batch, steps)
    seconds[name] = time.perf_counter() - t
  metrics = {name: held_out_metrics(split, dicts) for name, dicts in sides.items()}
  if args.lm_sequences:
    lm = delta_lm(sides["allscope"] + sides["sparsify"], args.lm_sequences, 128)
    for name, part in (("allscope", lm[:len(layers)]), ("sparsify", lm[len(layers):])):
      for m, e in zip(metrics[name], part):
        m["delta_lm_loss"] = e["delta_lm_loss"]
  print(f"train seconds: allscope {seconds['allscope']:.0f}, sparsify {seconds['sparsify']:.0f}")
  keys = ("fvu", "l0", "dead_fraction") + (("delta_lm_loss",) if args.lm_sequences else ())
  header = f"{'layer':>5} " + " ".join(f"{k + ' a/s':>26}" for k in keys)
  print(header)
  print("-" * len(header))
  for g, layer in enumerate(layers):
    cells = []
    for k in keys:
      a, s = metrics["allscope"][g][k], metrics["sparsify"][g][k]
      ratio = a / s if s else math.inf if a else 1.0
      cells.append(f"{a:.4f} / {s:.4f} = {ratio:.2f}".rjust(26))
    print(f"{layer:>5} " + " ".join(cells))


if __name__ == "__main__":
  main()
