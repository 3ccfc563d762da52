"""The trainer's real export (`release_arrays` on a train state) becomes release dictionaries
that write, load back and compute what the trainer's model computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import allscope.release as rel
from allscope.release import ReleaseConfig
from allscope.trainers import dictionaries, export, state as state_lib
from allscope.trainers.config import TrainConfig

from .reference import ref_clt, ref_decode, ref_encode, rel_err

D, F, LAYERS = 10, 24, (0, 1, 2)


def _exported(kind, activation, layers=LAYERS):
  rng = np.random.default_rng(3)
  cfg = TrainConfig(kind=kind, activation=activation, layers=layers, width=F, k=4,
                    capacity=F if activation != "topk" else 0)
  params = dictionaries.init_params(cfg, D, D, jax.random.key(1))
  params = {k: v + 0.05 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
            for k, v in params.items()}
  n = len(layers)
  if "log_threshold" in params:
    params["log_threshold"] = jnp.log(jnp.asarray(rng.uniform(0.05, 0.4, (cfg.n_groups, F)),
                                                  jnp.float32))
  state = state_lib.init_state(cfg, params, jax.random.key(0)).replace(
      l0=jnp.arange(cfg.n_groups, dtype=jnp.float32) + 3.0,
      batch_thr=jnp.full((cfg.n_groups,), 0.2))
  site_in, site_out = cfg.sites
  norm = {site_in: rng.uniform(0.2, 3.0, n), site_out: rng.uniform(0.2, 3.0, n)}
  return export.release_arrays(cfg, state, norm)


@pytest.mark.parametrize("kind,activation", [("transcoder", "jumprelu"), ("skip_transcoder", "jumprelu"),
                                             ("sae", "batchtopk"), ("sae", "topk"), ("sae", "relu")])
def test_per_layer_exports_round_trip(tmp_path, kind, activation):
  exported = _exported(kind, activation)
  dicts = rel.from_exported(exported)
  assert [d.layer for d in dicts] == list(LAYERS)
  root = rel.write_release(ReleaseConfig(directory="rel", model_card=False), dicts, tmp_path)
  loaded = rel.load(root).dictionaries
  x = np.random.default_rng(0).standard_normal((32, D))
  for e, d in zip(exported, loaded):
    np.testing.assert_array_equal(d.params["w_enc"], e.arrays["w_enc"])
    assert d.affine == (kind == "skip_transcoder") and d.l0 == e.metadata["l0"]
    f = ref_encode(d.params, x, d.architecture, d.k)
    want_f = ref_encode(e.arrays, x, e.metadata["architecture"], e.metadata.get("k"))
    assert rel_err(ref_decode(d.params, f, x), ref_decode(e.arrays, want_f, x)) == 0.0


def test_clt_export_on_a_subset_of_layers(tmp_path):
  exported = _exported("clt", "jumprelu", layers=(2, 4, 7))
  (clt,) = rel.from_exported(exported)
  assert isinstance(clt, rel.CrossLayerTranscoder) and clt.model_layers == (2, 4, 7)
  assert clt.l0 == 3.0 + 4.0 + 5.0
  root = rel.write_release(ReleaseConfig(directory="rel", model_card=False), [clt], tmp_path)
  (back,) = rel.load(root).dictionaries
  assert back.model_layers == (2, 4, 7)
  xs = np.random.default_rng(1).standard_normal((3, 16, D))
  _, want = ref_clt([e.arrays for e in exported], xs)
  _, got = ref_clt(back.layer_params, xs)
  assert rel_err(got, want) == 0.0
