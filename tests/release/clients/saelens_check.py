"""Loads allscope release folders with SAELens and writes its encodings and reconstructions.

Run in an environment that has sae-lens (no allscope needed):
  python saelens_check.py <jobs.json> <inputs.npz> <outputs.npz>
Each job is {"name", "loader", "path", ...}; loader "load_from_disk" calls SAE.load_from_disk on
a folder in SAELens' own format, "gemma_3_hub" calls SAE.from_pretrained(repo, folder,
converter=SAELens' gemma_3 loader) against HF_ENDPOINT (a loopback server in the tests).
A job with "expect_error": true reports the loader's exception as {"error": ...} instead.
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
  from sae_lens import SAE
  from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS

  out = {}
  report = {}
  for job in jobs:
    try:
      if job["loader"] == "load_from_disk":
        sae = SAE.load_from_disk(job["path"], device="cpu")
      else:
        sae = SAE.from_pretrained(job["repo"], job["folder"], device="cpu",
                                  converter=NAMED_PRETRAINED_SAE_LOADERS["gemma_3"])
    except Exception as e:  # a refusal under test: report it instead of crashing
      if not job.get("expect_error"):
        raise
      report[job["name"]] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      continue
    x = torch.from_numpy(inputs[job["input"]])
    with torch.no_grad():
      feats = sae.encode(x)
      recon = sae(x)  # forward: a skip-transcoder's skip term is added here, not in decode()
    out[f"{job['name']}/features"] = feats.numpy()
    out[f"{job['name']}/reconstruction"] = recon.numpy()
    report[job["name"]] = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                           "hook_name": sae.cfg.metadata.hook_name,
                           "hf_hook_name": getattr(sae.cfg.metadata, "hf_hook_name", None)}
  np.savez(outputs_path, **out)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
