"""`train`: the loop that turns global batches of activations into trained dictionaries.

It validates everything it can before compiling, initializes (or resumes from the latest
checkpoint in output_dir), runs the jitted step over a device mesh with a tqdm bar and
TensorBoard scalars, checkpoints asynchronously, and stops with the step and cause on the first
non-finite value, leaving the last good checkpoint intact.

Multi-host: every process runs this with the same arguments. Step k+1 trains on global batch k
of the source's seeded order; each process reads only the rows its devices hold (the rows of the
batch sharding it addresses), so a run gives the same batches on any number of processes and
resumes from a checkpoint written by another number. Initialization is a jitted computation on
the first global batch, identical everywhere. SIGTERM/SIGINT checkpoint every process at one
step and raise preemption.Preempted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from allscope import files
from allscope.trainers import checkpoint, dictionaries, mesh as mesh_lib, preemption
from allscope.trainers import state as state_lib
from allscope.trainers.config import TrainConfig
from allscope.trainers.step import compile_step

# Batches a process prefetches; reading is threaded, and a batch of 4096 rows x 26 layers is
# hundreds of MB, so the buffer stays small.
_READ = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)


class TrainingDiverged(FloatingPointError):
  """A NaN or Inf reached the loss, the update or the input; the message names step and cause."""


class Batches(Protocol):
  """What `train` reads (pipelines.reader.GlobalBatches): global batches in a fixed order."""

  global_batch: int

  def local(self, row_start: int, row_stop: int) -> grain.MapDataset:
    """Element k: rows [row_start, row_stop) of global batch k, {site: [rows, n_layers, d]}."""


@dataclasses.dataclass
class TrainResult:
  cfg: TrainConfig
  state: state_lib.TrainState  # the final train state (device arrays on the run's mesh)
  d_in: int  # per-layer site widths
  d_out: int
  norm_scale: dict[str, np.ndarray]
  metrics: dict[str, float]  # the last logged metrics
  resumed_from: int | None  # the checkpoint step this run started from, if any

  @property
  def params(self) -> dict[str, np.ndarray]:
    """Whole parameters on this process (gathered from the other processes when sharded)."""
    return {k: np.asarray(_fetch(v)) for k, v in self.state.params.items()}


Hook = Callable[[int, dict[str, Any]], None]


def _fetch(a: jax.Array) -> np.ndarray:
  if a.is_fully_addressable:
    return jax.device_get(a)
  return multihost_utils.process_allgather(a, tiled=True)


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[int, int]:
  """[start, stop) of the batch rows this process's devices hold under `sharding`."""
  spans = sorted({(s[0].start or 0, shape[0] if s[0].stop is None else s[0].stop)
                  for s in sharding.addressable_devices_indices_map(shape).values()})
  for (_, stop), (start, _) in zip(spans, spans[1:]):
    if start != stop:
      raise ValueError(f"this process holds batch rows {spans}, not one contiguous block; "
                       "order the mesh's devices by process")
  return spans[0][0], spans[-1][1]


def _check_batch(batch: Mapping[str, np.ndarray], cfg: TrainConfig,
                 rows: int) -> tuple[int, int]:
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
    if shape[0] != rows:
      raise ValueError(f"site {site!r}: the source gave {shape[0]} rows where this process "
                       f"reads {rows} of the global batch; the source is broken")
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


def _initial_state(cfg: TrainConfig, d_in: int, d_out: int, x: jax.Array, y: jax.Array,
                   norm_in: jax.Array, norm_out: jax.Array) -> state_lib.TrainState:
  """Random init, b_dec = the global batch's mean, JumpReLU thresholds calibrated to target L0.

  Runs under jit on the global first batch, so every process computes the same values.
  """
  params = dictionaries.init_params(cfg, d_in, d_out, jax.random.key(cfg.seed))
  xn = dictionaries.prepare(cfg, x.astype(jnp.float32) * norm_in[None, :, None])
  yn = dictionaries.prepare(cfg, y.astype(jnp.float32) * norm_out[None, :, None])
  if cfg.b_dec_init == "mean":
    params["b_dec"] = jnp.mean(yn, axis=0)
  if cfg.data_init:
    params = dictionaries.data_init(params, cfg, xn, yn, jax.random.fold_in(jax.random.key(cfg.seed), 1))
  if not cfg.tied_init:  # centre the pre-activations: no latent starts dense or dead by offset
    params["b_enc"] = -jnp.einsum("gi,gif->gf", jnp.mean(xn, axis=0), params["w_enc"])
  if cfg.activation == "jumprelu" and cfg.threshold_init <= 0:
    pre = jnp.einsum("bgi,gif->gbf", xn, params["w_enc"]) + params["b_enc"][:, None, :]
    q = 1.0 - min(cfg.init_l0_multiple * cfg.target_l0 / cfg.width, 1.0)
    thr = jnp.quantile(pre, q, axis=1)  # [G, F]
    params["log_threshold"] = jnp.log(jnp.maximum(thr, 1e-3))
  return state_lib.init_state(cfg, params, jax.random.key(cfg.seed))


