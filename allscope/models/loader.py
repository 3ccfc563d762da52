"""Resolves a model name or path and loads Gemma 3 weights and tokenizer."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which model to load: a preset name (`gemma3-270m` ships offline), a .gguf file, or a
  Hugging Face style directory (config.json + *.safetensors + tokenizer)."""

  name: str = "gemma3-270m"
  dtype: Literal["float32", "bfloat16"] = "float32"
