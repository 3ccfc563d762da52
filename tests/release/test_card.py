"""The model card: README.md with a metrics table, and readable PNG plots."""

from __future__ import annotations

import json

import numpy as np

import allscope.release as rel
from allscope.release import Evaluation, ReleaseConfig


def _evaluations(dicts, rng):
  out = []
  for i, d in enumerate(dicts):
    layer = getattr(d, "layer", 0)
    metrics = {"fvu": 0.05 + 0.02 * layer, "l0": 20.0 + 5 * layer, "dead_fraction": 0.01,
               "dense_fraction": 0.0, "n_tokens": 4096, "ce_clean": 3.0,
               "ce_spliced": 3.0 + 0.05 * (layer + 1), "ce_zero_ablation": 3.0 + 0.5 * (layer + 1),
               "delta_lm_loss": 0.05 * (layer + 1), "fraction_loss_recovered": 0.9, "kl": 0.04}
    width = d.width if not isinstance(d, rel.CrossLayerTranscoder) else (d.n_layers, d.width)
    out.append(Evaluation("", metrics, 10 ** rng.uniform(-5, -0.5, width)))
  return out


def test_model_card_has_table_and_plots(tmp_path, make_dict, rng):
  dicts = [make_dict("transcoder", layer=l, l0=None) for l in range(6)]
  evaluations = _evaluations(dicts, rng)
  root = rel.write_release(ReleaseConfig(directory=str(tmp_path / "rel"), name="tiny-release"),
                           dicts, tmp_path, evaluations=evaluations,
                           info={"corpus": "built-in text", "eval_tokens": 4096})
  readme = (root / "README.md").read_text()
  assert readme.startswith("# tiny-release")
  assert "| `transcoder/layer_3_width_64_l0_35` | transcoder | 3 | 64 | 35 | 0.11 |" in readme
  assert "| corpus | built-in text |" in readme
  for png in ("l0_vs_fvu.png", "delta_lm_loss.png", "latent_frequency.png"):
    data = (root / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert f"]({png})" in readme
  manifest = json.loads((root / "manifest.json").read_text())
  assert manifest["name"] == "tiny-release" and manifest["eval_tokens"] == 4096
  # folder tags come from the measured L0 when the dictionary carries none
  assert [e["metrics"]["l0"] for e in manifest["dictionaries"]] == [20.0 + 5 * l for l in range(6)]
  release = rel.load(root)
  assert release.metrics()[2]["delta_lm_loss"] == 0.15000000000000002


def test_plots_can_be_turned_off(tmp_path, make_dict, rng):
  dicts = [make_dict("sae", "resid_post", layer=1)]
  root = rel.write_release(ReleaseConfig(directory=str(tmp_path / "rel"), plots=False), dicts,
                           tmp_path, evaluations=_evaluations(dicts, rng))
  assert (root / "README.md").exists() and not list(root.glob("*.png"))
