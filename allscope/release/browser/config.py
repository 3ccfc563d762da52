"""`BrowseConfig`: how the feature browser of a release is computed and written."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class BrowseConfig:
  """The feature browser (`<release>/browser/`).

  One pass over `max_tokens` rows of the activation store (0: all of it) after its first
  `skip_tokens` (e.g. the rows training did not reach: a held-out slice), in batches of
  `batch_size` rows (rounded up to whole records of the store). Per latent it keeps the `top_n`
  highest activations (top_n <= 16 keeps XLA's fast top_k path on GPU) with `before` and `after`
  tokens of context, a histogram of its non-zero activations in `bins_per_decade` log-spaced bins
  per decade over [10^min_log10, 10^max_log10], its firing frequency, and the `logit_tokens`
  output tokens its decoder direction promotes and suppresses most (`logits=false` skips these
  and the model load). Latents firing on more than `dense_threshold` of tokens are listed as
  dense, ones that never fired as dead. Output is sharded in blocks of `block_size` latents.
  `neuronpedia` also writes SAEDashboard's Neuronpedia batch files (browser/neuronpedia/).
  """

  enabled: bool = True
  max_tokens: int = 1_000_000
  skip_tokens: int = 0
  batch_size: int = 1024
  top_n: int = 16
  before: int = 12
  after: int = 4
  bins_per_decade: int = 6
  min_log10: float = -3.0
  max_log10: float = 3.0
  logits: bool = True
  logit_tokens: int = 10
  dense_threshold: float = 0.1
  block_size: int = 256
  neuronpedia: bool = False

  @property
  def n_bins(self) -> int:
    return int(round((self.max_log10 - self.min_log10) * self.bins_per_decade))

  def validate(self) -> None:
    for name in ("batch_size", "top_n", "bins_per_decade", "logit_tokens", "block_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"browse.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("max_tokens", "skip_tokens", "before", "after"):
      if getattr(self, name) < 0:
        raise ValueError(f"browse.{name} must be >= 0, got {getattr(self, name)}")
    if not (math.isfinite(self.min_log10) and math.isfinite(self.max_log10)
            and self.max_log10 > self.min_log10):
      raise ValueError(f"browse.max_log10 ({self.max_log10}) must exceed browse.min_log10 "
                       f"({self.min_log10})")
    if not 0.0 < self.dense_threshold < 1.0:
      raise ValueError(f"browse.dense_threshold must lie in (0, 1), got {self.dense_threshold}")
