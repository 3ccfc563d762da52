"""The config system: typed files, dotted overrides, validation, and the saved resolved config."""

from __future__ import annotations

import dataclasses
import json

import pytest

from allscope.launch import config as config_lib
from allscope.launch.config import ConfigError, RunConfig


def test_named_config_file_loads_and_overrides_are_typed():
  cfg = config_lib.load("sample", ["model.dtype=bfloat16", "seed=7", "output_dir=/tmp/x"])
  assert cfg.model.dtype == "bfloat16" and cfg.seed == 7 and cfg.output_dir == "/tmp/x"


def test_config_file_path_loads(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text(
      "from allscope.launch.config import RunConfig\n"
      "def get_config():\n  return RunConfig(seed=3)\n")
  assert config_lib.load(str(path)).seed == 3


@pytest.mark.parametrize("override,message", [
    ("model.dtyp=float32", r"unknown config key 'model.dtyp'.*name, dtype"),
    ("seed=abc", r"seed: expected int, got 'abc'"),
    ("model.dtype=float16", r"'float16' is not one of 'float32', 'bfloat16'"),
    ("model=gemma", r"'model' is a value|expected ModelConfig|model"),
    ("seed", r"not of the form section.field=value"),
    ("model.name=gemma3-3b", r"unknown model name 'gemma3-3b'; valid names: gemma3-270m"),
])
def test_bad_overrides_get_clear_errors(override, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.load(None, [override])


def test_unknown_config_name_lists_the_known_ones():
  with pytest.raises(ConfigError, match="not found.*sample"):
    config_lib.load("nonexistent")


def test_resolved_config_round_trips_through_json(tmp_path):
  cfg = config_lib.load("sample", ["seed=11", "model.dtype=bfloat16"])
  path = config_lib.save(cfg, tmp_path / "out")
  data = json.loads(path.read_text())
  assert data["seed"] == 11 and data["model"]["dtype"] == "bfloat16"
  assert config_lib.from_dict(RunConfig, data) == cfg


@dataclasses.dataclass(frozen=True)
class Section:
  layers: tuple[int, ...] = (0,)
  limit: int | None = None
  rate: float = 1.0


@dataclasses.dataclass(frozen=True)
class Root:
  s: Section = Section()


def test_sequences_and_optionals_are_coerced():
  root = config_lib.apply_overrides(Root(), ["s.layers=[1,2,3]", "s.limit=none", "s.rate=2"])
  assert root.s == Section(layers=(1, 2, 3), limit=None, rate=2.0)
  assert config_lib.apply_overrides(Root(), ["s.layers=5"]).s.layers == (5,)
  with pytest.raises(ConfigError, match="expected int"):
    config_lib.apply_overrides(Root(), ["s.layers=[1,'a']"])


@pytest.mark.parametrize("override,message", [
    ("train.lr=-1", r"train.lr=-1.0 is out of range; it must lie in \(0, inf\)"),
    ("train.lr=0", r"train.lr=0.0 is out of range"),
    ("train.l0_coef=-0.5", r"train.l0_coef=-0.5 is out of range; it must lie in \[0, inf\)"),
    ("train.aux_coef=-1", r"train.aux_coef"),
    ("train.freq_coef=-1", r"train.freq_coef"),
    ("train.freq_max=0", r"train.freq_max=0.0 is out of range; it must lie in \(0, 1\]"),
    ("train.adam_b1=1", r"train.adam_b1=1.0 is out of range; it must lie in \[0, 1\)"),
    ("train.adam_b2=-0.1", r"train.adam_b2"),
    ("train.grad_clip=0", r"train.grad_clip"),
    ("train.lr_warmup_steps=-1", r"train.lr_warmup_steps=-1"),
    ("train.sparsity_warmup_steps=-5", r"train.sparsity_warmup_steps=-5"),
    ("train.lr_decay_fraction=1.5", r"train.lr_decay_fraction=1.5"),
    ("train.dead_tokens=0", r"train.dead_tokens=0"),
    ("train.threshold_init=-0.1", r"train.threshold_init"),
    ("train.init_l0_multiple=0", r"train.init_l0_multiple"),
    ("train.threshold_lr_multiple=-1", r"train.threshold_lr_multiple"),
    ("train.init_decoder_norm=0", r"train.init_decoder_norm"),
    ("train.aux_k=-1", r"train.aux_k"),
    ("train.d_in=0", r"train.d_in"),
    ("train.seed=-1", r"train.seed"),
    ("train.steps=0", r"train.steps=0 must be positive"),
    ("harvest.seed=-2", r"harvest.seed=-2 must be >= 0"),
    ("seed=-1", r"seed=-1 must be >= 0"),
    ("output_dir=", r"output_dir must not be empty"),
    ("browse.min_log10=3", r"browse.max_log10 \(3.0\) must exceed"),
    ("evaluate.seq_len=4096", r"evaluate.seq_len=4096 exceeds harvest.context_length=1024"),
])
def test_numbers_out_of_range_are_refused_with_the_field_and_its_range(override, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.load(None, [override])


def test_in_range_edges_are_accepted():
  cfg = config_lib.load(None, ["train.l0_coef=0", "train.adam_b1=0", "train.freq_max=1",
                               "train.lr_warmup_steps=0", "train.threshold_init=0",
                               "evaluate.seq_len=1024"])
  assert cfg.train.l0_coef == 0.0 and cfg.train.freq_max == 1.0


def test_quickstart_measures_on_8k_heldout_tokens_and_spends_its_splices_on_delta_lm():
  """FVU/L0/dead and the spliced delta LM loss of every layer on >= 8k held-out tokens, in
  whole batches: no padded rows computed; the splice budget goes to delta LM (no zero-ablation
  passes); its AuxK runs on the dense path (F = 1024, aux_k a quarter of it)."""
  from allscope.trainers import dictionaries

  cfg = config_lib.load("quickstart")
  ev, hv = cfg.evaluate, cfg.harvest
  positions = min(ev.seq_len, hv.context_length)
  assert ev.n_sequences <= hv.heldout_sequences
  assert ev.n_sequences * (positions - 1) >= 8192  # BOS is not counted
  assert ev.splice and not ev.zero_ablation
  n_splice = ev.n_sequences if ev.splice_sequences < 0 else ev.splice_sequences
  assert 0 < n_splice <= ev.n_sequences
  assert n_splice * (positions - 1) >= 8192  # next-token targets per dictionary (issue 10)
  assert n_splice % ev.batch_size == 0
  assert dictionaries.aux_dense(cfg.train)
