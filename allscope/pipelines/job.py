"""The harvest job: corpus -> packed sequences -> Gemma 3 forward -> shuffled, aligned store.

    units --TokenizePack--> (unit, j, tokens) --AssignIds(prefix sums)--> (shard, (id, tokens))
      --GroupByKey--> HarvestShard (forward, shuffle, write, receipt) --Combine--> manifest.json

Sequence ids are global ranks in (unit, position) order, so shard contents do not depend on
how the work is spread. A shard is the unit of work, of shuffling and of resume: its files are
written under temporary names and renamed, then its receipt is written; a re-run skips shards
with an intact receipt. The manifest is written last, by the one task that sees every receipt.
Locally the pipeline runs on Beam's FnApiRunner (N processes); `beam_args` send it elsewhere
(DaskRunner, Dataflow, Flink, Spark). Each worker process claims its own devices
(pipelines/devices.py) and shards the model over them (models/sharding.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from typing import Any

import apache_beam as beam
import jax
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.utils import shared

from allscope import models
from allscope.models import sharding
from allscope.models.loader import ModelConfig
from allscope.pipelines import corpus as corpus_lib
from allscope.pipelines import devices, heldout, store
from allscope.pipelines.config import SITES, HarvestConfig

log = logging.getLogger(__name__)

# Settings that change how a harvest runs but not the bytes it writes.
# A mesh changes only the order of split sums, so rows agree to bf16 rounding across meshes.
_RUNTIME_FIELDS = ("num_workers", "devices_per_worker", "mesh_data", "mesh_model", "overwrite",
                   "progress", "beam_args")


class HarvestError(ValueError):
  """Bad harvest input, raised before any model weights are loaded."""


# ---------------------------------------------------------------------------------------------
# Model access (the only places that touch allscope.models).

def describe(model_cfg: ModelConfig):
  """(architecture, tokenizer) from the weights' metadata; the weights are not loaded."""
  return models.describe(model_cfg.name)


def load_model(model_cfg: ModelConfig, placement=None):
  """The model's weights, each placed by `placement` (models.load's sharding hook) as read."""
  model, _ = models.load(model_cfg.name, dtype=model_cfg.dtype, sharding=placement)
  return model


capture_fn = sharding.capture_fn


class _Slot:
  """One worker process's model, devices and compiled captures (shared by its DoFn threads
  through beam.utils.shared, which needs a weak-referenceable value)."""

  def __init__(self, model=None):
    self.model = model  # a model handed in by the driver, or None until loaded
    self.claim: devices.Claim | None = None
    self.mesh = None
    self.compiled: dict[tuple, Any] = {}  # per-process jitted captures of the model
    self.lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class _Handles:
  """The per-process shared model: each worker process loads it at most once, and an
  in-process worker reuses the driver's when one was passed in (the driver holds it)."""

  model: shared.Shared = dataclasses.field(default_factory=shared.Shared)


# ---------------------------------------------------------------------------------------------
# Planning (driver side, cheap): validate, resolve layers, choose the corpus units.

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


def _prepare_output(p: Plan) -> dict | None:
  """Claims the output folder. Returns the manifest if the same store is already complete."""
  root = p.output_dir
  spec_path = store.join(root, store.SPEC)
  if store.exists(spec_path):
    found = store.read_json(spec_path)
    if found == p.identity:
      if store.exists(store.join(root, store.MANIFEST)):
        return store.load_manifest(root)
      return None  # same harvest, unfinished: resume
    if not p.cfg.overwrite:
      diff = sorted(k for k in set(found) | set(p.identity) if found.get(k) != p.identity.get(k))
      raise HarvestError(f"{root} holds a different activation store (differs in: "
                         f"{', '.join(diff)}); choose another output or set harvest.overwrite=True")
  elif not store.is_remote(root) and os.path.isdir(root) and os.listdir(root):
    if not p.cfg.overwrite:
      raise HarvestError(f"{root} is not empty and holds no activation store; choose an empty "
                         "output or set harvest.overwrite=True")
  if p.cfg.overwrite:
    _remove_store(root)
  if not store.is_remote(root):
    os.makedirs(root, exist_ok=True)
  store.write_text_atomic(root, store.SPEC, store.dumps(p.identity))
  return None


