"""Export of a per-layer dictionary to SAELens' own on-disk format (`SAE.load_from_disk(path)`).

SAELens' Gemma 3 loader reads the Gemma Scope 2 layout only from the Hub (it fetches tensor
shapes with HTTP range requests), so a local folder in SAELens' format is the offline route:

  <dir>/cfg.json                  flat SAELens config, apply_b_dec_to_input false
  <dir>/sae_weights.safetensors   W_enc [d_in, F], W_dec [F, d_out], b_enc, b_dec, threshold,
                                  W_skip [d_out, d_in] (the transpose of affine_skip_connection)

Architectures: jump_relu -> jumprelu[_skip]_transcoder / jumprelu, relu -> [skip_]transcoder /
standard, topk SAE -> topk (with `k`). SAELens has no TopK transcoder class, so a TopK
transcoder gets no SAELens copy (`unsupported` says why; the release records it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from allscope.release import export, layout
from allscope.release.dictionary import Dictionary

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

# TransformerLens hook names, as SAELens' own Gemma 3 loader sets them.
_TL_HOOKS = {"resid_post": "blocks.{l}.hook_resid_post", "attn_out": "blocks.{l}.attn.hook_z",
             "mlp_in": "blocks.{l}.hook_mlp_in", "mlp_out": "blocks.{l}.hook_mlp_out"}


def unsupported(d: Dictionary) -> str | None:
  """Why SAELens has no class for `d` (None when it has one)."""
  try:
    saelens_architecture(d)
  except ValueError as e:
    return str(e)
  return None


def saelens_architecture(d: Dictionary) -> str:
  if d.type == "sae":
    names = {"jump_relu": "jumprelu", "relu": "standard", "topk": "topk"}
  elif d.type == "transcoder":
    skip = "skip_" if d.affine else ""
    names = {"jump_relu": f"jumprelu_{skip}transcoder", "relu": f"{skip}transcoder"}
  else:
    names = {}
  if d.architecture not in names:
    raise ValueError(f"SAELens (6.54) has no architecture for a {d.architecture} {d.type}"
                     f"{' with a skip connection' if d.affine else ''}")
  if d.type == "sae" and d.affine:
    raise ValueError("SAELens SAEs have no affine skip connection")
  return names[d.architecture]


def saelens_config(d: Dictionary) -> dict[str, Any]:
  config: dict[str, Any] = {
      "architecture": saelens_architecture(d),
      "d_in": int(d.params["w_enc"].shape[0]),
      "d_sae": d.width,
      "dtype": "float32",
      "device": "cpu",
      "apply_b_dec_to_input": False,
      "normalize_activations": "none",
      "reshape_activations": "none",
      "model_name": export.hf_model_name(d.model_name),
      "hook_name": _TL_HOOKS[d.site_in].format(l=d.layer),
      "hook_head_index": None,
      "hf_hook_name": layout.hf_hook_point(d.site_in, d.layer),
      "prepend_bos": True,
  }
  if d.type == "transcoder":
    config["d_out"] = int(d.params["w_dec"].shape[1])
    config["hook_name_out"] = _TL_HOOKS[d.site_out].format(l=d.layer)
    config["hf_hook_name_out"] = layout.hf_hook_point(d.site_out, d.layer)
  if d.architecture == "topk":
    config["k"] = d.k
  return config


def write_saelens(d: Dictionary, directory: str | Path) -> Path:
  """Writes `d` in SAELens' format into `directory` (created); returns it."""
  d.validate("dictionary")
  directory = Path(directory)
  config = saelens_config(d)
  p = d.params
  weights = {"W_enc": p["w_enc"], "W_dec": p["w_dec"], "b_enc": p["b_enc"], "b_dec": p["b_dec"]}
  if d.architecture == "jump_relu":
    weights["threshold"] = p["threshold"]
  if d.affine:
    weights["W_skip"] = p["affine_skip_connection"].T
  export.write_tensors(directory / WEIGHTS_FILE, weights, {"format": "pt"})
  export.write_json(directory / CFG_FILE, config)
  return directory
