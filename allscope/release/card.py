"""The model card: README.md with a metrics table, and its PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allscope import files

PLOTS = ("l0_vs_fvu.png", "delta_lm_loss.png", "latent_frequency.png")


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}g}"
  return str(value)


def write_plots(release_dir: Path, entries: Sequence[Mapping[str, Any]],
                frequencies: Sequence[np.ndarray | None]) -> list[str]:
  """L0 vs FVU per layer, delta LM loss per layer, latent frequency histogram; returns file names."""
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  per_layer = [e for e in entries if e.get("layer") is not None and "fvu" in e.get("metrics", {})]
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for e in per_layer:
    groups.setdefault(f"{e['type']} {e['site_in']}->{e['site_out']}" if e["type"] == "transcoder"
                      else f"{e['type']} {e['site_in']}", []).append(e)
  written = []

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for label, group in groups.items():
    group = sorted(group, key=lambda e: e["layer"])
    l0 = [e["metrics"]["l0"] for e in group]
    fvu = [e["metrics"]["fvu"] for e in group]
    layers = [e["layer"] for e in group]
    sc = axes[0].scatter(l0, fvu, c=layers, cmap="viridis", label=label, edgecolors="k", linewidths=0.3)
    axes[1].plot(layers, fvu, marker="o", label=label)
  if groups:
    fig.colorbar(sc, ax=axes[0], label="layer")
  axes[0].set(xlabel="L0 (active latents per token)", ylabel="FVU", title="L0 vs FVU")
  axes[1].set(xlabel="layer", ylabel="FVU", title="FVU per layer")
  axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
  for ax in axes:
    ax.grid(alpha=0.3)
  if groups:
    axes[1].legend(fontsize=8)
  written.append(_save(fig, release_dir, PLOTS[0]))

  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  for label, group in groups.items():
    group = sorted((e for e in group if "delta_lm_loss" in e["metrics"]), key=lambda e: e["layer"])
    if not group:
      continue
    layers = [e["layer"] for e in group]
    ax.plot(layers, [e["metrics"]["delta_lm_loss"] for e in group], marker="o", label=f"{label} spliced")
    if all("ce_zero_ablation" in e["metrics"] for e in group):  # evaluate.zero_ablation
      ax.plot(layers, [e["metrics"]["ce_zero_ablation"] - e["metrics"]["ce_clean"] for e in group],
              marker="x", linestyle="--", label=f"{label} zero ablation")
  ax.set(xlabel="layer", ylabel="delta LM loss (nats/token)", title="Delta LM loss per layer")
  ax.set_yscale("symlog", linthresh=1e-2)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  written.append(_save(fig, release_dir, PLOTS[1]))

  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  all_freq = [np.asarray(f).reshape(-1) for f in frequencies if f is not None]
  if all_freq:
    freq = np.concatenate(all_freq)
    alive = freq[freq > 0]
    if alive.size:
      ax.hist(np.log10(alive), bins=50, color="tab:blue", alpha=0.8)
    ax.set_title(f"Latent firing frequency ({int(np.sum(freq == 0))} dead of {freq.size})")
  ax.set(xlabel="log10(fraction of tokens a latent fires on)", ylabel="latents")
  ax.axvline(-1, color="tab:red", linestyle="--", label="dense (10%)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  written.append(_save(fig, release_dir, PLOTS[2]))
  return written


def _save(fig, release_dir: Path, name: str) -> str:
  import matplotlib.pyplot as plt

  fig.tight_layout()
  files.atomic_write(release_dir / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
  plt.close(fig)
  return name


def readme(name: str, info: Mapping[str, Any], entries: Sequence[Mapping[str, Any]],
           plots: Sequence[str]) -> str:
  model = info.get("model_name", "?")
  lines = [
      f"# {name}",
      "",
      f"Sparse dictionaries for **{model}**, trained and evaluated with "
      "allscope, in the Gemma Scope 2 release layout: float32 safetensors "
      "with the keys `w_enc [d_in, F]`, `w_dec [F, d_out]`, `b_enc`, `b_dec`, `threshold` (and "
      "`affine_skip_connection` for skip-transcoders), a `config.json` per dictionary with the "
      "Hugging Face hook points, and `manifest.json` with every file's sha256.",
      "",
      "| | |",
      "|---|---|",
  ]
  for key in ("model_name", "model_fingerprint", "corpus", "train_tokens", "eval_tokens",
              "context_length"):
    if key in info:
      lines.append(f"| {key.replace('_', ' ')} | {info[key]} |")
  lines += [
      "",
      "## Use",
      "",
      "```python",
      "import allscope.release",
      "release = allscope.release.load('.')  # verifies checksums",
      "```",
      "",
      "SAELens and circuit-tracer load these folders; see the allscope docs (docs/release.md) for "
      "the exact calls.",
      "",
      "## Metrics",
      "",
      "FVU and L0 on held-out tokens; delta LM loss is the next-token cross-entropy with the "
      "dictionary's output spliced into the forward pass minus the clean one (nats/token); zero "
      "ablation replaces the same site with zeros.",
      "",
      "| dictionary | type | layer | width | L0 | FVU | dead | dense | delta LM loss | zero-abl. delta | loss recovered |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for e in entries:
    m = e.get("metrics", {})
    zero = (m["ce_zero_ablation"] - m["ce_clean"]) if "ce_zero_ablation" in m else None
    layer = e.get("layer") if e.get("layer") is not None else f"0-{(e.get('n_layers') or 1) - 1}"
    lines.append(
        f"| `{e['path']}` | {e['type']} | {layer} | {e['width']} | {_fmt(m.get('l0'), 3)} | "
        f"{_fmt(m.get('fvu'))} | {_fmt(m.get('dead_fraction'), 3)} | "
        f"{_fmt(m.get('dense_fraction'), 3)} | {_fmt(m.get('delta_lm_loss'))} | {_fmt(zero)} | "
        f"{_fmt(m.get('fraction_loss_recovered'))} |")
  if plots:
    lines += ["", "## Plots", ""]
    titles = {"l0_vs_fvu.png": "L0 vs FVU per layer", "delta_lm_loss.png": "Delta LM loss per layer",
              "latent_frequency.png": "Latent firing frequency"}
    for p in plots:
      lines += [f"![{titles.get(p, p)}]({p})", ""]
  return "\n".join(lines).rstrip() + "\n"