def _remove_store(root: str) -> None:
  """Deletes what a harvest writes (and nothing else) under root."""
  if store.is_remote(root):
    from apache_beam.io.filesystems import FileSystems
    if FileSystems.exists(root):
      FileSystems.delete([root])
    return
  if not os.path.isdir(root):
    return
  for name in os.listdir(root):
    path = os.path.join(root, name)
    if (name in (store.MANIFEST, store.SPEC, store.STATS, heldout.FILE)
        or name.startswith(store.SPEC + ".tmp")):
      os.remove(path)
    elif name in ("index", store.RECEIPTS, *SITES):
      shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# Beam transforms.

class TokenizePack(beam.DoFn):
  """unit index, unit -> (unit index, j, tokens int32 [context], n_valid).

  The driver's tokenizer travels with the DoFn (a few MB of SentencePiece model), so workers
  do not re-read the weights' metadata (tens of seconds for a GGUF) just to tokenize.
  """

  def __init__(self, p: Plan, arch, tokenizer):
    self._corpus, self._ctx = p.cfg.corpus, p.cfg.context_length
    # a unit's sequence j >= this is never kept (id >= j), held-out ids included
    self._limit = p.num_sequences + p.cfg.heldout_sequences
    self._special = (arch.bos_id, arch.eos_id, arch.pad_id)
    self._tokenizer = tokenizer

  def setup(self):
    self._source = (corpus_lib.tfds_source(self._corpus) if self._corpus.kind == "tfds" else None)

  def process(self, element):
    u, unit = element
    encode = lambda t: self._tokenizer.encode(t, add_bos=False)
    seqs = corpus_lib.unit_sequences(self._corpus, unit, encode, self._ctx, *self._special,
                                     source=self._source)
    for j, (tokens, n_valid) in enumerate(itertools.islice(seqs, self._limit)):
      yield u, j, tokens, n_valid


def _offsets(counts: dict[int, int], n_units: int) -> list[int]:
  out, total = [], 0
  for u in range(n_units):
    out.append(total)
    total += counts.get(u, 0)
  return out


def _assign(seq, offsets: list[int], num_sequences: int, per_shard: int):
  u, j, tokens, n_valid = seq
  gid = offsets[u] + j
  if gid < num_sequences:
    yield gid // per_shard, (gid, tokens, n_valid)


_TOKENS = beam.metrics.Metrics.counter("harvest", "tokens_written")
_MS_LOAD = beam.metrics.Metrics.counter("harvest", "model_load_ms")
_MS_FORWARD = beam.metrics.Metrics.counter("harvest", "forward_ms")  # capture + host copy
_MS_WRITE = beam.metrics.Metrics.counter("harvest", "write_ms")  # shuffle gather excluded


