"""Config sections owned by the release stage: `EvalConfig` (evaluate) and `ReleaseConfig`."""

from __future__ import annotations

import dataclasses

from allscope.release import layout


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How dictionaries are measured on held-out tokens (see docs/evaluate.md).

  The held-out tokens are the store's held-out split, or `tokens`: a .npy file of integer token
  ids [sequences, positions] (BOS first, PAD after the text; read without pickle). The first
  `n_sequences` sequences, cut to `seq_len` positions, give FVU, L0 and dead/dense latents, in
  batches of `batch_size` sequences. Latents firing on more than `dense_threshold` of tokens are
  dense; ones that never fire are dead. `splice` turns on the spliced LM losses, measured on the
  first `splice_sequences` of them (-1, or more than n_sequences: all): one clean forward per
  batch, then per dictionary the layers from its own onward and the unembedding;
  `zero_ablation` adds the zero-ablation loss (fraction of loss recovered) at the same cost
  again. `output` is where the metrics JSON goes (default: the run's evaluation.json, or
  <release>.evaluation.json beside a release evaluated with --release).
  """

  n_sequences: int = 32
  seq_len: int = 128
  batch_size: int = 8
  dense_threshold: float = 0.1
  splice: bool = True
  splice_sequences: int = -1
  zero_ablation: bool = True
  tokens: str = ""
  output: str = ""

  def validate(self) -> None:
    for name in ("n_sequences", "seq_len", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"evaluate.{name} must be >= 1, got {getattr(self, name)}")
    if self.splice_sequences == 0 or self.splice_sequences < -1:
      raise ValueError(f"evaluate.splice_sequences must be >= 1, or -1 (all), got "
                       f"{self.splice_sequences}; set evaluate.splice=false to skip the LM losses")
    if not 0.0 < self.dense_threshold < 1.0:
      raise ValueError(f"evaluate.dense_threshold must lie in (0, 1), got {self.dense_threshold}")
    if self.tokens and not self.tokens.endswith(".npy"):
      raise ValueError(f"evaluate.tokens={self.tokens!r} must name a .npy file of integer token "
                       "ids [sequences, positions] (numpy.save)")


@dataclasses.dataclass(frozen=True)
class ReleaseConfig:
  """Where and how a release folder is written and published.

  `directory` is relative to the run's output_dir unless absolute. `name` is the release name
  (one path component). `publish_to` is `hf://org/repo`, `gs://bucket/prefix`, a local folder,
  or empty for no publishing; `dry_run` lists what would be uploaded without uploading.
  `saelens_format` also writes each per-layer dictionary in SAELens' own format under
  `saelens/` (the offline `SAE.load_from_disk` route; doubles the size on disk).
  """

  directory: str = "release"
  name: str = "allscope-release"
  model_card: bool = True
  plots: bool = True
  publish_to: str = ""
  dry_run: bool = False
  private: bool = False
  overwrite: bool = False
  saelens_format: bool = False

  def validate(self) -> None:
    layout.check_component(self.name, "release.name")
    if not self.directory:
      raise ValueError("release.directory must not be empty")
    if self.publish_to:
      from allscope.release.publish import parse_target  # local: avoids an import cycle
      parse_target(self.publish_to)
