"""Gemma 3 in Flax NNX: presets, weight loaders, tokenizer, site capture and splicing."""

from allscope.models.gemma3 import SITES, Gemma3, cross_entropy, generate
from allscope.models.loader import (DEFAULT_MODEL, ModelConfig, describe, fingerprint, init_random,
                                    load, resolve)
from allscope.models.presets import PRESETS, Gemma3Config, preset
from allscope.models.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MODEL", "PRESETS", "SITES", "Gemma3", "Gemma3Config", "ModelConfig", "Tokenizer",
    "cross_entropy", "describe", "fingerprint", "generate", "init_random", "load", "preset",
    "resolve",
]
