"""The stages behind the CLI, wired over one output folder:

  <output_dir>/config.json     the resolved run config
  <output_dir>/store/          activation store (harvest)
  <output_dir>/train/          checkpoints/, tensorboard/ (train)
  <output_dir>/evaluation.json metrics per dictionary (evaluate), with the token counts
  <output_dir>/release/        the release folder (release)

Each stage reads what the previous one wrote, so any of them can be re-run or resumed alone.
On a multi-host job every process runs every stage; the stages writing shared outputs (harvest,
evaluate, release) do their work on process 0 while the others wait (distributed.on_primary),
and evaluate/release restore the latest checkpoint (trainers.checkpoint.restore_latest), never
train.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from allscope import models, pipelines, release, trainers
from allscope.launch import config as config_lib, distributed
from allscope.launch.config import RunConfig


@dataclasses.dataclass(frozen=True)
class Paths:
  root: Path

  @property
  def store(self) -> Path:
    return self.root / "store"

  @property
  def train(self) -> Path:
    return self.root / "train"

  @property
  def evaluation(self) -> Path:
    return self.root / "evaluation.json"


def harvest(cfg: RunConfig) -> dict:
  """Process 0 runs the harvest (a Beam job writing the shared store); the others wait."""
  paths = Paths(Path(cfg.output_dir))

  def work():
    config_lib.save(cfg, paths.root)
    return pipelines.harvest(cfg.harvest, cfg.model, str(paths.store))

  distributed.on_primary("harvest", work)
  return pipelines.open_store(paths.store).manifest


def train(cfg: RunConfig) -> trainers.TrainResult:
  """Trains (or resumes, or, when finished, restores) the run's dictionaries from its store.

  Every process runs it; each reads its rows of every global batch. Raises
  trainers.Preempted after checkpointing on SIGTERM/SIGINT.
  """
  paths = Paths(Path(cfg.output_dir))
  distributed.on_primary("train config", lambda: config_lib.save(cfg, paths.root))
  store = pipelines.open_store(paths.store)
  sites = tuple(dict.fromkeys(cfg.train.sites))
  batches = store.global_batches(cfg.train.batch_size, sites=sites, layers=cfg.train.layers,
                                 seed=cfg.seed)
  norm = {site: store.norm_scale(site, cfg.train.layers) for site in sites}
  return trainers.train(cfg.train, batches, norm, paths.train)


def trained_dictionaries(cfg: RunConfig, result: trainers.TrainResult | None = None, *,
                         allow_partial: bool = False) -> list:
  """Release-format dictionaries (normalization folded in): from `result`, or restored from the
  run's latest checkpoint without training (an unfinished run raises UnfinishedRun unless
  allow_partial). Every process calls it (restoring and gathering are collective)."""
  from allscope.trainers import checkpoint
  from allscope.trainers.export import release_arrays

  if result is not None:
    state, norm = result.state, result.norm_scale
  else:
    paths = Paths(Path(cfg.output_dir))
    restored = checkpoint.restore_latest(paths.train / "checkpoints", cfg.train,
                                         allow_partial=allow_partial)
    if not restored.finished:
      print(f"evaluating the unfinished run at step {restored.step} of {cfg.train.steps} "
            "(--allow-partial)", file=sys.stderr)
    store = pipelines.open_store(paths.store)
    state = restored.state
    norm = {site: store.norm_scale(site, cfg.train.layers) for site in set(cfg.train.sites)}
  return release.from_exported(
      release_arrays(cfg.train, state, norm, model_name=cfg.model.name))


def heldout_tokens(cfg: RunConfig) -> tuple[np.ndarray, str]:
  """(token ids [sequences, positions], where they came from): the file named by
  evaluate.tokens, else the held-out split the harvest wrote into the run's store."""
  if cfg.evaluate.tokens:
    return release.load_tokens(cfg.evaluate.tokens), cfg.evaluate.tokens
  store = pipelines.open_store(Paths(Path(cfg.output_dir)).store)
  return store.heldout_tokens(), f"{store.path} (held-out split)"


def evaluation_path(cfg: RunConfig, release_root: str | Path | None = None) -> Path:
  """Where evaluate writes its metrics: evaluate.output if set; beside a release evaluated with
  --release (`<release>.evaluation.json`, never over the run's own); else the run's
  evaluation.json."""
  if cfg.evaluate.output:
    return Path(cfg.evaluate.output)
  if release_root is not None:
    root = Path(release_root).resolve()
    return root.with_name(root.name + ".evaluation.json")
  return Paths(Path(cfg.output_dir)).evaluation


def evaluate(cfg: RunConfig, dictionaries: list | None = None, *, allow_partial: bool = False,
             output: Path | None = None) -> list[release.Evaluation] | None:
  """Metrics of the run's latest checkpoint (or of `dictionaries`), on process 0, into `output`
  (default: evaluation_path(cfg)); the other processes wait and get None."""
  dictionaries = dictionaries or trained_dictionaries(cfg, allow_partial=allow_partial)
  output = output or evaluation_path(cfg)
  return distributed.on_primary("evaluate", lambda: _evaluate(cfg, dictionaries, output))


