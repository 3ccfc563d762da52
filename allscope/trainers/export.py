"""Export: trained state -> per-dictionary float32 arrays in the Gemma Scope 2 layout.

`release_arrays` folds the per-(site, layer) normalization into the weights, so the exported
dictionary acts on raw activations: with x = s_in * x_raw during training,
  w_enc' = s_in * w_enc           (pre-activations, thresholds and b_enc unchanged)
  w_dec' = w_dec / s_out,  b_dec' = b_dec / s_out,  affine_skip' = w_skip * s_in / s_out
(per layer block for a CLT's targets and a crosscoder's input/output blocks).

Activations: JumpReLU exports its thresholds; ReLU exports as JumpReLU with threshold 0 (the
same function); BatchTopK exports as JumpReLU whose threshold (every latent of a dictionary) is
the running mean of the training batches' smallest kept value (TrainState.batch_thr, Bussmann et
al. 2024); TopK exports as architecture "topk" with `k` in the metadata and no threshold at all
(f = relu of the k largest pre-activations), so a JumpReLU-only loader fails on it instead of
reading a ReLU. `l0` in the metadata is the training estimate (running mean).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from allscope.kernels import clt_layout
from allscope.trainers.config import TrainConfig
from allscope.trainers.state import TrainState


@dataclasses.dataclass
class ExportedDictionary:
  name: str  # e.g. "mlp_in/layer_3_width_16384" or "clt/layer_3" (the release names folders)
  arrays: dict[str, np.ndarray]  # Gemma Scope 2 keys, float32
  metadata: dict[str, Any]


def _np(a: jax.Array) -> np.ndarray:
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    a = multihost_utils.process_allgather(a, tiled=True)
  return np.asarray(jax.device_get(a), np.float64)


def _architecture(cfg: TrainConfig) -> str:
  return "topk" if cfg.activation == "topk" else "jump_relu"


def _thresholds(cfg: TrainConfig, params, state) -> np.ndarray | None:
  """[G, F] JumpReLU thresholds of the export; None for TopK, which has none."""
  g, f = cfg.n_groups, cfg.width
  if cfg.activation == "jumprelu":
    return np.exp(params["log_threshold"])
  if cfg.activation == "batchtopk":
    thr = _np(state.batch_thr)
    if not np.all(thr > 0):
      # 0 would release the BatchTopK dictionary as a ReLU, which it is not.
      raise ValueError(f"BatchTopK thresholds {thr.tolist()} are not all positive: the state "
                       "has not trained (or every batch kept a non-positive value); train "
                       "steps before exporting")
    return np.repeat(thr[:, None], f, axis=1)
  if cfg.activation == "relu":
    return np.zeros((g, f))
  return None


def release_arrays(cfg: TrainConfig, state: TrainState, norm_scale: Mapping[str, Any],
                   model_name: str = "gemma3-270m") -> list[ExportedDictionary]:
  """One ExportedDictionary per trained dictionary (per layer; per source layer for a CLT).

  state: TrainResult.state or checkpoint.restore_latest(...).state (the one conversion from a
  train state to release arrays); norm_scale: {site: [n_layers]}.
  """
  params = {k: _np(v) for k, v in state.params.items()}
  thresholds = _thresholds(cfg, params, state)
  l0 = _np(state.l0)
  site_in, site_out = cfg.sites
  s_in = np.asarray(norm_scale[site_in], np.float64).reshape(-1)
  s_out = np.asarray(norm_scale[site_out], np.float64).reshape(-1)
  kind_type = {"sae": "sae", "transcoder": "transcoder", "skip_transcoder": "transcoder",
               "clt": "clt", "crosscoder": "crosscoder"}[cfg.kind]
  base = {"architecture": _architecture(cfg), "model_name": model_name, "width": cfg.width,
          "type": kind_type, "kind": cfg.kind, "affine_connection": cfg.kind == "skip_transcoder",
          "site_in": site_in, "site_out": site_out, "activation_trained": cfg.activation,
          "normalization_folded": True}
  if cfg.activation == "topk":
    base["k"] = cfg.k
  out = []
  if cfg.kind == "crosscoder":
    n, d_in = len(cfg.layers), params["w_enc"].shape[1] // len(cfg.layers)
    d_out = params["w_dec"].shape[-1] // n
    rows_in = np.repeat(s_in, d_in)
    cols_out = np.repeat(s_out, d_out)
    arrays = {"w_enc": params["w_enc"][0] * rows_in[:, None], "b_enc": params["b_enc"][0],
              "w_dec": params["w_dec"][0] / cols_out[None, :], "b_dec": params["b_dec"][0] / cols_out}
    if thresholds is not None:
      arrays["threshold"] = thresholds[0]
    meta = {**base, "layers": list(cfg.layers), "l0": float(l0[0]),
            "layout": "inputs and outputs are the listed layers concatenated, layer-major"}
    return [ExportedDictionary(f"crosscoder/width_{cfg.width}", _f32(arrays), meta)]
  for g, layer in enumerate(cfg.layers):
    arrays = {"w_enc": params["w_enc"][g] * s_in[g], "b_enc": params["b_enc"][g]}
    if thresholds is not None:
      arrays["threshold"] = thresholds[g]
    if cfg.kind == "clt":
      # Causal [F, P, d] -> this source's Gemma Scope 2 [F, L, d], zero rows for targets t < g.
      arrays["w_dec"] = clt_layout.to_dense(params["w_dec"], g) / s_out[None, :, None]
      arrays["b_dec"] = params["b_dec"][g] / s_out[g]
      name = f"clt/layer_{layer}"
    else:
      arrays["w_dec"] = params["w_dec"][g] / s_out[g]
      arrays["b_dec"] = params["b_dec"][g] / s_out[g]
      name = f"{site_in}/layer_{layer}_width_{cfg.width}"
    if "w_skip" in params:
      arrays["affine_skip_connection"] = params["w_skip"][g] * s_in[g] / s_out[g]
    # Hook names, folder names and config.json belong to the release step (release/layout.py).
    meta = {**base, "layer": layer, "l0": float(l0[g])}
    if cfg.kind == "clt":
      meta["target_layers"] = list(cfg.layers)
    out.append(ExportedDictionary(name, _f32(arrays), meta))
  return out


def _f32(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
