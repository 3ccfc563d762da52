"""The kernel seam on a mesh (trainers.sharded_ops): every primitive on its devices' rows and
latents gives what it gives off the mesh, and no device gathers the [B, F] pre-activations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_primitives_on_a_mesh_match_them_off_it_and_never_gather_the_latents():
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "tests.trainers.mesh_script"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for k, r in out["top_k"].items():
    # indices and values as lax.top_k over whole rows (ties to the lower latent), with and
    # without an offset row, counts as a dense count, compact as over whole rows (k = 1500:
    # more slots than a device's 1024 latents), from the split path
    assert r == {"indices": True, "values": True, "counts": True, "offset": True,
                 "compact": True, "ops": "xla/per-device"}, (k, r)
  # each primitive on a data 2 x model 2 mesh, XLA and Pallas (interpret), as off the mesh
  errors = out["primitive_errors"]
  assert len(errors) == 16 and {k.split(":")[0] for k in errors} == {
      "xla/per-device", "pallas-interpret/per-device"}
  for name, err in errors.items():
    assert err <= 1e-5, (name, err)
  # Pallas lowered for CUDA on that mesh at real shapes (B=4096, F=65536, d=2304; an 18-layer
  # CLT): one Triton call per primitive, top_k's on one device's [B/2, F/2] block
  assert out["cuda"] == {"triton_calls": 7, "top_k_block": True}
  # B = 256 rows of F = 4096 latents: nothing near [B, F] is gathered or all-reduced (XLA alone
  # gathered all of it for BatchTopK and JumpReLU, and [B, F / 8] for TopK; its compaction of
  # latents split over devices all-reduced [B, C, 32])
  for activation, elements in out["largest_collective"].items():
    assert elements < 256 * 4096 // 8, (activation, elements)
  # a device's temporary memory shrinks with the devices its latents are split over (0.27 of one
  # device's over 4; left to XLA's partitioner, 1.12)
  assert out["temp_4_over_1"] <= 0.35, out["temp_4_over_1"]
