"""`train`: the loop that turns a stream of activation batches into trained dictionaries.

It validates everything it can before compiling, initializes (or resumes from the latest
checkpoint in output_dir), runs the jitted step over a device mesh with a tqdm bar and
TensorBoard scalars, checkpoints asynchronously, and stops with the step and cause on the first
non-finite value, leaving the last good checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
import tqdm

from allscope.trainers import checkpoint, dictionaries, mesh as mesh_lib, state as state_lib
from allscope.trainers.config import TrainConfig
from allscope.trainers.step import compile_step


class TrainingDiverged(FloatingPointError):
  """A NaN or Inf reached the loss, the update or the input; the message names step and cause."""


@dataclasses.dataclass
class TrainResult:
  cfg: TrainConfig
  state: dict[str, Any]  # the final train state (device arrays on the run's mesh)
  d_in: int  # per-layer site widths
  d_out: int
  norm_scale: dict[str, np.ndarray]
  metrics: dict[str, float]  # the last logged metrics
  resumed_from: int | None  # the checkpoint step this run started from, if any

  @property
  def params(self) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in self.state["params"].items()}


Hook = Callable[[int, dict[str, Any]], None]


def _check_batch(batch: Mapping[str, np.ndarray], cfg: TrainConfig) -> tuple[int, int]:
  """Site presence and shapes of the first batch, before anything compiles."""
  if not isinstance(batch, Mapping):
    raise TypeError(f"the data source yields {type(batch).__name__}; expected a dict "
                    "{site: array [batch, n_layers, width]}")
  dims = []
  for role, site in zip(("input", "output"), cfg.sites):
    if site not in batch:
      raise ValueError(f"the data has no site {site!r} (the {role} of a {cfg.kind}); it has "
                       f"{sorted(batch)}; set train.site_in/site_out or harvest that site")
    shape = np.shape(batch[site])
    if len(shape) != 3:
      raise ValueError(f"site {site!r}: expected [batch, n_layers, width], got shape {shape}")
    if shape[0] * jax.process_count() != cfg.batch_size:
      raise ValueError(f"site {site!r}: the loader yields batches of {shape[0]} rows on each of "
                       f"{jax.process_count()} process(es) but train.batch_size={cfg.batch_size} "
                       "(global); make them agree")
    if shape[1] != len(cfg.layers):
      raise ValueError(f"site {site!r}: the data holds {shape[1]} layers per row but "
                       f"train.layers lists {len(cfg.layers)} ({cfg.layers})")
    want = cfg.d_in if role == "input" else cfg.d_out
    if want is not None and shape[2] != want:
      raise ValueError(f"width mismatch: site {site!r} has width {shape[2]} in the data but "
                       f"train.{'d_in' if role == 'input' else 'd_out'}={want}")
    dims.append(shape[2])
  return dims[0], dims[1]


def _check_norm(norm_scale: Mapping[str, Any], cfg: TrainConfig) -> dict[str, np.ndarray]:
  out = {}
  for site in set(cfg.sites):
    if site not in norm_scale:
      raise ValueError(f"norm_scale has no entry for site {site!r} (it has {sorted(norm_scale)});"
                       " take it from the store manifest's per-(site, layer) statistics")
    s = np.asarray(norm_scale[site], np.float32).reshape(-1)
    if s.shape != (len(cfg.layers),) or not np.all(np.isfinite(s)) or np.any(s <= 0):
      raise ValueError(f"norm_scale[{site!r}] must be {len(cfg.layers)} positive finite scalars "
                       f"(one per trained layer), got {s}")
    out[site] = s
  return out


def _initial_params(cfg: TrainConfig, d_in: int, d_out: int, x: np.ndarray, y: np.ndarray,
                    norm: dict[str, np.ndarray]) -> dictionaries.Params:
  """Random init, b_dec from the data mean, JumpReLU thresholds calibrated to target L0."""
  params = dictionaries.init_params(cfg, d_in, d_out, jax.random.key(cfg.seed))
  site_in, site_out = cfg.sites
  xn = dictionaries.prepare(cfg, jnp.asarray(x, jnp.float32) * norm[site_in][None, :, None])
  yn = dictionaries.prepare(cfg, jnp.asarray(y, jnp.float32) * norm[site_out][None, :, None])
  if cfg.b_dec_init == "mean":
    params["b_dec"] = jnp.mean(yn, axis=0)
  if cfg.activation == "jumprelu" and cfg.threshold_init <= 0:
    pre = jnp.einsum("bgi,gif->gbf", xn, params["w_enc"]) + params["b_enc"][:, None, :]
    q = 1.0 - min(cfg.init_l0_multiple * cfg.target_l0 / cfg.width, 1.0)
    thr = jnp.quantile(pre, q, axis=1)  # [G, F]
    params["log_threshold"] = jnp.log(jnp.maximum(thr, 1e-3))
  return params


def _latest_step(mngr) -> int | None:
  mngr.reload()
  return mngr.latest_step()


def train(cfg: TrainConfig, source: Iterable, norm_scale: Mapping[str, Any],
          output_dir: str | Path, *, devices: Sequence[jax.Device] | None = None,
          hooks: Sequence[Hook] = (), progress: bool = True) -> TrainResult:
  """Trains `cfg` on batches from `source`; resumes when output_dir holds checkpoints.

  source: iterable whose iterator yields {site: [batch, n_layers, width]} (bf16 or f32) and has
    get_state()/set_state() (a Grain DataLoader); n_layers follows cfg.layers.
  norm_scale: {site: [n_layers]} scalars making the mean squared norm 1 (from the manifest).
  output_dir: checkpoints/ and tensorboard/ go here, plus train_config.json.
  hooks: called as hook(step_done, context) after every step (context holds the state and the
    checkpoint manager); used by tests.
  """
  cfg.validate()
  ops = dictionaries.kernel_ops(cfg)  # fails here, before compiling, on Pallas without a kernel
  logging.getLogger(__name__).info("train: sparse kernels %s (train.kernels=%s, backend %s)",
                                   ops.name, cfg.kernels, jax.default_backend())
  mesh = mesh_lib.make_mesh(cfg, devices)
  out = Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
  mngr = checkpoint.manager(out / "checkpoints", cfg)
  iterator = iter(source)
  latest = _latest_step(mngr)
  saved_data = None
  if latest is not None:
    saved_cfg = mngr.restore(latest, args=checkpoint.ocp.args.Composite(
        config=checkpoint.ocp.args.JsonRestore()))["config"]
    checkpoint.check_compatible(saved_cfg, cfg, out)
  site_in, site_out = cfg.sites

  # The first batch fixes the widths; a resumed run first moves the iterator to its position.
  if latest is not None:
    saved_data = mngr.restore(latest, args=checkpoint.ocp.args.Composite(
        data=checkpoint.ocp.args.JsonRestore()))["data"]
    if saved_data and hasattr(iterator, "set_state"):
      iterator.set_state(json.dumps(saved_data).encode())
  first = next(iterator)
  d_in, d_out = _check_batch(first, cfg)
  norm = _check_norm(norm_scale, cfg)

  abstract_params = jax.eval_shape(
      lambda: dictionaries.init_params(cfg, d_in, d_out, jax.random.key(0)))
  abstract = jax.eval_shape(lambda p: state_lib.init_state(cfg, p, jax.random.key(0)),
                            abstract_params)
  state_sh = state_lib.shardings(cfg, abstract, mesh)
  step_fn = compile_step(cfg, mesh, state_sh)
  if latest is not None:
    st, _, _ = checkpoint.restore(mngr, latest, abstract, state_sh)
  else:
    params = _initial_params(cfg, d_in, d_out, first[site_in], first[site_out], norm)
    st = jax.device_put(state_lib.init_state(cfg, params, jax.random.key(cfg.seed)), state_sh)
  start = int(jax.device_get(st["step"]))

  batch_sh = mesh_lib.batch_sharding(mesh)
  rep = mesh_lib.replicated(mesh)
  norm_in = jax.device_put(jnp.asarray(norm[site_in]), rep)
  norm_out = jax.device_put(jnp.asarray(norm[site_out]), rep)
  writer = tensorboardX.SummaryWriter(str(out / "tensorboard"), purge_step=start or None)
  bar = tqdm.tqdm(total=cfg.steps, initial=start, disable=not progress, unit="step",
                  desc=f"train {cfg.kind}/{cfg.activation}", dynamic_ncols=True)
  metrics: dict[str, float] = {}
  tokens_per_step = cfg.batch_size
  t_last, s_last = time.perf_counter(), start

  def put(a: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(batch_sh, np.asarray(a))

  def check(step_done: int) -> None:
    bad = int(jax.device_get(st["bad_step"]))
    if bad >= 0:
      cause = state_lib.CAUSES.get(int(jax.device_get(st["bad_cause"])), "unknown")
      mngr.wait_until_finished()
      good = _latest_step(mngr)
      where = f"step {good} in {out / 'checkpoints'}" if good is not None else "none saved"
      raise TrainingDiverged(f"training stopped at step {bad + 1}: {cause}; the state was not "
                             f"updated by it; last good checkpoint: {where}")

  try:
    batch = first
    for step_done in range(start + 1, cfg.steps + 1):
      if batch is None:
        batch = next(iterator)
      st, m = step_fn(st, put(batch[site_in]), put(batch[site_out]), norm_in, norm_out)
      batch = None
      data_state = iterator.get_state() if hasattr(iterator, "get_state") else None
      bar.update(1)
      if step_done % cfg.log_every == 0 or step_done == cfg.steps:
        check(step_done)
        metrics = {k: float(v) for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        metrics["tokens_per_s"] = tokens_per_step * (step_done - s_last) / max(now - t_last, 1e-9)
        t_last, s_last = now, step_done
        for k, v in metrics.items():
          writer.add_scalar(f"train/{k}", v, step_done)
        bar.set_postfix(loss=f"{metrics['loss']:.4g}", fvu=f"{metrics['fvu']:.3f}",
                        l0=f"{metrics['l0']:.1f}", dead=f"{100 * metrics['dead']:.1f}%",
                        tok_s=f"{metrics['tokens_per_s']:.3g}")
      if step_done % cfg.checkpoint_every == 0 or step_done == cfg.steps:
        check(step_done)
        checkpoint.save(mngr, step_done, st, data_state, cfg)
      for hook in hooks:
        hook(step_done, {"state": st, "manager": mngr, "metrics": m})
    mngr.wait_until_finished()
  finally:
    bar.close()
    writer.close()
    mngr.wait_until_finished()
  return TrainResult(cfg, st, d_in, d_out, norm, metrics, latest)
