"""benchmarks/clt_depth_ab.py: one worker per checkout, a table row per depth and a ratio."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "clt_depth_ab.py"


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                        text=True, timeout=300)


def test_times_a_checkout_at_l_and_2l():
  out = _run("--rounds", "2", "--layers", "1", "--d", "16", "--width", "64", "--tokens", "32",
             "--k", "4", "--dead", "0.5", str(ROOT))
  assert out.returncode == 0, out.stderr
  rows = [line.split() for line in out.stdout.splitlines()]
  depths = [r[1] for r in rows if r and r[0].endswith(ROOT.name)]
  assert depths == ["1", "2"]
  ratio = next(r for r in rows if r[:1] == ["t(2L)"])
  assert all(float(v) > 0 for v in ratio[-4:])


def test_a_directory_that_is_not_a_checkout_fails_before_any_worker(tmp_path):
  out = _run(str(tmp_path))
  assert out.returncode != 0
  assert "is not an allscope checkout" in out.stderr and "git worktree add" in out.stderr