def _write_json(path: Path, data: dict) -> None:
  files.write_text(path, json.dumps(data, indent=2) + "\n")


def train(cfg: TrainConfig, source: Batches, norm_scale: Mapping[str, Any],
          output_dir: str | Path, *, devices: Sequence[jax.Device] | None = None,
          hooks: Sequence[Hook] = (), progress: bool = True) -> TrainResult:
  """Trains `cfg` on `source`'s global batches; resumes when output_dir holds checkpoints.

  source: global batches in a fixed order (pipelines.reader.GlobalBatches, e.g.
    ActivationStore.global_batches or synthetic.loader), global_batch == cfg.batch_size.
  norm_scale: {site: [n_layers]} scalars making the mean squared norm 1 (from the manifest).
  output_dir: checkpoints/ and tensorboard/ go here, plus train_config.json.
  hooks: called as hook(step_done, context) after every step (context holds the state and the
    checkpoint manager); used by tests.
  TensorBoard (output_dir/tensorboard): train/<metric> aggregates and train/lr every log_every
  steps, and per dictionary fvu/<layer>, l0/<layer>, dead/<layer>.
  Raises preemption.Preempted after checkpointing on SIGTERM/SIGINT.
  """
  cfg.validate()
  log = logging.getLogger(__name__)
  log.info("train: learning rate %.3g (%s)", cfg.learning_rate,
           "train.lr" if cfg.lr is not None else "default_lr: train.lr unset")
  if getattr(source, "global_batch", None) != cfg.batch_size:
    raise ValueError(f"the data source serves global batches of "
                     f"{getattr(source, 'global_batch', '?')} rows but train.batch_size="
                     f"{cfg.batch_size}; build it with the same batch size")
  mesh = mesh_lib.make_mesh(cfg, devices)
  with mesh_lib.tracing(mesh):
    # fails here, before compiling, on Pallas without a kernel; "/per-device" on several devices
    ops = dictionaries.kernel_ops(cfg)
  log.info("train: sparse kernels %s (train.kernels=%s, backend %s, mesh %s)", ops.name,
           cfg.kernels, jax.default_backend(),
           " x ".join(f"{name} {size}" for name, size in mesh.shape.items()))
  primary = jax.process_index() == 0
  out = Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  mngr = checkpoint.manager(out / "checkpoints", cfg)
  latest = checkpoint.latest_step(mngr)
  if latest is not None:
    checkpoint.check_compatible(checkpoint.saved_config(mngr, latest), cfg, out)
    if latest > cfg.steps:
      raise ValueError(f"{out / 'checkpoints'} holds step {latest}, past train.steps={cfg.steps}; "
                       f"give train.steps >= {latest} (or a new output_dir)")
  site_in, site_out = cfg.sites

  batch_sh = mesh_lib.batch_sharding(mesh)
  row_start, row_stop = process_rows(batch_sh, (cfg.batch_size, len(cfg.layers), 1))
  iterator = source.local(row_start, row_stop).to_iter_dataset(_READ).__iter__()
  if latest is not None and not checkpoint.restore_data(mngr, latest, iterator):
    iterator.set_state(_position(iterator, latest))
  if latest is not None and iterator.get_state() != _position(iterator, latest):
    raise ValueError(f"the data position saved at step {latest} in {out / 'checkpoints'} "
                     f"({iterator.get_state()}) disagrees with its step; the checkpoint is damaged")
  first = next(iterator)
  d_in, d_out = _check_batch(first, cfg, row_stop - row_start)
  norm = _check_norm(norm_scale, cfg)
  if primary:  # after every check: a refused run leaves the record of the last one
    _write_json(out / "train_config.json", dataclasses.asdict(cfg))

  def put(a: np.ndarray) -> jax.Array:
    shape = (cfg.batch_size,) + np.shape(a)[1:]
    return jax.make_array_from_process_local_data(batch_sh, np.asarray(a), shape)

  abstract = state_lib.abstract_state(cfg, jax.eval_shape(
      lambda: dictionaries.init_params(cfg, d_in, d_out, jax.random.key(0))))
  state_sh = state_lib.shardings(cfg, abstract, mesh)
  rep = mesh_lib.replicated(mesh)
  norm_in = jax.device_put(jnp.asarray(norm[site_in]), rep)
  norm_out = jax.device_put(jnp.asarray(norm[site_out]), rep)
  step_fn = compile_step(cfg, mesh, state_sh)
  if latest is not None:
    st = checkpoint.restore_state(mngr, latest, abstract, state_sh)
  else:
    init = jax.jit(lambda x, y, ni, no: _initial_state(cfg, d_in, d_out, x, y, ni, no),
                   in_shardings=(batch_sh, batch_sh, rep, rep), out_shardings=state_sh)
    st = init(put(first[site_in]), put(first[site_out]), norm_in, norm_out)
  start = int(jax.device_get(st.step))

  writer = tensorboardX.SummaryWriter(str(out / "tensorboard"), purge_step=start or None,
                                      write_to_disk=primary)
  bar = tqdm.tqdm(total=cfg.steps, initial=start, disable=not (progress and primary),
                  unit="step", desc=f"train {cfg.kind}/{cfg.activation}", dynamic_ncols=True)
  metrics: dict[str, float] = {}
  t_last, s_last = time.perf_counter(), start
  lr_at = state_lib.schedule(cfg)
  # Curves per dictionary: layer_<l> (a crosscoder has one dictionary over all its layers).
  group_names = (["all_layers"] if cfg.kind == "crosscoder"
                 else [f"layer_{l}" for l in cfg.layers])
  warned_capacity = False
  # The capacity should never bind once training settles (after the sparsity warm-up, or in the
  # second half of a run shorter than it): the firing latents dropped there are summed on the
  # device every step and checked at each log step, so one between log steps is not missed.
  steady_from = min(cfg.sparsity_warmup_steps, cfg.steps // 2)
  dropped, dropped_from = None, None

  def check() -> None:
    bad = int(jax.device_get(st.bad_step))
    if bad >= 0:
      cause = state_lib.CAUSES.get(int(jax.device_get(st.bad_cause)), "unknown")
      mngr.wait_until_finished()
      good = checkpoint.latest_step(mngr)
      where = f"step {good} in {out / 'checkpoints'}" if good is not None else "none saved"
      raise TrainingDiverged(f"training stopped at step {bad + 1}: {cause}; nothing from it was "
                             f"saved; last good checkpoint: {where}")

  try:
    with preemption.Guard() as guard:
      batch = first
      for step_done in range(start + 1, cfg.steps + 1):
        if batch is None:
          batch = next(iterator)
        st, m = step_fn(st, put(batch[site_in]), put(batch[site_out]), norm_in, norm_out)
        batch = None
        bar.update(1)
        if step_done > steady_from and not warned_capacity:
          dropped = m["overflow"] if dropped is None else dropped + m["overflow"]
          dropped_from = dropped_from or step_done
        if step_done % cfg.log_every == 0 or step_done == cfg.steps:
          check()
          host = jax.device_get(m)
          per_group = host.pop("per_group")
          metrics = {k: float(v) for k, v in host.items()}
          now = time.perf_counter()
          metrics["tokens_per_s"] = (cfg.batch_size * (step_done - s_last)
                                     / max(now - t_last, 1e-9))
          metrics["lr"] = float(lr_at(step_done - 1))  # the rate of this step's update
          t_last, s_last = now, step_done
          for k, v in metrics.items():
            writer.add_scalar(f"train/{k}", v, step_done)
          for k, values in per_group.items():
            for name, v in zip(group_names, np.asarray(values).reshape(-1)):
              writer.add_scalar(f"{k}/{name}", float(v), step_done)
          n_dropped = 0 if dropped is None else int(jax.device_get(dropped))
          if n_dropped > 0 and not warned_capacity:
            # The capacity bounds memory; the sparsity penalty should keep L0 well below it.
            warned_capacity = True
            fix = {"jumprelu": "rows fire far more latents than target_l0 (per-row L0 is "
                               "heavy-tailed, docs/train.md): raise train.capacity",
                   "relu": "the sparsity is not under control: raise train.l0_coef or "
                           "train.capacity"}.get(cfg.activation, "raise train.capacity")
            log.warning("train: steps %d-%d dropped %d active latents for lack of capacity "
                        "(train.capacity=%d slots per row, L0 %.1f); %s", dropped_from,
                        step_done, n_dropped, cfg.slots, metrics["l0"], fix)
          bar.set_postfix(loss=f"{metrics['loss']:.4g}", fvu=f"{metrics['fvu']:.3f}",
                          l0=f"{metrics['l0']:.1f}", dead=f"{100 * metrics['dead']:.1f}%",
                          tok_s=f"{metrics['tokens_per_s']:.3g}")
        stop = guard.reached(step_done)
        if stop or step_done % cfg.checkpoint_every == 0 or step_done == cfg.steps:
          check()
          checkpoint.save(mngr, step_done, st, iterator, cfg)
        for hook in hooks:
          hook(step_done, {"state": st, "manager": mngr, "metrics": m})
        if stop and step_done < cfg.steps:
          mngr.wait_until_finished()
          raise preemption.Preempted(step_done, str(out / "checkpoints"))
    mngr.wait_until_finished()
  finally:
    bar.close()
    writer.close()
    mngr.wait_until_finished()
  return TrainResult(cfg, st, d_in, d_out, norm, metrics, latest)


def _position(iterator, step: int) -> dict:
  """The iterator state at global batch `step`: Grain's dataset iterators count elements."""
  state = iterator.get_state()
  if set(state) != {"next_index"}:
    raise TypeError(f"unexpected Grain iterator state {state}; this Grain version is unsupported")
  return {"next_index": int(step)}
