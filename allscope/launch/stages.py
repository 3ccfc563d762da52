"""The stages behind the CLI, wired over one output folder:

  <output_dir>/config.json     the run's first resolved config (never replaced)
  <output_dir>/configs/        <stage>-<UTC time>.json: the config of every command that worked
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
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from allscope import files, models, pipelines, release, trainers
from allscope.launch import config as config_lib, distributed, host_memory
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
    manifest = pipelines.harvest(cfg.harvest, cfg.model, str(paths.store))
    config_lib.record(cfg, "harvest")  # after the harvest's own checks (it may refuse the store)
    return manifest

  distributed.on_primary("harvest", work)
  return pipelines.open_store(paths.store).manifest


def train(cfg: RunConfig) -> trainers.TrainResult:
  """Trains (or resumes, or, when finished, restores) the run's dictionaries from its store.

  Every process runs it; each reads its rows of every global batch. Raises
  trainers.Preempted after checkpointing on SIGTERM/SIGINT.
  """
  paths = Paths(Path(cfg.output_dir))
  store = pipelines.open_store(paths.store)
  check_store_rows(cfg, store.num_rows_served, paths.store)
  sites = tuple(dict.fromkeys(cfg.train.sites))
  batches = store.global_batches(cfg.train.batch_size, sites=sites, layers=cfg.train.layers,
                                 seed=cfg.seed)
  norm = {site: store.norm_scale(site, cfg.train.layers) for site in sites}
  recorded = []

  def record(step: int, context: dict) -> None:  # the first step taken: every check has passed
    if not recorded and jax.process_index() == 0:
      recorded.append(config_lib.record(cfg, "train"))

  return trainers.train(cfg.train, batches, norm, paths.train, hooks=(record,))


def check_store_rows(cfg: RunConfig, rows: int, where: Path) -> None:
  """A batch larger than the store is refused; training past the store's rows is said aloud."""
  t = cfg.train
  if t.batch_size > rows:
    raise ValueError(f"train.batch_size={t.batch_size} exceeds the {rows} rows the store {where} "
                     "serves; lower train.batch_size or harvest more (harvest.token_budget)")
  epochs = t.steps * t.batch_size / rows
  if epochs > 1:
    print(f"note: train.steps x train.batch_size = {t.steps * t.batch_size} rows is {epochs:.1f} "
          f"passes over the store's {rows} rows: rows repeat; raise harvest.token_budget to see "
          "each once", file=sys.stderr)


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


class ModelOnce:
  """The run's model, loaded on first call (on the process that calls it) and kept: in `run`,
  evaluate and the feature browser's logit effects share one load (a GGUF dequantization)."""

  def __init__(self, cfg: RunConfig):
    self._cfg = cfg.model
    self.loaded = None  # (model, tokenizer) once loaded

  def __call__(self, purpose: str):
    if self.loaded is None or self.loaded[0] is None:
      print(f"loading {self._cfg.name} ({self._cfg.dtype}) to {purpose} ...", file=sys.stderr)
      self.loaded = models.load(self._cfg.name, dtype=self._cfg.dtype)
    return self.loaded[0]

  def drop(self) -> None:
    """Frees the weights (the tokenizer is kept)."""
    if self.loaded is not None:
      self.loaded = (None, self.loaded[1])

  @property
  def float32(self) -> bool:
    """The browser's logit effects need float32 weights: shared only from a float32 model."""
    return self._cfg.dtype == "float32"


def evaluate(cfg: RunConfig, dictionaries: list | None = None, *, allow_partial: bool = False,
             output: Path | None = None,
             model: ModelOnce | None = None) -> list[release.Evaluation] | None:
  """Metrics of the run's latest checkpoint (or of `dictionaries`), on process 0, into `output`
  (default: evaluation_path(cfg)); the other processes wait and get None."""
  dictionaries = dictionaries or trained_dictionaries(cfg, allow_partial=allow_partial)
  output = output or evaluation_path(cfg)
  return distributed.on_primary("evaluate", lambda: _evaluate(cfg, dictionaries, output, model))


def _evaluate(cfg: RunConfig, dictionaries: list, output: Path | None = None,
              model: ModelOnce | None = None) -> list[release.Evaluation]:
  paths = Paths(Path(cfg.output_dir))
  output = output or evaluation_path(cfg)
  tokens, source = heldout_tokens(cfg)  # before the model loads: a missing split fails fast
  cfg.evaluate.validate()
  release.check_tokens(cfg.evaluate, tokens)
  config_lib.record(cfg, "evaluate")
  model = (model or ModelOnce(cfg))("evaluate")
  evaluations = release.evaluate(cfg.evaluate, dictionaries, model, tokens,
                                 log_dir=paths.root / "tensorboard_eval")
  files.write_text(output, json.dumps({
      "heldout": source, "tokens": token_counts(evaluations),
      "dictionaries": [{"path": e.path, "metrics": e.metrics} for e in evaluations]},
      indent=2) + "\n")
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
                  evaluations: list | None = None, *, allow_partial: bool = False,
                  model: ModelOnce | None = None) -> Path:
  """Writes (and publishes) the release of the latest checkpoint on process 0; the others wait.

  A folder that already holds a release is kept (and published as it is) unless
  release.overwrite; with release.dry_run nothing is evaluated or written, only said.
  """
  root = release.release_dir(cfg.release, Path(cfg.output_dir))
  exists = (root / "manifest.json").exists()
  checkpoints = Paths(Path(cfg.output_dir)).train / "checkpoints"
  if cfg.release.dry_run and not exists and not any(
      p.name.isdigit() for p in (checkpoints.iterdir() if checkpoints.is_dir() else ())):
    raise ValueError(f"nothing to release: no release in {root} and no checkpoints in "
                     f"{checkpoints}; train first (allscope train)")
  if cfg.release.dry_run or (exists and not cfg.release.overwrite):
    distributed.on_primary("release", lambda: _keep_release(cfg, root, exists))
    return root
  dictionaries = dictionaries or trained_dictionaries(cfg, allow_partial=allow_partial)
  out = distributed.on_primary("release",
                               lambda: _release(cfg, dictionaries, evaluations, model))
  return out or root


