"""Orbax checkpoints: one composite item per step, saved asynchronously, the last K kept.

  state   the TrainState, restored onto any mesh (any number of devices and processes)
  data    the Grain iterator state, one file per process (Grain's own Orbax handler)
  config  the TrainConfig (JSON), checked on resume

The data position is the step: the trainer reads global batch k at step k+1 from the seeded
global order (pipelines.reader.GlobalBatches), so a checkpoint written by N processes resumes on
M. Each process's Grain state is restored when the process count is unchanged and must agree
with the step; with another count the position is taken from the step alone.

`restore_latest` is the one way a finished (or, when allowed, unfinished) run's weights leave
the checkpoints: evaluation and release call it and never train.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from allscope.trainers import state as state_lib
from allscope.trainers.config import TrainConfig

_FIXED = ("kind", "activation", "site_in", "site_out", "layers", "width", "d_in", "d_out")


def manager(directory: str | Path, cfg: TrainConfig | None = None,
            read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=1,  # the loop decides when; every call it makes is a save
      max_to_keep=cfg.keep_checkpoints if cfg else None, enable_async_checkpointing=True,
      create=not read_only, read_only=read_only)
  handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
              "data": grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                               item_handlers=handlers)


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
  mngr.reload()
  return mngr.latest_step()


def save(mngr: ocp.CheckpointManager, step: int, st: state_lib.TrainState, iterator: Any,
         cfg: TrainConfig) -> None:
  """Every process calls this at the same step; `iterator` is its Grain dataset iterator."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(st), data=grain.checkpoint.CheckpointSave(iterator),
      config=ocp.args.JsonSave(dataclasses.asdict(cfg))))


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract: state_lib.TrainState,
                  shardings: state_lib.TrainState) -> state_lib.TrainState:
  """The TrainState of `step`, placed on `shardings` (any mesh)."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]


def restore_data(mngr: ocp.CheckpointManager, step: int, iterator: Any) -> bool:
  """Restores this process's iterator state; False when the checkpoint was written by another
  number of processes (then the caller positions the iterator from the step)."""
  folder = Path(mngr.directory) / str(step) / "data"
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if not (folder / name).exists():
    return False
  mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
  return True


def check_compatible(saved: dict[str, Any], cfg: TrainConfig, directory: str | Path) -> None:
  """A resumed run must train the same thing; schedule and bookkeeping may change."""
  for key in _FIXED:
    want = getattr(cfg, key)
    have = saved.get(key)
    if isinstance(want, tuple):
      have = tuple(have) if have is not None else None
    if have != want:
      raise ValueError(f"checkpoint in {directory} was trained with train.{key}={have!r}, but "
                       f"the config says {want!r}; use a new output_dir or the same setting")


class UnfinishedRun(ValueError):
  """The latest checkpoint is before the last step; the message says how to go on."""


@dataclasses.dataclass
class Restored:
  step: int  # the checkpoint's step
  state: state_lib.TrainState  # every leaf replicated on the mesh (readable on any process)
  finished: bool  # step == cfg.steps


def restore_latest(directory: str | Path, cfg: TrainConfig, *, allow_partial: bool = False,
                   mesh: Mesh | None = None) -> Restored:
  """The latest checkpoint of the run in `directory`, without training.

  Every process must call it (the restore is collective). An unfinished run raises
  UnfinishedRun unless allow_partial. `mesh` defaults to all devices in one data axis.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoints in {directory}; train first (allscope train)")
  mngr = manager(directory, read_only=True)
  try:
    step = latest_step(mngr)
    if step is None:
      raise FileNotFoundError(f"no checkpoints in {directory}; train first (allscope train)")
    check_compatible(saved_config(mngr, step), cfg, directory)
    if step < cfg.steps and not allow_partial:
      raise UnfinishedRun(
          f"the run in {directory} is unfinished: its latest checkpoint is step {step} of "
          f"train.steps={cfg.steps}; finish it with `allscope train` (same config), or evaluate "
          "the latest step as it is with --allow-partial")
    meta = mngr.item_metadata(step)["state"]
    params = {k: jax.ShapeDtypeStruct(tuple(v.shape), np.dtype(v.dtype))
              for k, v in meta["params"].items()}
    abstract = state_lib.abstract_state(cfg, params)
    mesh = mesh or jax.make_mesh((jax.device_count(),), ("data",))
    st = restore_state(mngr, step, abstract, state_lib.replicated(abstract, mesh))
  finally:
    mngr.close()
  return Restored(step, st, step >= cfg.steps)

