"""Load the bundled Gemma 3 270M and sample from it: `allscope sample --config sample`."""

from allscope.launch.config import RunConfig
from allscope.models import ModelConfig


def get_config() -> RunConfig:
  return RunConfig(
      model=ModelConfig(name="gemma3-270m", dtype="float32"),  # or a .gguf / HF directory path
      output_dir="outputs/sample",
  )
