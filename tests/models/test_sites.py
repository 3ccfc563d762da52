"""Sites, widths, hook points and preset repo names have one home (allscope.models), which the
other stages read, and reading it does not import JAX."""

from __future__ import annotations

import subprocess
import sys

import pytest

from allscope import models
from allscope.models import presets, sites


def test_every_stage_reads_the_one_definition():
  from allscope import pipelines
  from allscope.models import gemma3
  from allscope.release import export, layout
  assert pipelines.SITES is layout.SITES is gemma3.SITES is models.SITES is sites.SITES
  assert layout.hf_hook_point is sites.hf_hook_point
  assert export.hf_model_name is presets.hf_repo


@pytest.mark.parametrize("name, repo", [
    ("gemma3-270m", "google/gemma-3-270m"), ("gemma3-270m-it", "google/gemma-3-270m-it"),
    ("gemma3-1b", "google/gemma-3-1b-pt"), ("gemma3-27b-it", "google/gemma-3-27b-it"),
    ("/some/dir", "/some/dir"), ("org/custom-gemma", "org/custom-gemma")])
def test_preset_names_map_to_hugging_face_repos(name, repo):
  assert models.hf_repo(name) == repo


def test_hook_points_and_widths():
  assert models.hf_hook_point("mlp_in", 5) == "model.layers.5.pre_feedforward_layernorm.output"
  assert (models.hf_hook_point("attn_out", "{layer}")
          == "model.layers.{layer}.self_attn.o_proj.input")
  with pytest.raises(ValueError, match="unknown site 'mlp'; expected one of resid_post"):
    models.hf_hook_point("mlp", 0)
  cfg = models.PRESETS["gemma3-27b"]
  assert cfg.site_widths == {"resid_post": 5376, "attn_out": 32 * 128, "mlp_in": 5376,
                             "mlp_out": 5376}


def test_reading_the_vocabulary_does_not_import_jax():
  code = ("import sys; from allscope.models import SITES, PRESETS, hf_repo; "
          "import allscope.pipelines.config; assert 'jax' not in sys.modules, 'jax imported'")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
