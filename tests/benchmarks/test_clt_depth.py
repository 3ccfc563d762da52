"""benchmarks/clt_depth.py: the depth model t(L) = a L + b L (L + 1) / 2 and its floor."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import clt_depth  # noqa: E402


def test_a_causal_decoder_has_a_pair_per_source_and_later_target():
  assert [clt_depth.pairs(n) for n in (1, 4, 8, 18)] == [1, 10, 36, 171]


@pytest.mark.parametrize("n_layers", [2, 4, 9])
def test_the_ratio_is_two_without_pairs_and_2_2_at_the_documented_bound(n_layers):
  assert clt_depth.depth_ratio(n_layers, 0.0) == 2.0
  bound = 0.2 / (0.9 * n_layers - 0.1)
  assert clt_depth.depth_ratio(n_layers, bound) == pytest.approx(2.2, rel=1e-12)
  assert clt_depth.depth_ratio(n_layers, 1.1 * bound) > 2.2


def _parts(n_layers, a_select, a_enc_grad, b_sparse, adam, gemm_s):
  """A profile whose parts are exactly per layer / per pair multiples of the given seconds."""
  p = clt_depth.pairs(n_layers)
  return {"encoder x@w_enc": gemm_s * n_layers, "top-k": a_select * n_layers,
          "d w_enc (scatter)": a_enc_grad * n_layers, "decode": b_sparse * p / 3,
          "d values (gather-dot)": b_sparse * p / 3, "d w_dec (scatter)": b_sparse * p / 3,
          "optimizer": adam * (n_layers + p)}


def test_the_floor_is_adam_plus_the_pairs_multiply_adds_at_the_dense_products_rate():
  n, d, f, tokens, k = 4, 64, 1024, 256, 8
  gemm_s = 0.01  # one layer's tokens x d x f multiply-adds take 10 ms
  parts = {m: _parts(m, a_select=0.03, a_enc_grad=0.01, b_sparse=0.02, adam=0.005, gemm_s=gemm_s)
           for m in (n, 2 * n)}
  a, b = 0.03 + 0.01 + 0.005, 0.02 + 0.005
  steps = {m: a * m + b * clt_depth.pairs(m) for m in (n, 2 * n)}
  out = clt_depth.least_ratio(n, d, f, tokens, k, steps, parts[n], parts[2 * n])
  assert out["a"] == pytest.approx(a)
  assert out["b"] == pytest.approx(b)
  assert out["b_min"] == pytest.approx(0.005 + 3 * k / f * gemm_s)
  assert out["parts"] == pytest.approx(clt_depth.depth_ratio(n, out["b"] / out["a"]))
  assert 2.0 < out["least"] < out["parts"]
  # a per-layer cost the profile missed shows in the steps, and lowers the floor
  slower = {m: t + 0.1 * m for m, t in steps.items()}
  assert clt_depth.least_ratio(n, d, f, tokens, k, slower, parts[n], parts[2 * n])["a"] == (
      pytest.approx(a + 0.1))


def test_profile_prints_the_parts_and_the_least_ratio():
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "clt_depth.py"), "--profile",
                        "--layers", "1", "--d", "16", "--width", "64", "--tokens", "32", "--k", "4",
                        "--steps", "1"], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert [line.split()[0] for line in lines[3:5]] == ["1", "2"]
  floor = next(line for line in lines if line.startswith("per pair floor"))
  assert float(floor.split("t(2L)/t(L) >= ")[1].split(";")[0]) >= 2.0
