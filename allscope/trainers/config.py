"""TrainConfig: what to train, how, and on which mesh."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from allscope.kernels.dispatch import CHOICES

KERNELS = CHOICES  # train.kernels
KINDS = ("sae", "transcoder", "skip_transcoder", "clt", "crosscoder")
ACTIVATIONS = ("jumprelu", "topk", "batchtopk", "relu")
_DEFAULT_SITES = {"sae": ("resid_post", "resid_post"), "crosscoder": ("resid_post", "resid_post"),
                  "transcoder": ("mlp_in", "mlp_out"), "skip_transcoder": ("mlp_in", "mlp_out"),
                  "clt": ("mlp_in", "mlp_out")}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One dictionary kind over one site pair and a set of layers.

  Per-layer kinds (sae, transcoder, skip_transcoder) train one dictionary per layer, all in one
  pass (stacked parameters). A clt has one encoder per layer writing to every later layer; a
  crosscoder has one encoder over all listed layers.
  """

  kind: str = "sae"
  activation: str = "jumprelu"
  site_in: str | None = None  # None: the kind's default (resid_post, or mlp_in for transcoders)
  site_out: str | None = None
  layers: tuple[int, ...] = (0,)
  width: int = 1024  # latents F per dictionary
  d_in: int | None = None  # None: taken from the data (checked before compiling when given)
  d_out: int | None = None

  # Sparsity.
  k: int = 32  # TopK / BatchTopK
  target_l0: float = 32.0  # quadratic L0 penalty target; also sizes the JumpReLU capacity
  capacity: int = 0  # active slots per row; 0 = 4 * (k or target_l0) (JumpReLU: the larger of
  # 6 * target_l0 and target_l0 + 192), at most width
  l0_penalty: Literal["linear", "quadratic"] = "quadratic"
  l0_coef: float | None = None  # L0 coefficient (JumpReLU) or L1 coefficient (ReLU); None: the
  # activation's default (ACTIVATION_DEFAULTS)
  sparsity_warmup_steps: int = 100
  bandwidth: float = 0.01  # epsilon of the rectangle kernel, on normalized activations
  threshold_init: float = 0.0  # 0: calibrated on the first batch; > 0: fixed (Gemma Scope: 0.001)
  init_l0_multiple: float = 1.0  # calibrated thresholds fire init_l0_multiple * target_l0 at step 0
  threshold_lr_multiple: float = 20.0  # log-threshold steps are this many times the learning rate
  # JumpReLU: after each update every log-threshold of a dictionary moves by
  # l0_control * log(batch L0 / target_l0) (clipped to +-1), an integral controller that holds L0
  # at its target as the encoder grows and the lr decays (docs/train.md); 0 turns it off.
  l0_control: float = 0.1
  freq_coef: float = 0.0  # frequency penalty against latents firing on > freq_max of tokens
  freq_max: float = 0.1
  aux_k: int = 256  # AuxK for TopK/BatchTopK; aux_k=0 or aux_coef=0 turns it off
  aux_coef: float = 1.0 / 32
  aux_after_tokens: int = 5_000  # AuxK, revive and resampling act on latents silent for N tokens
  # AuxK's encode/decode: "sparse" over its aux_k slots (kernel seam), "dense" as [B, F] matmuls
  # (faster once aux_k is a sizeable fraction of the width), "auto" picks (dictionaries.aux_dense).
  aux_path: Literal["auto", "dense", "sparse"] = "auto"
  # Dead-latent resampling (trainers.resample; TopK/BatchTopK, not a clt): at these fractions of
  # train.steps, latents silent for aux_after_tokens tokens restart from high-error rows. Off by
  # default: it lost to `revive` in the screen (docs/train.md).
  resample_fractions: tuple[float, ...] = ()
  # TopK/BatchTopK: each step, a latent silent for aux_after_tokens tokens gets the encoder bias
  # that puts it in the top k of its best row of the batch; JumpReLU: the threshold just under
  # its best pre-activation of the batch, for at most width / 32 latents per step, nearest first
  # (docs/train.md: measured). None: the activation's default (ACTIVATION_DEFAULTS: on for TopK,
  # BatchTopK and JumpReLU).
  revive: bool | None = None
  dead_tokens: int = 1_000_000  # a latent that fired on none of the last N tokens is dead
  matryoshka: tuple[int, ...] = ()  # nested prefix sizes (< width); the full width is implied

  # Optimization.
  steps: int = 1000
  batch_size: int = 4096  # tokens per step
  lr: float | None = None  # None: default_lr(cfg), from the batch size (docs/train.md)
  # None / "auto" in the next three: the activation's measured default (ACTIVATION_DEFAULTS).
  lr_warmup_steps: int | None = None
  lr_decay_fraction: float = 0.2  # linear decay to 0 over the last fraction of steps
  adam_b1: float | None = None
  adam_b2: float = 0.999
  grad_clip: float = 1.0
  decoder_norm: Literal["auto", "unit", "none"] = "auto"
  init_decoder_norm: float = 0.001  # decoder row norm at init (ignored with a unit decoder)
  b_dec_init: Literal["mean", "zero"] = "mean"
  # "auto": an sae or crosscoder starts with w_enc = w_dec^T; a transcoder or CLT (input and
  # output spaces differ) with an independent random encoder whose biases centre the first
  # batch's pre-activations (docs/train.md: measured). "transpose" / "random" force one. "data":
  # each encoder column a centred first-batch input, its decoder row that row's output
  # (dictionaries.data_init).
  encoder_init: Literal["auto", "transpose", "random", "data"] = "auto"
  matmul_dtype: Literal["float32", "bfloat16"] = "float32"
  # Sparse kernels: "auto" = Pallas on GPU/TPU, sparse XLA on CPU; "pallas" or "xla" force one.
  kernels: Literal["auto", "pallas", "xla"] = "auto"
  pallas_interpret: bool = False  # run the Pallas kernels in interpret mode (CPU tests)

  # Mesh: -1 takes the devices left over.
  mesh_data: int = -1
  mesh_model: int = 1
  mesh_layer: int = 1

  # Bookkeeping.
  seed: int = 0
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  log_every: int = 50

  @property
  def learning_rate(self) -> float:
    """The peak learning rate: train.lr, or default_lr when it is left unset."""
    return default_lr(self) if self.lr is None else self.lr

  @property
  def warmup_steps(self) -> int:
    """train.lr_warmup_steps, or the activation's default when it is left unset."""
    return _default(self, "lr_warmup_steps")

  @property
  def b1(self) -> float:
    """train.adam_b1, or the activation's default when it is left unset."""
    return _default(self, "adam_b1")

  @property
  def sparsity_coef(self) -> float:
    """train.l0_coef, or the activation's default when it is left unset."""
    return _default(self, "l0_coef")

  @property
  def unit_decoder(self) -> bool:
    """Whether decoder rows are held at unit norm (train.decoder_norm; "auto": by activation)."""
    return _default(self, "decoder_norm") == "unit"

  @property
  def tied_init(self) -> bool:
    """Whether the encoder starts as the decoder's transpose (see encoder_init)."""
    if self.encoder_init == "auto":
      return self.kind in ("sae", "crosscoder")
    return self.encoder_init == "transpose"

  @property
  def revives(self) -> bool:
    """train.revive, or the activation's default when it is left unset."""
    return bool(_default(self, "revive")) and self.activation in ("topk", "batchtopk", "jumprelu")

  @property
  def auxk(self) -> bool:
    """Whether AuxK runs: TopK/BatchTopK with aux_k and aux_coef both above 0."""
    return self.activation in ("topk", "batchtopk") and self.aux_k > 0 and self.aux_coef > 0

  @property
  def data_init(self) -> bool:
    """Whether encoder columns (and decoder rows) start from first-batch rows (see encoder_init)."""
    return self.encoder_init == "data"

  @property
  def sites(self) -> tuple[str, str]:
    default_in, default_out = _DEFAULT_SITES.get(self.kind, ("resid_post", "resid_post"))
    site_in = self.site_in or default_in
    site_out = self.site_out or (site_in if self.kind in ("sae", "crosscoder") else default_out)
    return site_in, site_out

  @property
  def n_groups(self) -> int:
    """Independent encoders: one per layer, except the crosscoder's single one."""
    return 1 if self.kind == "crosscoder" else len(self.layers)

  @property
  def slots(self) -> int:
    if self.capacity:
      return self.capacity
    base = self.k if self.activation in ("topk", "batchtopk") else int(round(self.target_l0))
    if self.activation == "topk":
      return min(self.k, self.width)
    if self.activation == "jumprelu":
      # Per-row L0 is heavy-tailed on real activations (thresholds are absolute, so rows of 1.5-2x
      # the median norm fire 5-10x the target): at F = 4096 with revive the densest training rows
      # fire up to ~target + 160 at target 16 and ~5 x target at 64 (docs/train.md). Slots cost
      # little memory at real sizes (the [B, F] pre-activations dominate).
      return min(max(6 * base, base + 192), self.width)
    return min(max(4 * base, 8), self.width)

  def validate(self) -> None:
    self._check_numbers()
    if self.kernels not in KERNELS:
      raise ValueError(f"train.kernels={self.kernels!r} is unknown; use one of {', '.join(KERNELS)}")
    if self.aux_path not in ("auto", "dense", "sparse"):
      raise ValueError(f"train.aux_path={self.aux_path!r} is unknown; use auto, dense or sparse")
    if self.aux_path == "dense" and self.kind == "clt":
      raise ValueError("train.aux_path='dense' is not available for a clt; use auto or sparse")
    if self.kind not in KINDS:
      raise ValueError(f"train.kind={self.kind!r} is unknown; use one of {', '.join(KINDS)}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f"train.activation={self.activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}")
    if not self.layers or any(l < 0 for l in self.layers) or len(set(self.layers)) != len(self.layers):
      raise ValueError(f"train.layers={self.layers} must be distinct non-negative layer indices")
    if self.kind in ("clt", "crosscoder") and list(self.layers) != sorted(self.layers):
      raise ValueError(f"train.layers={self.layers} must be increasing for a {self.kind}")
    if self.kind == "sae" and self.sites[0] != self.sites[1]:
      raise ValueError(f"an sae reads and writes one site; got {self.sites[0]} -> {self.sites[1]}")
    for name in ("width", "steps", "batch_size", "k", "aux_after_tokens", "checkpoint_every",
                 "keep_checkpoints", "log_every", "mesh_model", "mesh_layer"):
      if getattr(self, name) <= 0:
        raise ValueError(f"train.{name}={getattr(self, name)} must be positive")
    if self.mesh_data == 0 or self.mesh_data < -1:
      raise ValueError(f"train.mesh_data={self.mesh_data} must be positive or -1 (all devices)")
    if self.activation in ("topk", "batchtopk") and self.k > self.width:
      raise ValueError(f"train.k={self.k} exceeds train.width={self.width}")
    if self.capacity < 0 or self.capacity > self.width:
      raise ValueError(f"train.capacity={self.capacity} must be in [0, width={self.width}]")
    if self.activation == "batchtopk" and self.capacity and self.capacity < self.k:
      raise ValueError(f"train.capacity={self.capacity} is below train.k={self.k}")
    if self.target_l0 <= 0 or self.bandwidth <= 0:
      raise ValueError("train.target_l0 and train.bandwidth must be positive")
    if self.width % self.mesh_model:
      raise ValueError(f"train.width={self.width} is not divisible by train.mesh_model={self.mesh_model}")
    if self.n_groups % self.mesh_layer:
      raise ValueError(
          f"{self.n_groups} dictionaries (train.layers) are not divisible by train.mesh_layer={self.mesh_layer}")
    if self.mesh_data > 0 and self.batch_size % self.mesh_data:
      raise ValueError(
          f"train.batch_size={self.batch_size} is not divisible by train.mesh_data={self.mesh_data}")
    if self.encoder_init not in ("auto", "transpose", "random", "data"):
      raise ValueError(f"train.encoder_init={self.encoder_init!r} is unknown; use auto, transpose,"
                       " random or data")
    if self.resample_fractions:
      if any(not 0 < f < 1 for f in self.resample_fractions):
        raise ValueError(f"train.resample_fractions={self.resample_fractions} must lie in (0, 1)")
      if self.activation not in ("topk", "batchtopk") or self.kind == "clt":
        raise ValueError(f"train.resample_fractions is for TopK/BatchTopK dictionaries other than"
                         f" a clt (got {self.activation} {self.kind}); set it to ()")
    if list(self.matryoshka) != sorted(set(self.matryoshka)) or any(
        not 0 < m < self.width for m in self.matryoshka):
      raise ValueError(f"train.matryoshka={self.matryoshka} must be increasing sizes in (0, width)")

  def _check_numbers(self) -> None:
    """Sign and range of every numeric field, before any work (a negative lr trains by ascent)."""
    # (field, low, high, low_open, high_open); None = unbounded. Fields that may be None (a
    # default chosen elsewhere) are checked only when given.
    ranges = (("lr", 0, None, True, False), ("l0_coef", 0, None, False, False),
              ("bandwidth", 0, None, True, False), ("threshold_init", 0, None, False, False),
              ("init_l0_multiple", 0, None, True, False),
              ("threshold_lr_multiple", 0, None, False, False), ("l0_control", 0, 1, False, False),
              ("freq_coef", 0, None, False, False), ("freq_max", 0, 1, True, False),
              ("aux_k", 0, None, False, False), ("aux_coef", 0, None, False, False),
              ("dead_tokens", 1, None, False, False), ("target_l0", 0, None, True, False),
              ("sparsity_warmup_steps", 0, None, False, False),
              ("lr_warmup_steps", 0, None, False, False), ("lr_decay_fraction", 0, 1, False, False),
              ("adam_b1", 0, 1, False, True), ("adam_b2", 0, 1, False, True),
              ("grad_clip", 0, None, True, False), ("init_decoder_norm", 0, None, True, False),
              ("d_in", 1, None, False, False), ("d_out", 1, None, False, False),
              ("seed", 0, None, False, False))
    for name, low, high, low_open, high_open in ranges:
      value = getattr(self, name)
      if value is None:
        continue
      bad = not math.isfinite(value) or (low is not None and (
          value <= low if low_open else value < low)) or (high is not None and (
              value >= high if high_open else value > high))
      if bad:
        lo = "" if low is None else ("(" if low_open else "[") + str(low)
        hi = "inf)" if high is None else str(high) + (")" if high_open else "]")
        raise ValueError(f"train.{name}={value} is out of range; it must lie in {lo}, {hi}")

# The defaults of the fields left None/"auto", by activation. TopK and BatchTopK:
# no warm-up, Adam momentum 0.5 and a free decoder (norm 0.001 at init) leave fewer latents dead
# and reach a lower held-out FVU than a 100-step warm-up, momentum 0.9 and unit-norm rows (Adam's
# momentum keeps pushing a latent that stopped winning the top k further down; docs/train.md has
# the screen). TopK and BatchTopK also revive silent latents (`revive`, trainers.step): without
# it 41-46% of the latents of a one-pass F = 4096 transcoder never fire on held-out rows, with
# it 1-4% (docs/train.md).
# JumpReLU trains with the same optimizer and decoder (its one-pass F = 4096 held-out FVU at the
# TopK lr is within 1-7% of TopK's at equal L0; its L0 is held by calibrated thresholds and
# l0_control, docs/train.md) and revives silent latents by lowering their thresholds (a few per
# step; lifting the bias instead, against an L0 penalty that raises the threshold again,
# ratchets both up until the reconstruction diverges).
# ReLU keeps Gemma Scope's unit-norm decoder (its L1 is weighted by decoder norms) and the usual
# Adam settings. l0_coef: JumpReLU's L0 coefficient 1 (Gemma Scope);
# ReLU's L1 coefficient 0.05 (held-out L0 48 for a one-pass F = 4096 transcoder; 1 killed every
# latent on normalized activations, docs/train.md); TopK and BatchTopK have no penalty.
ACTIVATION_DEFAULTS = {
    "topk": {"lr_warmup_steps": 0, "adam_b1": 0.5, "decoder_norm": "none",
             "revive": True, "l0_coef": 0.0},
    "batchtopk": {"lr_warmup_steps": 0, "adam_b1": 0.5, "decoder_norm": "none",
                  "revive": True, "l0_coef": 0.0},
    "jumprelu": {"lr_warmup_steps": 0, "adam_b1": 0.5, "decoder_norm": "none",
                 "revive": True, "l0_coef": 1.0},
    "relu": {"lr_warmup_steps": 100, "adam_b1": 0.9, "decoder_norm": "unit",
             "revive": False, "l0_coef": 0.05},
}


def _default(cfg: TrainConfig, name: str):
  value = getattr(cfg, name)
  if value is None or value == "auto":
    return ACTIVATION_DEFAULTS[cfg.activation][name]
  return value


# default_lr: Adam's peak lr for a dictionary trained on B tokens per step,
#   LR_BASE * sqrt(B / LR_REF_BATCH), the same at every width and activation.
# The held-out FVU of the sweep in docs/train.md (benchmarks/lr_sweep.py on the 270M store, one
# pass at 1024 tokens per step) was best at 5e-3 for widths 1k, 4k and 16k alike; the 1/sqrt(F)
# law that sparsify uses gave 8% worse FVU at 16k (its lr was half the best). sqrt(B) as for
# Adam's noise scale (not swept).
LR_BASE = 5e-3
LR_REF_BATCH = 1024


def default_lr(cfg: TrainConfig) -> float:
  """The learning rate used when train.lr is unset (see LR_BASE and docs/train.md)."""
  return LR_BASE * (cfg.batch_size / LR_REF_BATCH) ** 0.5
