"""The four capture sites: their names, widths and Hugging Face hook points (one home for all
stages; names follow the Gemma Scope 2 release configs). Imports nothing heavy."""

from __future__ import annotations

SITES = ("resid_post", "attn_out", "mlp_in", "mlp_out")

# The transformers Gemma3 module output each site is read from or written to.
_HF_HOOK_POINTS = {
    "resid_post": "model.layers.{layer}.output",
    "attn_out": "model.layers.{layer}.self_attn.o_proj.input",
    "mlp_in": "model.layers.{layer}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{layer}.post_feedforward_layernorm.output",
}


def check(site: str) -> str:
  if site not in SITES:
    raise ValueError(f"unknown site {site!r}; expected one of {', '.join(SITES)}")
  return site


def hf_hook_point(site: str, layer: int | str) -> str:
  """The Hugging Face (transformers Gemma3) module output of a site at a layer; `layer` may be
  a template such as "{layer}"."""
  return _HF_HOOK_POINTS[check(site)].format(layer=layer)


def widths(d_model: int, n_heads: int, head_dim: int) -> dict[str, int]:
  """Width of each site: attn_out is the concatenated per-head outputs before o_proj."""
  return {"resid_post": d_model, "attn_out": n_heads * head_dim, "mlp_in": d_model,
          "mlp_out": d_model}
