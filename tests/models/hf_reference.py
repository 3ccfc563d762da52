"""Hugging Face transformers as the independent reference: sites read by forward hooks on the
module names of the design (see DESIGN: sites)."""

from __future__ import annotations

import numpy as np
import torch

HOOKS = {  # site -> (module path under model.layers[i], read the module's input or output)
    "resid_post": ("", "output"),
    "attn_out": ("self_attn.o_proj", "input"),
    "mlp_in": ("pre_feedforward_layernorm", "output"),
    "mlp_out": ("post_feedforward_layernorm", "output"),
}


@torch.no_grad()
def run(hf_model, tokens: np.ndarray, mask: np.ndarray, replace: dict | None = None):
  """Returns (logits [B,S,V], {site: [B,S,L,d]}) in float64 numpy.

  `replace` maps (site, layer) to a torch function applied to that site's output, mirroring
  allscope's splice.
  """
  layers = hf_model.model.layers
  captured = {site: [None] * len(layers) for site in HOOKS}
  handles = []
  for i, layer in enumerate(layers):
    for site, (path, where) in HOOKS.items():
      module = layer.get_submodule(path) if path else layer
      fn = (replace or {}).get((site, i))

      def hook(mod, args, out, site=site, i=i, where=where, fn=fn):
        value = args[0] if where == "input" else (out[0] if isinstance(out, tuple) else out)
        if fn is not None:
          assert where == "output", "splicing is mirrored on module outputs only"
          value = fn(value)
        captured[site][i] = value.double().numpy()
        if fn is not None:
          return (value, *out[1:]) if isinstance(out, tuple) else value
        return None

      handles.append(module.register_forward_hook(hook))
  try:
    out = hf_model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                   attention_mask=torch.as_tensor(mask, dtype=torch.long))
  finally:
    for h in handles:
      h.remove()
  sites = {s: np.stack(v, axis=2) for s, v in captured.items()}
  return out.logits.double().numpy(), sites


def rel_err(ours, ref, mask: np.ndarray | None = None) -> float:
  """||ours - ref|| / ||ref|| over valid positions (mask [B, S]) in float64."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if mask is not None:
    ours, ref = ours[mask], ref[mask]
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
