"""Loaders fail early and clearly on bad input, and place weights where asked."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from allscope import models
from tests.models.test_gemma3 import _tiny_hf


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny")
  _tiny_hf(path)
  return path


def _copy(src, dst, edit):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  weights = load_file(dst / "model.safetensors")
  edit(weights)
  save_file(weights, dst / "model.safetensors")
  return dst


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match="gemma3-270m.*gemma3-27b"):
    models.load("gemma3-3b")


def test_presets_follow_the_released_sizes():
  table = {  # d_model, layers, heads, kv heads, head_dim, d_ff, window, vocab
      "gemma3-270m": (640, 18, 4, 1, 256, 2048, 512, 262144),
      "gemma3-1b": (1152, 26, 4, 1, 256, 6912, 512, 262144),
      "gemma3-4b": (2560, 34, 8, 4, 256, 10240, 1024, 262208),
      "gemma3-12b": (3840, 48, 16, 8, 256, 15360, 1024, 262208),
      "gemma3-27b": (5376, 62, 32, 16, 128, 21504, 1024, 262208),
  }
  for name, row in table.items():
    p = models.preset(name)
    assert (p.d_model, p.n_layers, p.n_heads, p.n_kv_heads, p.head_dim, p.d_ff,
            p.sliding_window, p.vocab_size) == row
    assert p.rope_global_scaling == (1.0 if name in ("gemma3-270m", "gemma3-1b") else 8.0)
    assert p.query_pre_attn_scalar == (168 if name == "gemma3-27b" else 256)
  assert [i for i in range(18) if models.preset("gemma3-270m").is_global(i)] == [5, 11, 17]


def test_gguf_of_another_architecture_is_refused(tmp_path):
  import gguf

  path = tmp_path / "llama.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tensor("token_embd.weight", np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="architecture is 'llama', not 'gemma3'"):
    models.load(str(path))


def test_missing_tensor_is_named(tiny_dir, tmp_path):
  broken = _copy(tiny_dir, tmp_path / "missing", lambda w: w.pop("model.layers.3.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing.*layers\.3\.mlp\.up_proj\.weight"):
    models.load(str(broken))


def test_misshaped_tensor_is_named(tiny_dir, tmp_path):
  def shrink(w):
    w["model.layers.1.self_attn.k_proj.weight"] = w["model.layers.1.self_attn.k_proj.weight"][:-1]
  broken = _copy(tiny_dir, tmp_path / "shape", shrink)
  with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj\.weight.*\(31, 64\).*\(32, 64\)"):
    models.load(str(broken))


def test_non_gemma3_directory_is_refused(tiny_dir, tmp_path):
  bad = tmp_path / "llama"
  bad.mkdir()
  cfg = json.loads((tiny_dir / "config.json").read_text()) | {"model_type": "llama"}
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="not a Gemma 3"):
    models.load(str(bad))


def test_weights_are_placed_with_the_given_sharding(tiny_dir):
  mesh = jax.make_mesh((1,), ("model",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  by_width = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
  seen = []

  def place(name, shape):
    seen.append(name)
    return by_width if len(shape) == 2 else replicated

  model, _ = models.load(str(tiny_dir), dtype="bfloat16", sharding=place)
  assert model.layers[2].up_proj[...].sharding == by_width
  assert model.norm[...].sharding == replicated
  assert "layers.5.self_attn.k_norm.weight" in seen and len(seen) == 2 + 6 * 13


def test_fast_gguf_reader_agrees_with_the_gguf_package(tmp_path):
  """Metadata and dequantized tensors equal gguf.GGUFReader's on a file with mixed types."""
  import gguf

  from allscope.models.gguf_file import GGUFFile

  rng = np.random.default_rng(3)
  path = tmp_path / "mixed.gguf"
  writer = gguf.GGUFWriter(str(path), "gemma3")
  writer.add_uint32("gemma3.block_count", 2)
  writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
  writer.add_array("tokenizer.ggml.tokens", ["<pad>", "▁a", "東京", "\n\n"])
  writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.25, -1000.0])
  writer.add_bool("tokenizer.ggml.add_space_prefix", False)
  tensors = {"f32": rng.normal(size=(3, 64)).astype(np.float32),
             "q8": rng.normal(size=(4, 64)).astype(np.float32),
             "q5": rng.normal(size=(2, 256)).astype(np.float32)}
  writer.add_tensor("f32", tensors["f32"])
  for name, qtype in (("q8", gguf.GGMLQuantizationType.Q8_0),
                      ("q5", gguf.GGMLQuantizationType.Q5_0)):
    writer.add_tensor(name, gguf.quants.quantize(tensors[name], qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()

  ours, ref = GGUFFile(path), gguf.GGUFReader(path)
  for key, field in ref.fields.items():
    if key.startswith("GGUF."):
      continue
    theirs, mine = field.contents(), ours.metadata[key]
    mine = list(mine) if isinstance(theirs, list) else mine
    assert mine == (theirs if isinstance(theirs, str) or key.endswith("tokens")
                    else pytest.approx(theirs)), key
  for info, t in zip(ours.tensors, ref.tensors):
    assert info.name == t.name
    want = gguf.quants.dequantize(t.data, t.tensor_type)
    np.testing.assert_array_equal(ours.dequantize(info), want)
    written = tensors[info.name]  # and it is the data that was written, to 5-bit precision
    assert np.abs(want - written).max() <= np.abs(written).max() / 16
