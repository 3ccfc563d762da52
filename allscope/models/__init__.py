"""Gemma 3 in Flax NNX: presets, weight loaders, tokenizer, site capture and splicing.

Names are imported on first use, so the shared vocabulary (`allscope.models.sites`,
`allscope.models.presets`) can be read without importing JAX.
"""

from __future__ import annotations

import importlib

from allscope.models.presets import PRESETS, Gemma3Config, hf_repo, preset
from allscope.models.sites import SITES, hf_hook_point

_LAZY = {
    "Gemma3": "allscope.models.gemma3", "cross_entropy": "allscope.models.gemma3",
    "generate": "allscope.models.gemma3",
    "DEFAULT_MODEL": "allscope.models.loader", "ModelConfig": "allscope.models.loader",
    "describe": "allscope.models.loader", "fingerprint": "allscope.models.loader",
    "init_random": "allscope.models.loader", "load": "allscope.models.loader",
    "resolve": "allscope.models.loader",
    "Tokenizer": "allscope.models.tokenizer",
}

__all__ = ["PRESETS", "SITES", "Gemma3Config", "hf_hook_point", "hf_repo", "preset", *_LAZY]


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'allscope.models' has no attribute {name!r}")
