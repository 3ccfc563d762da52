"""Release-format dictionaries: float32 arrays with the Gemma Scope 2 keys plus their metadata.

This is the seam between training and release: the trainer turns its state into these (scaling
folded in, BatchTopK as JumpReLU thresholds), and export, loading, evaluation and the clients all
read them. The math here is the released math, written once for numpy and jax.numpy alike:

  pre = x @ w_enc + b_enc
  f   = pre * (pre > threshold)           jump_relu
        relu(pre) on its k largest         topk   (no threshold tensor)
        relu(pre)                          relu   (threshold absent or all 0)
  y   = f @ w_dec + b_dec [+ x @ affine_skip_connection]

A TopK dictionary carries no `threshold`: a JumpReLU-only loader (SAELens' Gemma Scope 2 loader,
circuit-tracer's) then fails on the missing tensor instead of reading zeros as a ReLU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from allscope.release import layout

REQUIRED = ("w_enc", "w_dec", "b_enc", "b_dec")  # + threshold for jump_relu
OPTIONAL = ("affine_skip_connection",)


def threshold_rule(architecture: str) -> str:
  """Whether `threshold` is "required" (jump_relu), "forbidden" (topk) or "optional" (relu)."""
  return {"jump_relu": "required", "topk": "forbidden"}.get(architecture, "optional")


@dataclasses.dataclass(frozen=True, eq=False)
class Dictionary:
  """One per-layer dictionary (SAE, transcoder or skip-transcoder, or a crosscoder).

  `params` holds float32 arrays: w_enc [d_in, F], w_dec [F, d_out], b_enc [F], b_dec [d_out],
  threshold [F] (jump_relu; none for topk; absent or 0 for relu) and optionally
  affine_skip_connection [d_in, d_out]. `layer` is the layer it reads (a crosscoder lists all of
  its layers in `layers`). `l0` is a fallback mean L0 (e.g. the training estimate): the release
  names folders and fills config `l0` with the held-out L0 from evaluation when it has one, and
  `l0_tag` overrides both for the folder name. `k` is TopK's k. `metadata` adds config.json fields.
  """

  params: Mapping[str, np.ndarray]
  type: str
  architecture: str
  model_name: str
  layer: int
  site_in: str
  site_out: str
  l0: float | None = None
  l0_tag: str | None = None
  k: int | None = None
  layers: tuple[int, ...] = ()
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def width(self) -> int:
    return int(self.params["b_enc"].shape[0])

  @property
  def affine(self) -> bool:
    return "affine_skip_connection" in self.params

  def encode(self, x: Any, xp: Any = np) -> Any:
    """Latent activations [..., F] of inputs x [..., d_in] (a crosscoder: its layers' inputs
    concatenated, layer-major); float32 numpy, or jax.numpy arrays with `xp=jax.numpy`."""
    x = _as_input(x, self.params["w_enc"].shape[0], "x", xp)
    return encode(self.params, x, self.architecture, self.k, xp)

  def decode(self, f: Any, x: Any | None = None, xp: Any = np) -> Any:
    """Outputs [..., d_out] of latents f [..., F]; an affine skip-transcoder also needs its
    inputs x (the skip term x @ affine_skip_connection is part of its output)."""
    f = _as_input(f, self.width, "f", xp)
    if self.affine:
      if x is None:
        raise ValueError("this skip-transcoder's output adds x @ affine_skip_connection: "
                         "call decode(f, x) with the inputs x")
      x = _as_input(x, self.params["w_enc"].shape[0], "x", xp)
    return decode(self.params, f, x)

  def validate(self, source: str = "dictionary") -> None:
    if self.type not in ("sae", "transcoder", "crosscoder"):
      raise ValueError(f"{source}: type {self.type!r} must be sae, transcoder or crosscoder "
                       "(a CLT is a CrossLayerTranscoder)")
    _check_common(self.architecture, self.k, source)
    for site in (self.site_in, self.site_out):
      if site not in layout.SITES:
        raise ValueError(f"{source}: unknown site {site!r}; expected one of {', '.join(layout.SITES)}")
    if self.layer < 0:
      raise ValueError(f"{source}: layer {self.layer} must be >= 0")
    check_params(self.params, source, self.architecture)


@dataclasses.dataclass(frozen=True, eq=False)
class CrossLayerTranscoder:
  """A CLT: `layer_params[i]` reads mlp_in of model layer `layers[i]` and writes mlp_out of
  layers[j] for j >= i. `layers` defaults to 0..L-1 (all layers, as Gemma Scope 2 and
  circuit-tracer expect).

  Per source layer: w_enc [d, F], b_enc [F], threshold [F], w_dec [F, L, d] (zero for j < i, the
  Gemma Scope 2 layout), b_dec [d] (the output bias of that layer), affine_skip_connection [d, d]
  optional (mlp_in -> mlp_out of the same layer).
  """

  layer_params: tuple[Mapping[str, np.ndarray], ...]
  architecture: str
  model_name: str
  l0: float | None = None
  l0_tag: str | None = None
  k: int | None = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  layers: tuple[int, ...] = ()

  type = "clt"
  site_in = "mlp_in"
  site_out = "mlp_out"

  @property
  def n_layers(self) -> int:
    return len(self.layer_params)

  @property
  def model_layers(self) -> tuple[int, ...]:
    return tuple(self.layers) or tuple(range(self.n_layers))

  @property
  def width(self) -> int:
    return int(self.layer_params[0]["b_enc"].shape[0])

  @property
  def affine(self) -> bool:
    return "affine_skip_connection" in self.layer_params[0]

  def encode(self, xs: Any, xp: Any = np) -> list[Any]:
    """Latents per layer [..., F] of inputs xs (one [..., d] mlp_in per layer, in order)."""
    xs = self._inputs(xs, xp)
    return [encode(p, x, self.architecture, self.k, xp) for p, x in zip(self.layer_params, xs)]

  def decode(self, feats: Any, xs: Any | None = None, xp: Any = np) -> list[Any]:
    """Outputs per layer [..., d] (mlp_out of layer j sums the decoders of every layer i <= j)
    of latents `feats` (one [..., F] per layer); an affine CLT also needs its inputs xs."""
    if len(feats) != self.n_layers:
      raise ValueError(f"got latents of {len(feats)} layers; this CLT has {self.n_layers}")
    feats = [_as_input(f, self.width, f"feats[{i}]", xp) for i, f in enumerate(feats)]
    if self.affine:
      if xs is None:
        raise ValueError("this CLT's outputs add x @ affine_skip_connection: call "
                         "decode(feats, xs) with the inputs xs")
      xs = self._inputs(xs, xp)
    return clt_decode(self.layer_params, feats, xs)

  def _inputs(self, xs: Any, xp: Any) -> list[Any]:
    if len(xs) != self.n_layers:
      raise ValueError(f"got inputs of {len(xs)} layers; this CLT reads {self.n_layers} "
                       f"(model layers {self.model_layers})")
    d = self.layer_params[0]["w_enc"].shape[0]
    return [_as_input(x, d, f"xs[{i}]", xp) for i, x in enumerate(xs)]

  def validate(self, source: str = "clt") -> None:
    _check_common(self.architecture, self.k, source)
    n = self.n_layers
    if n == 0:
      raise ValueError(f"{source}: a CLT needs at least one layer")
    if self.layers and (len(self.layers) != n or list(self.layers) != sorted(set(self.layers))
                        or min(self.layers) < 0):
      raise ValueError(f"{source}: layers {self.layers} must be {n} increasing layer indices >= 0")
    for l, params in enumerate(self.layer_params):
      where = f"{source} layer {l}"
      check_params(params, where, self.architecture, clt_layers=n)
      if params["b_enc"].shape[0] != self.width:
        raise ValueError(f"{where}: width {params['b_enc'].shape[0]} differs from layer 0's {self.width}")
      if ("affine_skip_connection" in params) != self.affine:
        raise ValueError(f"{where}: affine_skip_connection must be present on all layers or none")
      if l > 0 and np.any(params["w_dec"][:, :l]):
        raise ValueError(f"{where}: w_dec writes to earlier layers 0..{l - 1}; a CLT writes to l' >= l")


def _as_input(a: Any, width: int, name: str, xp: Any) -> Any:
  """`a` as float32 with `width` features last; the error names the argument and both widths."""
  a = xp.asarray(a, dtype=xp.float32)
  if a.ndim < 1 or a.shape[-1] != width:
    raise ValueError(f"{name} has shape {tuple(a.shape)}; expected [..., {width}]")
  return a


def _check_common(architecture: str, k: int | None, source: str) -> None:
  if architecture not in layout.ARCHITECTURES:
    raise ValueError(f"{source}: architecture {architecture!r} must be one of "
                     f"{', '.join(layout.ARCHITECTURES)} (convert BatchTopK to jump_relu first)")
  if architecture == "topk" and (k is None or k < 1):
    raise ValueError(f"{source}: a topk dictionary needs k >= 1, got {k!r}")


def check_params(params: Mapping[str, np.ndarray], source: str, architecture: str = "jump_relu",
                 clt_layers: int | None = None) -> None:
  """Keys, dtypes, shapes and finiteness, with the file (or object) named in every error."""
  rule = threshold_rule(architecture)
  required = REQUIRED + (("threshold",) if rule == "required" else ())
  missing = [k for k in required if k not in params]
  if missing:
    raise ValueError(f"{source}: missing tensor(s) {', '.join(missing)}; a {architecture} "
                     f"dictionary has {', '.join(required)} (+ optional {', '.join(OPTIONAL)})")
  if rule == "forbidden" and "threshold" in params:
    raise ValueError(f"{source}: a topk dictionary has no threshold tensor (a JumpReLU loader "
                     "would read it as one); drop params['threshold']")
  unknown = sorted(set(params) - set(required) - set(OPTIONAL) - {"threshold"})
  if unknown:
    raise ValueError(f"{source}: unknown tensor(s) {', '.join(unknown)}")
  for key, value in params.items():
    if not isinstance(value, np.ndarray) or value.dtype != np.float32:
      raise ValueError(f"{source}: tensor {key} must be a float32 numpy array, got "
                       f"{getattr(value, 'dtype', type(value).__name__)}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{source}: tensor {key} holds NaN or inf")
  w_enc, w_dec = params["w_enc"], params["w_dec"]
  if w_enc.ndim != 2:
    raise ValueError(f"{source}: w_enc has shape {w_enc.shape}, expected [d_in, F]")
  d_in, width = w_enc.shape
  if clt_layers is None:
    expected_dec_ndim, dec_desc = 2, "[F, d_out]"
  else:
    expected_dec_ndim, dec_desc = 3, f"[F, {clt_layers}, d]"
  if w_dec.ndim != expected_dec_ndim or w_dec.shape[0] != width or (
      clt_layers is not None and w_dec.shape[1] != clt_layers):
    raise ValueError(f"{source}: w_dec has shape {w_dec.shape}, expected {dec_desc} with F={width}")
  d_out = w_dec.shape[-1]
  expected = {"b_enc": (width,), "threshold": (width,), "b_dec": (d_out,),
              "affine_skip_connection": (d_in, d_out)}
  for key, shape in expected.items():
    if key in params and params[key].shape != shape:
      raise ValueError(f"{source}: {key} has shape {params[key].shape}, expected {shape} "
                       f"(d_in={d_in}, F={width}, d_out={d_out})")
  if architecture == "jump_relu" and np.any(params["threshold"] < 0):
    # SAELens computes relu(pre) * (pre > threshold): equal to ours only for thresholds >= 0.
    raise ValueError(f"{source}: threshold has negative entries; JumpReLU thresholds must be >= 0 "
                     "for SAELens and circuit-tracer to reproduce the encodings")
  if architecture == "relu" and "threshold" in params and np.any(params["threshold"] != 0):
    raise ValueError(f"{source}: a relu dictionary's threshold must be absent or all 0 (a ReLU "
                     "is a JumpReLU at 0); use architecture jump_relu for non-zero thresholds")


def activate(pre: Any, threshold: Any, architecture: str, k: int | None = None, xp: Any = np) -> Any:
  """The activation function on pre-activations `pre` [..., F] (numpy or jax.numpy as `xp`)."""
  if architecture == "jump_relu":
    return pre * (pre > threshold)
  if architecture == "relu":
    return xp.maximum(pre, 0)
  if architecture == "topk":
    kth = xp.sort(pre, axis=-1)[..., -k][..., None]  # ties at the k-th value all stay
    return xp.maximum(pre, 0) * (pre >= kth)
  raise ValueError(f"unknown architecture {architecture!r}")


def encode(params: Mapping[str, Any], x: Any, architecture: str, k: int | None = None,
           xp: Any = np) -> Any:
  pre = x @ params["w_enc"] + params["b_enc"]
  return activate(pre, params.get("threshold"), architecture, k, xp)


def decode(params: Mapping[str, Any], f: Any, x: Any | None = None) -> Any:
  y = f @ params["w_dec"] + params["b_dec"]
  if "affine_skip_connection" in params:
    y = y + x @ params["affine_skip_connection"]
  return y


def clt_forward(clt: CrossLayerTranscoder, xs: list[Any], xp: Any = np,
                params: tuple[Mapping[str, Any], ...] | None = None) -> tuple[list[Any], list[Any]]:
  """CLT features per layer and outputs per layer from inputs `xs[l]` = mlp_in[l] [..., d]."""
  params = params if params is not None else clt.layer_params
  feats = [encode(p, x, clt.architecture, clt.k, xp) for p, x in zip(params, xs)]
  return feats, clt_decode(params, feats, xs)


def clt_decode(params: tuple[Mapping[str, Any], ...], feats: list[Any],
               xs: list[Any] | None) -> list[Any]:
  """Per target layer j: b_dec[j] + sum over sources i <= j of feats[i] @ w_dec[i][:, j]
  (+ xs[j] @ affine_skip_connection[j])."""
  outs = []
  for target in range(len(params)):
    y = params[target]["b_dec"]
    for source in range(target + 1):
      y = y + feats[source] @ params[source]["w_dec"][:, target]
    if "affine_skip_connection" in params[target]:
      y = y + xs[target] @ params[target]["affine_skip_connection"]
    outs.append(y)
  return outs