def _keep_release(cfg: RunConfig, root: Path, exists: bool) -> None:
  """Says what a dry run would do, or publishes an existing release as it is."""
  r = cfg.release
  if r.dry_run:
    if not exists:
      print(f"[dry run] would evaluate the latest checkpoint and write the release to {root}"
            + (f", then publish it to {r.publish_to}" if r.publish_to else ""), file=sys.stderr)
      return
    action = "rewrite (release.overwrite=true)" if r.overwrite else "keep"
    print(f"[dry run] would {action} the release in {root}", file=sys.stderr)
  else:
    print(f"keeping the existing release in {root} (release.overwrite=true rewrites it)",
          file=sys.stderr)
  if r.publish_to:
    if not r.dry_run:
      config_lib.record(cfg, "publish")
    release.publish(root, r.publish_to, dry_run=r.dry_run, private=r.private)


def _release(cfg: RunConfig, dictionaries: list, evaluations: list | None,
             model: ModelOnce | None = None) -> Path:
  paths = Paths(Path(cfg.output_dir))
  model = model or ModelOnce(cfg)
  if evaluations is None:
    evaluations = _evaluate(cfg, dictionaries, model=model)
  config_lib.record(cfg, "release")
  manifest = pipelines.open_store(paths.store).manifest
  info = {"model_fingerprint": manifest.get("model", {}).get("fingerprint"),
          "corpus": dataclasses.asdict(cfg.harvest.corpus),
          "train_tokens": cfg.train.steps * cfg.train.batch_size,
          "eval_tokens": ", ".join(f"{v} ({k.replace('_', ' ')})"
                                   for k, v in token_counts(evaluations).items())}
  root = release.write_release(cfg.release, dictionaries, paths.root, evaluations=evaluations,
                               info=info)
  if cfg.browse.enabled:
    _browse(cfg, root, None, model)
  if cfg.release.publish_to:
    release.publish(root, cfg.release.publish_to, dry_run=cfg.release.dry_run,
                    private=cfg.release.private)
  return root


def browse(cfg: RunConfig, release_root: Path | None = None,
           store: Path | None = None) -> dict | None:
  """Writes `<release>/browser/` from a pass over the run's store (see docs/browse.md), on
  process 0; the others wait and get None."""
  return distributed.on_primary("browse", lambda: _browse(cfg, release_root, store))


def _browse(cfg: RunConfig, release_root: Path | None, store: Path | None,
            model: ModelOnce | None = None) -> dict:
  from allscope.release import browser

  paths = Paths(Path(cfg.output_dir))
  root = Path(release_root) if release_root else release.release_dir(cfg.release, paths.root)
  shared, tokenizer = None, None
  if model is not None and model.loaded is not None:
    tokenizer = model.loaded[1]
    if model.float32 and cfg.browse.logits:
      shared = model.loaded[0]
    else:  # the browser loads a float32 copy if it needs one: never two models at once
      model.drop()
  return browser.browse(root, store or paths.store, cfg.browse, model=shared, tokenizer=tokenizer)


def run(cfg: RunConfig) -> dict[str, Any]:
  """harvest -> train -> evaluate -> release, each resuming what is already done."""
  start = time.perf_counter()
  stamps = {}
  manifest = harvest(cfg)
  stamps["harvest"] = time.perf_counter() - start
  host_memory.release_freed_memory()  # each stage's arrays differ: what one kept, the next frees
  result = train(cfg)
  stamps["train"] = time.perf_counter() - start - sum(stamps.values())
  host_memory.release_freed_memory()
  dictionaries = trained_dictionaries(cfg, result)
  model = ModelOnce(cfg)  # one load serves evaluate and the browser
  evaluations = evaluate(cfg, dictionaries, model=model) or []
  stamps["evaluate"] = time.perf_counter() - start - sum(stamps.values())
  host_memory.release_freed_memory()
  root = release_stage(cfg, dictionaries, evaluations or None, model=model)
  stamps["release"] = time.perf_counter() - start - sum(stamps.values())
  return {"store": Paths(Path(cfg.output_dir)).store, "tokens": manifest.get("num_tokens"),
          "train": Paths(Path(cfg.output_dir)).train, "release": root,
          "evaluations": evaluations, "seconds": stamps}
