"""Gemma 3 forward, capture and splice match transformers' Gemma3ForCausalLM on a tiny random model.

The tiny config has six layers (layer 5 is global) and a sliding window of 8 over sequences of up
to 24 tokens, so both attention types and the window are exercised. Every tensor, norms included,
is random, and the batch mixes sequence lengths (right padding).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from allscope import models
from tests.models import hf_reference
from tests.models.hf_reference import rel_err

SEQ = 24


def _tiny_hf(path, seed=0):
  import tokenizers
  from transformers import Gemma3ForCausalLM, Gemma3TextConfig

  torch.manual_seed(seed)
  cfg = Gemma3TextConfig(
      vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
      query_pre_attn_scalar=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
      eos_token_id=1, rope_parameters={
          "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
  model = Gemma3ForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else p.shape[-1] ** -0.5))
  model.save_pretrained(path)
  vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t3"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(str(path / "tokenizer.json"))
  return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_gemma3")
  hf = _tiny_hf(path)
  ours, tokenizer = models.load(str(path), dtype="float32")
  rng = np.random.default_rng(1)
  lengths = np.array([SEQ, 17, 9])
  tokens = rng.integers(4, 300, size=(3, SEQ)).astype(np.int32)
  tokens[:, 0] = 2
  mask = np.arange(SEQ)[None] < lengths[:, None]
  tokens[~mask] = 0
  return path, hf, ours, tokenizer, tokens, mask


def test_logits_and_every_site_match_transformers_float32(tiny):
  _, hf, ours, _, tokens, mask = tiny
  ref_logits, ref_sites = hf_reference.run(hf, tokens, mask)
  assert rel_err(ours.logits(tokens, mask=mask), ref_logits, mask) <= 1e-5
  captured = ours.capture(tokens, mask=mask)
  for site in models.SITES:
    for layer in range(6):
      err = rel_err(captured[site][:, :, layer], ref_sites[site][:, :, layer], mask)
      assert err <= 1e-5, (site, layer, err)


def test_bfloat16_tracks_float32(tiny):
  path, _, ours, _, tokens, mask = tiny
  ours16, _ = models.load(str(path), dtype="bfloat16")
  assert ours16.embed_tokens[...].dtype == jnp.bfloat16
  captured = ours16.capture(tokens, mask=mask, sites=("resid_post",))
  assert captured["resid_post"].dtype == jnp.bfloat16
  assert rel_err(ours16.logits(tokens, mask=mask), ours.logits(tokens, mask=mask), mask) < 3e-2


def test_capture_subset_equals_full_capture_and_stops_at_deepest_layer(tiny):
  path, _, ours, _, tokens, mask = tiny
  full = ours.capture(tokens, mask=mask)
  part = ours.capture(tokens, sites=("mlp_out", "attn_out"), layers=(3, 1), mask=mask)
  assert set(part) == {"mlp_out", "attn_out"}
  assert part["mlp_out"].shape == (3, SEQ, 2, 64) and part["attn_out"].shape == (3, SEQ, 2, 64)
  np.testing.assert_array_equal(part["mlp_out"], full["mlp_out"][:, :, [3, 1]])
  # Poison every layer past 3: a capture that ran deeper would come back NaN.
  poisoned, _ = models.load(str(path), dtype="float32")
  for blk in list(poisoned.layers)[4:]:
    blk.q_proj[...] = jnp.full_like(blk.q_proj[...], jnp.nan)
  shallow = poisoned.capture(tokens, layers=(3,), mask=mask)
  np.testing.assert_array_equal(shallow["resid_post"][:, :, 0], full["resid_post"][:, :, 3])


def test_splice_matches_transformers_with_the_same_replacement(tiny):
  _, hf, ours, _, tokens, mask = tiny
  scale = np.random.default_rng(2).normal(size=64).astype(np.float32)
  ref_logits, _ = hf_reference.run(
      hf, tokens, mask, replace={("mlp_out", 2): lambda a: a * torch.from_numpy(scale),
                                 ("resid_post", 4): lambda a: torch.flip(a, [-1])})
  logits = ours.logits(tokens, mask=mask, splice={("mlp_out", 2): lambda a: a * scale,
                                                  ("resid_post", 4): lambda a: a[..., ::-1]})
  assert rel_err(logits, ref_logits, mask) <= 1e-5
  identity = ours.logits(tokens, mask=mask, splice={("attn_out", 0): lambda a: a})
  np.testing.assert_allclose(identity, ours.logits(tokens, mask=mask), rtol=1e-6, atol=1e-6)


def test_padding_does_not_change_valid_positions(tiny):
  _, _, ours, _, tokens, mask = tiny
  alone = ours.logits(tokens[2:3, :9])
  batched = ours.logits(tokens, mask=mask)[2:3, :9]
  assert rel_err(batched, alone) <= 1e-5
  left = np.roll(tokens[2:3], SEQ - 9, axis=1)  # the same 9 tokens, left padded
  left_logits = ours.logits(left, mask=left != 0)[:, SEQ - 9:]
  assert rel_err(left_logits, alone) <= 1e-5


@pytest.mark.parametrize("sites,layers,message", [
    (("mlp_post",), (0,), "unknown site"),
    (("mlp_in",), (6,), "out of range"),
    (("mlp_in",), (-1,), "out of range"),
])
def test_bad_sites_and_layers_are_named(tiny, sites, layers, message):
  _, _, ours, _, tokens, mask = tiny
  with pytest.raises(ValueError, match=message) as info:
    ours.capture(tokens, sites=sites, layers=layers)
  assert "resid_post" in str(info.value) or "0..5" in str(info.value)
  with pytest.raises(ValueError, match=message):
    ours.logits(tokens, splice={(sites[0], layers[0]): lambda a: a})
