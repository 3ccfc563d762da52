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


def test_metrics_table_shows_zero_ablation_columns_only_when_measured(capsys):
  import numpy as np

  from allscope.launch import cli
  from allscope.release.evaluate import Evaluation

  base = {"l0": 16.0, "fvu": 0.2, "dead_fraction": 0.1, "n_tokens": 9144, "ce_clean": 3.0,
          "delta_lm_loss": 0.05, "delta_lm_loss_stderr": 0.01, "delta_lm_tokens": 1016,
          "delta_lm_sequences": 8}
  cli._print_metrics([Evaluation("transcoder/layer_0", base, np.zeros(4))])
  out = capsys.readouterr().out
  assert "dLM stderr" in out and "zero-abl" not in out and "loss recov." not in out
  assert "nan" not in out and "delta lm 1016" in out
  zero = {**base, "ce_zero_ablation": 4.0, "fraction_loss_recovered": 0.95}
  cli._print_metrics([Evaluation("transcoder/layer_0", zero, np.zeros(4))])
  out = capsys.readouterr().out
  assert "zero-abl" in out and "0.95" in out
