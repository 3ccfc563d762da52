"""Gemma 3 text-model hyperparameters: the five released sizes, plus tiny configs for tests."""

from __future__ import annotations

import dataclasses

from allscope.models import sites


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """Architecture of a Gemma 3 text decoder (the fields Hugging Face's Gemma3TextConfig uses)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  sliding_window: int
  query_pre_attn_scalar: float = 256.0
  rope_local_base: float = 10_000.0
  rope_global_base: float = 1_000_000.0
  rope_global_scaling: float = 1.0  # linear scaling factor on global layers (x8 on 4B and up)
  global_every: int = 6  # layer i is global when (i + 1) % global_every == 0
  rms_norm_eps: float = 1e-6
  max_context: int = 32_768
  bos_id: int = 2
  eos_id: int = 1
  pad_id: int = 0

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

  def is_global(self, layer: int) -> bool:
    return (layer + 1) % self.global_every == 0

  @property
  def site_widths(self) -> dict[str, int]:
    """Width of each capturable site (models/sites.py)."""
    return sites.widths(self.d_model, self.n_heads, self.head_dim)


PRESETS: dict[str, Gemma3Config] = {
    "gemma3-270m": Gemma3Config(
        vocab_size=262_144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
        d_ff=2048, sliding_window=512),
    "gemma3-1b": Gemma3Config(
        vocab_size=262_144, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256,
        d_ff=6912, sliding_window=512),
    "gemma3-4b": Gemma3Config(
        vocab_size=262_208, d_model=2560, n_layers=34, n_heads=8, n_kv_heads=4, head_dim=256,
        d_ff=10_240, sliding_window=1024, rope_global_scaling=8.0, max_context=131_072),
    "gemma3-12b": Gemma3Config(
        vocab_size=262_208, d_model=3840, n_layers=48, n_heads=16, n_kv_heads=8, head_dim=256,
        d_ff=15_360, sliding_window=1024, rope_global_scaling=8.0, max_context=131_072),
    "gemma3-27b": Gemma3Config(
        vocab_size=262_208, d_model=5376, n_layers=62, n_heads=32, n_kv_heads=16, head_dim=128,
        d_ff=21_504, sliding_window=1024, query_pre_attn_scalar=168.0, rope_global_scaling=8.0,
        max_context=131_072),
}


def preset(name: str) -> Gemma3Config:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(
        f"unknown model name {name!r}; valid names: {', '.join(PRESETS)} "
        "(or a path to a .gguf file or a Hugging Face model directory)") from None


def hf_repo(name: str) -> str:
  """The Hugging Face repo of a preset name (`gemma3-270m` -> `google/gemma-3-270m`,
  `gemma3-1b` -> `google/gemma-3-1b-pt`, `gemma3-4b-it` -> `google/gemma-3-4b-it`); any other
  name (a path, an HF id) is returned as is."""
  base = name.removesuffix("-it")
  if base not in PRESETS:
    return name
  size = base.removeprefix("gemma3-")
  suffix = "-it" if name.endswith("-it") else ("" if size == "270m" else "-pt")
  return f"google/gemma-3-{size}{suffix}"
