"""Cost of `allscope.release.evaluate` on Gemma 3: per-layer transcoders on every layer.

Prints two tables, each with ratios against one clean forward of the same batch (the baseline,
measured in the same run):
  * the spliced LM loss per token, old against new: the old evaluation ran a full forward per
    splice (every layer + the unembedding); the new one runs the clean forward once and each
    splice from its own layer onward, from the residual the clean pass cached;
  * the whole `evaluate` call (activation metrics only, and with the spliced LM loss).
Defaults are small enough for a 2-core CPU; on a GPU pass bigger shapes, e.g. --sequences 64
--seq-len 1024 --width 16384.

  PYTHONPATH=. python benchmarks/release_evaluate.py [--model gemma3-270m] [--layers 18]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import jax.numpy as jnp

from allscope import models
from allscope.release import Dictionary, EvalConfig, evaluate
from allscope.release.evaluate import _clean_pass, _spliced_nll, _splice_spec


def random_transcoder(rng, d, width, layer, model_name):
  p = {"w_enc": rng.normal(0, d ** -0.5, (d, width)), "b_enc": rng.normal(0, 0.1, width),
       "threshold": rng.uniform(0.5, 1.5, width), "w_dec": rng.normal(0, 0.02, (width, d)),
       "b_dec": np.zeros(d)}
  return Dictionary({k: v.astype(np.float32) for k, v in p.items()}, "transcoder", "jump_relu",
                    model_name, layer, "mlp_in", "mlp_out")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="gemma3-270m")
  parser.add_argument("--layers", type=int, default=None, help="first N layers (default: all)")
  parser.add_argument("--sequences", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--splices-only", action="store_true",
                      help="print the old/new splice table only (skip the whole-evaluate table)")
  args = parser.parse_args()

  model, _ = models.load(args.model, dtype="float32")
  mc = model.config
  n_layers = args.layers or mc.n_layers
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, mc.vocab_size, (args.sequences, args.seq_len)).astype(np.int32)
  tokens[:, 0] = mc.bos_id
  dicts = [random_transcoder(rng, mc.d_model, args.width, l, args.model) for l in range(n_layers)]
  cfg = EvalConfig(n_sequences=args.sequences, seq_len=args.seq_len, batch_size=args.batch)

  batch = tokens[:args.batch]
  jax.block_until_ready(model.logits(batch))  # compile
  t = time.perf_counter()
  jax.block_until_ready(model.logits(batch))
  forward = time.perf_counter() - t
  n_batches = -(-args.sequences // args.batch)

  # Per-splice cost, old (full forward) against new (from the cached residual), on one batch.
  jb = jnp.asarray(batch)
  mask = jb != mc.pad_id
  keep = mask & (jb != mc.bos_id)
  all_layers = tuple(range(n_layers))
  clean = lambda: _clean_pass(model, jb, mask, ("mlp_in", "mlp_out", "resid_post"), all_layers)
  jax.block_until_ready(clean())
  t = time.perf_counter()
  captured, logp, _, _ = jax.block_until_ready(clean())
  clean_s = time.perf_counter() - t
  old_s, new_s = 0.0, 0.0
  for i, d in enumerate(dicts):
    spec, layer = _splice_spec(d, mc.n_layers)
    params = jax.tree.map(jnp.asarray, dict(d.params))
    resid = model.embed(jb) if layer == 0 else captured["resid_post"][:, :, layer - 1]
    old = lambda: _spliced_nll(model, jb, mask, keep, params, spec, jnp.int32(layer), logp)
    new = lambda: _spliced_nll(model, jb, mask, keep, params, spec, jnp.int32(layer), logp,
                               jnp.int32(layer), resid)
    if i == 0:  # the first call per kind compiles; later layers hit the cache (traced layer)
      for fn in (old, new):
        jax.block_until_ready(fn())
    t = time.perf_counter()
    jax.block_until_ready(old())
    old_s += time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(new())
    new_s += time.perf_counter() - t
  batch_tok = args.batch * args.seq_len
  # Old evaluate: a capture + a clean forward + (zero ablation + dictionary) full forwards per
  # layer; new: one clean pass + (zero ablation + dictionary) tails per layer.
  old_total = forward + forward + 2 * old_s
  new_total = clean_s + 2 * new_s
  print(f"\n{args.model}: spliced LM loss of {n_layers} transcoders (+ their zero ablations), "
        f"one batch of {args.batch} x {args.seq_len}, {jax.devices()[0].platform}")
  print(f"{'per batch':48s} {'seconds':>9s} {'ms/token':>10s} {'x clean fwd':>12s}")
  for label, seconds in (("clean forward (baseline)", forward),
                         ("clean pass + captures + residual cache", clean_s),
                         (f"{n_layers} splices, full forward each (old)", old_s),
                         (f"{n_layers} splices from cached residual (new)", new_s),
                         ("delta LM total, old", old_total), ("delta LM total, new", new_total)):
    print(f"{label:48s} {seconds:9.2f} {1e3 * seconds / batch_tok:10.2f} {seconds / forward:12.1f}")
  print(f"{'new / old':48s} {new_total / old_total:9.2f}")

  if args.splices_only:
    return
  rows = []
  for label, splice in (("activation metrics only", False), ("with spliced LM loss", True)):
    for run in ("first (compiles)", "second"):
      t = time.perf_counter()
      evaluate(EvalConfig(**{**cfg.__dict__, "splice": splice}), dicts, model, tokens, progress=False)
      rows.append((f"{label}, {run}", time.perf_counter() - t))
  n_tok = args.sequences * args.seq_len
  print(f"\n{args.model}: {n_layers} transcoders of width {args.width}, {args.sequences} x "
        f"{args.seq_len} tokens, batch {args.batch}, {jax.devices()[0].platform}")
  print(f"{'stage':48s} {'seconds':>9s} {'tokens/s':>10s} {'x clean fwd':>12s}")
  print(f"{'clean forward, one batch (baseline)':48s} {forward:9.2f} {args.batch * args.seq_len / forward:10.0f} {1.0:12.1f}")
  for label, seconds in rows:
    print(f"{label:48s} {seconds:9.2f} {n_tok / seconds:10.0f} {seconds / (forward * n_batches):12.1f}")


if __name__ == "__main__":
  main()
