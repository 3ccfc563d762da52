"""Train state: one typed pytree (`TrainState`) that optax, Orbax, jit and the shardings all see.

A `TrainState` of arrays is the state; a `TrainState` of `NamedSharding`s is its placement; a
`TrainState` of `ShapeDtypeStruct`s is its abstract shape (Orbax restores onto that).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from allscope.trainers import dictionaries, mesh as mesh_lib
from allscope.trainers.config import TrainConfig

CAUSES = {1: "a non-finite value (NaN/Inf) in the input batch",
          2: "a non-finite loss", 3: "a non-finite gradient or parameter update"}


@struct.dataclass
class TrainState:
  params: dictionaries.Params  # dictionaries.Params, sharded on (layer, model)
  opt_state: optax.OptState  # sharded like params
  step: jax.Array  # int32: steps applied
  rng: jax.Array  # uint32 key data (jax.random.key_data), split once per step
  since_fired: jax.Array  # [G, F] int32 tokens since each latent last fired (saturates at 2^30)
  batch_thr: jax.Array  # [G] float32 running mean of BatchTopK's threshold (its JumpReLU export)
  l0: jax.Array  # [G] float32 running mean of L0, per dictionary
  bad_step: jax.Array  # int32: -1 while every step was finite; else the first non-finite step
  bad_cause: jax.Array  # int32: 0 ok, else a key of CAUSES


def schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up, constant, then linear decay to 0 over the last lr_decay_fraction."""
  warm = min(cfg.warmup_steps, cfg.steps)
  decay = int(cfg.lr_decay_fraction * cfg.steps)
  lr = cfg.learning_rate
  flat = max(cfg.steps - warm - decay, 0)
  parts = [optax.linear_schedule(0.0, lr, max(warm, 1)), optax.constant_schedule(lr),
           optax.linear_schedule(lr, 0.0, max(decay, 1))]
  return optax.join_schedules(parts, [warm, warm + flat])


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm as one scalar factor times each gradient.

  optax divides every element by the norm; XLA treats a divide as too costly to recompute in
  each consumer, so the clipped gradient (one per parameter; the decoder's as large as the CLT's
  pre-activations) is written out before Adam reads it twice. A multiply is recomputed inside
  both moment updates instead. Same values up to rounding (one float32 ulp).
  """

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_adam(b1: float, b2: float, eps: float = 1e-8) -> optax.GradientTransformation:
  """optax.scale_by_adam (same state, same values up to rounding) with the first moment as
  mu + (1 - b1) (g - mu).

  optax's (1 - b1) g + b1 mu becomes (g + mu) * 0.5 under XLA's simplifier at TopK's b1 = 0.5,
  and XLA:CPU then recomputes that moment inside the parameter update instead of reading it,
  so the new moment cannot overwrite the old one in place: one more parameter-sized temporary
  (a CLT decoder: 1.5x its [L, B, F] pre-activations at 18 layers).
  """
  base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: m + (1 - b1) * (g - m), updates, state.mu)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(base.init, update)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  # optax.adam's chain (so its state, and checkpoints, keep their structure) with our moment
  adam = optax.chain(scale_by_adam(cfg.b1, cfg.adam_b2),
                     optax.scale_by_learning_rate(schedule(cfg)))
  return optax.chain(clip_by_global_norm(cfg.grad_clip), adam)


def init_state(cfg: TrainConfig, params: dictionaries.Params, key: jax.Array) -> TrainState:
  g, f = cfg.n_groups, cfg.width
  return TrainState(
      params=params, opt_state=optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(key), since_fired=jnp.zeros((g, f), jnp.int32),
      batch_thr=jnp.zeros((g,), jnp.float32), l0=jnp.zeros((g,), jnp.float32),
      bad_step=jnp.full((), -1, jnp.int32), bad_cause=jnp.zeros((), jnp.int32))


def abstract_state(cfg: TrainConfig, params: dictionaries.Params) -> TrainState:
  """The TrainState of ShapeDtypeStructs for parameters shaped like `params` (arrays or shapes)."""
  return jax.eval_shape(lambda p: init_state(cfg, p, jax.random.key(0)), params)


def shardings(cfg: TrainConfig, abstract: TrainState, mesh: Mesh) -> TrainState:
  """A NamedSharding for every leaf: parameters and their Adam moments on (layer, model)."""
  param_sh = {k: NamedSharding(mesh, mesh_lib.param_spec(k, v.ndim, cfg.kind))
              for k, v in abstract.params.items()}
  rep = mesh_lib.replicated(mesh)
  opt_sh = optax.tree_map_params(optimizer(cfg), lambda _, s: s, abstract.opt_state, param_sh,
                                 transform_non_params=lambda _: rep)
  per_layer = NamedSharding(mesh, P("layer"))
  return TrainState(params=param_sh, opt_state=opt_sh, step=rep, rng=rep,
                    since_fired=NamedSharding(mesh, P("layer", "model")), batch_thr=per_layer,
                    l0=per_layer, bad_step=rep, bad_cause=rep)


def replicated(abstract: TrainState, mesh: Mesh) -> TrainState:
  """Every leaf whole on every device (what evaluation and export read on any one process)."""
  return jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract)