class HarvestShard(beam.DoFn):
  """(shard, sequences) -> receipt: forward, shuffle, write, commit.

  The model is loaded once per worker process (beam.utils.shared), and only when a shard
  actually needs computing, so resuming a finished harvest loads nothing.
  """

  def __init__(self, p: Plan, arch, handles: _Handles, job_id: str):
    self._cfg, self._model_cfg, self._root = p.cfg, p.model_cfg, p.output_dir
    self._layers, self._widths, self._handles = p.layers, p.widths, handles
    self._arch, self._job_id = arch, job_id
    self._slot = None

  def _forward(self):
    if self._slot is None:
      self._slot = self._handles.model.acquire(_Slot)
    slot, cfg = self._slot, self._cfg
    with slot.lock:
      if slot.claim is None:
        start = time.perf_counter()
        claim = devices.claim(self._job_id, cfg.num_workers, cfg.devices_per_worker)
        if len(claim.devices) > 1 or cfg.mesh_model > 1:
          slot.mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_model, claim.devices)
          if cfg.batch_size % slot.mesh.shape["data"]:
            raise ValueError(f"harvest.batch_size={cfg.batch_size} does not divide over this "
                             f"worker's mesh (data={slot.mesh.shape['data']}, model="
                             f"{slot.mesh.shape['model']}); make it a multiple of mesh_data")
          placement = sharding.param_sharding(slot.mesh, self._arch)
        else:
          placement = jax.sharding.SingleDeviceSharding(claim.devices[0])
        if slot.model is None:
          slot.model = load_model(self._model_cfg, placement)
        else:  # the driver's model: a copy placed on this worker's devices
          slot.model = sharding.place(slot.model, placement)
        slot.claim = claim
        _MS_LOAD.inc(int(1000 * (time.perf_counter() - start)))
      key = (tuple(self._widths), self._layers)
      if key not in slot.compiled:
        slot.compiled[key] = capture_fn(slot.model, *key, mesh=slot.mesh)
      return slot.model, slot.compiled[key]

  def process(self, element):
    shard, items = element
    items = sorted(items, key=lambda x: x[0])
    ids = [gid for gid, _, _ in items]
    meta = {"sequences": [ids[0], ids[-1] + 1]}
    if ids != list(range(ids[0], ids[-1] + 1)):
      raise RuntimeError(f"shard {shard}: sequence ids are not contiguous ({ids[:5]}...)")
    found = store.read_receipt(self._root, shard)
    if found is not None:
      receipt, _ = found
      if receipt["sequences"] == meta["sequences"] and store.receipt_intact(self._root, receipt):
        yield receipt
        return
    rows = self._compute(shard, items)
    start = time.perf_counter()
    receipt, _ = store.write_shard(self._root, rows, self._cfg.rows_per_record, meta,
                                   codec=self._cfg.codec)
    _MS_WRITE.inc(int(1000 * (time.perf_counter() - start)))
    _TOKENS.inc(len(rows.index))
    yield receipt

  def _compute(self, shard: int, items) -> store.ShardRows:
    cfg = self._cfg
    model, forward = self._forward()
    tokens = np.stack([t for _, t, _ in items])
    n_valid = np.array([n for _, _, n in items])
    gids = np.array([g for g, _, _ in items], np.int64)
    positions = np.arange(cfg.context_length)
    keep = (positions[None, :] >= 1) & (positions[None, :] < n_valid[:, None])  # no BOS, no PAD
    n_rows = int(keep.sum())
    index = np.empty(n_rows, store.INDEX_DTYPE)
    index["sequence"] = np.broadcast_to(gids[:, None], keep.shape)[keep]
    index["position"] = np.broadcast_to(positions[None, :], keep.shape)[keep]
    index["token"] = tokens[keep]
    acts = {s: np.empty((n_rows, len(self._layers), w), store.DTYPE)
            for s, w in self._widths.items()}
    b = cfg.batch_size

    def launch(start: int):  # dispatches one forward; jax returns before it finishes
      batch, valid = tokens[start:start + b], n_valid[start:start + b]
      if len(batch) < b:  # pad with empty sequences so every forward has one compiled shape
        pad = np.full((b - len(batch), cfg.context_length), model.config.pad_id, np.int32)
        batch = np.concatenate([batch, pad])
        valid = np.concatenate([valid, np.zeros(b - len(valid), valid.dtype)])
      mask = positions[None, :] < valid[:, None]
      return start, forward(batch, mask)

    t0 = time.perf_counter()
    starts = list(range(0, len(items), b))
    pending, filled = launch(starts[0]), 0
    for k in range(len(starts)):
      start, out = pending
      if k + 1 < len(starts):  # keep the device busy while this batch is copied out
        pending = launch(starts[k + 1])
      sel = keep[start:start + b]
      count = int(sel.sum())
      for site, x in out.items():
        acts[site][filled:filled + count] = np.asarray(x)[:len(sel)][sel]
      filled += count
    _MS_FORWARD.inc(int(1000 * (time.perf_counter() - t0)))
    # Rows are shuffled across the shard's sequences, the same way for a seed and shard.
    perm = np.random.default_rng([cfg.seed, shard]).permutation(n_rows)
    return store.ShardRows(shard, index[perm], {s: a[perm] for s, a in acts.items()},
                           self._layers)


