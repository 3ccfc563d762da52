"""Loads allscope release folders with circuit-tracer and writes its encodings and reconstructions.

Run in an environment that has circuit-tracer (no allscope needed):
  python circuit_tracer_check.py <jobs.json> <inputs.npz> <outputs.npz>
Jobs:
  {"name", "loader": "transcoder", "path", "layer", "input"}        load_gemma_scope_2_transcoder
  {"name", "loader": "transcoder_set", "paths": [...], "input"}     load_transcoder_set(gemma-scope-2)
  {"name", "loader": "clt", "paths": [...], "input", "pad_key"}      load_gemma_scope_2_clt
Inputs for sets and CLTs are [L, T, d] (one row block per layer). A job with "expect_error": true
reports the loader's exception as {"error": ...} instead of failing.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch


def main() -> None:
  jobs_path, inputs_path, outputs_path = sys.argv[1:4]
  jobs = json.loads(open(jobs_path).read())
  inputs = np.load(inputs_path, allow_pickle=False)
  from circuit_tracer.transcoder.cross_layer_transcoder import load_gemma_scope_2_clt
  from circuit_tracer.transcoder.single_layer_transcoder import (
      load_gemma_scope_2_transcoder, load_transcoder_set)

  cpu, f32 = torch.device("cpu"), torch.float32

  def load(job):
    if job["loader"] == "transcoder":
      return load_gemma_scope_2_transcoder(job["path"], job["layer"], device=cpu, dtype=f32)
    paths = {i: p for i, p in enumerate(job["paths"])}
    if job["loader"] == "transcoder_set":
      return load_transcoder_set(paths, scan="allscope-test", feature_input_hook="hook_resid_mid",
                                 feature_output_hook="hook_mlp_out", device=cpu, dtype=f32,
                                 special_load_fn="gemma-scope-2", lazy_encoder=False,
                                 lazy_decoder=False)
    if job.get("pad_key"):
      # load_gemma_scope_2_clt reads range(max(paths)) layers: one key past the last layer.
      paths[len(paths)] = paths[len(paths) - 1]
    return load_gemma_scope_2_clt(paths, device=cpu, dtype=f32)

  out, report = {}, {}
  for job in jobs:
    x = torch.from_numpy(inputs[job["input"]])
    name = job["name"]
    try:
      loaded = load(job)
    except Exception as e:  # a refusal under test: report it instead of crashing
      if not job.get("expect_error"):
        raise
      report[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      continue
    with torch.no_grad():
      feats = loaded.encode(x)
      if job["loader"] == "clt":
        recon = loaded.decode(feats.to_sparse(), x)
      else:
        recon = loaded.decode(feats, x)
      out[f"{name}/features"] = feats.numpy()
      out[f"{name}/reconstruction"] = recon.numpy()
      report[name] = {"shape": list(recon.shape)}
  np.savez(outputs_path, **out)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
