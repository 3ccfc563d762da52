"""Where one train step's time goes on CPU: a per-HLO-op profile of allscope's step.

Runs the step of benchmarks/train_step.py (same shapes and state) under `jax.profiler.trace` with
XLA:CPU's per-op trace events (`--xla_cpu_enable_xprof_traceme`), takes the last profiled step's
window from the perfetto trace, and prints the wall time of each of its ops, merged by name (a loop body's op over all
iterations), in ms and as a multiple of the float32 encoder product `x @ w_enc` timed in the
same run, in order of first start, each with the JAX operation it came from (the HLO's op_name
metadata).

  python benchmarks/step_profile.py                        # d=640, F=16384, B=4096, k=64, TopK
  python benchmarks/step_profile.py --activation jumprelu --min-ms 2

On a shared machine the times of single ops move with the load; compare ops within one run.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

from allscope.launch import host_memory
from train_step import _interleaved_best, add_step_args, allscope_runner, floor_runner

WAIT = "ThunkExecutor::Execute (wait for completion)"
CONTROL = re.compile(r"(while|cond|conditional|call)(\.\d+)?$")


def load_events(trace_dir: str) -> list[dict]:
  """The complete ("X") events of the perfetto trace written under trace_dir."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X"]


def _covered(spans: list[tuple[float, float]]) -> float:
  """Wall time covered by a union of (start, end) spans."""
  total, reach = 0.0, -float("inf")
  for a, b in sorted(spans):
    if b > reach:
      total += b - max(a, reach)
      reach = b
  return total


def step_ops(events: list[dict]) -> tuple[float, dict[str, float]]:
  """The last step's duration and the wall time covered by each op name in it (partitions of
  one op on several threads, or the iterations of a loop body, merged), in order of first start,
  in microseconds. Control flow (while, cond) is left out: its events only span the ops inside."""
  wait = max((e for e in events if e["name"] == WAIT), key=lambda e: e["ts"])
  t0, t1 = wait["ts"], wait["ts"] + wait["dur"]
  spans: dict[str, list] = {}
  for e in sorted(events, key=lambda e: e["ts"]):
    if (t0 <= e["ts"] <= t1 and e["tid"] != wait["tid"] and not CONTROL.match(e["name"])
        and not e["name"].startswith(("$", "ThunkExecutor", "Threadpool", "end: "))):
      spans.setdefault(e["name"], []).append((e["ts"], e["ts"] + e["dur"]))
  return wait["dur"], {name: _covered(s) for name, s in spans.items()}


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op_name of its metadata (shortened)."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
    out.setdefault(m.group(1), re.sub(r"jit\([^)]*\)/", "", m.group(2))[-60:])
  return out


def main() -> None:
  host_memory.keep_freed_memory()  # as the CLI runs: freed memory reused
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_args(ap)
  ap.add_argument("--min-ms", type=float, default=1.0, help="hide ops below this (per step)")
  args = ap.parse_args()
  (run, sync), _ = allscope_runner(args.d, args.width, args.tokens, args.activation, args.k,
                                  args.auxk)
  floor = _interleaved_best({"floor": floor_runner(args.d, args.width, args.tokens)}, 2)["floor"]
  names = op_names(run.hlo_text())
  sync(run())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(2):
        sync(run())
    step_us, ops = step_ops(load_events(tmp))
  load = os.getloadavg()[0]
  print(f"d={args.d} F={args.width} B={args.tokens} k={args.k} {args.activation}; load {load:.1f}; "
        f"floor (x @ w_enc, f32) {1e3 * floor:.1f} ms; step {step_us / 1e3:.1f} ms "
        f"({step_us / 1e6 / floor:.2f}x)")
  hidden = 0.0
  print(f"{'ms':>8} {'x floor':>8}  op")
  for name, us in ops.items():
    if us < 1e3 * args.min_ms:
      hidden += us
      continue
    print(f"{us / 1e3:>8.1f} {us / 1e6 / floor:>8.3f}  {name:<30} {names.get(name, '')}")
  print(f"{sum(ops.values()) / 1e3:>8.1f} {sum(ops.values()) / 1e6 / floor:>8.3f}  (all ops)")
  print(f"{hidden / 1e3:>8.1f} {hidden / 1e6 / floor:>8.3f}  (ops under {args.min_ms} ms)")


if __name__ == "__main__":
  main()
