"""The harvest's output folder: claim it for one store, resume or repair it, or refuse it.

A folder belongs to the store whose identity (harvest.json) it holds. The same harvest again
resumes it; a finished one is checked against its receipts first (sizes and sha256), and damaged
shards lose their receipt and the manifest, so the job rewrites exactly those shards.
"""

from __future__ import annotations

import json
import logging

from allscope import files
from allscope.models import SITES
from allscope.pipelines import heldout, store
from allscope.pipelines.planning import HarvestError, Plan

log = logging.getLogger(__name__)


def claim(p: Plan) -> dict | None:
  """Claims the output folder. Returns the manifest if the same store is already complete and
  intact; None when the job has shards to (re)write."""
  root = p.output_dir
  spec_path = files.join(root, store.SPEC)
  if files.exists(spec_path):
    found = files.read_json(spec_path)
    if found == p.identity:
      if files.exists(files.join(root, store.MANIFEST)):
        manifest = store.load_manifest(root)
        if not repair(root, manifest["shards"]):
          return manifest
      return None  # same harvest, unfinished (or just repaired): resume
    if not p.cfg.overwrite:
      raise HarvestError(f"{root} holds a different activation store: "
                         f"{'; '.join(differences(found, p.identity))}; use the store's "
                         "settings, choose another output_dir, or set harvest.overwrite=true "
                         "to replace it")
  elif files.listdir(root) and not p.cfg.overwrite:
    raise HarvestError(f"{root} is not empty and holds no activation store; choose an empty "
                       "output or set harvest.overwrite=True")
  if p.cfg.overwrite:
    remove_store(root)
  files.write_text(spec_path, store.dumps(p.identity))
  return None


def differences(found: dict, wanted: dict, prefix: str = "") -> list[str]:
  """`key: <found> in the store, <wanted> in the config` for every differing leaf, dotted
  (harvest.* keys are the config fields of the same name)."""
  out = []
  for key in sorted(set(found) | set(wanted)):
    a, b, name = found.get(key), wanted.get(key), f"{prefix}{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, f"{name}.")
    elif a != b:
      out.append(f"{name}: {_short(a)} in the store, {_short(b)} in the config")
  return out


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def repair(root: str, shards: list[dict]) -> list[str]:
  """Checks a finished store's shards against their receipts; for each damaged one removes its
  receipt (and the manifest), so that a resumed job rewrites it. Returns the damaged files."""
  damaged = [rel for receipt in shards for rel in store.damaged_files(root, receipt)]
  if not damaged:
    return []
  log.warning("%s: %d file(s) do not match their receipts (%s%s); rewriting their shards",
              root, len(damaged), ", ".join(damaged[:3]), ", ..." if len(damaged) > 3 else "")
  files.remove(files.join(root, store.MANIFEST))  # first: the store is no longer finished
  for receipt in shards:
    if any(rel in receipt["files"] for rel in damaged):
      files.remove(store.receipt_path(root, receipt["shard"]))
  return damaged


def remove_store(root: str) -> None:
  """Deletes what a harvest writes (and nothing else) under root."""
  for name in files.listdir(root):
    if (name in (store.MANIFEST, store.SPEC, store.STATS, heldout.FILE, "index", "scales",
                 store.RECEIPTS,
                 *SITES) or files.is_temporary(name)):
      files.remove(files.join(root, name))
