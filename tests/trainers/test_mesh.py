"""The trainer's mesh: latents split on `model` are selected and counted on their own devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_split_latents_select_exactly_as_whole_rows_and_never_gather_them():
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "tests.trainers.mesh_script"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for k, r in out["top_k"].items():
    # indices and values as lax.top_k over whole rows (ties to the lower latent), counts as a
    # dense count, from the split path
    assert r == {"indices": True, "values": True, "counts": True,
                 "ops": "xla/latents-split"}, (k, r)
  # B = 256 rows of F = 4096 latents: nothing near [B, F] is gathered (XLA alone gathered all of
  # it for BatchTopK and JumpReLU, and [B, F / 8] for TopK)
  for activation, elements in out["largest_all_gather"].items():
    assert elements < 256 * 4096 // 8, (activation, elements)
