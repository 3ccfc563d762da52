"""benchmarks/gpu_step_profile.py: the last step's kernels, idle gaps and host events."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_step_profile  # noqa: E402


def _event(pid, name, ts, dur):
  return {"ph": "X", "pid": pid, "tid": 7, "name": name, "ts": ts, "dur": dur}


def test_the_last_step_has_its_kernels_gaps_and_host_waits():
  gpu, host = 1, 2
  meta = [{"ph": "M", "name": "process_name", "pid": gpu, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": host, "args": {"name": "/host:CPU"}}]
  first = [_event(gpu, "gemm", 0, 100), _event(gpu, "top_k", 100, 50)]
  t = 100 + 50 + 2 * gpu_step_profile.SPLIT_US  # the pause between steps
  last = [_event(gpu, "gemm", t, 100),
          _event(gpu, "top_k", t + 100, 50),
          _event(gpu, "MemcpyD2H", t + 150, 1),
          _event(gpu, "scatter", t + 251, 30),  # 100 us idle: the host waited on the copy
          _event(gpu, "adam", t + 260, 40),  # overlaps scatter on another stream
          _event(gpu, "scatter", t + 305, 30)]  # 5 us: under the gap threshold
  waits = [_event(host, "cond.12", t + 140, 120), _event(host, "cond.12", t + 290, 2),
           _event(host, "before the step", t - 10, 5)]
  prof = gpu_step_profile.last_step(meta + first + last + waits, gap_us=8.0)
  assert prof.span_us == 335
  assert prof.busy_us == 100 + 50 + 1 + (300 - 251) + 30
  assert prof.kernels == {"gemm": (100, 1), "scatter": (60, 2), "top_k": (50, 1),
                          "adam": (40, 1), "MemcpyD2H": (1, 1)}
  assert list(prof.kernels)[0] == "gemm"
  assert prof.gaps == [(100, "MemcpyD2H", "scatter")]
  assert prof.host == {"cond.12": (122, 2)}


def test_a_trace_without_gpu_events_has_no_step():
  assert gpu_step_profile.last_step([_event(2, "cond.1", 0, 5)], gap_us=8.0) is None


def test_xla_options_take_xla_types():
  """--xla OPTION=VALUE: bools and ints typed (XLA refuses the text 'false'), lists as text."""
  assert gpu_step_profile._option_value("false") is False
  assert gpu_step_profile._option_value("True") is True
  assert gpu_step_profile._option_value("-1") == -1
  assert gpu_step_profile._option_value("FUSION,CUBLAS") == "FUSION,CUBLAS"
  assert gpu_step_profile._option_value("") == ""
