"""Writes dictionaries into the Gemma Scope 2 release layout, with a checksummed manifest.

  <release>/<site>/layer_<l>_width_<w>_l0_<tag>/params.safetensors + config.json
  <release>/clt/width_<w>_l0_<tag>/params_layer_<i>.safetensors + config.json
  <release>/manifest.json

Every file is written to a temporary name and renamed into place (allscope.files), so a crash
never leaves a half-written tensor file behind a valid name, and file modes come from the umask.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from allscope import files
from allscope.models.presets import hf_repo
from allscope.release import layout
from allscope.release.dictionary import CrossLayerTranscoder, Dictionary

SCHEMA_VERSION = 1
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"

# Preset -> Hugging Face repo has one home (models/presets.py); this name stays for callers.
hf_model_name = hf_repo


def write_json(path: Path, data: Any) -> None:
  files.write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_tensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
  arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
  files.atomic_write(path, lambda tmp: safetensors.numpy.save_file(arrays, tmp,
                                                                  metadata=dict(metadata)))


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serializable")


def folder_of(d: Dictionary | CrossLayerTranscoder, l0: float | None = None) -> str:
  """The release-relative folder of a dictionary; `l0` (the held-out L0 measured by evaluation)
  names it, `d.l0` only when no measurement is given."""
  measured = l0 if l0 is not None else d.l0
  if isinstance(d, CrossLayerTranscoder):
    return layout.clt_folder(d.width, measured, d.l0_tag, d.affine)
  return layout.dictionary_folder(d.type, d.site_in, d.site_out, d.layer, d.width, measured,
                                  d.l0_tag, d.affine)


def gemma_scope_form(architecture: str, params: Mapping[str, np.ndarray]
                     ) -> tuple[str, dict[str, np.ndarray]]:
  """(architecture, tensors) as a Gemma Scope 2 folder holds them: a ReLU as JumpReLU at 0, which
  every JumpReLU loader reads exactly; TopK without a threshold (see dictionary.py)."""
  if architecture == "relu":
    return "jump_relu", {**params, "threshold": np.zeros_like(params["b_enc"])}
  return architecture, dict(params)


def dictionary_config(d: Dictionary, l0: float | None = None) -> dict[str, Any]:
  """config.json of a per-layer dictionary (Gemma Scope 2 fields first, then ours); `l0` is the
  measured held-out L0 (d.l0 when None)."""
  layers = d.layers or (d.layer,)
  config = {
      **dict(d.metadata),
      "architecture": gemma_scope_form(d.architecture, d.params)[0],
      "model_name": hf_model_name(d.model_name),
      "allscope_model": d.model_name,
      "width": d.width,
      "l0": l0 if l0 is not None else d.l0,
      "type": d.type,
      "affine_connection": d.affine,
      "hf_hook_point_in": layout.hf_hook_point(d.site_in, d.layer),
      "hf_hook_point_out": layout.hf_hook_point(d.site_out, d.layer),
      "layer": d.layer,
      "site_in": d.site_in,
      "site_out": d.site_out,
      "d_in": int(d.params["w_enc"].shape[0]),
      "d_out": int(d.params["w_dec"].shape[-1]),
      "schema_version": SCHEMA_VERSION,
  }
  if d.type == "crosscoder":
    config["layers"] = list(layers)
    config["hf_hook_points_in"] = [layout.hf_hook_point(d.site_in, l) for l in layers]
  if d.k is not None:
    config["k"] = d.k
  if d.l0_tag is not None:
    config["l0_tag"] = d.l0_tag
  return config


def clt_config(clt: CrossLayerTranscoder, l0: float | None = None) -> dict[str, Any]:
  n = clt.n_layers
  config = {
      **dict(clt.metadata),
      "architecture": gemma_scope_form(clt.architecture, clt.layer_params[0])[0],
      "model_name": hf_model_name(clt.model_name),
      "allscope_model": clt.model_name,
      "width": clt.width,
      "l0": l0 if l0 is not None else clt.l0,
      "type": "clt",
      "affine_connection": clt.affine,
      "n_layers": n,
      "layers": list(clt.model_layers),
      "site_in": "mlp_in",
      "site_out": "mlp_out",
      "hf_hook_point_in": layout.hf_hook_point("mlp_in", "{layer}"),  # a template over layers
      "hf_hook_point_out": layout.hf_hook_point("mlp_out", "{layer}"),
      "hf_hook_points_in": [layout.hf_hook_point("mlp_in", l) for l in clt.model_layers],
      "hf_hook_points_out": [layout.hf_hook_point("mlp_out", l) for l in clt.model_layers],
      "d_in": int(clt.layer_params[0]["w_enc"].shape[0]),
      "d_out": int(clt.layer_params[0]["w_dec"].shape[-1]),
      "files": [f"params_layer_{l}.safetensors" for l in range(n)],
      "schema_version": SCHEMA_VERSION,
  }
  if clt.k is not None:
    config["k"] = clt.k
  if clt.l0_tag is not None:
    config["l0_tag"] = clt.l0_tag
  return config


def write_dictionary(release_dir: str | Path, d: Dictionary | CrossLayerTranscoder,
                     l0: float | None = None) -> dict[str, Any]:
  """Writes one dictionary's folder; returns its manifest entry (path, metadata, file checksums)."""
  d.validate(f"{d.type} {getattr(d, 'layer', '')}".strip())
  rel = folder_of(d, l0)
  folder = layout.inside(release_dir, rel)
  if isinstance(d, CrossLayerTranscoder):
    config = clt_config(d, l0)
    tensors = {f"params_layer_{l}.safetensors": gemma_scope_form(d.architecture, p)[1]
               for l, p in enumerate(d.layer_params)}
  else:
    config = dictionary_config(d, l0)
    tensors = {PARAMS_FILE: gemma_scope_form(d.architecture, d.params)[1]}
  meta = {"format": "gemma-scope-2", "writer": "allscope", "architecture": config["architecture"]}
  for name, params in tensors.items():
    write_tensors(folder / name, params, meta)
  write_json(folder / CONFIG_FILE, config)
  written = {name: {"sha256": files.digest(folder / name), "bytes": files.size(folder / name)}
             for name in [*tensors, CONFIG_FILE]}
  entry = {k: config[k] for k in ("type", "architecture", "width", "l0", "affine_connection",
                                  "site_in", "site_out")}
  entry["layer"] = config.get("layer")
  entry["n_layers"] = config.get("n_layers")
  entry["path"] = rel
  entry["files"] = written
  return entry


def write_manifest(release_dir: str | Path, entries: Sequence[Mapping[str, Any]],
                   info: Mapping[str, Any] | None = None) -> Path:
  path = layout.inside(release_dir, MANIFEST_FILE)
  paths = [e["path"] for e in entries]
  duplicates = sorted({p for p in paths if paths.count(p) > 1})
  if duplicates:
    raise ValueError(f"two dictionaries map to the same folder {duplicates}; give them distinct "
                     "l0_tag values")
  write_json(path, {"schema_version": SCHEMA_VERSION, **dict(info or {}),
                    "dictionaries": [dict(e) for e in entries]})
  return path
