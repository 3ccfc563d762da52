"""Gemma 3 tokenizer from a GGUF file's metadata or a Hugging Face model directory.

The GGUF carries the SentencePiece vocabulary (pieces, scores, types). We rebuild the
SentencePiece model from it and let the sentencepiece library encode, so the semantics are
SentencePiece's own. A Hugging Face directory is read through its tokenizer.json
(the `tokenizers` library, as transformers does) or, failing that, its tokenizer.model.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Sequence

import numpy as np


class Tokenizer:
  """Text <-> token ids. `encode` never adds EOS; BOS is added only when asked."""

  def __init__(self, backend, *, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    self._backend = backend
    self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab_size, bos_id, eos_id, pad_id

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = self._backend.encode(text)
    return [self.bos_id, *ids] if add_bos else list(ids)

  def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `(tokens [B, S] int32, mask [B, S] bool)` for texts of different lengths."""
    rows = [self.encode(t, add_bos=add_bos) for t in texts]
    width = max(map(len, rows))
    tokens = np.full((len(rows), width), self.pad_id, np.int32)
    for i, row in enumerate(rows):
      tokens[i, : len(row)] = row
    mask = np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]
    return tokens, mask

  def decode(self, ids: Sequence[int]) -> str:
    return self._backend.decode([int(i) for i in ids])

  def piece_text(self, token_id: int) -> str:
    """One token as display text: its vocabulary piece with SentencePiece's U+2581 back to a
    space (so ' the' keeps its space, which `decode([id])` strips) and ASCII byte pieces
    (`<0x0A>`) as their character. Control pieces (`<bos>`) stay as written."""
    backend = self._backend
    piece = (backend.tok.id_to_token(int(token_id)) if isinstance(backend, _HFTokenizers)
             else backend.id_to_piece(int(token_id)))
    if piece is None:
      return ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
      byte = int(piece[3:5], 16)
      return chr(byte) if byte < 0x80 else piece
    return piece.replace("\u2581", " ")

  # -- constructors -----------------------------------------------------------------------------

  @classmethod
  def from_gguf(cls, metadata: dict) -> "Tokenizer":
    """From a GGUF file's `tokenizer.ggml.*` metadata (SentencePiece / "llama" model)."""
    import sentencepiece as spm

    field = metadata.get

    kind = field("tokenizer.ggml.model")
    if kind != "llama":
      raise ValueError(f"GGUF tokenizer model {kind!r} is not SentencePiece ('llama'); "
                       "Gemma 3 GGUFs carry a SentencePiece vocabulary")
    pieces = field("tokenizer.ggml.tokens")
    ids = {k: int(field(f"tokenizer.ggml.{k}_token_id", d))
           for k, d in (("bos", 2), ("eos", 1), ("padding", 0), ("unknown", 3))}
    proto = _sentencepiece_proto(
        pieces, field("tokenizer.ggml.scores"), field("tokenizer.ggml.token_type"), ids,
        add_dummy_prefix=bool(field("tokenizer.ggml.add_space_prefix", False)))
    backend = spm.SentencePieceProcessor(model_proto=proto)
    return cls(backend, vocab_size=len(pieces), bos_id=ids["bos"], eos_id=ids["eos"],
               pad_id=ids["padding"])

  @classmethod
  def from_directory(cls, path: str | Path, *, bos_id: int, eos_id: int, pad_id: int
                     ) -> "Tokenizer":
    path = Path(path)
    if (path / "tokenizer.json").exists():
      import tokenizers

      backend = _HFTokenizers(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
      size = backend.tok.get_vocab_size(with_added_tokens=True)
    elif (path / "tokenizer.model").exists():
      import sentencepiece as spm

      backend = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
      size = backend.get_piece_size()
    else:
      raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model")
    return cls(backend, vocab_size=size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


class _HFTokenizers:
  """Adapts a `tokenizers.Tokenizer` to the encode/decode interface without special tokens."""

  def __init__(self, tok):
    self.tok = tok

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.tok.decode(ids, skip_special_tokens=False)


def _sentencepiece_proto(pieces, scores, types, ids, add_dummy_prefix: bool) -> bytes:
  """Serializes a SentencePiece BPE ModelProto (sentencepiece_model.proto field numbers).

  Written by hand because sentencepiece's generated protobuf module pins the protobuf runtime.
  GGUF token types use SentencePiece's own enum (1 normal, 2 unknown, 3 control, 4 user-defined,
  5 unused, 6 byte).
  """

  def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32s are encoded as 10-byte two's complement
    out = bytearray()
    while True:
      byte, n = n & 0x7F, n >> 7
      out.append(byte | (0x80 if n else 0))
      if not n:
        return bytes(out)

  def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)

  def length(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload

  def integer(number: int, value: int) -> bytes:
    return tag(number, 0) + varint(value)

  out = bytearray()
  for piece, score, kind in zip(pieces, scores, types):
    if kind == 4:  # llama.cpp un-escapes user-defined pieces (whitespace runs); SentencePiece
      piece = piece.replace(" ", "\u2581")  # matches them on the escaped text
    body = length(1, piece.encode("utf-8")) + tag(2, 5) + struct.pack("<f", float(score))
    out += length(1, body + integer(3, int(kind)))
  trainer = (integer(3, 2) + integer(4, len(pieces)) + integer(35, 1)  # BPE, size, byte_fallback
             + integer(40, ids["unknown"]) + integer(41, ids["bos"]) + integer(42, ids["eos"])
             + integer(43, ids["padding"]))
  normalizer = (length(1, b"identity") + integer(3, int(add_dummy_prefix))
                + integer(4, 0) + integer(5, 1))  # keep whitespace runs; escape spaces as U+2581
  return bytes(out + length(2, trainer) + length(3, normalizer))
