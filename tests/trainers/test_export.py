"""Export folds the normalization: exported arrays on raw activations reproduce the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allscope.trainers import dictionaries, export, state as state_lib
from allscope.trainers.config import TrainConfig

B, D, F, L = 16, 10, 24, 3


def _state(cfg: TrainConfig, rng: np.random.Generator):
  params = dictionaries.init_params(cfg, D, D, jax.random.key(1))
  params = {k: v + 0.05 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
            for k, v in params.items()}
  if "log_threshold" in params:
    params["log_threshold"] = jnp.log(jnp.asarray(rng.uniform(0.05, 0.4, (cfg.n_groups, F)),
                                                  jnp.float32))
  st = state_lib.init_state(cfg, params, jax.random.key(0))
  return st.replace(l0=jnp.arange(cfg.n_groups, dtype=jnp.float32) + 3.0,
                    batch_thr=jnp.full((cfg.n_groups,), 0.2))


def _apply(arrays, meta, x_raw):
  """Float64 numpy forward of one exported dictionary on raw activations."""
  a = {k: v.astype(np.float64) for k, v in arrays.items()}
  pre = x_raw @ a["w_enc"] + a["b_enc"]
  if meta["architecture"] == "topk":
    keep = np.zeros(pre.shape, bool)
    np.put_along_axis(keep, np.argsort(-pre, axis=-1)[:, :meta["k"]], True, axis=-1)
    f = np.where(keep & (pre > 0), pre, 0.0)
  else:
    f = pre * (pre > a["threshold"])
  return f, a


@pytest.mark.parametrize("kind,activation", [
    ("sae", "jumprelu"), ("sae", "topk"), ("sae", "relu"), ("transcoder", "jumprelu"),
    ("skip_transcoder", "jumprelu"), ("crosscoder", "jumprelu"), ("clt", "jumprelu"),
    ("clt", "topk")])
def test_exported_arrays_act_on_raw_activations(kind, activation):
  rng = np.random.default_rng(5)
  cfg = TrainConfig(kind=kind, activation=activation, layers=(2, 4, 7), width=F, k=4,
                    capacity=F if activation != "topk" else 0)
  site_in, site_out = cfg.sites
  norm = {site_in: rng.uniform(0.2, 3.0, L), site_out: rng.uniform(0.2, 3.0, L)}
  state = _state(cfg, rng)
  x_raw = rng.standard_normal((B, L, D)) * 4.0
  x_norm = x_raw * norm[site_in][None, :, None]
  y_norm, _ = dictionaries.forward(state.params, cfg,
                                   dictionaries.prepare(cfg, jnp.asarray(x_norm, jnp.float32)))
  y_norm = np.asarray(y_norm, np.float64)
  exported = export.release_arrays(cfg, state, norm)
  for e in exported:
    assert all(v.dtype == np.float32 for v in e.arrays.values())
    assert set(e.arrays) >= {"w_enc", "w_dec", "b_enc", "b_dec"}
    # TopK has no threshold: zeros would make a JumpReLU loader read it as a ReLU.
    assert ("threshold" in e.arrays) == (activation != "topk")
    assert e.metadata["width"] == F and e.metadata["site_in"] == site_in
  if kind == "crosscoder":
    (e,) = exported
    f, a = _apply(e.arrays, e.metadata, x_raw.reshape(B, -1))
    y_raw = (f @ a["w_dec"] + a["b_dec"]).reshape(B, L, D)
    want = y_norm.reshape(B, L, D) / norm[site_out][None, :, None]
  elif kind == "clt":
    y_raw = np.zeros((B, L, D))
    for s, e in enumerate(exported):
      assert e.arrays["w_dec"].shape == (F, L, D)
      f, a = _apply(e.arrays, e.metadata, x_raw[:, s])
      y_raw += np.einsum("bf,ftd->btd", f, a["w_dec"])
      y_raw[:, s] += a["b_dec"]
    want = y_norm / norm[site_out][None, :, None]
  else:
    y_raw = np.zeros((B, L, D))
    for g, e in enumerate(exported):
      assert e.metadata["layer"] == cfg.layers[g] and e.metadata["l0"] == 3.0 + g
      f, a = _apply(e.arrays, e.metadata, x_raw[:, g])
      y_raw[:, g] = f @ a["w_dec"] + a["b_dec"]
      if "affine_skip_connection" in a:
        y_raw[:, g] += x_raw[:, g] @ a["affine_skip_connection"]
    want = y_norm / norm[site_out][None, :, None]
  err = np.linalg.norm(y_raw - want) / np.linalg.norm(want)
  assert err < 1e-5, err


def test_batchtopk_exports_jumprelu_with_running_threshold():
  cfg = TrainConfig(kind="sae", activation="batchtopk", layers=(0, 1, 2), width=F, k=4)
  rng = np.random.default_rng(0)
  state = _state(cfg, rng)
  state = state.replace(batch_thr=jnp.asarray([0.1, 0.2, 0.3]))
  norm = {"resid_post": np.ones(L)}
  exported = export.release_arrays(cfg, state, norm)
  for g, e in enumerate(exported):
    assert e.metadata["architecture"] == "jump_relu"
    np.testing.assert_allclose(e.arrays["threshold"], np.full(F, [0.1, 0.2, 0.3][g]), rtol=1e-6)


def test_batchtopk_export_refuses_an_untracked_threshold():
  """A BatchTopK state whose threshold was never tracked (0) would export as a ReLU."""
  cfg = TrainConfig(kind="sae", activation="batchtopk", layers=(0, 1, 2), width=F, k=4)
  state = _state(cfg, np.random.default_rng(0)).replace(batch_thr=jnp.asarray([0.1, 0.0, 0.3]))
  with pytest.raises(ValueError, match="BatchTopK thresholds .* not all positive"):
    export.release_arrays(cfg, state, {"resid_post": np.ones(L)})


def test_batchtopk_threshold_is_tracked_during_training():
  """batch_thr follows a running mean of each step's smallest kept pre-activation (the k*B-th
  largest), with a horizon of a quarter of the steps taken."""
  from allscope.trainers import mesh as mesh_lib
  from allscope.trainers.step import compile_step

  cfg = TrainConfig(kind="sae", activation="batchtopk", layers=(0, 1), width=F, k=3,
                    batch_size=B, lr=0.0, capacity=F)
  rng = np.random.default_rng(4)
  params = dictionaries.init_params(cfg, D, D, jax.random.key(2))
  w_enc, b_enc = np.asarray(params["w_enc"]), np.asarray(params["b_enc"])  # lr 0: they stay
  st = state_lib.init_state(cfg, params, jax.random.key(0))
  mesh = mesh_lib.make_mesh(cfg, jax.devices()[:1])
  sh = state_lib.shardings(cfg, jax.eval_shape(lambda: st), mesh)
  step = compile_step(cfg, mesh, sh)
  ones = jnp.ones((2,), jnp.float32)
  want = None
  for i in range(3):
    x = rng.standard_normal((B, 2, D)).astype(np.float32)
    pre = np.einsum("bgi,gif->gbf", x, w_enc) + b_enc[:, None]
    kth = np.sort(np.maximum(pre, 0).reshape(2, -1), axis=1)[:, -cfg.k * B]  # k*B-th largest
    decay = min(0.99, 1 - 4 / (i + 4))  # the horizon grows with the steps taken
    want = kth if want is None else decay * want + (1 - decay) * kth
    st, _ = step(st, jnp.asarray(x), jnp.asarray(x), ones, ones)
  np.testing.assert_allclose(np.asarray(st.batch_thr), want, rtol=1e-5)
