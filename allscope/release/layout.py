"""Names in a release folder: folder names and safe paths (sites and Hugging Face hook points
come from allscope.models.sites).

Folder names follow Gemma Scope 2 (`resid_post/layer_5_width_16k_l0_71`), because SAELens' Gemma 3
loader infers the hook point from them: it looks for `resid_post`, `attn_out`, `mlp_out`,
`transcoder` or `clt` in the folder name. Transcoders therefore live under `transcoder/`, and a
skip-transcoder's folder ends in `_affine` like Gemma Scope 2's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from allscope.models.sites import SITES, hf_hook_point  # noqa: F401  (their home is models)

TYPES = ("sae", "transcoder", "clt", "crosscoder")
ARCHITECTURES = ("jump_relu", "topk", "relu")

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_component(name: str, what: str) -> str:
  """Accepts `name` only as one plain path component, so it can never leave its parent folder."""
  if not isinstance(name, str) or not _COMPONENT.match(name) or name in (".", "..") or ".." in name:
    raise ValueError(
        f"{what} {name!r} is not a safe name: use 1-128 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit, and no '..'")
  return name


def inside(root: str | Path, relative: str | Path) -> Path:
  """`root / relative`, refusing any path that resolves outside `root` (.., absolute, symlinks)."""
  root_path = Path(root).resolve()
  candidate = (root_path / relative).resolve()
  if candidate != root_path and root_path not in candidate.parents:
    raise ValueError(f"path {str(relative)!r} escapes the release folder {root_path}")
  return candidate


def width_tag(width: int) -> str:
  """Gemma Scope naming: 16384 -> 16k, 262144 -> 262k, 1048576 -> 1m; below 1000 the number."""
  if width < 1000:
    return str(width)
  if width < 1_000_000:
    return f"{width // 1000}k"
  return f"{width // 1_000_000}m"


def l0_tag(l0: float | None, tag: str | None = None) -> str:
  """An explicit tag (`small`, `medium`, ...) or the measured L0 rounded to an integer."""
  if tag is not None:
    return check_component(tag, "l0 tag")
  if l0 is None or not math.isfinite(l0) or l0 < 0:
    raise ValueError(f"l0 {l0!r} cannot name a folder: give a measured L0 >= 0 or an explicit l0_tag")
  return str(int(round(l0)))


def site_folder(type_: str, site_in: str, site_out: str) -> str:
  """The top-level folder of a per-layer dictionary: its site, or `transcoder` for transcoders."""
  if type_ == "transcoder":
    return "transcoder"
  if type_ == "crosscoder":
    return "crosscoder"
  if site_in != site_out:
    raise ValueError(f"an sae reads and writes one site; got site_in={site_in!r}, site_out={site_out!r}")
  return site_in


def dictionary_folder(type_: str, site_in: str, site_out: str, layer: int, width: int,
                      l0: float | None, tag: str | None, affine: bool) -> str:
  """Relative folder of a per-layer dictionary, e.g. `transcoder/layer_5_width_16k_l0_71_affine`."""
  name = f"layer_{layer}_width_{width_tag(width)}_l0_{l0_tag(l0, tag)}"
  if affine:
    name += "_affine"
  return f"{site_folder(type_, site_in, site_out)}/{name}"


def clt_folder(width: int, l0: float | None, tag: str | None, affine: bool) -> str:
  name = f"width_{width_tag(width)}_l0_{l0_tag(l0, tag)}"
  if affine:
    name += "_affine"
  return f"clt/{name}"
