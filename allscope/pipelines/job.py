"""The harvest job: plan, claim the output, run the Beam pipeline, report.

    planning.py    check inputs and fix the work (no weights loaded)
    output.py      claim, resume or repair the output folder
    transforms.py  the Beam transforms (tokenize, number, harvest shards, manifest)
    worker.py      the model inside a worker process (devices, weights, compiled capture)
    progress.py    the progress bar

Locally the pipeline runs on Beam's FnApiRunner (N processes); `beam_args` send it elsewhere
(DaskRunner, Dataflow, Flink, Spark).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from allscope import files
from allscope.models.loader import ModelConfig
from allscope.pipelines import devices, output, progress, store, transforms, worker
from allscope.pipelines.config import HarvestConfig
from allscope.pipelines.planning import HarvestError, Plan, describe, plan

__all__ = ["HarvestError", "Plan", "harvest", "plan", "run", "pipeline_options"]

log = logging.getLogger(__name__)


def pipeline_options(cfg: HarvestConfig) -> PipelineOptions:
  args = list(cfg.beam_args)
  if cfg.num_workers > 1 and not any(a.startswith("--direct_num_workers") for a in args):
    args += [f"--direct_num_workers={cfg.num_workers}", "--direct_running_mode=multi_processing"]
  return PipelineOptions(args)


def _runner(options: PipelineOptions):
  if options.view_as(StandardOptions).runner:
    return None  # the user named one (Dataflow, Flink, Spark, ...)
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  return FnApiRunner()


def harvest(cfg: HarvestConfig, model_cfg: ModelConfig, output_dir: str, *, model=None,
            tokenizer=None) -> dict:
  """Runs (or resumes) a harvest into output_dir and returns the store's manifest.

  Every input is checked before the model loads. A finished identical store is returned as is;
  an unfinished one is resumed (finished shards are kept); a different one is refused unless
  cfg.overwrite. `model` / `tokenizer`: already loaded ones for `model_cfg`, reused by
  in-process workers instead of loading again (worker processes always load their own).
  See docs/harvest.md.
  """
  return run(cfg, model_cfg, output_dir, model=model, tokenizer=tokenizer)[0]


def run(cfg: HarvestConfig, model_cfg: ModelConfig, output_dir: str, *, model=None,
        tokenizer=None) -> tuple[dict, dict]:
  """`harvest`, also returning the job's counters (tokens_written, *_ms, wall_s)."""
  arch = model.config if model is not None else None
  if arch is None or tokenizer is None:
    arch, tokenizer = describe(model_cfg)
  if model is not None and model.config != arch:
    raise HarvestError(f"the model passed in does not match {model_cfg.name}: "
                       f"{model.config} != {arch}")
  p = plan(cfg, model_cfg, output_dir, arch=arch, tokenizer=tokenizer)
  done = output.claim(p)
  if done is not None:
    log.info("%s already holds this harvest (manifest present); nothing to do", output_dir)
    return done, {}
  handles = worker.Handles()
  held = handles.hold(model) if model is not None else None  # noqa: F841
  options = pipeline_options(cfg)
  show = cfg.progress and not files.is_remote(output_dir)
  job_id = uuid.uuid4().hex  # names this run's device slots on every host
  start = time.perf_counter()
  try:
    with (progress.Progress(p) if show else contextlib.nullcontext()):
      pipeline = beam.Pipeline(runner=_runner(options), options=options)
      transforms.build(pipeline, p, arch, tokenizer, handles, job_id)
      result = pipeline.run()
      try:
        result.wait_until_finish()
      finally:
        client = getattr(result, "client", None)  # DaskRunner leaves its Dask client connected
        if client is not None:
          client.close()
  finally:
    shutil.rmtree(devices.slot_folder(job_id), ignore_errors=True)
  counters = {"wall_s": time.perf_counter() - start}
  try:
    found = result.metrics().query()["counters"]
  except NotImplementedError:  # DaskRunner keeps no metrics; the store is complete regardless
    found = []
  for c in found:
    counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (
        c.committed if c.committed is not None else c.attempted)
  manifest = store.load_manifest(output_dir)
  if manifest["num_sequences"] < p.num_sequences:
    log.warning("the corpus ran out: %d of %d sequences harvested (%d tokens)",
                manifest["num_sequences"], p.num_sequences, manifest["num_tokens"])
  split = manifest.get("heldout") or {"sequences": 0}
  if split["sequences"] < cfg.heldout_sequences:
    log.warning("the corpus ran out: %d of %d held-out sequences written after the %d training "
                "sequences; evaluation will have fewer held-out tokens", split["sequences"],
                cfg.heldout_sequences, manifest["num_sequences"])
  return manifest, counters
