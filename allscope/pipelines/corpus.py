"""Corpus reading and packing: documents -> fixed-length token sequences with BOS first.

A corpus is split into *units* (a range of documents) that one worker tokenizes and packs on
its own, so the work spreads over workers while sequence ids stay stable: a sequence's id is
its rank in (unit, position in unit) order, whatever the number of workers.

Packing (within a unit): each document is encoded without BOS and followed by EOS; the
documents are concatenated in corpus order and cut into chunks of `context_length - 1` tokens;
each chunk gets BOS in front. The unit's last chunk is padded with PAD. BOS and PAD positions
are never stored.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from allscope import files
from allscope.pipelines.config import CorpusConfig

Unit = tuple[str, Any]  # (kind, payload): small and picklable, so Beam can ship it to workers


class CorpusError(ValueError):
  pass


def _builtin_documents() -> list[str]:
  from pydoc_data import topics
  return [topics.topics[k] for k in sorted(topics.topics)]


def _match(pattern: str) -> list[str]:
  return files.glob(pattern)


def _open_text(path: str):
  if files.is_remote(path):
    fs, inner = files.filesystem(path)
    return fs.open(inner, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def _text(path: str, read: Callable[[], str]) -> str:
  """`read()`, with a binary or non-UTF-8 file named (the decoder's own error names no file)."""
  try:
    text = read()
  except UnicodeDecodeError as e:
    raise CorpusError(f"corpus file {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                      "convert it to UTF-8 or leave it out of corpus.path") from e
  if "\x00" in text:
    raise CorpusError(f"corpus file {path} holds NUL bytes: it looks binary; leave it out of "
                      "corpus.path")
  return text


def tfds_source(cfg: CorpusConfig):
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(cfg.path, split=cfg.split, data_dir=cfg.data_dir or None)
  except Exception as e:  # TFDS raises several types for a missing dataset, split or file format
    raise CorpusError(f"corpus.path={cfg.path!r} split={cfg.split!r} data_dir={cfg.data_dir!r}: "
                      f"TFDS cannot open it as a data source ({type(e).__name__}: {e}); build it "
                      "with file_format='array_record' (no TensorFlow needed) or fix the name") from e


def units(cfg: CorpusConfig) -> list[Unit]:
  """The corpus split into units, in corpus order. Raises CorpusError for a missing corpus."""
  n = cfg.docs_per_unit
  if cfg.kind == "builtin":
    total = len(_builtin_documents())
    return [("builtin", (a, min(a + n, total))) for a in range(0, total, n)]
  if cfg.kind == "files":
    paths = _match(cfg.path)
    if not paths:
      raise CorpusError(f"corpus.path={cfg.path!r} matches no files; give a glob of .txt or "
                        ".jsonl files")
    jsonl = [p for p in paths if p.endswith((".jsonl", ".json"))]
    text = [p for p in paths if p not in jsonl]
    out: list[Unit] = [("text", tuple(text[a:a + n])) for a in range(0, len(text), n)]
    return out + [("jsonl", p) for p in jsonl]
  if cfg.kind == "tfds":
    total = len(tfds_source(cfg))
    if total == 0:
      raise CorpusError(f"corpus {cfg.path!r} split {cfg.split!r} has no records")
    return [("tfds", (a, min(a + n, total))) for a in range(0, total, n)]
  raise CorpusError(f"corpus.kind={cfg.kind!r} is not one of builtin, files, tfds")


def documents(cfg: CorpusConfig, unit: Unit, source: Any = None) -> Iterator[str]:
  """The texts of one unit, in order. `source` is an open TFDS data source, if any."""
  kind, payload = unit
  if kind == "builtin":
    yield from _builtin_documents()[payload[0]:payload[1]]
  elif kind == "text":
    for path in payload:
      with _open_text(path) as f:
        yield _text(path, f.read)
  elif kind == "jsonl":
    with _open_text(payload) as f:
      for lineno, line in enumerate(iter(lambda: _text(payload, f.readline), ""), 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          text = record[cfg.text_field]
        except (ValueError, KeyError, TypeError) as e:
          raise CorpusError(f"{payload}:{lineno}: expected a JSON object with a "
                            f"{cfg.text_field!r} string (set corpus.text_field): {e}") from e
        yield text
  elif kind == "tfds":
    source = source if source is not None else tfds_source(cfg)
    for i in range(payload[0], payload[1]):
      record = source[i]
      if cfg.text_field not in record:
        raise CorpusError(f"TFDS {cfg.path!r} record {i} has no feature {cfg.text_field!r} "
                          f"(features: {', '.join(record)}); set corpus.text_field")
      text = record[cfg.text_field]
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
  else:
    raise CorpusError(f"unknown unit kind {kind!r}")


def pack(token_lists: Iterable[list[int]], context_length: int, bos: int, eos: int,
         pad: int) -> Iterator[tuple[np.ndarray, int]]:
  """Yields (tokens int32 [context_length], n_valid): BOS + up to context_length-1 tokens + PAD."""
  body = context_length - 1
  buffer: list[int] = []

  def emit(chunk: list[int]) -> tuple[np.ndarray, int]:
    seq = np.full(context_length, pad, np.int32)
    seq[0] = bos
    seq[1:1 + len(chunk)] = chunk
    return seq, 1 + len(chunk)

  for tokens in token_lists:
    if not tokens:
      continue
    buffer.extend(tokens)
    buffer.append(eos)
    while len(buffer) >= body:
      yield emit(buffer[:body])
      del buffer[:body]
  if buffer:
    yield emit(buffer)


def unit_sequences(cfg: CorpusConfig, unit: Unit, encode: Callable[[str], list[int]],
                   context_length: int, bos: int, eos: int, pad: int,
                   source: Any = None) -> Iterator[tuple[np.ndarray, int]]:
  texts = (t for t in documents(cfg, unit, source) if t and t.strip())
  return pack((encode(t) for t in texts), context_length, bos, eos, pad)
