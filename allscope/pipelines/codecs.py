"""Record codecs of the activation store: how a [rows, width] bf16 block becomes bytes.

  bf16  raw bfloat16 (2 bytes/value), the default
  zstd  lossless: the bf16 high bytes, then the low bytes (byte planes), zstd level 3; sign and
        exponent bytes repeat a lot, mantissa bytes barely compress
  int8  per-channel symmetric int8 (1 byte/value): scale[c] = max |x[:, c]| / 127 over the
        shard's rows of one (site, layer) file
  fp8   float8 e4m3fn with per-channel scales: scale[c] = max |x[:, c]| / 448
  int8_zstd, fp8_zstd   the quantized bytes, then zstd level 3 (below 1 byte per value)

Scales are per channel, not per row: Gemma's residual streams have a few channels hundreds of
times larger than the rest, and a per-row scale set by them rounds every other channel to zero.
A shard's scales live in `scales/shard_<k>.safetensors` (float32 [width] per "<site>/<layer>"),
covered by the receipt's checksums. Every codec decodes to bf16, so the reader hands the trainer
the same arrays (exactly for bf16/zstd; the quantized values for int8/fp8).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

CODECS = ("bf16", "zstd", "int8", "fp8", "int8_zstd", "fp8_zstd")
LOSSY = ("int8", "fp8", "int8_zstd", "fp8_zstd")
BF16 = ml_dtypes.bfloat16
_QMAX = {"int8": 127.0, "fp8": float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)}
_QDTYPE = {"int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn}
_ZSTD_LEVEL = 3


def check(codec: str) -> None:
  if codec not in CODECS:
    raise ValueError(f"harvest.codec={codec!r} is not one of {', '.join(CODECS)}")


def scales(codec: str, x: np.ndarray) -> np.ndarray | None:
  """float32 [width] per-channel scales of a lossy codec over x [rows, width]; else None."""
  if codec not in LOSSY:
    return None
  peak = np.max(np.abs(x.astype(np.float32)), axis=0) if len(x) else np.zeros(x.shape[1], np.float32)
  s = peak / np.float32(_QMAX[codec.removesuffix("_zstd")])
  return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)


def encode(codec: str, x: np.ndarray, scale: np.ndarray | None = None) -> bytes:
  """One record: x bf16 [rows, width] -> bytes."""
  if codec == "bf16":
    return np.ascontiguousarray(x, BF16).tobytes()
  if codec == "zstd":
    planes = np.ascontiguousarray(x, BF16).view(np.uint8).reshape(-1, 2).T  # [lo; hi] little-endian
    return _compress(np.ascontiguousarray(planes[::-1]).tobytes())
  base = codec.removesuffix("_zstd")
  q = x.astype(np.float32) / scale
  if base == "int8":
    q = np.clip(np.rint(q), -127, 127)
  data = q.astype(_QDTYPE[base]).tobytes()
  return _compress(data) if codec.endswith("_zstd") else data


def _compress(data: bytes) -> bytes:
  import zstandard

  return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)


def decode(codec: str, data: bytes, rows: int, width: int,
           scale: np.ndarray | None = None) -> np.ndarray:
  """bytes -> bf16 [rows, width]; raises ValueError when the bytes cannot be that block."""
  if codec.endswith("zstd"):
    import zstandard

    data = zstandard.ZstdDecompressor().decompress(data, max_output_size=rows * width * 2)
  size = rows * width * (2 if codec in ("bf16", "zstd") else 1)
  if len(data) != size:
    raise ValueError(f"{len(data)} bytes where {rows} rows x {width} {codec} take {size}")
  if codec == "bf16":
    return np.frombuffer(data, BF16).reshape(rows, width)
  if codec == "zstd":
    hi, lo = np.frombuffer(data, np.uint8).reshape(2, -1)
    return np.stack([lo, hi], axis=1).reshape(-1).view(BF16).reshape(rows, width)
  q = np.frombuffer(data, _QDTYPE[codec.removesuffix("_zstd")]).reshape(rows, width).astype(np.float32)
  return (q * scale).astype(BF16)


def roundtrip(codec: str, x: np.ndarray) -> np.ndarray:
  """What the reader serves for rows x [rows, width] written as one shard with this codec."""
  s = scales(codec, x)
  return decode(codec, encode(codec, x, s), *x.shape, s)
