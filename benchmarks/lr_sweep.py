"""Learning-rate sweep on a real store: held-out FVU, L0 and dead fraction per setting.

For every (activation, kind, width, k / target L0) it trains allscope dictionaries on the layers
of a store at each learning rate (everything else at the defaults, or at --set overrides) and
measures them in float64 on held-out rows (the store's last records). The last column gives
each lr's FVU relative to the best of its group, and `default` marks what
`trainers.config.default_lr` picks, so the table shows how far the rule is from the optimum.

  python benchmarks/lr_sweep.py --store outputs/bench/quality_store
  python benchmarks/lr_sweep.py --activations jumprelu --widths 4096 --ks 16,64 \
      --set threshold_lr_multiple=10
  python benchmarks/lr_sweep.py --kinds sae,skip_transcoder --set site_in=mlp_in  # SAE on mlp_in
docs/train.md records the sweep behind the defaults. Harvest the store with
benchmarks/quality.py (it harvests when its --store is missing).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import time

from quality import held_out_metrics, train_allscope_cfg
from quality_data import Split


def parse_override(item: str) -> tuple[str, object]:
  """A --set item `name=value`: a Python literal, else the bare string (site_in=mlp_in)."""
  name, sep, value = item.partition("=")
  if not sep or not name:
    raise ValueError(f"--set {item!r}: expected name=value, e.g. --set site_in=mlp_in")
  try:
    return name, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return name, value


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--store", default="outputs/bench/quality_store")
  ap.add_argument("--layers", default="9")
  ap.add_argument("--kinds", default="transcoder")
  ap.add_argument("--activations", default="topk")
  ap.add_argument("--widths", default="1024,4096")
  ap.add_argument("--ks", default="32", help="k (TopK/BatchTopK) or target L0 (JumpReLU)")
  ap.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="'default' = the rule's lr")
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--held-out", type=int, default=10_240)
  ap.add_argument("--set", action="append", default=[], help="TrainConfig override name=value")
  args = ap.parse_args()
  from allscope.trainers.config import TrainConfig, default_lr
  layers = tuple(int(l) for l in args.layers.split(","))
  split = Split(args.store, layers, args.held_out)
  overrides = dict(parse_override(item) for item in args.set)
  print(f"store {args.store}: layers {layers}, batch {args.batch} x {args.steps} steps, "
        f"{split.held_out['mlp_in'].shape[0]} held-out rows, overrides {overrides}")
  header = (f"{'kind':>10} {'act':>9} {'F':>6} {'k/L0':>5} {'lr':>9} {'layer':>5} {'fvu':>7} "
            f"{'l0':>7} {'dead':>6} {'fvu/best':>8} {'s':>5}")
  print(header)
  print("-" * len(header))
  for kind, act, width, k in itertools.product(args.kinds.split(","), args.activations.split(","),
                                               [int(w) for w in args.widths.split(",")],
                                               [int(k) for k in args.ks.split(",")]):
    sparsity = {"k": k} if act in ("topk", "batchtopk") else {"target_l0": float(k)}
    base = dict(kind=kind, activation=act, layers=layers, width=width, batch_size=args.batch,
                steps=args.steps, checkpoint_every=10 ** 9, log_every=50, **sparsity,
                **overrides)
    rule = default_lr(TrainConfig(**base))
    lrs = [rule if lr == "default" else float(lr) for lr in args.lrs.split(",")]
    rows = []
    for lr in lrs:
      t = time.perf_counter()
      dicts = train_allscope_cfg(split, TrainConfig(**base, lr=lr))
      ms = held_out_metrics(split, dicts)
      rows.append((lr, ms, time.perf_counter() - t))
    for g, layer in enumerate(layers):
      best = min(ms[g]["fvu"] for _, ms, _ in rows)
      for lr, ms, s in rows:
        m = ms[g]
        mark = "*" if abs(lr - rule) <= 1e-12 * rule else " "
        print(f"{kind:>10} {act:>9} {width:>6} {k:>5} {lr:>8.2e}{mark} {layer:>5} "
              f"{m['fvu']:>7.4f} {m['l0']:>7.2f} {m['dead_fraction']:>6.3f} "
              f"{m['fvu'] / best:>8.3f} {s:>5.0f}", flush=True)
  print("* = trainers.config.default_lr")


if __name__ == "__main__":
  main()
