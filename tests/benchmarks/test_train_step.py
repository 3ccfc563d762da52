"""benchmarks/train_step.py: a row per step with its ratios to the floor, Adam's among them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_quick_prints_the_step_and_its_optimizers_share_of_the_floor():
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick",
                        "--tokens", "256", "--steps", "2"], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[1].split()[-1] == "adam/floor"
  # d F activation kernels AuxK floor GFLOP/s allscope sparsify ratios...
  (cells,) = [line.split() for line in lines[2:] if line.split()[:1] == ["640"]]
  assert cells[:5] == ["640", "16384", "topk", "xla", "off"]
  step_over_floor, adam_over_floor = float(cells[9]), float(cells[-1])
  # Adam over 2 x 640 x 16384 float32 entries and both moments, against 256 x 640 x 16384
  # multiply-adds: a real share of the floor, and less than the whole step
  assert 0 < adam_over_floor < step_over_floor
