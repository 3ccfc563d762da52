"""One config system for every command.

A run is described by a tree of typed, frozen dataclasses (`RunConfig` and its sections). Config
files are Python modules with a `get_config()` that returns one, so they read like documentation
and can compute values. The command line adds dotted overrides (`train.steps=1000`), which are
parsed, type-checked against the dataclass annotations and validated before any work starts.
A command that starts work records its resolved config in the run folder (`record`).
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any

from allscope import files
from allscope.models.loader import ModelConfig
from allscope.pipelines.config import HarvestConfig
from allscope.release.browser.config import BrowseConfig
from allscope.release.config import EvalConfig, ReleaseConfig
from allscope.trainers.config import TrainConfig

CONFIG_DIRS = (Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one `allscope` command needs. Each stage owns one section."""

  model: ModelConfig = ModelConfig()
  harvest: HarvestConfig = HarvestConfig()
  train: TrainConfig = TrainConfig()
  evaluate: EvalConfig = EvalConfig()
  release: ReleaseConfig = ReleaseConfig()
  browse: BrowseConfig = BrowseConfig()
  output_dir: str = "outputs/run"
  seed: int = 0

  def validate(self) -> None:
    """Facts across sections that can be checked before any work."""
    if not self.output_dir:
      raise ValueError("output_dir must not be empty")
    if self.seed < 0:
      raise ValueError(f"seed={self.seed} must be >= 0")
    if self.evaluate.seq_len > self.harvest.context_length:
      raise ValueError(f"evaluate.seq_len={self.evaluate.seq_len} exceeds harvest.context_length="
                       f"{self.harvest.context_length}: held-out sequences are cut from packed "
                       "sequences of that length; lower evaluate.seq_len")


class ConfigError(ValueError):
  """A config file, override or value that cannot be used; the message says which and why."""


def resolve_path(name_or_path: str) -> Path:
  """A config file path, or the name of one in configs/ (`quickstart` -> configs/quickstart.py)."""
  path = Path(name_or_path)
  if path.suffix == ".py" and path.exists():
    return path
  for root in CONFIG_DIRS:
    candidate = root / f"{path.stem}.py"
    if candidate.exists():
      return candidate
  known = sorted({p.stem for root in CONFIG_DIRS if root.is_dir() for p in root.glob("*.py")})
  raise ConfigError(f"config {name_or_path!r} not found; give a .py file or one of: {', '.join(known)}")


def load(name_or_path: str | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
  """Loads a config file (or the defaults when None), applies overrides and validates."""
  if name_or_path is None:
    config = RunConfig()
  else:
    path = resolve_path(name_or_path)
    spec = importlib.util.spec_from_file_location(f"allscope_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"{path} has no get_config() function returning a RunConfig")
    config = module.get_config()
    if not isinstance(config, RunConfig):
      raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not RunConfig")
  config = apply_overrides(config, overrides)
  validate(config)
  return config


def apply_overrides(config: Any, overrides: typing.Sequence[str]) -> Any:
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"override {item!r} is not of the form section.field=value")
    config = _replace(config, key.strip().split("."), raw.strip(), key)
  return config


def _replace(node: Any, path: list[str], raw: str, full_key: str) -> Any:
  fields = {f.name: f for f in dataclasses.fields(node)}
  name = path[0]
  if name not in fields:
    raise ConfigError(
        f"unknown config key {full_key!r}: {type(node).__name__} has {', '.join(fields)}")
  hints = typing.get_type_hints(type(node))
  if len(path) > 1:
    child = getattr(node, name)
    if not dataclasses.is_dataclass(child):
      raise ConfigError(f"config key {full_key!r}: {name!r} is a value, not a section")
    return dataclasses.replace(node, **{name: _replace(child, path[1:], raw, full_key)})
  return dataclasses.replace(node, **{name: _coerce(_parse(raw), hints[name], full_key)})


def _parse(raw: str) -> Any:
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    lowered = raw.lower()
    if lowered in ("true", "false"):
      return lowered == "true"
    if lowered in ("none", "null"):
      return None
    return raw  # a bare string such as a path or a name


def _coerce(value: Any, hint: Any, key: str) -> Any:
  """Checks `value` against a type annotation, converting where the meaning is unambiguous."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {hint}")
  if origin is typing.Literal:
    if value not in args:
      raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
    return value
  if origin in (tuple, list):
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
      value = (value,)  # `layers=5` means one layer
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"{key}: expected a sequence, got {value!r}")
    item = args[0] if args else Any
    return tuple(_coerce(v, item, key) for v in value)
  if origin is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  if isinstance(hint, type) and not isinstance(value, hint):
    raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
  return value


def validate(config: Any) -> None:
  """Runs every section's `validate()` (sections raise ValueError with a clear message)."""
  for f in dataclasses.fields(config):
    child = getattr(config, f.name)
    if dataclasses.is_dataclass(child):
      validate(child)
  check = getattr(config, "validate", None)
  if check is not None:
    try:
      check()
    except ValueError as e:
      if isinstance(e, ConfigError):
        raise
      raise ConfigError(f"{type(config).__name__}: {e}") from e


def to_dict(config: Any) -> dict[str, Any]:
  return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
  """Rebuilds a config tree from `to_dict` output (as read back from JSON)."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in data:
      continue
    value, hint = data[f.name], hints[f.name]
    if dataclasses.is_dataclass(hint):
      kwargs[f.name] = from_dict(hint, value)
    else:
      kwargs[f.name] = _coerce(value, hint, f.name)
  return cls(**kwargs)


def save(config: Any, directory: str | Path, name: str = "config.json") -> Path:
  """Writes the resolved config beside an output (atomically: temp name + rename)."""
  path = Path(directory) / name
  files.write_text(path, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
  return path


HISTORY = "configs"  # <output_dir>/configs/<stage>-<UTC time>.json: one per command that worked


def record(config: RunConfig, stage: str) -> Path:
  """Records the resolved config of a command that starts real work (call it after every check
  that may refuse the command): `configs/<stage>-<UTC time>.json` always, and `config.json`
  (the run's first resolved config) only when the run has none, so no later command, refused
  or not, replaces a run's record. Returns the history entry."""
  root = Path(config.output_dir)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
  entry = save(config, root / HISTORY, f"{stage}-{stamp}.json")
  if not (root / "config.json").exists():
    save(config, root)
  return entry
