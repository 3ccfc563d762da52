"""Placing Gemma 3 over a device mesh: tensor parallel on `model`, batch rows on `data`.

    mesh = make_mesh(data=2, model=4)                      # 8 devices
    model, tok = load("gemma3-12b", "bfloat16", sharding=param_sharding(mesh, preset("gemma3-12b")))
    acts = model.capture(jax.device_put(tokens, batch_sharding(mesh)), ...)

Megatron-style split of each block: q/k/v columns and o_proj rows by attention head, gate/up
columns and down_proj rows by MLP width, so each block needs one reduction over `model` after
o_proj and one after down_proj; the embedding is split by vocabulary row. A dimension that does
not divide evenly (e.g. one KV head on a 2-way `model` axis) is replicated instead. XLA's
sharding propagation (Auto axes) inserts the collectives; the arithmetic is unchanged, only the
order of the split sums differs from one device, so activations agree to bf16 rounding.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from allscope.models.presets import Gemma3Config

AXES = ("data", "model")


def make_mesh(data: int = -1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A data x model mesh over `devices` (default: this process's local devices); data=-1
  takes every device the model axis leaves."""
  devices = list(devices if devices is not None else jax.local_devices())
  if model < 1:
    raise ValueError(f"mesh model={model} must be >= 1")
  data = data if data > 0 else len(devices) // model
  if data < 1 or data * model != len(devices):
    raise ValueError(f"mesh data={data} x model={model} does not fit {len(devices)} device(s); "
                     "set harvest.mesh_data x harvest.mesh_model to the worker's device count "
                     "(mesh_data=-1 fills it)")
  return jax.make_mesh((data, model), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=np.asarray(devices))


def param_spec(name: str, shape: tuple[int, ...], cfg: Gemma3Config, model: int) -> P:
  """The PartitionSpec of one parameter (Hugging Face name, our [in, out] layout)."""
  def split(dim: int, units: int) -> P:  # shard `dim` if its `units` (heads, rows) divide
    if model == 1 or units % model:
      return P()
    spec = [None] * len(shape)
    spec[dim] = "model"
    return P(*spec)

  leaf = name.rsplit(".", 2)[-2]  # q_proj, down_proj, embed_tokens, input_layernorm, ...
  if leaf == "embed_tokens":
    return split(0, shape[0])
  if leaf == "q_proj":
    return split(1, cfg.n_heads)
  if leaf in ("k_proj", "v_proj"):
    return split(1, cfg.n_kv_heads)
  if leaf == "o_proj":
    return split(0, cfg.n_heads)
  if leaf in ("gate_proj", "up_proj"):
    return split(1, shape[1])
  if leaf == "down_proj":
    return split(0, shape[0])
  return P()  # norms: a few KB, replicated


def param_sharding(mesh: Mesh, cfg: Gemma3Config) -> Callable[[str, tuple[int, ...]], NamedSharding]:
  """The loader's placement hook (`models.load(..., sharding=...)`) for this mesh."""
  model = mesh.shape["model"]
  return lambda name, shape: NamedSharding(mesh, param_spec(name, tuple(shape), cfg, model))


def place(model, placement):
  """A copy of `model` whose parameters are moved as `placement` (a Sharding, or the hook of
  `param_sharding`) says; the original keeps its arrays."""
  from flax import nnx

  from allscope.models.loader import _targets

  copy = nnx.merge(*nnx.split(model))
  for name, (param, _) in _targets(copy).items():
    value = param.get_value()
    where = placement(name, tuple(value.shape)) if callable(placement) else placement
    param.set_value(jax.device_put(value, where))
  return copy


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Token batches [B, S] and captured activations [B, S, ...]: rows over `data`."""
  return NamedSharding(mesh, P("data"))


def capture_fn(model, sites: tuple[str, ...], layers: tuple[int, ...], mesh: Mesh | None = None):
  """`(tokens, mask) -> {site: bf16 [B, S, n_layers, width]}`, jitted over `model.capture`.

  The parameters are passed as jit arguments (nnx.split) rather than through nnx.jit, whose
  per-call state handling cost more than the forward itself on CPU; casting to bf16 inside the
  jit halves the device-to-host copy. Without a mesh, compilations are shared by models of one
  architecture. With one, the parameters keep the shardings they were loaded with, and tokens
  and activations are split over `data` (B must divide by it).
  """
  from flax import nnx

  graphdef, state = nnx.split(model)
  sites, layers = tuple(sites), tuple(layers)
  if mesh is None:
    return functools.partial(_capture, graphdef, state, sites=sites, layers=layers)
  rows = batch_sharding(mesh)
  leaves, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, state))
  fn = _sharded_capture(graphdef, sites, layers, rows, tuple(leaves), treedef)
  data = mesh.shape["data"]

  def run(tokens, mask):
    if tokens.shape[0] % data:
      raise ValueError(f"batch of {tokens.shape[0]} sequences does not divide over the mesh's "
                       f"data axis ({data}); make harvest.batch_size a multiple of it")
    return fn(state, jax.device_put(tokens, rows), jax.device_put(mask, rows))

  return run


def _capture_body(graphdef, state, tokens, mask, *, sites, layers):
  from flax import nnx

  out = nnx.merge(graphdef, state).capture(tokens, sites=sites, layers=layers, mask=mask)
  return {s: x.astype(jnp.bfloat16) for s, x in out.items()}


_capture = jax.jit(_capture_body, static_argnums=0, static_argnames=("sites", "layers"))


@functools.lru_cache(maxsize=16)
def _sharded_capture(graphdef, sites, layers, rows, param_shardings, treedef):
  """One jitted sharded capture per (architecture, sites, layers, placement), so models placed
  alike (a re-run harvest, a benchmark's baseline) share its compilation."""
  return jax.jit(functools.partial(_capture_body, graphdef, sites=sites, layers=layers),
                 in_shardings=(jax.tree.unflatten(treedef, param_shardings), rows, rows),
                 out_shardings=rows)