def _evaluate(cfg: RunConfig, dictionaries: list,
              output: Path | None = None) -> list[release.Evaluation]:
  paths = Paths(Path(cfg.output_dir))
  output = output or evaluation_path(cfg)
  tokens, source = heldout_tokens(cfg)  # before the model loads: a missing split fails fast
  cfg.evaluate.validate()
  from allscope.release.evaluate import check_tokens
  check_tokens(cfg.evaluate, tokens)
  model, _ = models.load(cfg.model.name, dtype=cfg.model.dtype)
  evaluations = release.evaluate(cfg.evaluate, dictionaries, model, tokens,
                                 log_dir=paths.root / "tensorboard_eval")
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_name(f".{output.name}.tmp")
  tmp.write_text(json.dumps({"heldout": source, "tokens": token_counts(evaluations),
                             "dictionaries": [{"path": e.path, "metrics": e.metrics}
                                              for e in evaluations]}, indent=2) + "\n")
  os.replace(tmp, output)
  return evaluations


def token_counts(evaluations: list[release.Evaluation]) -> dict[str, int]:
  """The tokens behind each metric: FVU/L0/dead/dense, and the spliced LM losses."""
  first = evaluations[0].metrics if evaluations else {}
  counts = {"activation_metrics": int(first.get("n_tokens", 0))}
  if "delta_lm_tokens" in first:
    counts["delta_lm"] = int(first["delta_lm_tokens"])
    counts["delta_lm_sequences"] = int(first["delta_lm_sequences"])
  return counts


def release_stage(cfg: RunConfig, dictionaries: list | None = None,
                  evaluations: list | None = None, *, allow_partial: bool = False) -> Path:
  """Writes (and publishes) the release of the latest checkpoint on process 0; the others wait."""
  dictionaries = dictionaries or trained_dictionaries(cfg, allow_partial=allow_partial)
  root = distributed.on_primary("release", lambda: _release(cfg, dictionaries, evaluations))
  return root or release.release_dir(cfg.release, Path(cfg.output_dir))


def _release(cfg: RunConfig, dictionaries: list, evaluations: list | None) -> Path:
  paths = Paths(Path(cfg.output_dir))
  if evaluations is None:
    evaluations = _evaluate(cfg, dictionaries)
  manifest = pipelines.open_store(paths.store).manifest
  info = {"model_fingerprint": manifest.get("model", {}).get("fingerprint"),
          "corpus": dataclasses.asdict(cfg.harvest.corpus),
          "train_tokens": cfg.train.steps * cfg.train.batch_size,
          "eval_tokens": ", ".join(f"{v} ({k.replace('_', ' ')})"
                                   for k, v in token_counts(evaluations).items())}
  root = release.write_release(cfg.release, dictionaries, paths.root, evaluations=evaluations,
                               info=info)
  if cfg.browse.enabled:
    _browse(cfg, root, None)
  if cfg.release.publish_to:
    release.publish(root, cfg.release.publish_to, dry_run=cfg.release.dry_run,
                    private=cfg.release.private)
  return root


def browse(cfg: RunConfig, release_root: Path | None = None,
           store: Path | None = None) -> dict | None:
  """Writes `<release>/browser/` from a pass over the run's store (see docs/browse.md), on
  process 0; the others wait and get None."""
  return distributed.on_primary("browse", lambda: _browse(cfg, release_root, store))


def _browse(cfg: RunConfig, release_root: Path | None, store: Path | None) -> dict:
  from allscope.release import browser

  paths = Paths(Path(cfg.output_dir))
  root = Path(release_root) if release_root else release.release_dir(cfg.release, paths.root)
  return browser.browse(root, store or paths.store, cfg.browse)


def run(cfg: RunConfig) -> dict[str, Any]:
  """harvest -> train -> evaluate -> release, each resuming what is already done."""
  start = time.perf_counter()
  stamps = {}
  manifest = harvest(cfg)
  stamps["harvest"] = time.perf_counter() - start
  result = train(cfg)
  stamps["train"] = time.perf_counter() - start - sum(stamps.values())
  dictionaries = trained_dictionaries(cfg, result)
  evaluations = evaluate(cfg, dictionaries) or []
  stamps["evaluate"] = time.perf_counter() - start - sum(stamps.values())
  root = release_stage(cfg, dictionaries, evaluations or None)
  stamps["release"] = time.perf_counter() - start - sum(stamps.values())
  return {"store": Paths(Path(cfg.output_dir)).store, "tokens": manifest.get("num_tokens"),
          "train": Paths(Path(cfg.output_dir)).train, "release": root,
          "evaluations": evaluations, "seconds": stamps}
