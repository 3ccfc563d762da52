"""Typed settings of the harvest stage (corpus, sites, layers, sizes, workers)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from allscope.models.sites import SITES


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """Where the text comes from.

  kind="builtin": the English reference text that ships with CPython (`pydoc_data.topics`).
  kind="files": `path` is a glob of .txt files (one document per file) or .jsonl files (one
    document per line, the text in `text_field`).
  kind="tfds": `path` is a TFDS dataset name (`name[/config][:version]`) read with
    `tfds.data_source` (array_record files, no TensorFlow), `split` and `data_dir` as in TFDS.
  """

  kind: Literal["builtin", "files", "tfds"] = "builtin"
  path: str = ""
  split: str = "train"
  data_dir: str = ""
  text_field: str = "text"
  docs_per_unit: int = 256  # documents tokenized and packed together by one worker task

  def validate(self) -> None:
    if self.kind in ("files", "tfds") and not self.path:
      raise ValueError(f"corpus.kind={self.kind!r} needs corpus.path (a glob or a TFDS name)")
    if self.docs_per_unit < 1:
      raise ValueError(f"corpus.docs_per_unit={self.docs_per_unit} must be >= 1")


@dataclasses.dataclass(frozen=True)
class HarvestConfig:
  """What to capture and how to write it (see docs/harvest.md)."""

  corpus: CorpusConfig = CorpusConfig()
  sites: tuple[str, ...] = ("mlp_in", "mlp_out")
  layers: tuple[int, ...] = ()  # empty: every layer of the model
  context_length: int = 1024  # tokens per packed sequence, BOS included
  token_budget: int = 1_000_000  # packed tokens to harvest (BOS excluded); the store may hold fewer
  batch_size: int = 8  # sequences per model forward
  # Packed sequences after the training ones, kept as token ids in the store's held-out split
  # (pipelines/heldout.py) for evaluation; they are never harvested as rows.
  heldout_sequences: int = 16
  sequences_per_shard: int = 16  # one shard = this many sequences, shuffled together, in memory
  rows_per_record: int = 32  # rows per ArrayRecord record (the reader's unit of random access)
  seed: int = 0  # row shuffle within shards
  # Record encoding (pipelines/codecs.py): bf16, zstd, int8, fp8, int8_zstd, fp8_zstd.
  codec: str = "bf16"
  # Worker processes per host: FnApiRunner starts this many; with any runner, the processes of
  # one host split its devices between them (each claims its own `devices_per_worker`).
  num_workers: int = 1
  devices_per_worker: int = 0  # 0: the host's devices divided evenly among num_workers
  mesh_data: int = -1  # per-worker mesh over its devices: batch rows (-1: what model leaves)
  mesh_model: int = 1  # tensor parallel over attention heads and MLP width
  overwrite: bool = False  # replace a different store found at the output path
  progress: bool = True
  beam_args: tuple[str, ...] = ()  # standard Beam pipeline options, e.g. ("--runner=DataflowRunner",)

  def validate(self) -> None:
    unknown = [s for s in self.sites if s not in SITES]
    if unknown or not self.sites:
      raise ValueError(f"harvest.sites={self.sites!r}: unknown site(s) {unknown}; valid sites: "
                       f"{', '.join(SITES)}")
    if len(set(self.sites)) != len(self.sites):
      raise ValueError(f"harvest.sites={self.sites!r} lists a site twice")
    if any(l < 0 for l in self.layers) or len(set(self.layers)) != len(self.layers):
      raise ValueError(f"harvest.layers={self.layers!r} must be distinct non-negative layer indices")
    if self.context_length < 2:
      raise ValueError(f"harvest.context_length={self.context_length} must be >= 2 (BOS + a token)")
    for name in ("token_budget", "batch_size", "sequences_per_shard", "rows_per_record",
                 "num_workers", "mesh_model"):
      if getattr(self, name) < 1:
        raise ValueError(f"harvest.{name}={getattr(self, name)} must be >= 1")
    if self.seed < 0:
      raise ValueError(f"harvest.seed={self.seed} must be >= 0")
    if self.heldout_sequences < 0:
      raise ValueError(f"harvest.heldout_sequences={self.heldout_sequences} must be >= 0")
    if self.devices_per_worker < 0:
      raise ValueError(f"harvest.devices_per_worker={self.devices_per_worker} must be >= 0 "
                       "(0: divide the host's devices among num_workers)")
    if self.mesh_data == 0 or self.mesh_data < -1:
      raise ValueError(f"harvest.mesh_data={self.mesh_data} must be >= 1, or -1 (fill)")
    if self.mesh_data > 0 and self.batch_size % self.mesh_data:
      raise ValueError(f"harvest.batch_size={self.batch_size} is not divisible by "
                       f"harvest.mesh_data={self.mesh_data}")
    from allscope.pipelines import codecs
    codecs.check(self.codec)
    self.corpus.validate()
