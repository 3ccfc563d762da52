"""Train state: parameters, optimizer state, step, RNG and the per-latent counters.

The state is a plain dict of arrays so that optax, Orbax and the shardings all see one pytree:
  params        dictionaries.Params
  opt_state     optax state (sharded like params)
  step          int32
  rng           uint32 key data (jax.random.key_data), split once per step
  since_fired   [G, F] int32 tokens since each latent last fired (saturates at 2^30)
  batch_thr     [G] float32 running mean of BatchTopK's batch threshold (its JumpReLU export)
  l0            [G] float32 running mean of L0, per dictionary
  bad_step      int32, -1 while every step was finite; else the first non-finite step
  bad_cause     int32, 0 ok, 1 non-finite input, 2 non-finite loss, 3 non-finite gradient/update
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from allscope.trainers import dictionaries, mesh as mesh_lib
from allscope.trainers.config import TrainConfig

State = dict[str, Any]
CAUSES = {1: "a non-finite value (NaN/Inf) in the input batch",
          2: "a non-finite loss", 3: "a non-finite gradient or parameter update"}


def schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up, constant, then linear decay to 0 over the last lr_decay_fraction."""
  warm = min(cfg.lr_warmup_steps, cfg.steps)
  decay = int(cfg.lr_decay_fraction * cfg.steps)
  flat = max(cfg.steps - warm - decay, 0)
  parts = [optax.linear_schedule(0.0, cfg.lr, max(warm, 1)), optax.constant_schedule(cfg.lr),
           optax.linear_schedule(cfg.lr, 0.0, max(decay, 1))]
  return optax.join_schedules(parts, [warm, warm + flat])


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adam(schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2))


def init_state(cfg: TrainConfig, params: dictionaries.Params, key: jax.Array) -> State:
  g, f = cfg.n_groups, cfg.width
  return {
      "params": params,
      "opt_state": optimizer(cfg).init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(key),
      "since_fired": jnp.zeros((g, f), jnp.int32),
      "batch_thr": jnp.zeros((g,), jnp.float32),
      "l0": jnp.zeros((g,), jnp.float32),
      "bad_step": jnp.full((), -1, jnp.int32),
      "bad_cause": jnp.zeros((), jnp.int32),
  }


def shardings(cfg: TrainConfig, abstract: State, mesh: Mesh) -> State:
  """A NamedSharding for every leaf: parameters and their Adam moments on (layer, model)."""
  param_sh = {k: NamedSharding(mesh, mesh_lib.param_spec(k, v.ndim, cfg.kind))
              for k, v in abstract["params"].items()}
  rep = mesh_lib.replicated(mesh)
  opt_sh = optax.tree_map_params(optimizer(cfg), lambda _, s: s, abstract["opt_state"], param_sh,
                                 transform_non_params=lambda _: rep)
  lf = NamedSharding(mesh, P("layer", "model"))
  return {"params": param_sh, "opt_state": opt_sh, "step": rep, "rng": rep, "since_fired": lf,
          "batch_thr": NamedSharding(mesh, P("layer")), "l0": NamedSharding(mesh, P("layer")),
          "bad_step": rep, "bad_cause": rep}
