"""The `allscope` command, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _allscope(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "allscope.launch.cli", *args],
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_sample_prints_a_coherent_continuation():
  out = _allscope("sample", "--prompt", "The capital of France is", "--tokens", "8")
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("The capital of France is")
  assert "Paris" in out.stdout or "France" in out.stdout[len("The capital of France is"):]


def test_bad_override_exits_with_a_clear_message_before_loading():
  out = _allscope("sample", "model.name=gemma3-3b", timeout=120)
  assert out.returncode == 2
  assert "unknown model name 'gemma3-3b'" in out.stderr and "Traceback" not in out.stderr
  assert "loaded" not in out.stderr