def _finish(receipts: list[dict], p: Plan, heldout_entry: dict | None) -> None:
  store.finish(p.output_dir, p.identity, receipts, sites=p.cfg.sites, layers=p.layers,
               widths=p.widths, rows_per_record=p.cfg.rows_per_record,
               context_length=p.cfg.context_length, codec=p.cfg.codec, heldout=heldout_entry)


def _write_heldout(items, p: Plan, eos_id: int) -> dict | None:
  if not p.cfg.heldout_sequences:
    return None
  return heldout.write(items, p.output_dir, num_sequences=p.num_sequences,
                       context_length=p.cfg.context_length, eos_id=eos_id)


def build(pipeline: beam.Pipeline, p: Plan, arch, tokenizer, handles: _Handles,
          job_id: str) -> None:
  seqs = (pipeline
          | "Units" >> beam.Create(list(enumerate(p.units)))
          | "SpreadUnits" >> beam.Reshuffle()
          | "TokenizePack" >> beam.ParDo(TokenizePack(p, arch, tokenizer)))
  offsets = (seqs
             | "One" >> beam.Map(lambda s: (s[0], 1))
             | "CountPerUnit" >> beam.CombinePerKey(sum)
             | "ToDict" >> beam.combiners.ToDict()
             | "PrefixSums" >> beam.Map(_offsets, len(p.units)))
  split = (seqs
           | "HeldOut" >> beam.FlatMap(heldout.select, beam.pvalue.AsSingleton(offsets),
                                       p.num_sequences, p.cfg.heldout_sequences)
           | "GatherHeldOut" >> beam.combiners.ToList()
           | "WriteHeldOut" >> beam.Map(_write_heldout, p, arch.eos_id))
  (seqs
   | "AssignIds" >> beam.FlatMap(_assign, beam.pvalue.AsSingleton(offsets), p.num_sequences,
                                 p.cfg.sequences_per_shard)
   | "GroupShards" >> beam.GroupByKey()
   | "HarvestShard" >> beam.ParDo(HarvestShard(p, arch, handles, job_id))
   | "Gather" >> beam.CombineGlobally(beam.combiners.ToListCombineFn()).without_defaults()
   | "WriteManifest" >> beam.Map(_finish, p, beam.pvalue.AsSingleton(split)))


def pipeline_options(cfg: HarvestConfig) -> PipelineOptions:
  args = list(cfg.beam_args)
  if cfg.num_workers > 1 and not any(a.startswith("--direct_num_workers") for a in args):
    args += [f"--direct_num_workers={cfg.num_workers}", "--direct_running_mode=multi_processing"]
  return PipelineOptions(args)


def _runner(options: PipelineOptions):
  if options.view_as(StandardOptions).runner:
    return None  # the user named one (Dataflow, Flink, Spark, ...)
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  return FnApiRunner()


