"""Export to the Gemma Scope 2 layout and `allscope.release.load` round trips."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.numpy

import allscope.release as rel
from allscope.release import ReleaseConfig, ReleaseError


def _write(tmp_path, dictionaries, **cfg):
  return rel.write_release(ReleaseConfig(directory=str(tmp_path / "rel"), **cfg), dictionaries,
                           tmp_path)


def test_layout_names_keys_and_config(tmp_path, make_dict, make_clt):
  sae = make_dict("sae", "resid_post", layer=5, width=64, l0=7.3)
  skip = make_dict("transcoder", layer=2, affine=True, width=2048, l0=31.6)
  clt = make_clt(n_layers=3, width=32, l0=11.0)
  root = _write(tmp_path, [sae, skip, clt], model_card=False)

  folder = root / "resid_post/layer_5_width_64_l0_7"
  assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.safetensors"]
  tensors = safetensors.numpy.load_file(str(folder / "params.safetensors"))
  assert {k: v.shape for k, v in tensors.items()} == {
      "w_enc": (16, 64), "w_dec": (64, 16), "b_enc": (64,), "b_dec": (16,), "threshold": (64,)}
  assert all(v.dtype == np.float32 for v in tensors.values())
  config = json.loads((folder / "config.json").read_text())
  assert config["architecture"] == "jump_relu" and config["type"] == "sae"
  assert config["model_name"] == "google/gemma-3-270m" and config["width"] == 64
  assert config["hf_hook_point_in"] == "model.layers.5.output"
  assert config["affine_connection"] is False and config["l0"] == 7.3

  tc = json.loads((root / "transcoder/layer_2_width_2k_l0_32_affine/config.json").read_text())
  assert tc["hf_hook_point_in"] == "model.layers.2.pre_feedforward_layernorm.output"
  assert tc["hf_hook_point_out"] == "model.layers.2.post_feedforward_layernorm.output"
  assert tc["affine_connection"] is True and tc["type"] == "transcoder"

  clt_dir = root / "clt/width_32_l0_11"
  assert sorted(p.name for p in clt_dir.iterdir()) == [
      "config.json", "params_layer_0.safetensors", "params_layer_1.safetensors",
      "params_layer_2.safetensors"]
  layer1 = safetensors.numpy.load_file(str(clt_dir / "params_layer_1.safetensors"))
  assert layer1["w_dec"].shape == (32, 3, 16)  # [F, L, d], zero for earlier layers
  assert not np.any(layer1["w_dec"][:, 0])

  manifest = json.loads((root / "manifest.json").read_text())
  paths = [e["path"] for e in manifest["dictionaries"]]
  assert paths == ["resid_post/layer_5_width_64_l0_7",
                   "transcoder/layer_2_width_2k_l0_32_affine", "clt/width_32_l0_11"]
  for entry in manifest["dictionaries"]:
    assert all(len(f["sha256"]) == 64 for f in entry["files"].values())


def test_round_trip_gives_back_the_same_dictionaries(tmp_path, make_dict, make_clt):
  originals = [make_dict("sae", "attn_out", layer=0), make_dict("transcoder", layer=3),
               make_dict("transcoder", layer=4, affine=True),
               make_dict("sae", "mlp_out", architecture="topk", k=5, l0=5.0),
               make_clt(n_layers=4, affine=True)]
  root = _write(tmp_path, originals, model_card=False)
  release = rel.load(root)
  assert isinstance(release, rel.Release) and len(release.dictionaries) == len(originals)
  for got, want in zip(release.dictionaries, originals):
    assert type(got) is type(want)
    assert (got.type, got.architecture, got.model_name, got.k) == (
        want.type, want.architecture, want.model_name, want.k)
    if isinstance(want, rel.Dictionary):
      assert (got.layer, got.site_in, got.site_out) == (want.layer, want.site_in, want.site_out)
      pairs = [(got.params, want.params)]
    else:
      pairs = list(zip(got.layer_params, want.layer_params))
    for g, w in pairs:
      assert g.keys() == w.keys()
      for key in w:
        np.testing.assert_array_equal(g[key], w[key])
  # one folder alone loads too, and is verified against the release manifest above it
  one = rel.load(root / "transcoder/layer_3_width_64_l0_7")
  np.testing.assert_array_equal(one.params["w_enc"], originals[1].params["w_enc"])


def test_crosscoder_round_trip(tmp_path, rng):
  from .conftest import random_params
  layers = (2, 5, 8)
  d = rel.Dictionary(random_params(rng, 3 * 16, 64, 3 * 16), "crosscoder", "jump_relu",
                     "gemma3-270m", 2, "resid_post", "resid_post", l0=12.0, layers=layers)
  root = _write(tmp_path, [d], model_card=False)
  config = json.loads((root / "crosscoder/layer_2_width_64_l0_12/config.json").read_text())
  assert config["layers"] == [2, 5, 8]
  assert config["hf_hook_points_in"] == [f"model.layers.{l}.output" for l in layers]
  (got,) = rel.load(root).dictionaries
  assert got.layers == layers and got.type == "crosscoder"
  np.testing.assert_array_equal(got.params["w_dec"], d.params["w_dec"])


def _corrupt_setup(tmp_path, make_dict):
  root = _write(tmp_path, [make_dict("sae", "resid_post", layer=1)], model_card=False)
  return root, root / "resid_post/layer_1_width_64_l0_7/params.safetensors"


def test_checksum_mismatch_names_the_file(tmp_path, make_dict):
  root, params = _corrupt_setup(tmp_path, make_dict)
  data = bytearray(params.read_bytes())
  data[-1] ^= 0xFF
  params.write_bytes(bytes(data))
  with pytest.raises(ReleaseError, match=r"params\.safetensors: checksum mismatch"):
    rel.load(root)
  with pytest.raises(ReleaseError, match="checksum mismatch"):
    rel.load(params.parent)


def test_missing_tensor_names_the_file_and_key(tmp_path, make_dict):
  root, params = _corrupt_setup(tmp_path, make_dict)
  tensors = safetensors.numpy.load_file(str(params))
  del tensors["threshold"]
  safetensors.numpy.save_file(tensors, str(params))
  with pytest.raises(ReleaseError, match=r"params\.safetensors: missing tensor\(s\) threshold"):
    rel.load(root, verify=False)


def test_wrong_shape_names_the_file_and_shapes(tmp_path, make_dict):
  root, params = _corrupt_setup(tmp_path, make_dict)
  tensors = safetensors.numpy.load_file(str(params))
  tensors["b_dec"] = np.ones(17, np.float32)
  safetensors.numpy.save_file(tensors, str(params))
  with pytest.raises(ReleaseError, match=r"params\.safetensors: b_dec has shape \(17,\), expected \(16,\)"):
    rel.load(root, verify=False)


def test_missing_and_truncated_files_are_named(tmp_path, make_dict):
  root, params = _corrupt_setup(tmp_path, make_dict)
  params.write_bytes(params.read_bytes()[:40])
  with pytest.raises(ReleaseError, match=r"params\.safetensors: not a readable safetensors file"):
    rel.load(root, verify=False)
  params.unlink()
  with pytest.raises(ReleaseError, match=r"params\.safetensors: missing"):
    rel.load(root)


def test_bad_dictionaries_are_refused_before_writing(tmp_path, make_dict):
  good = make_dict("sae", "resid_post")
  bad_shape = make_dict("sae", "resid_post", layer=2)
  bad_shape.params["b_enc"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"dictionary 1 \(sae\): b_enc has shape \(3,\)"):
    _write(tmp_path, [good, bad_shape])
  assert not (tmp_path / "rel").exists()  # nothing half-written
  nan = make_dict("sae", "resid_post")
  nan.params["w_enc"][0, 0] = np.nan
  with pytest.raises(ValueError, match="w_enc holds NaN"):
    _write(tmp_path, [nan])
  negative = make_dict("sae", "resid_post")
  negative.params["threshold"][0] = -0.1
  with pytest.raises(ValueError, match="threshold has negative entries"):
    _write(tmp_path, [negative])
  with pytest.raises(ValueError, match="unknown site 'resid_pre'"):
    _write(tmp_path, [make_dict("sae", "resid_pre")])
  with pytest.raises(ValueError, match="architecture 'batchtopk'"):
    _write(tmp_path, [make_dict("sae", "resid_post", architecture="batchtopk")])
  with pytest.raises(ValueError, match="same folder"):
    _write(tmp_path, [make_dict("sae", "resid_post"), make_dict("sae", "resid_post")])


def test_existing_release_is_not_overwritten_silently(tmp_path, make_dict):
  _write(tmp_path, [make_dict("sae", "resid_post")], model_card=False)
  with pytest.raises(FileExistsError, match="release.overwrite=true"):
    _write(tmp_path, [make_dict("sae", "resid_post")], model_card=False)
  _write(tmp_path, [make_dict("sae", "resid_post")], model_card=False, overwrite=True)


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "..", "x" * 200, ""])
def test_user_names_never_escape_the_release_folder(tmp_path, make_dict, name):
  with pytest.raises(ValueError, match="not a safe name"):
    ReleaseConfig(name=name).validate()
  with pytest.raises(ValueError, match="not a safe name"):
    _write(tmp_path, [make_dict("sae", "resid_post", l0_tag=name)], model_card=False)


def test_manifest_paths_cannot_escape(tmp_path, make_dict):
  root = _write(tmp_path, [make_dict("sae", "resid_post")], model_card=False)
  manifest = json.loads((root / "manifest.json").read_text())
  manifest["dictionaries"][0]["path"] = "../../etc"
  (root / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ReleaseError, match="escapes the release folder"):
    rel.load(root)


def test_no_pickle_anywhere():
  """Weights are read only through safetensors and JSON; no module may use pickle, and np.load
  (token files) only with allow_pickle=False."""
  package = os.path.join(os.path.dirname(rel.__file__))
  for name in os.listdir(package):
    if name.endswith(".py"):
      text = open(os.path.join(package, name)).read()
      for banned in ("import pickle", "torch.load(", "allow_pickle=True"):
        assert banned not in text, f"{name} uses {banned}"
      loads = text.count("np.load(")  # token files only, and never with pickle
      assert loads == text.count("np.load(path, allow_pickle=False)"), f"{name} uses np.load"


def test_measured_heldout_l0_names_the_folder_and_fills_config(tmp_path, make_dict, rng):
  """The release's `l0` tag and config value are evaluation's held-out L0, not the dictionary's
  own (training) estimate or its k."""
  d = make_dict("transcoder", layer=4, affine=True, l0=16.0, metadata={"train_l0": 16.0})
  evaluation = rel.Evaluation("", {"l0": 23.4, "fvu": 0.1}, rng.uniform(0, 0.1, d.width))
  root = rel.write_release(ReleaseConfig(directory=str(tmp_path / "rel"), model_card=False), [d],
                           tmp_path, evaluations=[evaluation])
  folder = root / "transcoder/layer_4_width_64_l0_23_affine"
  config = json.loads((folder / "config.json").read_text())
  assert config["l0"] == 23.4 and config["train_l0"] == 16.0
  (entry,) = json.loads((root / "manifest.json").read_text())["dictionaries"]
  assert entry["l0"] == 23.4 and entry["path"] == "transcoder/layer_4_width_64_l0_23_affine"
  assert rel.load(root).dictionaries[0].l0 == 23.4
  # without a measurement the dictionary's own l0 still names it
  root2 = _write(tmp_path / "b", [d], model_card=False)
  assert (root2 / "transcoder/layer_4_width_64_l0_16_affine").is_dir()


def test_topk_has_no_threshold_and_relu_is_jumprelu_at_zero(tmp_path, make_dict):
  topk = make_dict("sae", "mlp_out", architecture="topk", k=5, l0=5.0)
  relu = make_dict("sae", "attn_out", architecture="relu", l0=30.0)
  root = _write(tmp_path, [topk, relu], model_card=False)
  t = safetensors.numpy.load_file(str(root / "mlp_out/layer_1_width_64_l0_5/params.safetensors"))
  assert "threshold" not in t
  r = safetensors.numpy.load_file(str(root / "attn_out/layer_1_width_64_l0_30/params.safetensors"))
  assert np.all(r["threshold"] == 0)
  config = json.loads((root / "attn_out/layer_1_width_64_l0_30/config.json").read_text())
  assert config["architecture"] == "jump_relu"  # what every JumpReLU loader reads exactly
  bad = make_dict("sae", "mlp_out", architecture="topk", k=5)
  bad = rel.Dictionary({**bad.params, "threshold": np.zeros(64, np.float32)}, "sae", "topk",
                       "gemma3-270m", 1, "mlp_out", "mlp_out", k=5)
  with pytest.raises(ValueError, match="topk dictionary has no threshold"):
    _write(tmp_path / "c", [bad], model_card=False)
  bad_relu = rel.Dictionary({**relu.params, "threshold": np.full(64, 0.1, np.float32)}, "sae",
                            "relu", "gemma3-270m", 1, "attn_out", "attn_out")
  with pytest.raises(ValueError, match="relu dictionary's threshold must be absent or all 0"):
    _write(tmp_path / "d", [bad_relu], model_card=False)
