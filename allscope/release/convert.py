"""Trainer exports -> release dictionaries.

`allscope.trainers.export.release_arrays` yields objects with `.arrays` (Gemma Scope 2 keys,
float32, normalization folded) and `.metadata` (architecture, type, model_name, layer or layers,
site_in, site_out, l0, k, ...). This groups a CLT's per-source-layer entries into one
CrossLayerTranscoder and turns the rest into Dictionary objects. It reads attributes only, so the
release stage does not depend on trainer internals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from allscope.release.dictionary import CrossLayerTranscoder, Dictionary

_DROP = {"architecture", "model_name", "type", "layer", "layers", "site_in", "site_out", "l0", "k",
         "width", "affine_connection", "hf_hook_point_in", "hf_hook_point_out", "target_layers"}


def from_exported(items: Iterable[Any]) -> list[Dictionary | CrossLayerTranscoder]:
  """One release dictionary per exported per-layer dictionary, one CLT per group of CLT layers."""
  out: list[Dictionary | CrossLayerTranscoder] = []
  clt_parts: list[Any] = []
  for item in items:
    meta = dict(item.metadata)
    for key in ("architecture", "model_name", "type", "site_in", "site_out"):
      if key not in meta:
        raise ValueError(f"exported dictionary {getattr(item, 'name', '?')!r}: metadata has no {key!r}")
    extra = {k: v for k, v in meta.items() if k not in _DROP}
    if "l0" in meta:  # the training estimate; the release's `l0` is the held-out measurement
      extra["train_l0"] = meta["l0"]
    if meta["type"] == "clt":
      clt_parts.append((item, meta, extra))
      continue
    layers = tuple(meta.get("layers") or ())
    layer = meta["layer"] if "layer" in meta else layers[0]
    out.append(Dictionary(dict(item.arrays), meta["type"], meta["architecture"], meta["model_name"],
                          int(layer), meta["site_in"], meta["site_out"], l0=meta.get("l0"),
                          k=meta.get("k"), layers=layers, metadata=extra))
  if clt_parts:
    clt_parts.sort(key=lambda part: part[1]["layer"])
    metas = [m for _, m, _ in clt_parts]
    layers = tuple(int(m["layer"]) for m in metas)
    targets = metas[0].get("target_layers")
    if targets is not None and tuple(targets) != layers:
      raise ValueError(f"CLT parts cover layers {layers} but write to {tuple(targets)}")
    l0 = sum(float(m["l0"]) for m in metas) if all("l0" in m for m in metas) else None
    if l0 is not None:
      clt_parts[0][2]["train_l0"] = l0
    out.append(CrossLayerTranscoder(tuple(dict(item.arrays) for item, _, _ in clt_parts),
                                    metas[0]["architecture"], metas[0]["model_name"], l0=l0,
                                    k=metas[0].get("k"), metadata=clt_parts[0][2], layers=layers))
  return out