class _Progress:
  """A tqdm bar fed by finished-shard receipts (works across worker processes)."""

  def __init__(self, p: Plan):
    self._root = p.output_dir
    self._total = p.num_sequences * (p.cfg.context_length - 1)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _rows(self, seen: dict[str, int]) -> int:
    folder = os.path.join(self._root, store.RECEIPTS)
    if os.path.isdir(folder):
      for name in os.listdir(folder):
        if name.endswith(".safetensors") and name not in seen:
          found = store.read_receipt(self._root, int(name[6:11]))
          seen[name] = found[0]["rows"] if found else 0
    return sum(seen.values())

  def _run(self):
    from tqdm import tqdm
    seen: dict[str, int] = {}
    bar = tqdm(total=self._total, initial=self._rows(seen), unit="tok", unit_scale=True,
               desc="harvest", smoothing=0.1)
    while not self._stop.wait(1.0):
      bar.update(self._rows(seen) - bar.n)
    bar.update(self._rows(seen) - bar.n)
    bar.close()

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def harvest(cfg: HarvestConfig, model_cfg: ModelConfig, output_dir: str, *, model=None,
            tokenizer=None) -> dict:
  """Runs (or resumes) a harvest into output_dir and returns the store's manifest.

  Every input is checked before the model loads. A finished identical store is returned as is;
  an unfinished one is resumed (finished shards are kept); a different one is refused unless
  cfg.overwrite. `model` / `tokenizer`: already loaded ones for `model_cfg`, reused by
  in-process workers instead of loading again (worker processes always load their own).
  See docs/harvest.md.
  """
  return run(cfg, model_cfg, output_dir, model=model, tokenizer=tokenizer)[0]


def run(cfg: HarvestConfig, model_cfg: ModelConfig, output_dir: str, *, model=None,
        tokenizer=None) -> tuple[dict, dict]:
  """`harvest`, also returning the job's counters (tokens_written, *_ms, wall_s)."""
  arch = model.config if model is not None else None
  if arch is None or tokenizer is None:
    arch, tokenizer = describe(model_cfg)
  if model is not None and model.config != arch:
    raise HarvestError(f"the model passed in does not match {model_cfg.name}: "
                       f"{model.config} != {arch}")
  p = plan(cfg, model_cfg, output_dir, arch=arch, tokenizer=tokenizer)
  done = _prepare_output(p)
  if done is not None:
    log.info("%s already holds this harvest (manifest present); nothing to do", output_dir)
    return done, {}
  handles = _Handles()
  held = handles.model.acquire(lambda: _Slot(model)) if model is not None else None  # noqa: F841
  options = pipeline_options(cfg)
  show = cfg.progress and not store.is_remote(output_dir)
  job_id = uuid.uuid4().hex  # names this run's device slots on every host
  start = time.perf_counter()
  try:
    with (_Progress(p) if show else contextlib.nullcontext()):
      pipeline = beam.Pipeline(runner=_runner(options), options=options)
      build(pipeline, p, arch, tokenizer, handles, job_id)
      result = pipeline.run()
      try:
        result.wait_until_finish()
      finally:
        client = getattr(result, "client", None)  # DaskRunner leaves its Dask client connected
        if client is not None:
          client.close()
  finally:
    shutil.rmtree(devices.slot_folder(job_id), ignore_errors=True)
  counters = {"wall_s": time.perf_counter() - start}
  try:
    found = result.metrics().query()["counters"]
  except NotImplementedError:  # DaskRunner keeps no metrics; the store is complete regardless
    found = []
  for c in found:
    counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (
        c.committed if c.committed is not None else c.attempted)
  manifest = store.load_manifest(output_dir)
  if manifest["num_sequences"] < p.num_sequences:
    log.warning("the corpus ran out: %d of %d sequences harvested (%d tokens)",
                manifest["num_sequences"], p.num_sequences, manifest["num_tokens"])
  split = manifest.get("heldout") or {"sequences": 0}
  if split["sequences"] < cfg.heldout_sequences:
    log.warning("the corpus ran out: %d of %d held-out sequences written after the %d training "
                "sequences; evaluation will have fewer held-out tokens", split["sequences"],
                cfg.heldout_sequences, manifest["num_sequences"])
  return manifest, counters
