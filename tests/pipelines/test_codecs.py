"""Compressed stores: lossless codecs serve the exact rows, quantized ones serve their per-channel
decoding (checked against a float64 reference), and the reader hands back bf16 either way."""

from __future__ import annotations

import numpy as np
import pytest

from allscope.pipelines import ActivationStore, CorruptShardError, HarvestConfig, codecs, store
from tests.pipelines.helpers import LAYERS, R, SITES, WIDTHS, write_random_store


def _uneven(width: int, seed: int) -> np.ndarray:
  """Channel scales like Gemma's residuals: most near 1, a few hundreds of times larger."""
  rng = np.random.default_rng(seed)
  c = np.exp(rng.normal(0, 0.5, width))
  c[rng.choice(width, 2, replace=False)] *= 300
  return c


def _served(root, sites=SITES) -> dict[str, np.ndarray]:
  src = ActivationStore(root).source(sites, LAYERS)
  return {s: np.concatenate([src[i][s] for i in range(len(src))]) for s in sites}


def _full_record_rows(manifest, truth: np.ndarray) -> np.ndarray:
  """The truth rows the reader serves (full records only), shard by shard."""
  out, start = [], 0
  for shard in manifest["shards"]:
    out.append(truth[start:start + shard["rows"] // R * R])
    start += shard["rows"]
  return np.concatenate(out)


def _activation_bytes(root, manifest) -> int:
  """Record payload bytes of the activation files and scales (tiny test files are dominated by
  ArrayRecord's fixed ~128 KB per file, so file sizes would not show the codec)."""
  total = 0
  for s in manifest["shards"]:
    for rel, info in s["files"].items():
      if rel.startswith("scales/"):
        total += info["bytes"]
      elif not rel.startswith("index/"):
        total += sum(len(b) for b in store.open_reader(str(root / rel)).read_all())
  return total


@pytest.mark.parametrize("codec", ["bf16", "zstd"])
def test_lossless_codecs_serve_the_exact_rows(tmp_path, codec):
  c = _uneven(WIDTHS["mlp_in"], 1)
  manifest, truth = write_random_store(tmp_path / codec, seed=3, codec=codec, channel_scales=c)
  assert manifest["codec"] == codec and manifest["dtype"] == "bfloat16"
  served = _served(tmp_path / codec)
  for site in SITES:
    assert served[site].dtype == store.DTYPE
    np.testing.assert_array_equal(served[site].astype(np.float32),
                                  _full_record_rows(manifest, truth[site]))


@pytest.mark.parametrize("codec, ratio", [("zstd", 1.1), ("int8_zstd", 2.05), ("fp8_zstd", 2.05)])
def test_compressed_codecs_are_smaller_than_raw_bf16(tmp_path, codec, ratio):
  c = _uneven(WIDTHS["mlp_in"], 2)
  # Records of 200 rows (compression is per record, as random access needs).
  raw, _ = write_random_store(tmp_path / "raw", seed=4, channel_scales=c, shard_rows=(400, 400),
                              rows_per_record=200)
  packed, _ = write_random_store(tmp_path / "z", seed=4, channel_scales=c, codec=codec,
                                 shard_rows=(400, 400), rows_per_record=200)
  assert _activation_bytes(tmp_path / "raw", raw) / _activation_bytes(tmp_path / "z", packed) > ratio


def _per_channel_reference(x: np.ndarray, qmax: float) -> np.ndarray:
  """float64 symmetric per-channel quantization to integers in [-qmax, qmax]."""
  x = x.astype(np.float64)
  s = np.abs(x).max(0) / qmax
  return np.clip(np.rint(x / s), -qmax, qmax) * s


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_matches_a_float64_per_channel_reference(seed):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(512, 96)) * _uneven(96, seed)).astype(store.DTYPE)
  got = codecs.roundtrip("int8", x).astype(np.float64)
  ref = _per_channel_reference(x, 127)
  step = np.abs(x.astype(np.float64)).max(0) / 127
  # Equal up to bf16 rounding of the decoded value (2^-8 relative) and float32 scale rounding,
  # which can move a value sitting on a rounding boundary by one step.
  diff = np.abs(got - ref)
  assert np.all(diff <= 2.0 ** -8 * np.abs(ref) + 1.01 * step)
  assert np.mean(diff <= 2.0 ** -8 * np.abs(ref) + 1e-6 * step) > 0.99
  # Every channel keeps its own resolution, the small ones included.
  xf = x.astype(np.float64)
  rel = np.sqrt(np.mean((got - xf) ** 2, 0) / np.mean(xf ** 2, 0))
  assert rel.max() < 0.02, rel.max()


