"""JumpReLU dead latents at one pass: held-out L0, FVU, dead fraction and steady-state overflow.

Trains JumpReLU transcoders (one per layer of the store, F latents, target L0 t) on one pass of
the store's training rows, with TrainConfig overrides (--set) and, for screening, constants of
trainers.step (--const REVIVE_MAX_FRACTION=0.0625) and a scaled random encoder (--enc-scale),
then measures the exported dictionaries in float64 on the held-out rows. Besides lr_sweep.py's columns it prints the
firing latents dropped for lack of capacity over the second half of the steps (`overflow`) and
the fraction of latents silent for aux_after_tokens tokens at a few steps (when they die). The
layers of one run share the step (global-norm gradient clipping), so a layer trained alone and
the same layer trained beside others differ slightly.

  python benchmarks/jumprelu_dead.py --store /tmp/quality/store --layers 9 --targets 16,64
  python benchmarks/jumprelu_dead.py --layers 3,9,15 --targets 16,64 --set lr_warmup_steps=25
docs/train.md ("Dead latents: what kills them") records the screen behind the JumpReLU defaults.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time

import numpy as np

from lr_sweep import parse_override
from quality import held_out_metrics
from quality_data import Split


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--store", default="outputs/bench/quality_store")
  ap.add_argument("--layers", default="9")
  ap.add_argument("--targets", default="16,64")
  ap.add_argument("--width", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=94)
  ap.add_argument("--held-out", type=int, default=12_288)
  ap.add_argument("--set", action="append", default=[], help="TrainConfig override name=value")
  ap.add_argument("--const", action="append", default=[], help="trainers.step constant name=value")
  ap.add_argument("--enc-scale", type=float, default=1.0,
                  help="multiply the initial encoder columns (a screen: pre-activation scale)")
  ap.add_argument("--adam-eps", type=float, default=None,
                  help="Adam's epsilon (a screen: how far small gradients are normalized)")
  args = ap.parse_args()
  from allscope.trainers import TrainConfig, dictionaries, step
  if args.enc_scale != 1.0:
    base_init = dictionaries.init_params  # the loop calls it through the module

    def scaled(*a, **k):
      p = base_init(*a, **k)
      return {**p, "w_enc": p["w_enc"] * args.enc_scale}
    dictionaries.init_params = scaled
  if args.adam_eps is not None:
    from allscope.trainers import state as state_lib  # optimizer() looks it up in the module
    state_lib.scale_by_adam = functools.partial(state_lib.scale_by_adam, eps=args.adam_eps)
  for name, value in (parse_override(c) for c in args.const):
    if not hasattr(step, name):
      raise ValueError(f"--const {name}: trainers.step has no such constant")
    setattr(step, name, value)
  layers = tuple(int(l) for l in args.layers.split(","))
  split = Split(args.store, layers, args.held_out)
  overrides = dict(parse_override(item) for item in args.set)
  print(f"store {args.store}: layers {layers}, F {args.width}, batch {args.batch} x {args.steps}"
        f" steps, {split.held_out['mlp_in'].shape[0]} held-out rows, overrides {overrides},"
        f" constants {args.const}")
  marks = sorted({5, 10, 25, args.steps // 2, args.steps})
  print(f"{'layer':>5} {'target':>6} {'l0':>7} {'l0/t':>6} {'train l0':>8} {'fvu':>7} {'dead':>6} "
        f"{'overflow':>8} " + " ".join(f"{'silent@' + str(m):>10}" for m in marks) + f" {'s':>5}")
  for target in (float(t) for t in args.targets.split(",")):
    cfg = TrainConfig(kind="transcoder", activation="jumprelu", layers=layers, width=args.width,
                      target_l0=target, batch_size=args.batch, steps=args.steps,
                      checkpoint_every=10 ** 9, log_every=10 ** 9, **overrides)
    t = time.perf_counter()
    ms, train_l0, overflow, silent = run(split, cfg, marks)
    s = time.perf_counter() - t
    for g, layer in enumerate(layers):
      m = ms[g]
      print(f"{layer:>5} {target:>6.0f} {m['l0']:>7.2f} {m['l0'] / target - 1:>+6.1%} "
            f"{train_l0[g]:>8.2f} {m['fvu']:>7.4f} {m['dead_fraction']:>6.3f} {overflow:>8.0f} "
            + " ".join(f"{silent[k][g]:>10.3f}" for k in marks) + f" {s:>5.0f}", flush=True)


def run(split: Split, cfg, marks) -> tuple[list[dict], np.ndarray, float, dict[int, np.ndarray]]:
  """Trains `cfg` on one pass of `split`: held-out metrics per layer, the final running L0 per
  layer, the firing latents dropped over the second half of the steps (all layers), and at each
  step of `marks` the fraction of each layer's latents silent for aux_after_tokens tokens."""
  from allscope.release import convert
  from allscope.trainers import export, train
  overflow = [0.0]
  silent = {}

  def hook(done, ctx):
    if done > cfg.steps // 2:
      overflow[0] += float(ctx["metrics"]["overflow"])
    if done in marks:
      since = np.asarray(ctx["state"].since_fired)
      silent[done] = (since >= cfg.aux_after_tokens).mean(axis=-1)

  with tempfile.TemporaryDirectory() as out:
    res = train(cfg, split.batches(cfg.batch_size), split.norm_scale, out, hooks=(hook,),
                progress=False)
  dicts = convert.from_exported(export.release_arrays(cfg, res.state, split.norm_scale,
                                                      split.model_name))
  return held_out_metrics(split, dicts), np.asarray(res.state.l0), overflow[0], silent


if __name__ == "__main__":
  main()
