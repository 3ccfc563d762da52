"""Planning a harvest (driver side, cheap): check every input, resolve the layers, choose the
corpus units and fix the store's identity, all without loading the model's weights."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any

from allscope import models
from allscope.models.loader import ModelConfig
from allscope.pipelines import corpus as corpus_lib
from allscope.pipelines import store
from allscope.pipelines.config import HarvestConfig

# Settings that change how a harvest runs but not the bytes it writes.
# A mesh changes only the order of split sums, so rows agree to bf16 rounding across meshes.
_RUNTIME_FIELDS = ("num_workers", "devices_per_worker", "mesh_data", "mesh_model", "overwrite",
                   "progress", "beam_args")


class HarvestError(ValueError):
  """Bad harvest input, raised before any model weights are loaded."""


def describe(model_cfg: ModelConfig):
  """(architecture, tokenizer) from the weights' metadata; the weights are not loaded."""
  return models.describe(model_cfg.name)


@dataclasses.dataclass(frozen=True)
class Plan:
  cfg: HarvestConfig
  model_cfg: ModelConfig
  output_dir: str
  layers: tuple[int, ...]
  widths: dict[str, int]
  units: tuple[corpus_lib.Unit, ...]
  num_sequences: int  # sequences wanted (the store holds fewer if the corpus runs out)
  identity: dict[str, Any]  # what makes two stores the same; written to harvest.json

  @property
  def num_shards(self) -> int:
    return math.ceil(self.num_sequences / self.cfg.sequences_per_shard)


def plan(cfg: HarvestConfig, model_cfg: ModelConfig, output_dir: str, *, arch=None,
         tokenizer=None) -> Plan:
  """Checks every input and fixes the work, without loading the model's weights.

  `arch` and `tokenizer` skip reading them from the weights' metadata when already at hand.
  """
  try:
    cfg.validate()
  except ValueError as e:
    raise HarvestError(str(e)) from e
  if arch is None or tokenizer is None:
    arch, tokenizer = describe(model_cfg)
  layers = tuple(cfg.layers) if cfg.layers else tuple(range(arch.n_layers))
  bad = [l for l in layers if not 0 <= l < arch.n_layers]
  if bad:
    raise HarvestError(f"harvest.layers: layer(s) {bad} out of range; {model_cfg.name} has "
                       f"{arch.n_layers} layers (0..{arch.n_layers - 1})")
  if cfg.context_length > arch.max_context:
    raise HarvestError(f"harvest.context_length={cfg.context_length} exceeds the maximum context "
                       f"of {model_cfg.name} ({arch.max_context}); lower it")
  try:
    units = corpus_lib.units(cfg.corpus)
  except corpus_lib.CorpusError as e:
    raise HarvestError(str(e)) from e
  # Estimate sequences per unit from the first unit with text, and read only as many units as
  # the budget needs (+25%); this is deterministic, so a re-run picks the same units.
  source = corpus_lib.tfds_source(cfg.corpus) if cfg.corpus.kind == "tfds" else None
  num_sequences = math.ceil(cfg.token_budget / (cfg.context_length - 1))
  per_unit, first = 0, 0
  for first, unit in enumerate(units):
    per_unit = sum(1 for _ in itertools.islice(corpus_lib.unit_sequences(
        cfg.corpus, unit, lambda t: tokenizer.encode(t, add_bos=False), cfg.context_length,
        arch.bos_id, arch.eos_id, arch.pad_id, source), num_sequences))
    if per_unit:
      break
  if not per_unit:
    raise HarvestError(f"the corpus ({cfg.corpus.kind} {cfg.corpus.path!r}) holds no text: "
                       f"{len(units)} unit(s) read, all empty")
  wanted = num_sequences + cfg.heldout_sequences  # the held-out split follows the training ids
  n_units = min(len(units), first + 1 + math.ceil(1.25 * wanted / per_unit))
  widths = {s: arch.site_widths[s] for s in cfg.sites}
  harvest_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUNTIME_FIELDS}
  harvest_cfg["layers"] = list(layers)
  identity = json.loads(json.dumps({
      "format": store.FORMAT, "schema_version": store.SCHEMA_VERSION,
      "model": {"name": model_cfg.name, "dtype": model_cfg.dtype,
                "fingerprint": models.fingerprint(model_cfg.name),
                "config": dataclasses.asdict(arch)},
      "tokenizer": {"vocab_size": arch.vocab_size, "bos_id": arch.bos_id, "eos_id": arch.eos_id,
                    "pad_id": arch.pad_id},
      "harvest": harvest_cfg, "units": len(units[:n_units])}))  # as read back from JSON
  return Plan(cfg, model_cfg, output_dir, layers, widths, tuple(units[:n_units]), num_sequences,
              identity)
