"""Export to Neuronpedia's upload route: SAEDashboard's `batch-<n>.json` feature files.

Neuronpedia ingests dashboards that SAEDashboard's `neuronpedia-runner` writes (one folder per
SAE, `batch-<n>.json` files of features), converted by Neuronpedia's
`convert-saedashboard-to-neuronpedia-export.py`, which adds what only the uploader knows: creator,
release id and title, Neuronpedia model id, source set id and description, weights URL, hook
point, and the prompts' dataset path. Per feature the batch format holds:

  feature_index, frac_nonzero, pos_str/pos_values, neg_str/neg_values (top logit effects),
  freq_hist_data_bar_values/heights (activation histogram), activations: [{tokens (strings),
  values (per token), qualifying_token_index, bin_min, bin_max, bin_contains}], n_prompts_total,
  n_tokens_in_prompt, dataset

and further fields allscope does not compute, written empty: logits_hist_data_* (the histogram of
all V logit effects), decoder_weights_dist, neuron_alignment_*, correlated_neurons_*,
correlated_features_*. Our contexts are windows around the peak token, not whole prompts, and all
of them form one bin (the top activations) rather than SAEDashboard's quantile bins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def feature(latent: Mapping[str, Any], texts: Mapping[int, str], *, before: int, bins: Mapping,
            n_prompts: int, n_tokens_in_prompt: int, dataset: str) -> dict[str, Any]:
  """One browser latent (as written into a block) in SAEDashboard's Neuronpedia feature format."""
  contexts = latent["contexts"]
  acts = [c["act"] for c in contexts]
  edges = [10 ** (bins["min_log10"] + k / bins["per_decade"]) for k in range(bins["n"])]
  return {
      "feature_index": latent["i"],
      "frac_nonzero": latent["freq"],
      "pos_str": [texts[t] for t, _ in latent.get("promoted", [])],
      "pos_values": [v for _, v in latent.get("promoted", [])],
      "neg_str": [texts[t] for t, _ in latent.get("suppressed", [])],
      "neg_values": [v for _, v in latent.get("suppressed", [])],
      "freq_hist_data_bar_values": edges,
      "freq_hist_data_bar_heights": [float(c) for c in latent["hist"]],
      "logits_hist_data_bar_values": [], "logits_hist_data_bar_heights": [],
      "decoder_weights_dist": [],
      "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
      "correlated_neurons_indices": [], "correlated_neurons_l1": [],
      "correlated_neurons_pearson": [], "correlated_features_indices": [],
      "correlated_features_l1": [], "correlated_features_pearson": [],
      "n_prompts_total": n_prompts, "n_tokens_in_prompt": n_tokens_in_prompt, "dataset": dataset,
      "activations": [{
          "tokens": [texts.get(t, "") for t in c["toks"] if t >= 0],
          "values": [float(a or 0.0) for t, a in zip(c["toks"], c["acts"]) if t >= 0],
          "qualifying_token_index": sum(1 for t in c["toks"][:before] if t >= 0),
          "bin_min": min(acts), "bin_max": max(acts), "bin_contains": latent["freq"],
      } for c in contexts],
  }


def write_batches(folder: Path, latents: Sequence[Mapping[str, Any]], texts: Mapping[int, str],
                  *, model_id: str, layer: int, sae_set: str, per_batch: int, **common) -> int:
  """`folder/batch-<n>.json`, `per_batch` features each; returns the number of files."""
  folder.mkdir(parents=True, exist_ok=True)
  n = 0
  for n, start in enumerate(range(0, len(latents), per_batch)):
    batch = {"model_id": model_id, "layer": layer, "sae_set": sae_set,
             "features": [feature(lat, texts, **common) for lat in latents[start:start + per_batch]]}
    (folder / f"batch-{n}.json").write_text(json.dumps(batch, separators=(",", ":")))
  return n + 1
