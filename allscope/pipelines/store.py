"""The activation store on disk: layout, manifest schema, shard writing and verified reading.

Layout under the output folder (see docs/harvest.md):

  harvest.json                         what this store is (written first; resume checks it)
  <site>/layer_<l>/shard_<k>.array_record   rows, `rows_per_record` per record, in the codec
  scales/shard_<k>.safetensors         per-channel scales of an int8/fp8 store (see codecs.py)
  index/shard_<k>.array_record         the same records' (sequence, position, token) triples
  _receipts/shard_<k>.safetensors      a finished shard: checksums and statistic sums
  stats.safetensors                    per (site, layer) mean vectors
  manifest.json                        written last: a store without it is incomplete

Record i of shard k holds the same tokens in every (site, layer) file and in the index file.
Files are written under temporary names and renamed (allscope.files.atomic_write), so a name
that exists is complete.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import json
import os
from typing import Any, Iterable

import ml_dtypes
import numpy as np
from array_record.python import array_record_module
import safetensors.numpy
from safetensors.numpy import save_file

from allscope import files
from allscope.pipelines import codecs

SCHEMA_VERSION = 1
FORMAT = "allscope.activation_store"
MANIFEST = "manifest.json"
SPEC = "harvest.json"
STATS = "stats.safetensors"
RECEIPTS = "_receipts"
DTYPE = ml_dtypes.bfloat16
INDEX_DTYPE = np.dtype([("sequence", "<i8"), ("position", "<i4"), ("token", "<i4")])
# Group size 1 gives random access to every record; compression, if any, is the codec's (per
# record), since riegeli's own would need groups of records.
WRITER_OPTIONS = "group_size:1,uncompressed"
READER_OPTIONS = "readahead_buffer_size:0"


class StoreError(RuntimeError):
  """An activation store that cannot be used as it is; the message names the file and the fix."""


class IncompleteStoreError(StoreError):
  pass


class CorruptShardError(StoreError):
  pass


# ---------------------------------------------------------------------------------------------
# Names. Paths, digests and atomic writes are allscope.files'.

# What to do about a damaged store: the re-harvest checks every shard against its receipt.
REPAIR = ("re-run the same harvest command on this output: it checks every shard against its "
          "receipt and rewrites the damaged ones")


def layer_dir(site: str, layer: int) -> str:
  return f"{site}/layer_{layer}"


def shard_name(shard: int) -> str:
  return f"shard_{shard:05d}.array_record"


def scales_name(shard: int) -> str:
  return f"scales/shard_{shard:05d}.safetensors"


def shard_files(sites: tuple[str, ...], layers: tuple[int, ...], shard: int,
                codec: str = "bf16") -> list[str]:
  """Relative paths of every file of one shard, index first."""
  name = shard_name(shard)
  extra = [scales_name(shard)] if codec in codecs.LOSSY else []
  return [f"index/{name}"] + [f"{layer_dir(s, l)}/{name}" for s in sites for l in layers] + extra


def receipt_name(shard: int) -> str:
  return f"{RECEIPTS}/shard_{shard:05d}.safetensors"


def receipt_path(root: str, shard: int) -> str:
  return files.join(root, receipt_name(shard))


# ---------------------------------------------------------------------------------------------
# Writing one shard.

@dataclasses.dataclass
class ShardRows:
  """One shard's rows, already in their shuffled order.

  index: INDEX_DTYPE [rows]; acts: {site: bf16 [rows, n_layers, width]}.
  """

  shard: int
  index: np.ndarray
  acts: dict[str, np.ndarray]
  layers: tuple[int, ...]


def _write_records(path: str, records: Iterable[bytes]) -> int:
  """Writes the records; C++ failures come back as OSError."""
  try:
    writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
    if not writer.ok():
      raise OSError(errno.EIO, f"cannot open {path} for writing")
    n = 0
    for record in records:
      writer.write(record)
      n += 1
    writer.close()
  except RuntimeError as e:  # riegeli reports errno only in the message
    message = str(e)
    code = next((c for c, text in _ERRNO_TEXT if text in message), errno.EIO)
    raise OSError(code, message) from e
  return n


def _write_tensors(path: str, tensors: dict[str, np.ndarray]) -> int:
  save_file(tensors, path)
  return -1  # not a record file


_ERRNO_TEXT = ((errno.ENOSPC, "No space left"), (errno.EACCES, "Permission denied"),
               (errno.EROFS, "Read-only file system"), (errno.EDQUOT, "Disk quota"))


def write_shard(root: str, rows: ShardRows, rows_per_record: int, meta: dict[str, Any],
                codec: str = "bf16") -> tuple[dict, dict[str, np.ndarray]]:
  """Writes every file of a shard (activations in `codec`), then its receipt (the shard's
  commit point).

  Returns the receipt and the shard's statistic sums (float64, over the values the reader will
  serve: the decoded ones for a lossy codec).
  """
  codecs.check(codec)
  written: dict[str, dict[str, Any]] = {}
  sums: dict[str, np.ndarray] = {}
  n_records = -1

  def put(rel: str, records, write=_write_records) -> None:
    nonlocal n_records
    path = files.join(root, rel)
    fill = lambda tmp: (write(tmp, records), os.path.getsize(tmp), files.digest(tmp))
    try:
      n, size, digest = files.atomic_write(path, fill)
    except OSError as e:
      raise OSError(e.errno, f"writing {path} failed: {e.strerror or e}; "
                    "free space or fix permissions, then re-run the same harvest to resume "
                    "(finished shards are kept)") from e
    written[rel] = {"bytes": size, "sha256": digest}
    if n >= 0:
      n_records = n

  def blocks(flat: np.ndarray):
    return (flat[a:a + rows_per_record] for a in range(0, len(flat), rows_per_record))

  name = shard_name(rows.shard)
  put(f"index/{name}", (b.tobytes() for b in blocks(rows.index)))
  shard_scales: dict[str, np.ndarray] = {}
  for site, acts in rows.acts.items():
    for j, layer in enumerate(rows.layers):
      flat = np.ascontiguousarray(acts[:, j])
      scale = codecs.scales(codec, flat)
      served = flat
      if scale is not None:
        shard_scales[f"{site}/{layer}"] = scale
        served = codecs.decode(codec, codecs.encode(codec, flat, scale), *flat.shape, scale)
      x = served.astype(np.float64)
      sums[f"{site}/{layer}/sum"] = x.sum(axis=0)
      sums[f"{site}/{layer}/sumsq"] = np.array([np.einsum("nd,nd->", x, x)])
      put(f"{layer_dir(site, layer)}/{name}", (codecs.encode(codec, b, scale) for b in blocks(flat)))
  if shard_scales:
    put(scales_name(rows.shard), shard_scales, write=_write_tensors)
  receipt = dict(meta, shard=rows.shard, rows=int(len(rows.index)), records=n_records,
                 files=written)
  files.atomic_write(receipt_path(root, rows.shard), lambda tmp: save_file(
      sums, tmp, metadata={"receipt": json.dumps(receipt, sort_keys=True)}))
  return receipt, sums


def read_receipt(root: str, shard: int) -> tuple[dict, dict[str, np.ndarray]] | None:
  """A finished shard's receipt and statistic sums, or None when the shard is not finished."""
  path = receipt_path(root, shard)
  if not files.exists(path):
    return None
  data = files.read_bytes(path)  # receipts are small: read once, locally or remotely
  header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
  return json.loads(header["__metadata__"]["receipt"]), safetensors.numpy.load(data)


