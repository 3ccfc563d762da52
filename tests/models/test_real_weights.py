"""The real Gemma 3 270M (bundled Q4_K_M GGUF) matches transformers 5 loading the same file.

transformers dequantizes the GGUF independently (its own GGUF reader and norm-weight handling), so
agreement checks our dequantization, norm convention, tokenizer and forward at once.
"""

from __future__ import annotations

import pydoc_data.topics

import numpy as np
import pytest
import torch

from allscope import models
from allscope.models import Tokenizer
from tests.models import hf_reference
from tests.models.hf_reference import rel_err

pytestmark = pytest.mark.slow

# Real English from CPython's bundled documentation: longer than the 512-token sliding window.
TEXT = "\n\n".join(pydoc_data.topics.topics[k] for k in ("with", "while", "if", "for"))

# Whitespace runs, tabs, newlines, digits, non-ASCII and emoji.
TRICKY = ("Hello  world,\tthis is   spaced.\n\n\nLine 3: 1234567 + 89 = 1234656\r\n"
          "Ünïcödé naïve café — «quotes» 東京は日本の首都です。 Привет, мир! 🙂🚀 <b>html</b>\n"
          "    indented code():\n        return x**2  # comment\n")


@pytest.fixture(scope="module")
def hf():
  from transformers import AutoModelForCausalLM, AutoTokenizer

  path = models.resolve("gemma3-270m")
  tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  model = AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  return model, tokenizer


def test_tokenizer_matches_transformers(gemma270m, hf):
  _, ours = gemma270m
  _, theirs = hf
  for text in (TEXT, TRICKY, "lighthouse", " leading space", "trailing space "):
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
  assert len(ours.encode(" lighthouse")) == 1  # one piece, not `▁l igh th ou se`
  assert ours.decode(ours.encode(TRICKY)) == TRICKY
  assert ours.encode(TEXT, add_bos=True)[0] == ours.bos_id == 2


def test_tokenizer_from_a_hugging_face_directory_matches(hf, tmp_path):
  _, theirs = hf
  theirs.save_pretrained(tmp_path)  # tokenizer.json, as in google/gemma-3-* repos
  ours = Tokenizer.from_directory(tmp_path, bos_id=2, eos_id=1, pad_id=0)
  for text in (TEXT, TRICKY):
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
  assert ours.decode(ours.encode(TRICKY)) == TRICKY


@pytest.fixture(scope="module")
def english(gemma270m):
  """640 tokens of real English: longer than the 512-token sliding window."""
  model, tokenizer = gemma270m
  ids = np.asarray([tokenizer.encode(TEXT, add_bos=True)[:640]], np.int32)
  assert ids.shape[1] == 640 > model.config.sliding_window
  return ids, model.logits(ids)


def test_logits_and_every_site_match_transformers(gemma270m, hf, english):
  model, _ = gemma270m
  ids, logits = english
  ref_logits, ref_sites = hf_reference.run(hf[0], ids, np.ones_like(ids, bool))
  assert rel_err(logits, ref_logits) <= 1e-4
  captured = model.capture(ids)
  for site in models.SITES:
    for layer in range(model.config.n_layers):
      err = rel_err(captured[site][:, :, layer], ref_sites[site][:, :, layer])
      assert err <= 1e-4, (site, layer, err)


def test_greedy_continuation_matches_transformers(gemma270m, hf):
  model, tokenizer = gemma270m
  prompt = tokenizer.encode("The capital of France is", add_bos=True)
  ours = models.generate(model, prompt, 16)
  with torch.no_grad():
    theirs = hf[0].generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
  assert ours == theirs[0, len(prompt):].tolist()
  assert "Paris" in tokenizer.decode(ours) or "France" in tokenizer.decode(ours)


def test_language_model_loss_is_that_of_a_trained_model(english):
  """The norm convention decides between a working model and noise: the bundled GGUF stores
  (1 + w), and with w read correctly the loss on English is about 3 nats/token."""
  ids, logits = english
  ce = float(models.cross_entropy(logits, ids, np.ones_like(ids, bool)))
  assert 1.0 < ce < 4.0, ce
