"""The harvest's Beam transforms: tokenize and pack, number the sequences, harvest each shard.

    units --TokenizePack--> (unit, j, tokens) --AssignIds(prefix sums)--> (shard, (id, tokens))
      --GroupByKey--> HarvestShard (forward, shuffle, write, receipt) --Combine--> manifest.json

Sequence ids are global ranks in (unit, position) order, so shard contents do not depend on
how the work is spread. A shard is the unit of work, of shuffling and of resume: its files are
written under temporary names and renamed, then its receipt is written; a re-run keeps a shard
only when every file matches its receipt (size and sha256) and rewrites it otherwise. The
manifest is written last, by the one task that sees every receipt.
"""

from __future__ import annotations

import itertools
import logging
import time

import apache_beam as beam
import numpy as np

from allscope.pipelines import corpus as corpus_lib
from allscope.pipelines import heldout, store, worker
from allscope.pipelines.planning import Plan

log = logging.getLogger(__name__)


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
_MS_FORWARD = beam.metrics.Metrics.counter("harvest", "forward_ms")  # capture + host copy
_MS_WRITE = beam.metrics.Metrics.counter("harvest", "write_ms")  # shuffle gather excluded


class HarvestShard(beam.DoFn):
  """(shard, sequences) -> receipt: forward, shuffle, write, commit.

  The model is loaded once per worker process (beam.utils.shared), and only when a shard
  actually needs computing, so resuming a finished harvest loads nothing.
  """

  def __init__(self, p: Plan, arch, handles: worker.Handles, job_id: str):
    self._cfg, self._model_cfg, self._root = p.cfg, p.model_cfg, p.output_dir
    self._layers, self._widths, self._handles = p.layers, p.widths, handles
    self._arch, self._job_id = arch, job_id
    self._slot = None

  def _forward(self):
    if self._slot is None:
      self._slot = self._handles.slot()
    return worker.forward(self._slot, self._cfg, self._model_cfg, self._arch, self._job_id,
                          self._widths, self._layers)

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
      damaged = store.damaged_files(self._root, receipt)
      if receipt["sequences"] == meta["sequences"] and not damaged:
        yield receipt
        return
      log.warning("shard %d: %s; rewriting it", shard,
                  f"{len(damaged)} file(s) differ from the receipt ({', '.join(damaged[:3])})"
                  if damaged else "the receipt holds other sequences")
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


def build(pipeline: beam.Pipeline, p: Plan, arch, tokenizer, handles: worker.Handles,
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
