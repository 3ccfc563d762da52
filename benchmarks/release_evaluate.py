"""Cost of the spliced LM losses of `allscope.release.evaluate` on Gemma 3: per-layer transcoders
on every layer, one batch.

Prints, in CPU seconds (all threads; meaningful on a shared machine) and wall seconds, with
ratios against floors measured in the same run:
  * the former method (per splice: forward to the logits, a materialized [B, S, V] log-softmax
    and KL against the clean log-probs) against the current one (per splice: forward to the
    final hidden state; then one streamed pass over the vocabulary for the clean rows and every
    splice at once, `_splice_losses`);
  * the streamed pass against its floor, the bare [M, d] x [d, V] product at this machine's GEMM
    rate (measured on a [2048, d] x [d, 16384] block), for several vocabulary chunk sizes.

  PYTHONPATH=. python benchmarks/release_evaluate.py [--batch 1] [--chunks 512,1024,4096]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allscope import models
from allscope.release import Dictionary
from allscope.launch import host_memory

ev = importlib.import_module("allscope.release.evaluate")  # the module, not the function


def random_transcoder(rng, d, width, layer, model_name):
  p = {"w_enc": rng.normal(0, d ** -0.5, (d, width)), "b_enc": rng.normal(0, 0.1, width),
       "threshold": rng.uniform(0.5, 1.5, width), "w_dec": rng.normal(0, 0.02, (width, d)),
       "b_dec": np.zeros(d)}
  return Dictionary({k: v.astype(np.float32) for k, v in p.items()}, "transcoder", "jump_relu",
                    model_name, layer, "mlp_in", "mlp_out")


@functools.partial(jax.jit, static_argnums=(0, 6))
def former_spliced_nll(graphdef, state, tokens, mask, keep, params, spec, layer, clean_logp,
                       start, resid):
  """The former per-splice loss: logits, a [B, S - 1, V] log-softmax, KL against clean_logp."""
  model = nnx.merge(graphdef, state)
  fns = ev._splice_fns(spec, params, keep, layer)
  splice = tuple(sorted(fns.items(), key=lambda kv: (kv[0][1], kv[0][0])))
  _, logits = model.forward(tokens, mask, (), (), splice, True, start, resid)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  valid = mask[:, 1:] & mask[:, :-1]
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  kl = jnp.sum(jnp.exp(clean_logp) * (clean_logp - logp), axis=-1)
  return jnp.sum(jnp.where(valid, nll, 0.0), 1), jnp.sum(jnp.where(valid, kl, 0.0), 1)


@functools.partial(jax.jit, static_argnums=0)
def former_clean_logp(graphdef, state, tokens, mask):
  _, logits = nnx.merge(graphdef, state).forward(tokens, mask, (), (), (), True)
  return jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)


def timed(fn, repeat=1):
  """(result, cpu seconds, wall seconds) of the last of `repeat` calls after one warm-up."""
  out = jax.block_until_ready(fn())
  for _ in range(repeat):
    c, w = time.process_time(), time.perf_counter()
    out = jax.block_until_ready(fn())
    cpu, wall = time.process_time() - c, time.perf_counter() - w
  return out, cpu, wall


def main() -> None:
  host_memory.keep_freed_memory()  # as the CLI runs: freed memory reused
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="gemma3-270m")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--chunks", default="512,1024,4096")
  parser.add_argument("--skip-former", action="store_true")
  args = parser.parse_args()

  model, _ = models.load(args.model, dtype="float32")
  mc = model.config
  n, d, vocab = mc.n_layers, mc.d_model, mc.vocab_size
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab, (args.batch, args.seq_len)).astype(np.int32)
  tokens[:, 0] = mc.bos_id
  dicts = [random_transcoder(rng, d, args.width, l, args.model) for l in range(n)]
  batch = jnp.asarray(tokens)
  mask = batch != mc.pad_id
  keep = mask & (batch != mc.bos_id)
  embed = model.embed_tokens[...]
  spec = ev._splice_spec(dicts[0], n)[0]
  params = [jax.tree.map(jnp.asarray, dict(x.params)) for x in dicts]
  layers = tuple(range(n))

  # GEMM floor: this machine's rate on one [2048, d] x [d, 16384] block.
  a = jnp.asarray(rng.normal(size=(2048, d)).astype(np.float32))
  gemm = jax.jit(lambda a, e: a @ e.T)
  _, g_cpu, g_wall = timed(lambda: gemm(a, embed[:16384]), repeat=3)
  flops = 2 * 2048 * d * 16384
  print(f"GEMM [2048, {d}] x [{d}, 16384]: {flops / g_cpu / 1e9:.1f} GFLOP per CPU-second, "
        f"{flops / g_wall / 1e9:.1f} per wall-second")

  graphdef, state = nnx.split(model)
  (captured, clean), c_cpu, c_wall = timed(lambda: ev._clean_pass(
      graphdef, state, batch, mask, ("mlp_in", "mlp_out", "resid_post"), layers))

  def tails():
    return [ev._spliced_hidden(graphdef, state, batch, mask, keep, params[l], spec, jnp.int32(l),
                               jnp.int32(l), model.embed(batch) if l == 0
                               else captured["resid_post"][:, :, l - 1]) for l in range(n)]

  hidden, t_cpu, t_wall = timed(tails)
  hidden = jnp.stack(hidden)
  rows = (n + 1) * args.batch * (args.seq_len - 1)
  floor = 2 * rows * d * vocab / (flops / g_cpu)
  sweep = []
  for chunk in (int(c) for c in args.chunks.split(",")):
    out, cpu, wall = timed(lambda: ev._splice_losses(embed, clean, hidden, batch, mask,
                                                     chunk=chunk))
    sweep.append((chunk, cpu, wall))
  best = min(sweep, key=lambda r: r[1])
  new_cpu, new_wall = c_cpu + t_cpu + best[1], c_wall + t_wall + best[2]

  tok = args.batch * args.seq_len
  print(f"\n{args.model}: {n} transcoders (width {args.width}), one batch of {args.batch} x "
        f"{args.seq_len}, {jax.devices()[0].platform}")
  print(f"{'per batch':52s} {'CPU s':>8s} {'wall s':>8s} {'CPU ms/tok':>11s}")
  table = [("clean pass (captures, residual cache, hidden)", c_cpu, c_wall),
           (f"{n} splice tails to the final hidden state", t_cpu, t_wall)]
  table += [(f"streamed vocabulary pass, chunk {c}", cpu, wall) for c, cpu, wall in sweep]
  table += [(f"  its GEMM floor ({rows} x {d} x {vocab})", floor, float("nan")),
            ("current total (best chunk)", new_cpu, new_wall)]
  if not args.skip_former:
    logp, o_cpu, o_wall = timed(lambda: former_clean_logp(graphdef, state, batch, mask))
    def former():
      return [former_spliced_nll(graphdef, state, batch, mask, keep, params[l], spec,
                                 jnp.int32(l), logp, jnp.int32(l), model.embed(batch) if l == 0
                                 else captured["resid_post"][:, :, l - 1]) for l in range(n)]
    _, f_cpu, f_wall = timed(former)
    former_cpu, former_wall = c_cpu + o_cpu + f_cpu, c_wall + o_wall + f_wall
    table.append(("former total (clean log-probs + per-splice log-softmax)", former_cpu,
                  former_wall))
  for label, cpu, wall in table:
    print(f"{label:52s} {cpu:8.2f} {wall:8.2f} {1e3 * cpu / tok:11.1f}")
  print(f"{'streamed pass / its GEMM floor (best chunk)':52s} {best[1] / floor:8.2f}")
  if not args.skip_former:
    print(f"{'current / former (CPU s)':52s} {new_cpu / former_cpu:8.2f}")


if __name__ == "__main__":
  main()
