"""Reads a release (or one dictionary folder) back, verifying checksums, keys and shapes.

Only safetensors and JSON are read; nothing goes through pickle.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from allscope import files
from allscope.release import export, layout
from allscope.release.dictionary import CrossLayerTranscoder, Dictionary, check_params


class ReleaseError(ValueError):
  """A release file that is missing, corrupt or inconsistent; the message names the file."""


@dataclasses.dataclass(frozen=True, eq=False)
class Release:
  root: Path
  manifest: dict[str, Any]
  dictionaries: tuple[Dictionary | CrossLayerTranscoder, ...]

  def metrics(self) -> list[dict[str, Any]]:
    return [dict(e.get("metrics", {})) for e in self.manifest["dictionaries"]]


def load(path: str | Path, verify: bool = True) -> Release | Dictionary | CrossLayerTranscoder:
  """A release root (with manifest.json) -> Release; a dictionary or CLT folder -> that dictionary.

  With `verify`, every file's sha256 is checked against the manifest (for a single folder, the
  manifest of the release it sits in, when there is one).
  """
  path = Path(path)
  if not path.is_dir():
    raise ReleaseError(f"{path}: no such release or dictionary folder")
  manifest_path = path / export.MANIFEST_FILE
  if manifest_path.exists():
    manifest = _read_json(manifest_path)
    entries = manifest.get("dictionaries")
    if not isinstance(entries, list):
      raise ReleaseError(f"{manifest_path}: no 'dictionaries' list")
    dictionaries = []
    for entry in entries:
      folder = _entry_folder(path, entry, manifest_path)
      if verify:
        _verify(folder, entry, manifest_path)
      dictionaries.append(_load_folder(folder))
    return Release(path, manifest, tuple(dictionaries))
  if verify:
    for root in path.parents[:2]:
      candidate = root / export.MANIFEST_FILE
      if candidate.exists():
        rel = path.resolve().relative_to(root.resolve()).as_posix()
        for entry in _read_json(candidate).get("dictionaries", []):
          if entry.get("path") == rel:
            _verify(path, entry, candidate)
        break
  return _load_folder(path)


def _entry_folder(root: Path, entry: Any, manifest_path: Path) -> Path:
  if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
    raise ReleaseError(f"{manifest_path}: a dictionaries entry has no 'path'")
  try:
    return layout.inside(root, entry["path"])
  except ValueError as e:
    raise ReleaseError(f"{manifest_path}: {e}") from e


def _verify(folder: Path, entry: dict[str, Any], manifest_path: Path) -> None:
  for name, info in entry.get("files", {}).items():
    try:
      file = layout.inside(folder, name)
    except ValueError as e:
      raise ReleaseError(f"{manifest_path}: {e}") from e
    if not file.exists():
      raise ReleaseError(f"{file}: missing (listed in {manifest_path})")
    actual = files.digest(file)
    if actual != info.get("sha256"):
      raise ReleaseError(f"{file}: checksum mismatch: sha256 {actual}, manifest {manifest_path} "
                         f"says {info.get('sha256')}; the file is corrupt or was changed")


def _read_json(path: Path) -> dict[str, Any]:
  try:
    data = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ReleaseError(f"{path}: unreadable JSON ({e})") from e
  if not isinstance(data, dict):
    raise ReleaseError(f"{path}: expected a JSON object")
  return data


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
  if not path.exists():
    raise ReleaseError(f"{path}: missing tensor file")
  try:
    return safetensors.numpy.load_file(str(path))
  except Exception as e:  # safetensors raises its own error types for truncated or bad headers
    raise ReleaseError(f"{path}: not a readable safetensors file ({e})") from e


def _load_folder(folder: Path) -> Dictionary | CrossLayerTranscoder:
  config_path = folder / export.CONFIG_FILE
  if not config_path.exists():
    raise ReleaseError(f"{config_path}: missing config.json")
  config = _read_json(config_path)
  for key in ("type", "architecture", "model_name"):
    if key not in config:
      raise ReleaseError(f"{config_path}: missing field {key!r}")
  extra = {k: v for k, v in config.items() if k not in _KNOWN}
  model = config.get("allscope_model", config["model_name"])
  try:
    if config["type"] == "clt":
      n = int(config.get("n_layers", 0))
      if n < 1:
        raise ReleaseError(f"{config_path}: a clt needs n_layers >= 1, got {config.get('n_layers')!r}")
      files = [folder / f"params_layer_{l}.safetensors" for l in range(n)]
      layer_params = tuple(_read_tensors(f) for f in files)
      for file, params in zip(files, layer_params):
        check_params(params, str(file), config["architecture"], clt_layers=n)
      clt = CrossLayerTranscoder(layer_params, config["architecture"], model, config.get("l0"),
                                 config.get("l0_tag"), config.get("k"), extra,
                                 tuple(config.get("layers", ())))
      clt.validate(str(folder))
      return clt
    params_path = folder / export.PARAMS_FILE
    params = _read_tensors(params_path)
    d = Dictionary(params, config["type"], config["architecture"], model, int(config["layer"]),
                   config["site_in"], config["site_out"], config.get("l0"), config.get("l0_tag"),
                   config.get("k"), tuple(config.get("layers", ())), extra)
    d.validate(str(params_path))
    return d
  except KeyError as e:
    raise ReleaseError(f"{config_path}: missing field {e}") from e
  except ReleaseError:
    raise
  except ValueError as e:
    raise ReleaseError(str(e)) from e


_KNOWN = {"architecture", "model_name", "allscope_model", "width", "l0", "type", "affine_connection",
          "hf_hook_point_in", "hf_hook_point_out", "hf_hook_points_in", "hf_hook_points_out",
          "layer", "layers", "site_in", "site_out", "d_in", "d_out", "k", "l0_tag", "n_layers",
          "files", "schema_version"}
