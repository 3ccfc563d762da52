"""Where one train step's time goes on a GPU: device kernels, the gaps between them, host waits.

Runs train_step.py's step under `jax.profiler.trace`, takes the last step's device events (steps
are separated by an idle pause), and prints the step's span, its kernel time and count, the
kernels merged by name (largest first), the gaps between kernels over --gap-us with the kernels
on either side, and the host events of that window merged by name: a host-driven loop or
conditional shows there as its trips and predicate copies (MemcpyD2H), with the GPU idle.
Under the profiler every launch is slower: compare the step's time outside it (printed first).

  python benchmarks/gpu_step_profile.py                    # d=640, F=16384, B=4096, k=64, TopK
  python benchmarks/gpu_step_profile.py --d 2304 --width 65536 --auxk
  # a second step compiled with XLA options, timed in the same rounds, profiled after the first
  python benchmarks/gpu_step_profile.py --xla xla_gpu_enable_command_buffer=
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time
from typing import NamedTuple

import jax

from allscope.launch import host_memory
from train_step import (_interleaved_best, add_step_args, allscope_runner,
                        sparsify_runner)

STEP_PAUSE_S = 0.02  # device idle between profiled steps, so each step's events form one cluster
SPLIT_US = 5000  # a device idle gap this long ends a step (a quarter of the pause)


def device_steps(events: list[dict]) -> list[list[dict]]:
  """The GPU's complete events, split into clusters (one per step) at idle gaps over SPLIT_US."""
  names = {e["pid"]: e["args"].get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {pid for pid, name in names.items() if "/device:GPU" in name}
  dev = sorted((e for e in events if e.get("ph") == "X" and e["pid"] in gpu),
               key=lambda e: e["ts"])
  steps, reach = [], -float("inf")
  for e in dev:
    if not steps or e["ts"] - reach > SPLIT_US:
      steps.append([])
    steps[-1].append(e)
    reach = max(reach, e["ts"] + e["dur"])
  return steps


class StepProfile(NamedTuple):
  span_us: float  # first kernel start to last kernel end
  busy_us: float  # time covered by at least one kernel
  kernels: dict[str, tuple[float, int]]  # name -> (us, count), largest first
  gaps: list[tuple[float, str, str]]  # (us, kernel before, kernel after), largest first
  host: dict[str, tuple[float, int]]  # host events starting in the step: name -> (us, count)


def last_step(events: list[dict], gap_us: float) -> StepProfile | None:
  """The last step's kernels, the idle gaps over gap_us between them, and its host events."""
  steps = device_steps(events)
  if not steps:
    return None
  step = steps[-1]
  t0, t1 = step[0]["ts"], max(e["ts"] + e["dur"] for e in step)
  busy, reach, prev, gaps = 0.0, -float("inf"), None, []
  for e in step:
    end = e["ts"] + e["dur"]
    if prev is not None and e["ts"] - reach > gap_us:
      gaps.append((e["ts"] - reach, prev["name"], e["name"]))
    busy += max(0.0, end - max(e["ts"], reach))
    if end > reach:
      reach, prev = end, e

  def merged(evs) -> dict[str, tuple[float, int]]:
    by = collections.defaultdict(lambda: [0.0, 0])
    for e in evs:
      by[e["name"]][0] += e["dur"]
      by[e["name"]][1] += 1
    return {name: tuple(v) for name, v in sorted(by.items(), key=lambda kv: -kv[1][0])}

  ids = {id(e) for e in step}
  host = [e for e in events if e.get("ph") == "X" and id(e) not in ids and t0 <= e["ts"] <= t1]
  return StepProfile(t1 - t0, busy, merged(step), sorted(gaps, reverse=True), merged(host))


def report(events: list[dict], gap_us: float, top: int) -> None:
  prof = last_step(events, gap_us)
  if prof is None:
    print("no GPU events in the trace")
    return
  print(f"profiled step: span {prof.span_us / 1e3:.3f} ms, kernels busy {prof.busy_us / 1e3:.3f} "
        f"ms, {sum(n for _, n in prof.kernels.values())} device events")
  print(f"{'us':>9} {'n':>4}  kernel")
  for name, (us, n) in list(prof.kernels.items())[:top]:
    print(f"{us:>9.1f} {n:>4}  {name[:100]}")
  print(f"gaps over {gap_us:g} us: {sum(g for g, *_ in prof.gaps):.1f} us in {len(prof.gaps)}; "
        "largest:")
  for g, before, after in prof.gaps[:top]:
    print(f"{g:>9.1f}  {before[:50]} -> {after[:50]}")
  print("host events starting in the step (us, count):")
  for name, (us, n) in list(prof.host.items())[:top]:
    print(f"{us:>9.1f} {n:>4}  {name[:100]}")


def trace_steps(run, sync, n: int = 3) -> list[dict]:
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(n):
        sync(run())
        time.sleep(STEP_PAUSE_S)
    (path,) = glob.glob(os.path.join(tmp, "**", "*perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path, "rt") as f:
      trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def _option_value(text: str) -> bool | int | str:
  """An XLA option's value as XLA takes it: a bool, an int, or the text (lists, enums)."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  return int(text) if text.lstrip("-").isdigit() else text


def main() -> None:
  host_memory.keep_freed_memory()  # as the CLI runs: freed memory reused
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_args(ap)
  ap.add_argument("--steps", type=int, default=10, help="timed rounds outside the profiler")
  ap.add_argument("--gap-us", type=float, default=8.0)
  ap.add_argument("--top", type=int, default=20)
  ap.add_argument("--xla", nargs="+", default=[], metavar="OPTION=VALUE",
                  help="also a step compiled with these XLA options ('allscope+xla')")
  args = ap.parse_args()
  if bad := [kv for kv in args.xla if "=" not in kv]:
    ap.error(f"--xla {' '.join(bad)}: give each option as OPTION=VALUE (an empty VALUE is allowed)")
  options = {key: _option_value(value) for key, value in (kv.split("=", 1) for kv in args.xla)}
  t = time.perf_counter()
  step = lambda opts=None: allscope_runner(args.d, args.width, args.tokens, args.activation,
                                           args.k, args.auxk, compiler_options=opts)[0]
  runners = {"allscope": step()}
  if options:
    runners["allscope+xla"] = step(options)
  if args.activation == "topk" and (peer := sparsify_runner(args.d, args.width, args.tokens,
                                                            args.k, args.auxk)):
    runners["sparsify"] = peer
  best = _interleaved_best(runners, args.steps)
  print(f"{jax.devices()[0].device_kind}: d={args.d} F={args.width} B={args.tokens} k={args.k} "
        f"{args.activation} auxk={args.auxk} (ready in {time.perf_counter() - t:.0f} s); best of "
        f"{args.steps}: " + ", ".join(f"{name} {1e3 * s:.3f} ms" for name, s in best.items()),
        flush=True)
  for name in [name for name in runners if name.startswith("allscope")]:
    print(f"== {name}" + (f" {options}" if name == "allscope+xla" else ""))
    report(trace_steps(*runners[name]), args.gap_us, args.top)


if __name__ == "__main__":
  main()
