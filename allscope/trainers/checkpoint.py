"""Orbax checkpoints: one composite item per step, saved asynchronously, the last K kept.

  state   the train state (params, optimizer, step, RNG, counters), restored onto any mesh
  data    the Grain iterator state (JSON)
  config  the TrainConfig (JSON), checked on resume
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from allscope.trainers.config import TrainConfig


def manager(directory: str | Path, cfg: TrainConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=1,  # the loop decides when; every call it makes is a save
      max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                               item_names=("state", "data", "config"))


def data_state_to_json(state: bytes | str | dict) -> dict:
  if isinstance(state, dict):
    return state
  return json.loads(state.decode() if isinstance(state, bytes) else state)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_state: bytes | dict | None,
         cfg: TrainConfig) -> None:
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state_to_json(data_state) if data_state is not None else {}),
      config=ocp.args.JsonSave(dataclasses.asdict(cfg)))
  mngr.save(step, args=args)


def restore(mngr: ocp.CheckpointManager, step: int, abstract: dict,
            shardings: dict) -> tuple[dict, dict, dict]:
  """(state placed on `shardings`, data iterator state, saved config dict)."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore()))
  return out["state"], out["data"], out["config"]


def check_compatible(saved: dict[str, Any], cfg: TrainConfig, directory: str | Path) -> None:
  """A resumed run must train the same thing; schedule and bookkeeping may change."""
  fixed = ("kind", "activation", "site_in", "site_out", "layers", "width", "d_in", "d_out")
  for key in fixed:
    want = getattr(cfg, key)
    have = saved.get(key)
    if isinstance(want, tuple):
      have = tuple(have) if have is not None else None
    if have != want:
      raise ValueError(f"checkpoint in {directory} was trained with train.{key}={have!r}, but "
                       f"the config says {want!r}; use a new output_dir or the same setting")
