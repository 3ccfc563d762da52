"""A fast GGUF (v2/v3) reader: metadata and tensor views; the `gguf` package dequantizes.

`gguf.GGUFReader` builds a numpy view per array element, which takes tens of seconds for a
262144-piece vocabulary; parsing the header with `struct` takes well under one.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]  # row-major (torch) order: GGUF's dims reversed
  qtype: int  # gguf.GGMLQuantizationType value
  offset: int  # absolute byte offset in the file


class GGUFFile:
  """Header of a GGUF file; `dequantize(info)` reads one tensor as float32."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
    buf = memoryview(self._data)
    if bytes(buf[:4]) != b"GGUF":
      raise ValueError(f"{self.path} is not a GGUF file (bad magic)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
      raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
    pos = 24
    self.metadata: dict[str, Any] = {}
    for _ in range(n_kv):
      key, pos = _string(buf, pos)
      (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
      self.metadata[key], pos = _value(buf, pos, kind)
    infos = []
    for _ in range(n_tensors):
      name, pos = _string(buf, pos)
      (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
      dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
      qtype, offset = struct.unpack_from("<IQ", buf, pos + 8 * n_dims)
      pos += 8 * n_dims + 12
      infos.append((name, tuple(reversed(dims)), qtype, offset))
    align = int(self.metadata.get("general.alignment", 32))
    start = -(-pos // align) * align
    self.tensors = [TensorInfo(n, s, q, start + o) for n, s, q, o in infos]

  def dequantize(self, info: TensorInfo) -> np.ndarray:
    import gguf

    qtype = gguf.GGMLQuantizationType(info.qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    *rows, cols = info.shape
    if cols % block:
      raise ValueError(f"{self.path}: tensor {info.name} has {cols} columns, not a multiple of the "
                       f"{qtype.name} block size {block}")
    nbytes = int(np.prod(rows, dtype=np.int64)) * cols // block * size
    if info.offset + nbytes > self._data.size:
      raise ValueError(f"{self.path}: tensor {info.name} runs past the end of the file "
                       "(truncated download?)")
    raw = self._data[info.offset:info.offset + nbytes].reshape(*rows, cols // block * size)
    return gguf.quants.dequantize(raw, qtype).reshape(info.shape)


def _string(buf, pos: int) -> tuple[str, int]:
  (n,) = struct.unpack_from("<Q", buf, pos)
  return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8"), pos + 8 + n


def _value(buf, pos: int, kind: int) -> tuple[Any, int]:
  if kind in _SCALARS:
    fmt = _SCALARS[kind]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
  if kind == _STRING:
    return _string(buf, pos)
  if kind == _ARRAY:
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _SCALARS:  # one numpy view for the whole array
      dtype = np.dtype(_SCALARS[item])
      values = np.frombuffer(buf, dtype, count, pos).copy()
      return values, pos + dtype.itemsize * count
    out = []
    for _ in range(count):
      value, pos = _value(buf, pos, item)
      out.append(value)
    return out, pos
  raise ValueError(f"unknown GGUF value type {kind}")
