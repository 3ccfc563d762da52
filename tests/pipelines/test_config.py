"""HarvestConfig validation and its place in the run config."""

from __future__ import annotations

import pytest

from allscope.launch import config as config_lib
from allscope.pipelines.config import CorpusConfig, HarvestConfig


@pytest.mark.parametrize("kwargs, message", [
    (dict(sites=("mlp_in", "resid_pre")), "unknown site"),
    (dict(sites=()), "unknown site"),
    (dict(layers=(-1,)), "non-negative"),
    (dict(context_length=1), "context_length"),
    (dict(rows_per_record=0), "rows_per_record"),
    (dict(corpus=CorpusConfig(kind="files")), "needs corpus.path"),
])
def test_bad_values_are_refused_with_the_key(kwargs, message):
  with pytest.raises(ValueError, match=message):
    HarvestConfig(**kwargs).validate()


def test_run_config_has_a_harvest_section_with_dotted_overrides():
  cfg = config_lib.load(None, ["harvest.layers=(3, 5)", "harvest.corpus.kind=files",
                               "harvest.corpus.path=/data/*.txt", "harvest.token_budget=2000"])
  assert cfg.harvest.layers == (3, 5) and cfg.harvest.corpus.path == "/data/*.txt"
  with pytest.raises(config_lib.ConfigError, match="unknown site"):
    config_lib.load(None, ["harvest.sites=('mlp_x',)"])
