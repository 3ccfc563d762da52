"""Decoder directions through the unembedding against a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from allscope.release.browser import Unembedding, logit_effects


@pytest.fixture
def unembed():
  rng = np.random.default_rng(3)
  # 1000 tokens: long enough rows for the seam's two-stage top_k (n >= 128 k)
  return Unembedding(rng.normal(0, 1, (1000, 16)).astype(np.float32),
                     rng.uniform(0.5, 1.5, 16).astype(np.float32),
                     {2: rng.normal(0, 0.3, (12, 16)).astype(np.float32)},
                     {2: rng.uniform(0.5, 1.5, 16).astype(np.float32)})


@pytest.mark.parametrize("site", ["mlp_out", "resid_post", "attn_out"])
def test_promoted_and_suppressed_tokens_match_reference(unembed, site):
  rng = np.random.default_rng(4)
  d_site = 12 if site == "attn_out" else 16
  w_dec = rng.normal(0, 1, (300, d_site)).astype(np.float32)  # 300: two chunks, one partial
  v = w_dec.astype(np.float64)
  if site == "attn_out":
    v = (v @ unembed.o_proj[2].astype(np.float64)) * unembed.post_attention_gain[2]
  logits = (v * unembed.final_gain.astype(np.float64)) @ unembed.embed.astype(np.float64).T
  directions = unembed.residual_directions(w_dec, site, 2)
  top_i, top_v, bot_i, bot_v = logit_effects(directions, unembed, 6, chunk=256)
  want_top = np.argsort(-logits, axis=1)[:, :6]
  want_bot = np.argsort(logits, axis=1)[:, :6]
  np.testing.assert_array_equal(top_i, want_top)
  np.testing.assert_array_equal(bot_i, want_bot)
  np.testing.assert_allclose(top_v, np.take_along_axis(logits, want_top, 1), rtol=1e-4)
  np.testing.assert_allclose(bot_v, np.take_along_axis(logits, want_bot, 1), rtol=1e-4)


def test_mlp_in_has_no_logit_effect_and_widths_are_checked(unembed):
  assert unembed.residual_directions(np.zeros((3, 16), np.float32), "mlp_in", 0) is None
  with pytest.raises(ValueError, match="width 9 but the unembedding has d_model 16"):
    logit_effects(np.zeros((3, 9), np.float32), unembed, 4)