def damaged_files(root: str, receipt: dict, workers: int = 8) -> list[str]:
  """The files of a finished shard that are missing or differ from its receipt (size, sha256).

  Same-size corruption (flipped bytes) is caught by the digest; files are hashed in parallel.
  """
  def bad(item) -> bool:
    rel, info = item
    path = files.join(root, rel)
    if not files.exists(path) or files.size(path) != info["bytes"]:
      return True
    return files.digest(path) != info["sha256"]

  items = sorted(receipt["files"].items())
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return [rel for (rel, _), is_bad in zip(items, pool.map(bad, items)) if is_bad]


# ---------------------------------------------------------------------------------------------
# Statistics and the manifest.

def combine_stats(sums: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Adds statistic sums key by key, in the order given."""
  total: dict[str, np.ndarray] = {}
  for part in sums:
    for key, value in part.items():
      total[key] = total[key] + value if key in total else value.copy()
  return total


def stats_entries(total: dict[str, np.ndarray], sites, layers, count: int) -> tuple[dict, dict]:
  """Manifest statistics and the mean vectors (for stats.safetensors) from summed receipts."""
  entries: dict[str, dict[str, Any]] = {}
  means: dict[str, np.ndarray] = {}
  for site in sites:
    entries[site] = {}
    for layer in layers:
      mean = total[f"{site}/{layer}/sum"] / max(count, 1)
      msn = float(total[f"{site}/{layer}/sumsq"][0]) / max(count, 1)
      means[f"{site}/{layer}/mean"] = mean.astype(np.float32)
      entries[site][str(layer)] = {
          "count": count, "mean_sq_norm": msn, "mean_norm": float(np.linalg.norm(mean)),
          "norm_scale": 1.0 / np.sqrt(msn) if msn > 0 else 1.0}
  return entries, means


def write_stats(root: str, means: dict[str, np.ndarray]) -> dict[str, Any]:
  def fill(tmp: str) -> dict[str, Any]:
    save_file(means, tmp)
    return {"path": STATS, "bytes": os.path.getsize(tmp), "sha256": files.digest(tmp)}

  return files.atomic_write(files.join(root, STATS), fill)


def finish(root: str, identity: dict, receipts: list[dict], *, sites, layers,
           widths: dict[str, int], rows_per_record: int, context_length: int,
           codec: str = "bf16", heldout: dict | None = None) -> dict:
  """Writes stats.safetensors and then manifest.json, the store's commit point. `heldout`
  is the held-out split's entry (pipelines/heldout.py), already written.

  The statistic sums are read back from the receipts and added in shard order, so the floats
  do not depend on the order in which workers finished.
  """
  receipts = sorted(receipts, key=lambda r: r["shard"])
  if not receipts or [r["shard"] for r in receipts] != list(range(len(receipts))):
    raise StoreError(f"{root}: shards {[r['shard'] for r in receipts]} are not 0..n-1; "
                     "not writing a manifest")
  for prev, nxt in zip(receipts, receipts[1:]):
    if prev["sequences"][1] != nxt["sequences"][0]:
      raise StoreError(f"{root}: shards {prev['shard']} and {nxt['shard']} leave a hole in "
                       "the sequence ids; not writing a manifest")
  n_rows = sum(r["rows"] for r in receipts)
  sums = combine_stats(read_receipt(root, r["shard"])[1] for r in receipts)
  entries, means = stats_entries(sums, sites, layers, n_rows)
  manifest = dict(
      identity,
      context_length=context_length, sites=list(sites), layers=list(layers), widths=dict(widths),
      dtype="bfloat16", codec=codec, rows_per_record=rows_per_record,
      index_dtype=[[n, INDEX_DTYPE[n].str] for n in INDEX_DTYPE.names],
      num_rows=n_rows, num_tokens=n_rows, num_sequences=receipts[-1]["sequences"][1],
      num_records=sum(r["records"] for r in receipts),
      shards=[{k: r[k] for k in ("shard", "rows", "records", "sequences", "files")}
              for r in receipts],
      stats=entries, stats_file=write_stats(root, means), heldout=heldout)
  files.write_text(files.join(root, MANIFEST), dumps(manifest))
  return manifest


def dumps(obj: Any) -> str:
  return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def load_manifest(root: str) -> dict:
  """The manifest of a finished store; refuses incomplete and unknown stores."""
  path = files.join(root, MANIFEST)
  if not files.exists(path):
    hint = ("a harvest was started here but did not finish; re-run the same harvest command on "
            "this output to resume it" if files.exists(files.join(root, SPEC)) else
            "no harvest has been written here; check the path")
    raise IncompleteStoreError(f"{root} is not a complete activation store: {path} is missing ({hint})")
  try:
    manifest = files.read_json(path)
  except (ValueError, UnicodeDecodeError) as e:
    raise StoreError(f"{path} is not valid JSON ({e}); the store is damaged, re-run the harvest") from e
  if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
    raise StoreError(f"{path}: format {manifest.get('format')!r} schema "
                     f"{manifest.get('schema_version')!r}; this reader reads {FORMAT!r} schema "
                     f"{SCHEMA_VERSION}")
  return manifest


def open_reader(path: str):
  """An ArrayRecord reader, with decode failures reported by file name."""
  try:
    return array_record_module.ArrayRecordReader(path, READER_OPTIONS)
  except Exception as e:  # the C++ reader raises RuntimeError/ValueError variants
    raise CorruptShardError(f"{path}: cannot be opened as ArrayRecord ({e}); the shard is "
                            f"corrupt: {REPAIR}") from e
