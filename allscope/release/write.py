"""`write_release`: dictionaries (+ their evaluations) -> a complete release folder."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from allscope import files
from allscope.release import card, export, layout, saelens
from allscope.release.config import ReleaseConfig
from allscope.release.dictionary import CrossLayerTranscoder, Dictionary
from allscope.release.evaluate import Evaluation

log = logging.getLogger(__name__)


def release_dir(cfg: ReleaseConfig, output_dir: str | Path) -> Path:
  """`cfg.directory` under the run's output_dir (or as given, when absolute)."""
  directory = Path(cfg.directory)
  return directory if directory.is_absolute() else Path(output_dir) / directory


def write_release(cfg: ReleaseConfig, dictionaries: Sequence[Dictionary | CrossLayerTranscoder],
                  output_dir: str | Path, *, evaluations: Sequence[Evaluation] | None = None,
                  info: Mapping[str, Any] | None = None) -> Path:
  """Writes the release folder: dictionaries, manifest.json (metrics + sha256), README.md, plots.

  `evaluations` (from `evaluate`, same order) supply metrics and the held-out L0 that names the
  folders and fills config.json's `l0` (over each dictionary's own `l0`);
  `info` adds model-card facts (model_fingerprint, corpus, train_tokens, eval_tokens, ...).
  Refuses a folder that already holds a release unless `cfg.overwrite`.
  """
  cfg.validate()
  if evaluations is not None and len(evaluations) != len(dictionaries):
    raise ValueError(f"got {len(evaluations)} evaluations for {len(dictionaries)} dictionaries")
  if not dictionaries:
    raise ValueError("no dictionaries to release")
  for i, d in enumerate(dictionaries):  # every check before the first byte is written
    d.validate(f"dictionary {i} ({d.type})")
  root = release_dir(cfg, output_dir)
  if (root / export.MANIFEST_FILE).exists() and not cfg.overwrite:
    raise FileExistsError(f"{root} already holds a release (manifest.json); choose another "
                          "release.directory or set release.overwrite=true")
  root.mkdir(parents=True, exist_ok=True)
  entries = []
  for i, d in enumerate(dictionaries):
    evaluation = evaluations[i] if evaluations is not None else None
    l0 = evaluation.metrics.get("l0") if evaluation is not None else None
    entry = export.write_dictionary(root, d, l0)
    if evaluation is not None:
      entry["metrics"] = {k: v for k, v in evaluation.metrics.items()}
    if cfg.saelens_format and isinstance(d, Dictionary) and d.type != "crosscoder":
      reason = saelens.unsupported(d)
      if reason:  # said in the manifest and the log, never a copy SAELens would misread
        log.warning("no SAELens-format copy of %s: %s", entry["path"], reason)
        entry["saelens_unsupported"] = reason
      else:
        target = layout.inside(root, f"saelens/{entry['path']}")
        saelens.write_saelens(d, target)
        entry["saelens_path"] = f"saelens/{entry['path']}"
        entry["saelens_files"] = {n: {"sha256": files.digest(target / n)}
                                  for n in (saelens.CFG_FILE, saelens.WEIGHTS_FILE)}
    entries.append(entry)
  model_name = dictionaries[0].model_name
  manifest_info = {"name": cfg.name, "model_name": export.hf_model_name(model_name),
                   "allscope_model": model_name, **dict(info or {})}
  if cfg.model_card:
    plots = []
    if cfg.plots and evaluations is not None:
      plots = card.write_plots(root, entries, [e.frequency for e in evaluations])
    text = card.readme(cfg.name, manifest_info, entries, plots)
    files.write_text(root / "README.md", text)
  export.write_manifest(root, entries, manifest_info)
  log.info("wrote release %s (%d dictionaries)", root, len(entries))
  return root
