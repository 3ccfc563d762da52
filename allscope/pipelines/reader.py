"""Reading an activation store: a Grain data source and loader over aligned records.

    store = ActivationStore("outputs/run/store")
    loader = store.loader(batch_size=4096, sites=("mlp_in", "mlp_out"), layers=(3,), seed=0)
    it = iter(loader)                 # grain.DataLoaderIterator
    batch = next(it)                  # {"mlp_in": bf16 [4096, 1, 640], "mlp_out": ...}
    state = it.get_state()            # bytes; it.set_state(state) resumes exactly there
    scale = store.norm_scale("mlp_in", (3,))  # [1] float32: mean |scale * x|^2 == 1

    batches = store.global_batches(4096, sites=("mlp_in", "mlp_out"), layers=(3,), seed=0)
    rows_k = batches.local(0, 2048)[k]  # rows [0, 2048) of global batch k (what the trainer reads)

The unit of random access is a record (`rows_per_record` rows, already shuffled across
sequences at harvest time); the loader shuffles records globally and shards them over JAX
processes. Only the chosen (site, layer) files are opened. Each file is checked against the
manifest's sha256 the first time a process opens it; a mismatch or a decode failure raises
CorruptShardError naming the file, so corrupt data is never served. A shard's last record is
partial when its row count is not a multiple of `rows_per_record`; the loader serves full
records only (`num_rows_served`), at most rows_per_record - 1 rows per shard left out.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import grain
import numpy as np

from allscope import files
from allscope.pipelines import codecs, store


class _Files:
  """Lazily opened, verified ArrayRecord readers over the shards of one store (picklable)."""

  def __init__(self, root: str, manifest: dict, verify: str):
    if verify not in ("checksum", "size", "none"):
      raise ValueError(f"verify={verify!r} is not one of checksum, size, none")
    self._root, self._verify = root, verify
    self._info = {rel: info for s in manifest["shards"] for rel, info in s["files"].items()}
    self._readers: dict[str, Any] = {}

  def __getstate__(self):
    return {**self.__dict__, "_readers": {}}

  def read(self, rel: str, record: int) -> bytes:
    reader = self._readers.get(rel)
    if reader is None:
      reader = self._readers[rel] = self._open(rel)
    try:
      return reader.read([record])[0]
    except Exception as e:  # decode failure inside the C++ reader
      raise store.CorruptShardError(f"{files.join(self._root, rel)}: record {record} cannot be "
                                    f"decoded ({e}); the shard is corrupt: {store.REPAIR}") from e

  def tensors(self, rel: str) -> dict[str, np.ndarray]:
    """A verified safetensors file of the store (a shard's codec scales), read once."""
    found = self._readers.get(rel)
    if found is None:
      from safetensors.numpy import load_file
      self._check(rel)
      found = self._readers[rel] = load_file(files.join(self._root, rel))
    return found

  def _open(self, rel: str):
    self._check(rel)
    return store.open_reader(files.join(self._root, rel))

  def _check(self, rel: str) -> None:
    path = files.join(self._root, rel)
    info = self._info[rel]
    if files.is_remote(path):
      raise store.StoreError(f"{path}: reading object storage directly is not supported; mount "
                             "the bucket (e.g. gcsfuse) and give the local path")
    if not os.path.exists(path):
      raise store.CorruptShardError(f"{path} is missing; the store is damaged: {store.REPAIR}")
    if self._verify != "none" and os.path.getsize(path) != info["bytes"]:
      raise store.CorruptShardError(f"{path}: {os.path.getsize(path)} bytes, the manifest says "
                                    f"{info['bytes']}; the shard is corrupt: {store.REPAIR}")
    if self._verify == "checksum":
      digest = files.digest(path)
      if digest != info["sha256"]:
        raise store.CorruptShardError(f"{path}: sha256 {digest[:16]}... does not match the "
                                      f"manifest ({info['sha256'][:16]}...); the shard is corrupt: "
                                      f"{store.REPAIR}")


class _Records:
  """Maps a global record index to (shard, record in shard), full records only."""

  def __init__(self, manifest: dict):
    r = manifest["rows_per_record"]
    self.shards = [s["shard"] for s in manifest["shards"]]
    full = np.array([s["rows"] // r for s in manifest["shards"]], np.int64)
    self.starts = np.concatenate([[0], np.cumsum(full)])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def locate(self, i: int) -> tuple[int, int]:
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} out of range [0, {len(self)})")
    k = int(np.searchsorted(self.starts, i, side="right") - 1)
    return self.shards[k], int(i - self.starts[k])


class ActivationSource:
  """Grain random-access source: record i -> {site: bf16 [rows_per_record, n_layers, width]}."""

  def __init__(self, root: str, manifest: dict, sites: Sequence[str], layers: Sequence[int],
               verify: str = "checksum"):
    self._root, self._sites, self._layers = root, tuple(sites), tuple(layers)
    self._widths = {s: manifest["widths"][s] for s in self._sites}
    self._r = manifest["rows_per_record"]
    self._codec = manifest.get("codec", "bf16")
    self._records = _Records(manifest)
    self._files = _Files(root, manifest, verify)

  def __len__(self) -> int:
    return len(self._records)

  def _decode(self, site: str, layer: int, shard: int, rec: int, data: bytes) -> np.ndarray:
    """One record's bytes -> bf16 [rows_per_record, width], whatever the store's codec."""
    rel, width, scale = f"{store.layer_dir(site, layer)}/{store.shard_name(shard)}", self._widths[site], None
    if self._codec in codecs.LOSSY:
      scale = self._files.tensors(store.scales_name(shard))[f"{site}/{layer}"]
    try:
      return codecs.decode(self._codec, data, self._r, width, scale)
    except Exception as e:  # a wrong size or a zstd frame that does not decode
      raise store.CorruptShardError(
          f"{files.join(self._root, rel)}: record {rec} cannot be decoded as {self._r} rows x "
          f"{width} {self._codec} ({e}); the shard is corrupt: {store.REPAIR}") from e

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    shard, rec = self._records.locate(int(i))
    name = store.shard_name(shard)
    out = {}
    for site, width in self._widths.items():
      rows = np.empty((self._r, len(self._layers), width), store.DTYPE)
      for j, layer in enumerate(self._layers):
        rel = f"{store.layer_dir(site, layer)}/{name}"
        rows[:, j] = self._decode(site, layer, shard, rec, self._files.read(rel, rec))
      out[site] = rows
    return out

  def __repr__(self) -> str:  # Grain compares it when restoring an iterator state
    return f"ActivationSource({self._root!r}, sites={self._sites}, layers={self._layers})"


class IndexSource:
  """Record i -> structured rows (sequence, position, token), aligned with ActivationSource."""

  def __init__(self, root: str, manifest: dict, verify: str = "checksum"):
    self._root, self._r = root, manifest["rows_per_record"]
    self._records = _Records(manifest)
    self._files = _Files(root, manifest, verify)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> np.ndarray:
    shard, rec = self._records.locate(int(i))
    data = self._files.read(f"index/{store.shard_name(shard)}", rec)
    return np.frombuffer(data, store.INDEX_DTYPE)

  def __repr__(self) -> str:
    return f"IndexSource({self._root!r})"


class _Flatten(grain.transforms.Map):
  """{site: [records, rows_per_record, L, d]} -> {site: [records * rows_per_record, L, d]}."""

  def map(self, batch):
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


class ActivationStore:
  """A finished activation store (refuses one without manifest.json)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.manifest = store.load_manifest(self.path)
    self.sites: tuple[str, ...] = tuple(self.manifest["sites"])
    self.layers: tuple[int, ...] = tuple(self.manifest["layers"])
    self.widths: dict[str, int] = dict(self.manifest["widths"])
    self.rows_per_record: int = self.manifest["rows_per_record"]
    self.num_rows: int = self.manifest["num_rows"]

  def heldout(self):
    """The held-out split (pipelines/heldout.py: tokens, n_valid, doc_start), checked against
    its sha256; raises StoreError naming the fix when the store has none."""
    from allscope.pipelines import heldout
    return heldout.read(self.path, self.manifest)

  def heldout_tokens(self) -> np.ndarray:
    """The held-out sequences' token ids [H, context_length] (BOS first, PAD after the text)."""
    return self.heldout().tokens

  def _check(self, sites: Sequence[str], layers: Sequence[int] | None) -> tuple[int, ...]:
    bad = [s for s in sites if s not in self.sites]
    if bad or not sites:
      raise ValueError(f"sites {list(sites)}: {bad or 'none given'}; {self.path} holds sites "
                       f"{list(self.sites)}")
    layers = self.layers if layers is None else tuple(layers)
    missing = [l for l in layers if l not in self.layers]
    if missing or not layers:
      raise ValueError(f"layers {list(layers)}: {missing or 'none given'} not in {self.path}, "
                       f"which holds layers {list(self.layers)}")
    return layers

  @property
  def num_rows_served(self) -> int:
    return len(_Records(self.manifest)) * self.rows_per_record

  def norm_scale(self, site: str, layers: Sequence[int] | None = None) -> np.ndarray:
    """float32 [len(layers)]: the scalar per layer that makes the mean squared norm 1."""
    layers = self._check((site,), layers)
    return np.array([self.manifest["stats"][site][str(l)]["norm_scale"] for l in layers],
                    np.float32)

  def mean_sq_norm(self, site: str, layers: Sequence[int] | None = None) -> np.ndarray:
    layers = self._check((site,), layers)
    return np.array([self.manifest["stats"][site][str(l)]["mean_sq_norm"] for l in layers])

  def mean(self, site: str, layers: Sequence[int] | None = None) -> np.ndarray:
    """float32 [len(layers), width]: the per-layer mean activation (from stats.safetensors)."""
    from safetensors.numpy import load_file
    layers = self._check((site,), layers)
    info = self.manifest["stats_file"]
    path = files.join(self.path, info["path"])
    if files.digest(path) != info["sha256"]:
      raise store.CorruptShardError(f"{path}: sha256 does not match the manifest; {store.REPAIR}")
    tensors = load_file(path)
    return np.stack([tensors[f"{site}/{l}/mean"] for l in layers])

  def source(self, sites: Sequence[str] = ("mlp_in", "mlp_out"),
             layers: Sequence[int] | None = None, verify: str = "checksum") -> ActivationSource:
    layers = self._check(tuple(sites), layers)
    return ActivationSource(self.path, self.manifest, sites, layers, verify)

  def index(self, verify: str = "checksum") -> IndexSource:
    """Where every row came from; record i matches record i of every source."""
    return IndexSource(self.path, self.manifest, verify)

  def global_batches(self, global_batch: int, sites: Sequence[str] = ("mlp_in", "mlp_out"),
                     layers: Sequence[int] | None = None, *, seed: int = 0, shuffle: bool = True,
                     verify: str = "checksum") -> GlobalBatches:
    """The training data position over this store (see GlobalBatches); full records only."""
    if global_batch <= 0 or global_batch % self.rows_per_record:
      raise ValueError(f"batch_size={global_batch} must be a positive multiple of the store's "
                       f"rows_per_record ({self.rows_per_record})")
    src = self.source(sites, layers, verify)
    if len(src) == 0:
      raise ValueError(f"{self.path} has no full record to serve")
    return GlobalBatches(src, self.rows_per_record, global_batch, seed, shuffle)

  def loader(self, batch_size: int, sites: Sequence[str] = ("mlp_in", "mlp_out"),
             layers: Sequence[int] | None = None, *, seed: int = 0, shuffle: bool = True,
             num_epochs: int | None = None, shard_options: grain.sharding.ShardOptions | None = None,
             worker_count: int = 0, verify: str = "checksum") -> grain.DataLoader:
    """A Grain DataLoader of {site: bf16 [batch_size, n_layers, width]} batches.

    Records are shuffled globally (seeded) and split over JAX processes (ShardByJaxProcess by
    default). `iter(loader)` gives an iterator with get_state()/set_state() for checkpoints.
    """
    if batch_size <= 0 or batch_size % self.rows_per_record:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the store's "
                       f"rows_per_record ({self.rows_per_record})")
    src = self.source(sites, layers, verify)
    if len(src) == 0:
      raise ValueError(f"{self.path} has no full record to serve")
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=len(src), shard_options=shard_options, shuffle=shuffle,
        num_epochs=num_epochs, seed=seed)
    ops = [grain.transforms.Batch(batch_size // self.rows_per_record, drop_remainder=True),
           _Flatten()]
    return grain.DataLoader(data_source=src, sampler=sampler, operations=ops,
                            worker_count=worker_count)


class GlobalBatches:
  """The data position of a training run: a seeded global order of records, cut into batches.

  Epoch e is a permutation of all n records (Grain's index_shuffle keyed by (seed, e));
  its first floor(n / m) * m records form steps_per_epoch global batches of m = global_batch /
  rows_per_record records, the rest of the epoch is skipped. Global batch k is therefore fixed by
  (store, seed, global_batch, k) alone, whatever the number of processes: a process reads the
  rows of global batch k that its devices hold (`local`), and a checkpoint at step k resumes any
  number of processes at global batch k.
  """

  def __init__(self, source, rows_per_record: int, global_batch: int, seed: int = 0,
               shuffle: bool = True):
    if global_batch <= 0 or global_batch % rows_per_record:
      raise ValueError(f"batch_size={global_batch} must be a positive multiple of the store's "
                       f"rows_per_record ({rows_per_record})")
    self.source, self.rows_per_record, self.global_batch = source, rows_per_record, global_batch
    self.seed, self.shuffle = seed, shuffle
    self.records_per_batch = global_batch // rows_per_record
    self.steps_per_epoch = len(source) // self.records_per_batch
    if self.steps_per_epoch == 0:
      raise ValueError(f"the data holds {len(source)} records of {rows_per_record} rows, fewer "
                       f"than one global batch of {global_batch} rows; lower the batch size or "
                       "harvest more tokens")

  def records(self, step: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Record indices [start, stop) of global batch `step` (0-based), in row order."""
    epoch, k = divmod(int(step), self.steps_per_epoch)
    m = self.records_per_batch
    stop = m if stop is None else stop
    positions = range(k * m + start, k * m + stop)
    if not self.shuffle:
      return np.asarray(positions, np.int64)
    # Grain's Feistel index shuffle: a permutation of the epoch in O(1) memory.
    seed = int(np.random.SeedSequence((self.seed, epoch)).generate_state(1)[0])
    last = len(self.source) - 1
    return np.asarray([grain.experimental.index_shuffle(i, max_index=last, seed=seed, rounds=4)
                       for i in positions], np.int64)

  def local(self, row_start: int, row_stop: int) -> grain.MapDataset:
    """Element k: rows [row_start, row_stop) of global batch k, {site: [rows, n_layers, width]}."""
    r = self.rows_per_record
    if not 0 <= row_start < row_stop <= self.global_batch or row_start % r or row_stop % r:
      raise ValueError(f"rows [{row_start}, {row_stop}) of a {self.global_batch}-row batch do not "
                       f"fall on records of {r} rows; make the per-device batch "
                       f"(batch_size / mesh_data) a multiple of {r}")

    def read(step: int) -> dict[str, np.ndarray]:
      ids = self.records(step, row_start // r, row_stop // r)
      parts = [self.source[int(i)] for i in ids]
      return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return grain.MapDataset.range(0, 1 << 62).map(read)

  def __repr__(self) -> str:
    return (f"GlobalBatches({self.source!r}, global_batch={self.global_batch}, seed={self.seed}, "
            f"shuffle={self.shuffle})")


def open_store(path: str | os.PathLike) -> ActivationStore:
  return ActivationStore(path)