def test_per_channel_scales_survive_massive_channels_where_per_row_ones_fail():
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(512, 96)) * _uneven(96, 5)).astype(store.DTYPE)
  xf = x.astype(np.float64)
  small = np.argsort(np.abs(xf).max(0))[:90]  # the ordinary channels
  per_row = np.clip(np.rint(xf / (np.abs(xf).max(1, keepdims=True) / 127)), -127, 127) * (
      np.abs(xf).max(1, keepdims=True) / 127)
  for codec, bound in (("int8", 0.02), ("fp8", 0.06)):
    got = codecs.roundtrip(codec, x).astype(np.float64)
    err = np.sum((got - xf)[:, small] ** 2) / np.sum(xf[:, small] ** 2)
    assert err < bound ** 2, (codec, err)
  row_err = np.sum((per_row - xf)[:, small] ** 2) / np.sum(xf[:, small] ** 2)
  assert row_err > 0.1  # per-row int8 rounds the ordinary channels to (almost) nothing


@pytest.mark.parametrize("codec, ratio", [("int8", 1.9), ("fp8", 1.9), ("int8_zstd", None),
                                          ("fp8_zstd", None)])
def test_quantized_store_serves_its_decoding_and_its_statistics(tmp_path, codec, ratio):
  c = _uneven(WIDTHS["mlp_in"], 6)
  rows = (370, 400, 290)  # enough rows that the float32 scales are a small part
  raw, _ = write_random_store(tmp_path / "raw", seed=6, channel_scales=c, shard_rows=rows)
  manifest, truth = write_random_store(tmp_path / codec, seed=6, codec=codec, channel_scales=c,
                                       shard_rows=rows)
  files = {rel for s in manifest["shards"] for rel in s["files"]}
  assert files == {rel for k in range(3) for rel in store.shard_files(SITES, LAYERS, k, codec)}
  assert "scales/shard_00000.safetensors" in files
  if ratio:  # (zstd on 4-row records: see test_compressed_codecs_are_smaller_than_raw_bf16)
    assert _activation_bytes(tmp_path / "raw", raw) / _activation_bytes(tmp_path / codec, manifest) > ratio
  served = _served(tmp_path / codec)
  start = 0
  for shard in manifest["shards"]:  # scales are per shard: decode each shard on its own
    n, full = shard["rows"], shard["rows"] // R * R
    for site in SITES:
      for j, layer in enumerate(LAYERS):
        want = codecs.roundtrip(codec, truth[site][start:start + n, j].astype(store.DTYPE))
        got = served[site][sum(s["rows"] // R * R for s in manifest["shards"][:shard["shard"]]):][:full, j]
        np.testing.assert_array_equal(got, want[:full])
    start += n
  # Statistics describe what the trainer reads: the decoded rows (partial records included).
  for site in SITES:
    for j, layer in enumerate(LAYERS):
      start, sq = 0, 0.0
      for shard in manifest["shards"]:
        x = codecs.roundtrip(codec, truth[site][start:start + shard["rows"], j].astype(store.DTYPE))
        sq += np.sum(x.astype(np.float64) ** 2)
        start += shard["rows"]
      msn = manifest["stats"][site][str(layer)]["mean_sq_norm"]
      assert abs(msn - sq / manifest["num_rows"]) <= 1e-12 * msn


def test_a_record_that_does_not_decode_is_reported_by_file(tmp_path):
  manifest, _ = write_random_store(tmp_path / "z", codec="zstd")
  rel = "mlp_in/layer_4/shard_00001.array_record"
  store._write_records(str(tmp_path / "z" / rel), [b"not a zstd frame"] * 10)
  src = ActivationStore(tmp_path / "z").source(("mlp_in",), LAYERS, verify="none")
  with pytest.raises(CorruptShardError, match=f"{rel}: record 0 cannot be decoded as 4 rows x 24 zstd"):
    src[9]  # the first record of shard 1 (shard 0 holds 9 full records)
  src = ActivationStore(tmp_path / "z").source(("mlp_in",), LAYERS)
  with pytest.raises(CorruptShardError, match=f"{rel}: sha256"):
    src[9]


def test_a_missing_scales_file_is_reported(tmp_path):
  write_random_store(tmp_path / "q", codec="int8")
  (tmp_path / "q" / "scales" / "shard_00002.safetensors").unlink()
  src = ActivationStore(tmp_path / "q").source(("mlp_out",), LAYERS)
  src[0]
  with pytest.raises(CorruptShardError, match="scales/shard_00002.safetensors is missing"):
    src[len(src) - 1]


def test_unknown_codec_is_refused_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="harvest.codec=.lz4. is not one of bf16, zstd, int8, fp8, int8_zstd, fp8_zstd"):
    HarvestConfig(codec="lz4").validate()
  with pytest.raises(ValueError, match="harvest.codec='lz4'"):
    write_random_store(tmp_path / "x", codec="lz4")
  assert not (tmp_path / "x").exists()
