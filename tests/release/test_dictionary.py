"""`Dictionary.encode/decode` and `CrossLayerTranscoder.encode/decode` on a loaded release match
the float64 reference of the released math."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from allscope import release
from allscope.release import CrossLayerTranscoder, Dictionary, ReleaseConfig, write_release
from tests.release.conftest import random_params
from tests.release.reference import ref_clt, ref_decode, ref_encode, rel_err, well_posed_inputs

D, F, L = 24, 48, 3


@pytest.fixture
def loaded(tmp_path, rng):
  """A written and re-loaded release: jump_relu transcoder (affine), TopK SAE, ReLU SAE, CLT."""
  topk, relu = random_params(rng, D, F, D), random_params(rng, D, F, D)
  del topk["threshold"], relu["threshold"]  # TopK has no threshold; a ReLU's would be 0
  dicts = [
      Dictionary(random_params(rng, D, F, D, affine=True), "transcoder", "jump_relu",
                 "gemma3-270m", 1, "mlp_in", "mlp_out", l0=5),
      Dictionary(topk, "sae", "topk", "gemma3-270m", 2, "resid_post",
                 "resid_post", l0=6, k=6),
      Dictionary(relu, "sae", "relu", "gemma3-270m", 3, "mlp_out",
                 "mlp_out", l0=20),
      CrossLayerTranscoder(tuple(random_params(rng, D, F, D, affine=True, clt_layers=L, source=i)
                                 for i in range(L)), "jump_relu", "gemma3-270m", l0=4),
  ]
  root = write_release(ReleaseConfig(directory="rel", plots=False, model_card=False), dicts,
                       tmp_path)
  return list(release.load(root).dictionaries)


def test_per_layer_dictionaries_encode_and_decode_like_the_reference(loaded, rng):
  for d in loaded[:3]:
    p = d.params
    x = well_posed_inputs(rng, [p] if d.architecture == "jump_relu" else [], 64, D)
    f = d.encode(x)
    want_f = ref_encode(p, x, {"jump_relu": "jump_relu", "topk": "topk", "relu": "relu"}[
        d.architecture], d.k)
    assert f.shape == (64, F) and f.dtype == np.float32
    assert rel_err(f, want_f) < 1e-5, d.architecture
    assert np.array_equal(f > 0, want_f > 0)
    if d.architecture == "topk":
      assert ((f > 0).sum(-1) <= 6).all()
    y = d.decode(f, x) if d.affine else d.decode(f)
    assert rel_err(y, ref_decode(p, want_f, x)) < 1e-5
    # Batch dimensions are free: [2, 32, d] gives the same rows.
    assert np.allclose(d.encode(x.reshape(2, 32, D)).reshape(64, F), f, rtol=1e-6, atol=1e-6)


def test_jax_arrays_work_through_xp(loaded, rng):
  d = loaded[0]
  x = well_posed_inputs(rng, [d.params], 16, D)
  f = d.encode(jnp.asarray(x), xp=jnp)
  y = d.decode(f, jnp.asarray(x), xp=jnp)
  assert rel_err(np.asarray(y), ref_decode(d.params, ref_encode(d.params, x), x)) < 1e-5


def test_clt_encodes_per_layer_and_decodes_into_every_later_layer(loaded, rng):
  clt = loaded[3]
  assert isinstance(clt, CrossLayerTranscoder)
  xs = [well_posed_inputs(rng, [clt.layer_params[l]], 32, D) for l in range(L)]
  feats = clt.encode(xs)
  want_f, want_y = ref_clt(clt.layer_params, np.stack(xs))
  assert len(feats) == L and all(f.shape == (32, F) for f in feats)
  assert rel_err(np.stack(feats), want_f) < 1e-5
  outs = clt.decode(feats, xs)
  assert len(outs) == L and rel_err(np.stack(outs), want_y) < 1e-5


def test_bad_shapes_and_missing_skip_inputs_are_named(loaded, rng):
  tc, sae, _, clt = loaded
  with pytest.raises(ValueError, match=r"x has shape \(4, 7\); expected \[\.\.\., 24\]"):
    sae.encode(np.zeros((4, 7)))
  with pytest.raises(ValueError, match=r"f has shape \(4, 24\); expected \[\.\.\., 48\]"):
    sae.decode(np.zeros((4, D)))
  with pytest.raises(ValueError, match=r"call decode\(f, x\) with the inputs x"):
    tc.decode(np.zeros((4, F), np.float32))
  with pytest.raises(ValueError, match="got inputs of 2 layers; this CLT reads 3"):
    clt.encode([np.zeros((4, D))] * 2)
  with pytest.raises(ValueError, match=r"decode\(feats, xs\)"):
    clt.decode([np.zeros((4, F))] * 3)
