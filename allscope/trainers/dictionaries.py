"""Sparse dictionaries as Flax NNX modules over stacked parameters, plus their pure forward.

Every kind is a stack of G encoders over [B, G, d_in] inputs (G = the trained layers; 1 for a
crosscoder, which reads all its layers flattened into one input):

  pre_g = x_g @ w_enc[g] + b_enc[g]                (dense: the one unavoidable product)
  (idx, f) = select(pre_g)                         (kernels: TopK / BatchTopK / JumpReLU / ReLU)
  y_g = sum_j f[j] w_dec[g, idx[j]] + b_dec[g]     (kernels.sparse_decode)
        (+ x_g @ w_skip[g] for a skip-transcoder)

A CLT's decoder is stored causally as one w_dec [F, P, d], P = G (G + 1) / 2 (source, target)
pairs with target >= source (kernels.clt_layout): latent f of source s writes to layer t with
row w_dec[f, p(s, t)] (kernels.clt_decode). Shapes of the parameters:

  w_enc [G, d_in, F]   b_enc [G, F]   log_threshold [G, F] (JumpReLU)
  w_dec [G, F, d_out] or [F, P, d] (CLT)   b_dec [G, d_out]   w_skip [G, d_in, d_out]

Only `x @ w_enc` (and `x @ w_skip`) are dense; every other op runs through the kernel seam
(`kernel_ops(cfg)`: Pallas or sparse XLA) on the active (row, latent) pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allscope import kernels
from allscope.kernels import clt_layout
from allscope.trainers import activations, mesh as mesh_lib, sharded_ops
from allscope.trainers.config import TrainConfig

Params = dict[str, jax.Array]


class Encoding(NamedTuple):
  indices: jax.Array  # [G, B, C] int32
  pre: jax.Array  # [G, B, C] pre-activations at the indices, differentiable (sparse gradient)
  acts: jax.Array  # [G, B, C] activation values f (0 where inactive)
  fired: jax.Array  # [G, B, C] 1.0 where the latent is active (STE step for JumpReLU)
  overflow: jax.Array  # [G] int32: active (firing) latents dropped for lack of capacity
  batch_threshold: jax.Array  # [G] BatchTopK's smallest kept value (0 for other activations)
  # AuxK (TopK/BatchTopK, when `dead` was given): the top aux_k dead latents of each row, picked
  # from the same dense product; zeros and aux_ok False outside the ranked regime (aux_regimes:
  # no latent dead, or few enough for losses' columns regime). On the sparse
  # path (no [G, B, F] array outlives the encoder) aux_* are [G, B, aux_k] slots; on the dense
  # path (aux_dense(cfg)) they are [G, B, F] and aux_indices is None.
  aux_indices: jax.Array | None = None  # [G, B, aux_k] int32
  # pre-activations at the candidates (0 elsewhere): differentiable on the sparse path (one
  # encoder gradient with the main slots, kernels.sparse_encode_with_aux), not on the dense one
  aux_pre: jax.Array | None = None
  aux_ok: jax.Array | None = None  # bool: the slot (dense: the latent) is a candidate
  # JumpReLU: entries of the threshold-gradient window (just below their thresholds, not
  # firing) dropped for lack of capacity; they narrow the window of that row, not the code.
  window_dropped: jax.Array | None = None  # [G] int32
  # train.revive (TopK/BatchTopK, when `dead` was given): [G, F] how far each latent's best
  # pre-activation in the batch lies below its row's cut-off (the smallest kept value, at least
  # 0); raising b_enc by it puts the latent in the top k of that row. Zeros while none is dead.
  lift: jax.Array | None = None


def kernel_ops(cfg: TrainConfig) -> kernels.Ops:
  """The kernel seam implementation for `cfg.kernels` / `cfg.pallas_interpret`, on the devices
  of the mesh the step traces under (sharded_ops)."""
  return sharded_ops.per_device(kernels.resolve(cfg.kernels, cfg.pallas_interpret))


# AuxK's encode and decode run as dense [B, F] x [F, d] matmuls once its aux_k slots reach this
# fraction of the width: the sparse path's cost grows with aux_k (gathers and scatters of [B, d]
# per slot), the dense one's hardly does, and on CPU they cross between F/64 and F/32
# (benchmarks/quickstart_step.py --aux-sweep; docs/train.md).
AUX_DENSE_MIN_FRACTION = 1 / 32


def aux_dense(cfg: TrainConfig) -> bool:
  """Whether AuxK runs dense (train.aux_path, or "auto": aux_k >= AUX_DENSE_MIN_FRACTION * F;
  never for a clt, whose decoder is stored causally)."""
  if cfg.aux_path != "auto":
    return cfg.aux_path == "dense"
  return cfg.kind != "clt" and min(cfg.aux_k, cfg.width) >= AUX_DENSE_MIN_FRACTION * cfg.width


def aux_regimes(cfg: TrainConfig, dead: jax.Array) -> tuple[jax.Array, jax.Array]:
  """AuxK's two regimes, as scalars (both False while no latent of `dead` [G, F] is silent):

  ranked   each row ranks its silent latents among all F and keeps the top aux_k (encode's
           aux_* fields, the dense or sparse path): some group has more silent latents than
           the widest of aux_column_sizes, or a CLT.
  columns  every group's silent latents fit in aux_column_sizes' widest: AuxK is a dense problem
           over those columns (losses: no [B, F] or aux_k-slot pass; rows rank among the
           columns only where there are more than aux_k).
  """
  any_dead = jnp.any(dead)
  if cfg.kind == "clt":
    return any_dead, jnp.zeros((), bool)
  fit = jnp.max(jnp.sum(dead, axis=-1)) <= aux_column_sizes(cfg)[-1]
  return any_dead & ~fit, any_dead & fit


# AuxK's columns regime is compiled for these column counts below aux_k, then for aux_k (every
# row keeps all of its group's silent latents) and 2 and 4 aux_k up to F / 2 (each row keeps its
# top aux_k of them): its GEMMs cost what the widest group's silent latents need.
AUX_COLUMN_SIZES = (32, 64, 128)


def aux_column_sizes(cfg: TrainConfig) -> tuple[int, ...]:
  """The column counts of AuxK's columns regime, ascending."""
  k_aux = min(cfg.aux_k, cfg.width)
  return (tuple(n for n in AUX_COLUMN_SIZES if n < k_aux) + (k_aux,)
          + tuple(n for n in (2 * k_aux, 4 * k_aux) if n <= cfg.width // 2))


def shapes(cfg: TrainConfig, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
  """Parameter shapes; d_in/d_out are the per-layer site widths."""
  g, f = cfg.n_groups, cfg.width
  n_layers = len(cfg.layers)
  if cfg.kind == "crosscoder":
    d_in, d_out = n_layers * d_in, n_layers * d_out
  out = {"w_enc": (g, d_in, f), "b_enc": (g, f), "b_dec": (g, d_out)}
  out["w_dec"] = (f, clt_layout.n_pairs(g), d_out) if cfg.kind == "clt" else (g, f, d_out)
  if cfg.activation == "jumprelu":
    out["log_threshold"] = (g, f)
  if cfg.kind == "skip_transcoder":
    out["w_skip"] = (g, d_in, d_out)
  return out


def init_params(cfg: TrainConfig, d_in: int, d_out: int, key: jax.Array) -> Params:
  """Random unit-norm decoder rows; the encoder is their transpose where cfg.tied_init and the
  shapes allow, else independent random columns of norm ~1 (the same scale)."""
  shp = shapes(cfg, d_in, d_out)
  k_dec, k_enc = jax.random.split(key)
  g, f = cfg.n_groups, cfg.width
  w_dec = jax.random.normal(k_dec, shp["w_dec"], jnp.float32)
  w_dec = w_dec / per_row(decoder_norms(w_dec, cfg), cfg)
  if not cfg.unit_decoder:
    w_dec = w_dec * cfg.init_decoder_norm
  din_g = shp["w_enc"][1]
  if not cfg.tied_init:
    w_enc = jax.random.normal(k_enc, shp["w_enc"], jnp.float32) / np.sqrt(din_g)
  elif cfg.kind == "clt" and d_in == d_out:
    own = jnp.moveaxis(w_dec[:, clt_layout.offsets(g)], 1, 0)  # [G, F, d]: each source's own layer
    w_enc = jnp.swapaxes(own / jnp.linalg.norm(own, axis=-1, keepdims=True), 1, 2)
  elif cfg.kind != "clt" and shp["w_dec"][-1] == din_g:
    w_enc = jnp.swapaxes(w_dec, 1, 2) / (1.0 if cfg.unit_decoder else cfg.init_decoder_norm)
  else:
    w_enc = jax.random.normal(k_enc, shp["w_enc"], jnp.float32) / np.sqrt(din_g)
  params = {"w_enc": w_enc, "b_enc": jnp.zeros((g, f)), "w_dec": w_dec,
            "b_dec": jnp.zeros(shp["b_dec"])}
  if "log_threshold" in shp:
    params["log_threshold"] = jnp.full((g, f), np.log(max(cfg.threshold_init, 1e-3)), jnp.float32)
  if "w_skip" in shp:
    params["w_skip"] = jnp.zeros(shp["w_skip"])
  return params


def data_init(params: Params, cfg: TrainConfig, x: jax.Array, y: jax.Array, key: jax.Array) -> Params:
  """Encoder columns (and decoder rows) from the first batch's rows (train.encoder_init="data").

  x [B, G, d_in], y [B, G_out, d_out] normalized. Column f of group g is the centred input row
  i(f) (a permutation of the batch, reused cyclically when F > B), unit-normed, then scaled so its
  pre-activation spread over the batch equals the random init's: random Gaussian directions mostly
  point where the activations have little variance, and those latents never win a top k. Its
  decoder row is that row's centred output at the random init's decoder norm (not for a CLT,
  whose decoder is stored causally).
  """
  xc = x - jnp.mean(x, axis=0, keepdims=True)
  b, f = x.shape[0], cfg.width
  rows = jax.random.permutation(key, b)[jnp.arange(f) % b]  # [F]
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  w_enc = jnp.swapaxes(unit(xc[rows]), 0, 1).transpose(0, 2, 1)  # [G, d_in, F]
  spread = lambda w: jnp.std(jnp.einsum("bgi,gif->gbf", xc, w), axis=1)  # [G, F]
  target = jnp.mean(spread(params["w_enc"]), axis=-1, keepdims=True)
  w_enc = w_enc * (target / jnp.maximum(spread(w_enc), 1e-12))[:, None, :]
  out = {**params, "w_enc": w_enc}
  if cfg.kind != "clt":
    yc = y - jnp.mean(y, axis=0, keepdims=True)
    norm = 1.0 if cfg.unit_decoder else cfg.init_decoder_norm
    out["w_dec"] = jnp.swapaxes(unit(yc[rows]), 0, 1) * norm  # [G, F, d_out]
  return out


def latent_sums(a: jax.Array, cfg: TrainConfig) -> jax.Array:
  """[G, F]: the sum of a decoder-shaped array over each latent's rows (all targets for a CLT)."""
  rows = jnp.sum(a, axis=-1)
  if cfg.kind == "clt":  # rows [F, P]: sum the pairs of each source
    src = clt_layout.pair_source(cfg.n_groups)
    return jax.ops.segment_sum(rows.T, jnp.asarray(src), num_segments=cfg.n_groups)
  return rows


def per_row(per_latent: jax.Array, cfg: TrainConfig) -> jax.Array:
  """[G, F] per-latent values broadcast against w_dec ([G, F, 1], or [F, P, 1] for a CLT)."""
  if cfg.kind == "clt":
    return per_latent[clt_layout.pair_source(cfg.n_groups)].T[..., None]
  return per_latent[..., None]


def decoder_norms(w_dec: jax.Array, cfg: TrainConfig) -> jax.Array:
  """[G, F] norm of each latent's full decoder row (all targets for a CLT)."""
  return jnp.sqrt(latent_sums(jnp.square(w_dec), cfg))


def normalize_decoder(w_dec: jax.Array, cfg: TrainConfig) -> jax.Array:
  return w_dec / jnp.maximum(per_row(decoder_norms(w_dec, cfg), cfg), 1e-8)


def prepare(cfg: TrainConfig, x: jax.Array) -> jax.Array:
  """[B, L, d] site activations -> [B, G, d_in] encoder inputs (a crosscoder flattens)."""
  if cfg.kind == "crosscoder":
    return x.reshape(x.shape[0], 1, -1)
  return x


def _per_group(cfg: TrainConfig, fn, args: tuple):
  """fn over the groups (axis 0 of every arg): vmapped across the `layer` shards, and in a loop
  over each shard's groups.

  The loop keeps one group's [B, F] product and selection buffers alive at a time: 18
  transcoders at d=640, F=16384, B=4096 compile to 4.7 GiB of temporaries instead of 10.1
  (benchmarks/step_memory.py). A CLT's peak is its decoder-sized gradients, after these buffers
  are gone, and the loop cost it up to 9% a step at small shapes: its groups stay vmapped, as do
  single groups.
  """
  groups = args[0].shape[0]
  shards = cfg.mesh_layer if groups % cfg.mesh_layer == 0 else 1
  if cfg.kind == "clt" or groups == shards:
    return mesh_lib.group_vmap(fn)(*args)
  split = [a.reshape(shards, groups // shards, *a.shape[1:]) for a in args]
  res = mesh_lib.group_vmap(lambda *a: jax.lax.map(lambda t: fn(*t), a))(*split)
  return jax.tree.map(lambda r: r.reshape(groups, *r.shape[2:]), res)


def encode(params: Params, cfg: TrainConfig, x: jax.Array, dead: jax.Array | None = None) -> Encoding:
  """x [B, G, d_in] (normalized) -> the sparse code of every group.

  With `dead` [G, F] (TopK/BatchTopK), also the AuxK candidates of the ranked regime
  (aux_regimes; lax.cond on one scalar, so the dense [B, F] scores exist once per group).
  """
  ops = kernel_ops(cfg)
  compute = jnp.bfloat16 if cfg.matmul_dtype == "bfloat16" else jnp.float32
  xg = jnp.swapaxes(x, 0, 1)  # [G, B, d_in]
  threshold = (jnp.exp(params["log_threshold"]) if "log_threshold" in params
               else jnp.zeros(params["b_enc"].shape))
  k_aux = min(cfg.aux_k, cfg.width) if dead is not None and cfg.auxk else 0
  revive = dead is not None and cfg.revives
  any_dead = jnp.any(dead) if (k_aux or revive) else None
  ranked = aux_regimes(cfg, dead)[0] if k_aux else None
  # A CLT ranks per row only where a group has more silent latents than aux_k (otherwise its
  # slots hold all of them); other kinds leave that case to losses' columns regime.
  all_fit = jnp.max(jnp.sum(dead, axis=-1)) <= k_aux if k_aux and cfg.kind == "clt" else None
  dense_aux = bool(k_aux) and aux_dense(cfg)
  width = params["b_enc"].shape[-1]
  if dead is None:
    dead = jnp.zeros(params["b_enc"].shape, bool)

  def one(x_g, w_enc, b_enc, thr, dead_g):
    product = jax.lax.stop_gradient(jnp.matmul(x_g.astype(compute), w_enc.astype(compute),
                                               preferred_element_type=jnp.float32))
    b = jax.lax.stop_gradient(b_enc)
    batch_thr = jnp.zeros((), jnp.float32)
    window_dropped = jnp.zeros((), jnp.int32)
    if cfg.activation == "topk":
      sel = kernels.topk(product, cfg.k, ops, offset=b)
    elif cfg.activation == "batchtopk":
      sel, batch_thr = kernels.batchtopk(product, cfg.k, cfg.slots, ops, offset=b)
    elif cfg.activation == "jumprelu":
      # Ranked by the margin over the threshold, not by pre: firing latents take the slots
      # first, then the window entries nearest their thresholds (a large pre of a latent with a
      # high threshold must not displace a firing one).
      t = jax.lax.stop_gradient(thr)
      sel = kernels.jumprelu(product, jnp.zeros((), jnp.float32), cfg.slots, cfg.bandwidth, ops,
                             offset=b - t)
      # The selection's overflow counts window entries too; only firing latents dropped
      # change the code (and its L0), so they are counted apart (chunked: no [B, F] mask), and
      # only where some row overflowed: firing latents are kept ones. A loop of 0 or 1 trips
      # whose offset takes a -inf from the counter, so XLA does not hoist the count out of it.
      count_fired = lambda i, _: jnp.sum(jnp.maximum(ops.row_count(
          product, lambda v: v > 0, offset=jnp.maximum(b - t, -jnp.inf * (i + 1.0))) - cfg.slots,
          0))
      fired_dropped = jax.lax.fori_loop(0, (sel.overflow > 0).astype(jnp.int32), count_fired,
                                        jnp.zeros((), jnp.int32)).astype(jnp.int32)
      window_dropped = sel.overflow - fired_dropped
      sel = sel._replace(values=jnp.where(sel.active, sel.values + t[sel.indices], 0.0),
                         overflow=fired_dropped)
    else:
      sel = kernels.relu(product, cfg.slots, ops, offset=b)
    main = lambda pre: (sel.indices, pre, sel.active, sel.overflow, batch_thr, window_dropped)
    lifted = ()
    if revive:
      def lift(_):
        if cfg.activation == "jumprelu":
          # In log-threshold units: how far the threshold lies above the latent's best
          # pre-activation in the batch (0 where that is not positive: no threshold reaches it).
          best = kernels.column_max(product, b)
          gap = jnp.log(jax.lax.stop_gradient(thr)) - jnp.log(jnp.maximum(best, 1e-30))
          return jnp.where(best > 0, jnp.maximum(gap, 0.0), 0.0)
        if cfg.activation == "topk":
          cut = jnp.maximum(jnp.min(jnp.where(sel.active, sel.values, jnp.inf), axis=-1), 0.0)
        else:
          cut = jnp.full((x_g.shape[0],), jnp.maximum(batch_thr, 0.0))
        return jnp.maximum(-kernels.column_max(product, b, cut), 0.0)
      lifted = (jax.lax.cond(any_dead, lift, lambda _: jnp.zeros((width,), jnp.float32), None),)
    encode_main = lambda: kernels.sparse_encode(x_g, w_enc, b_enc, sel.indices, sel.values, ops)
    if not k_aux:
      return main(encode_main()) + lifted

    def every(_):  # a CLT with at most aux_k silent latents per group: all of them
      _, ids = jax.lax.top_k(dead_g.astype(jnp.int32), k_aux)  # the silent latents first
      slots = (x_g.shape[0], k_aux)
      return ((product + b)[:, ids], jnp.broadcast_to(dead_g[ids], slots),
              jnp.broadcast_to(ids, slots))

    def rank(_):
      if not dense_aux:  # the dead latents' scores, masked as top_k reads them
        aux = kernels.topk(product, k_aux, ops, offset=jnp.where(dead_g, b, -jnp.inf))
        return aux.values, dead_g[aux.indices], aux.indices
      scores = jnp.where(dead_g[None, :], product + b, -jnp.inf)
      # Every dead latent at or above the row's aux_k-th dead value (a tie at that value keeps
      # every tied latent); only that value is needed, not the indices.
      ok = dead_g[None, :] & (scores >= kernels.nth_largest(scores, k_aux)[:, None])
      return jnp.where(ok, product + b, 0.0), ok

    pick = rank if all_fit is None else lambda _: jax.lax.cond(all_fit, every, rank, None)

    def none(_):
      shape = (x_g.shape[0], width if dense_aux else k_aux)
      return (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, bool)) + (
          () if dense_aux else (jnp.zeros(shape, jnp.int32),))

    aux_pre, aux_ok, *aux_idx = jax.lax.cond(ranked, pick, none, None)
    aux_pre = jnp.where(aux_ok, aux_pre, 0.0)
    if dense_aux:  # no indices: every latent
      return main(encode_main()) + lifted + (None, aux_pre, aux_ok)
    # One encoder-gradient buffer for the main and AuxK slots (AuxK's scatters only while dead).
    pre, aux_pre = kernels.sparse_encode_with_aux(x_g, w_enc, b_enc, sel.indices, sel.values,
                                                  aux_idx[0], aux_pre, ranked, ops)
    return main(pre) + lifted + (aux_idx[0], aux_pre, aux_ok)

  res = _per_group(cfg, one, (xg, params["w_enc"], params["b_enc"], threshold, dead))
  idx, pre, active, overflow, batch_thr, window_dropped = res[:6]
  lift = res[6] if revive else None
  res = res[7:] if revive else res[6:]
  aux = res if k_aux else (None, None, None)
  if cfg.activation == "jumprelu":
    thr_sel = jax.vmap(lambda t, i: t[i])(threshold, idx)  # [G, B, C], no [G, B, F] broadcast
    acts = activations.jumprelu(pre, thr_sel, cfg.bandwidth)
    fired = activations.step(pre, thr_sel, cfg.bandwidth) * active
    acts = acts * active
  else:
    acts = jnp.where(active, jax.nn.relu(pre), 0.0)
    fired = (acts > 0).astype(acts.dtype)
  return Encoding(idx, pre, acts, fired, overflow, batch_thr, *aux, window_dropped=window_dropped,
                  lift=lift)


def decode_latents(params: Params, cfg: TrainConfig, indices: jax.Array, acts: jax.Array) -> jax.Array:
  """The latents' contribution [B, G_out, d_out], without b_dec or the skip term."""
  ops = kernel_ops(cfg)
  if cfg.kind == "clt":
    return kernels.clt_decode(indices, acts, params["w_dec"], ops)
  out = mesh_lib.group_vmap(lambda i, v, w: kernels.sparse_decode(i, v, w, ops))(
      indices, acts, params["w_dec"])  # [G, B, d_out]
  return jnp.swapaxes(out, 0, 1)


def decode(params: Params, cfg: TrainConfig, x: jax.Array, indices: jax.Array,
           acts: jax.Array) -> jax.Array:
  return add_bias_and_skip(params, x, decode_latents(params, cfg, indices, acts))


def add_bias_and_skip(params: Params, x: jax.Array, y_latents: jax.Array) -> jax.Array:
  """The reconstruction from the latents' contribution: + b_dec, + x @ w_skip (skip kinds)."""
  y = y_latents + params["b_dec"][None]
  if "w_skip" in params:
    y = y + jnp.einsum("bgi,gio->bgo", x, params["w_skip"])
  return y


def forward(params: Params, cfg: TrainConfig, x: jax.Array) -> tuple[jax.Array, Encoding]:
  """x [B, G, d_in] -> reconstruction [B, G, d_out] (CLT: [B, L, d]) and the code."""
  enc = encode(params, cfg, x)
  return decode(params, cfg, x, enc.indices, enc.acts), enc


class Dictionary(nnx.Module):
  """A stack of sparse dictionaries of one kind (see module docstring) as an NNX module."""

  def __init__(self, cfg: TrainConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs | None = None,
               params: Params | None = None):
    self.cfg = cfg
    if params is None:
      params = init_params(cfg, d_in, d_out, (rngs or nnx.Rngs(cfg.seed)).params())
    for name, value in params.items():
      setattr(self, name, nnx.Param(jnp.asarray(value)))

  def params(self) -> Params:
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Site activations [B, L, d_in] (normalized) -> reconstruction [B, G, d_out]."""
    return forward(self.params(), self.cfg, prepare(self.cfg, x))[0]
