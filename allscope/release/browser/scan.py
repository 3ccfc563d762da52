"""One streaming pass over an activation store for every dictionary of a release at once.

Per latent of every unit (a per-layer dictionary, or one source layer of a CLT) it keeps:

  top_values, top_rows [F, N]   the N largest activations and the rows they came from
                                (record * rows_per_record + slot over full records): a bounded heap, merged batch by batch with lax.top_k
  hist [F, n_bins]              counts of non-zero activations in log-spaced bins
  fired [F], act_sum [F]        how often it fired and the sum of its activations

Encoding is the release's own math (`release.dictionary.encode`), jitted once for all units, with
the state donated. A row of the pass is `record * rows_per_record + slot` over the store's full
records in order (from `skip_tokens`), so the store's index gives back its (sequence,
position, token).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from allscope.release import dictionary as dict_math
from allscope.release.browser.config import BrowseConfig


@dataclasses.dataclass(frozen=True, eq=False)
class Unit:
  """What the browser shows as one dictionary: `key` (its release folder, plus `/layer_<l>` for
  a CLT's source layer), the store `site` and model `layer` it reads, its encoder `params`
  (w_enc, b_enc, threshold), and `directions` [F, d_out]: what each latent writes to `out_site`
  at `out_layer` (a CLT's source layer: its decoder rows summed over the layers it writes)."""

  key: str
  label: str
  site: str
  layer: int
  params: Mapping[str, np.ndarray]
  architecture: str
  k: int | None
  out_site: str
  out_layer: int
  directions: np.ndarray

  @property
  def width(self) -> int:
    return int(self.params["b_enc"].shape[0])


@dataclasses.dataclass
class LatentStats:
  """A unit's pass results (numpy): see the module docstring. `n_tokens` rows were seen."""

  n_tokens: int
  fired: np.ndarray
  act_sum: np.ndarray
  hist: np.ndarray
  top_values: np.ndarray
  top_rows: np.ndarray

  @property
  def frequency(self) -> np.ndarray:
    return self.fired / max(self.n_tokens, 1)


def _init_state(width: int, n_top: int, n_bins: int):
  return {"fired": jnp.zeros(width, jnp.int32), "act_sum": jnp.zeros(width, jnp.float32),
          "hist": jnp.zeros((width, n_bins), jnp.int32),
          "top_values": jnp.zeros((width, n_top), jnp.float32),
          "top_rows": jnp.full((width, n_top), -1, jnp.int32)}


def _update(state, f, offset, bins: tuple[float, int, int]):
  """Adds one batch of activations f [B, F] (zero on padding rows) to a unit's state."""
  lo, per_decade, n_bins = bins
  width, n_top = state["top_values"].shape
  on = f > 0
  b = jnp.clip(jnp.floor((jnp.log10(jnp.where(on, f, 1.0)) - lo) * per_decade), 0, n_bins - 1)
  flat = (jnp.arange(width, dtype=jnp.int32)[None, :] * n_bins + b.astype(jnp.int32)).reshape(-1)
  hist = state["hist"].reshape(-1).at[flat].add(on.reshape(-1).astype(jnp.int32))
  k = min(n_top, f.shape[0])
  values, idx = jax.lax.top_k(f.T, k)  # [F, k]: this batch's best rows per latent
  rows = offset + idx.astype(jnp.int32)
  merged_v = jnp.concatenate([state["top_values"], values], axis=1)
  merged_r = jnp.concatenate([state["top_rows"], rows], axis=1)
  top_values, pick = jax.lax.top_k(merged_v, n_top)
  return {"fired": state["fired"] + on.sum(0, dtype=jnp.int32),
          "act_sum": state["act_sum"] + f.sum(0),
          "hist": hist.reshape(width, n_bins),
          "top_values": top_values,
          "top_rows": jnp.take_along_axis(merged_r, pick, axis=1)}


@functools.partial(jax.jit, static_argnames=("specs", "bins"), donate_argnums=(0,))
def _step(states, params, xs, valid, offset, *, specs, bins):
  """One batch for every unit: xs {site: [B, L_site, d] bf16}, valid [B] bool."""
  out = []
  for state, p, (site, j, arch, k) in zip(states, params, specs):
    x = xs[site][:, j].astype(jnp.float32)
    f = dict_math.encode(p, x, arch, k, jnp) * valid[:, None]
    out.append(_update(state, f, offset, bins))
  return out


def check(units: Sequence[Unit], store: Any) -> None:
  """Every unit readable from `store`: its site and layer stored, at its input width."""
  if not units:
    raise ValueError("no dictionaries to browse")
  for u in units:
    if u.site not in store.sites or u.layer not in store.layers:
      raise ValueError(f"{u.key} reads {u.site} at layer {u.layer}, but the store {store.path} "
                       f"holds sites {list(store.sites)} at layers {list(store.layers)}; harvest "
                       "them or browse against another store")
    d = store.widths[u.site]
    if u.params["w_enc"].shape[0] != d:
      raise ValueError(f"{u.key}: w_enc has d_in {u.params['w_enc'].shape[0]} but {u.site} in "
                       f"the store has width {d}; was it trained on another model?")


def scan(units: Sequence[Unit], store: Any, cfg: BrowseConfig, *, progress: bool = True,
         verify: str = "checksum") -> tuple[list[LatentStats], dict[str, float]]:
  """The pass over `store` (an `ActivationStore`); returns per-unit stats and timing
  ({"tokens", "seconds", "tokens_per_s"}, compile included)."""
  from tqdm.auto import tqdm

  cfg.validate()
  r = store.rows_per_record
  per_batch = -(-cfg.batch_size // r)  # whole records: batch_size rounded up
  batch = per_batch * r
  check(units, store)
  layers = {s: tuple(sorted({u.layer for u in units if u.site == s}))
            for s in dict.fromkeys(u.site for u in units)}
  sources = {s: store.source((s,), ls, verify) for s, ls in layers.items()}
  total = len(next(iter(sources.values())))
  first = cfg.skip_tokens // r
  n_records = total - first
  if cfg.max_tokens:
    n_records = min(n_records, -(-cfg.max_tokens // r))
  if n_records <= 0:
    raise ValueError(f"{store.path} has {total * r} rows in full records; browse.skip_tokens="
                     f"{cfg.skip_tokens} leaves none to browse")
  n_rows = n_records * r
  if (first + n_records) * r >= 2**31:
    raise ValueError(f"browse.max_tokens: a pass of {n_rows} rows exceeds int32 row ids; "
                     "lower browse.max_tokens")

  specs = tuple((u.site, layers[u.site].index(u.layer), u.architecture, u.k) for u in units)
  bins = (float(cfg.min_log10), int(cfg.bins_per_decade), cfg.n_bins)
  params = [_encoder(u) for u in units]
  states = [_init_state(u.width, cfg.top_n, cfg.n_bins) for u in units]
  bar = tqdm(total=n_rows, desc="browse", unit="tok", unit_scale=True, disable=not progress)
  start = time.perf_counter()
  for rec0 in range(first, first + n_records, per_batch):
    recs = range(rec0, min(rec0 + per_batch, first + n_records))
    xs = {}
    for s, src in sources.items():
      rows = np.concatenate([src[i][s] for i in recs])
      if len(rows) < batch:  # one batch shape, one compile
        rows = np.concatenate([rows, np.zeros((batch - len(rows),) + rows.shape[1:], rows.dtype)])
      xs[s] = rows
    valid = np.arange(batch) < len(recs) * r
    states = _step(states, params, xs, valid, jnp.int32(rec0 * r), specs=specs, bins=bins)
    bar.update(len(recs) * r)
  states = jax.device_get(states)
  seconds = time.perf_counter() - start
  bar.close()
  stats = [LatentStats(n_rows, np.asarray(s["fired"], np.int64),
                       np.asarray(s["act_sum"], np.float64), np.asarray(s["hist"], np.int64),
                       np.asarray(s["top_values"]), np.asarray(s["top_rows"], np.int64))
           for s in states]
  return stats, {"tokens": n_rows, "seconds": seconds, "tokens_per_s": n_rows / seconds}


@functools.partial(jax.jit, static_argnames=("architecture", "k"))
def _gather(params, x, rows, latents, architecture, k):
  """Activations f[rows[p], latents[p]] of one chunk of rows x, the release math on whole rows."""
  f = dict_math.encode(params, x.astype(jnp.float32), architecture, k, jnp)
  return f[rows, latents]


def pair_activations(unit: Unit, x: np.ndarray, rows: np.ndarray, latents: np.ndarray,
                     chunk: int = 1024) -> np.ndarray:
  """Activations [P] of `latents[p]` on store rows `x[rows[p]]` (x [n, d_in]): the tokens around
  top contexts. Rows are encoded whole, `chunk` at a time (the release's own activation, TopK
  included), and only the wanted pairs come back; cost: one encode of each distinct row."""
  params = _encoder(unit)
  order = np.argsort(rows, kind="stable")
  out = np.zeros(len(rows), np.float32)
  bounds = np.searchsorted(rows[order], np.arange(0, len(x) + chunk, chunk))
  for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
    if a == b:
      continue
    pick = order[a:b]
    size = 1 << int(np.ceil(np.log2(b - a)))  # few pair-count shapes, few compiles
    got = _gather(params, jnp.asarray(_pad(x[c * chunk:(c + 1) * chunk], chunk)),
                  jnp.asarray(_pad(rows[pick] - c * chunk, size)),
                  jnp.asarray(_pad(latents[pick], size)), architecture=unit.architecture,
                  k=unit.k)
    out[pick] = np.asarray(got)[:b - a]
  return out


def _encoder(unit: Unit) -> dict[str, jax.Array]:
  """The tensors encode reads (a TopK has no threshold)."""
  return {k: jnp.asarray(v) for k, v in unit.params.items() if k in ("w_enc", "b_enc", "threshold")}


def _pad(a: np.ndarray, n: int) -> np.ndarray:
  """`a` padded with zeros to n rows: one shape per chunk size, one compile."""
  if len(a) == n:
    return a
  return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])
