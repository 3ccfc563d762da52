"""Evaluation metrics against a float64 numpy reference, and spliced LM loss on the real Gemma 3
forward (a tiny random Gemma 3, and the real 270M for the identity check)."""

from __future__ import annotations

import dataclasses
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from allscope import models
from allscope.release import CrossLayerTranscoder, Dictionary, EvalConfig, evaluate
from allscope.release.evaluate import activation_metrics

from .conftest import random_params
from .reference import ref_clt, ref_decode, ref_encode, rel_err

TINY = models.Gemma3Config(vocab_size=300, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1,
                           head_dim=16, d_ff=64, sliding_window=8)


def ref_metrics(x, y, feats, recon, dense=0.1):
  x, y, feats, recon = (np.asarray(a, np.float64) for a in (x, y, feats, recon))
  y2 = y.reshape(len(y), -1)
  fvu = np.sum((y - recon) ** 2) / np.sum((y2 - y2.mean(0)) ** 2)
  fired = (feats != 0).reshape(len(feats), -1)
  freq = fired.mean(0)
  return {"fvu": fvu, "l0": fired.sum(1).mean(), "dead_fraction": np.mean(freq == 0),
          "dense_fraction": np.mean(freq > dense)}, freq


@pytest.mark.parametrize("architecture,affine", [("jump_relu", False), ("jump_relu", True),
                                                 ("topk", False), ("relu", False)])
def test_activation_metrics_match_float64_reference(rng, architecture, affine):
  p = random_params(rng, 24, 96, 20, affine)
  p["b_enc"][:10] += 3.0  # some dense latents
  p["b_enc"][10:20] -= 30.0  # some dead latents
  if architecture != "jump_relu":  # TopK has no threshold; a ReLU's would be 0
    del p["threshold"]
  d = Dictionary(p, "transcoder", architecture, "tiny", 0, "mlp_in", "mlp_out", k=6)
  x = rng.normal(0, 1, (700, 24)).astype(np.float32)
  y = (rng.normal(0, 1, (700, 20)) + 0.5).astype(np.float32)
  got, freq = activation_metrics(d, x, y, 0.1, batch=256)
  f = ref_encode(p, x, architecture, 6)
  want, want_freq = ref_metrics(x, y, f, ref_decode(p, f, x))
  for key, value in want.items():
    assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), (key, got[key], value)
  np.testing.assert_array_equal(freq, want_freq)
  assert got["n_dead"] >= 10 and got["n_dense"] >= 10
  assert got["n_tokens"] == 700


def test_clt_activation_metrics_match_float64_reference(rng):
  n, d_model, width = 3, 16, 40
  layers = tuple(random_params(rng, d_model, width, d_model, clt_layers=n, source=l) for l in range(n))
  clt = CrossLayerTranscoder(layers, "jump_relu", "tiny")
  x = rng.normal(0, 1, (300, n, d_model)).astype(np.float32)
  y = rng.normal(0, 1, (300, n, d_model)).astype(np.float32)
  got, freq = activation_metrics(clt, x, y)
  feats, outs = ref_clt(layers, x.transpose(1, 0, 2))
  want, want_freq = ref_metrics(x, y, feats.transpose(1, 0, 2), outs.transpose(1, 0, 2))
  for key, value in want.items():
    assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), (key, got[key], value)
  np.testing.assert_array_equal(freq.reshape(-1), want_freq)


@pytest.fixture(scope="module")
def tiny():
  model = models.Gemma3(TINY, jnp.float32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(7)
  tokens = rng.integers(3, TINY.vocab_size, (3, 12)).astype(np.int32)
  tokens[:, 0] = TINY.bos_id
  tokens[2, 9:] = TINY.pad_id  # a padded row
  return model, tokens


def _ce(logits, tokens):
  """Reference CE over targets whose position and target are real tokens."""
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], -1))
  mask = tokens != TINY.pad_id
  valid = mask[:, 1:] & mask[:, :-1]
  nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  return float(nll[valid].mean())


def _eager_logits(model, tokens, splice=None):
  """Reference forwards run op by op: each uses fresh closures, which would each compile."""
  with jax.disable_jit():
    return model.logits(tokens, splice=splice)


def _keep(tokens):
  return (tokens != TINY.pad_id) & (tokens != TINY.bos_id)


def _const_splice(value, tokens):
  keep = jnp.asarray(_keep(tokens))[..., None]
  return lambda a: jnp.where(keep, jnp.asarray(value, a.dtype), a)


def identity_sae(d_model, site, layer, model_name="tiny"):
  eye = np.eye(d_model, dtype=np.float32)
  params = {"w_enc": np.concatenate([eye, -eye], 1), "w_dec": np.concatenate([eye, -eye], 0),
            "b_enc": np.zeros(2 * d_model, np.float32), "b_dec": np.zeros(d_model, np.float32),
            "threshold": np.zeros(2 * d_model, np.float32)}
  return Dictionary(params, "sae", "jump_relu", model_name, layer, site, site)


CFG = EvalConfig(n_sequences=3, seq_len=12, batch_size=2)


def test_identity_sae_splice_leaves_the_loss_unchanged(tiny):
  model, tokens = tiny
  (r,) = evaluate(CFG, [identity_sae(32, "resid_post", 1)], model, tokens, progress=False)
  m = r.metrics
  assert abs(m["delta_lm_loss"]) < 1e-5 and m["kl"] < 1e-6 and m["fvu"] < 1e-10
  assert abs(m["fraction_loss_recovered"] - 1.0) < 1e-4
  assert m["n_tokens"] == int(_keep(tokens).sum())
  assert m["ce_clean"] == pytest.approx(_ce(_eager_logits(model, tokens), tokens), rel=1e-5)


def test_transcoder_splice_matches_a_reference_replacement(tiny, rng):
  model, tokens = tiny
  layer = 2
  tc = Dictionary(random_params(rng, 32, 48, 32, affine=True), "transcoder", "jump_relu", "tiny",
                  layer, "mlp_in", "mlp_out")
  zero = Dictionary({**random_params(rng, 32, 48, 32), "w_dec": np.zeros((48, 32), np.float32),
                     "b_dec": np.zeros(32, np.float32)}, "transcoder", "jump_relu", "tiny", 1,
                    "mlp_in", "mlp_out")
  r_tc, r_zero = evaluate(CFG, [tc, zero], model, tokens, progress=False)

  x = np.asarray(model.capture(tokens, sites=("mlp_in",), layers=(layer,))["mlp_in"][:, :, 0])
  recon = ref_decode(tc.params, ref_encode(tc.params, x), x)
  logits = _eager_logits(model, tokens, {("mlp_out", layer): _const_splice(recon, tokens)})
  assert rel_err(r_tc.metrics["ce_spliced"], _ce(logits, tokens)) < 1e-5
  zero_logits = _eager_logits(model, tokens, {("mlp_out", layer): _const_splice(0.0, tokens)})
  assert rel_err(r_tc.metrics["ce_zero_ablation"], _ce(zero_logits, tokens)) < 1e-5
  clean = r_tc.metrics["ce_clean"]
  assert r_tc.metrics["delta_lm_loss"] == pytest.approx(r_tc.metrics["ce_spliced"] - clean)
  # a transcoder that outputs zeros is exactly zero ablation: nothing recovered
  assert r_zero.metrics["ce_spliced"] == pytest.approx(r_zero.metrics["ce_zero_ablation"], rel=1e-6)
  assert abs(r_zero.metrics["fraction_loss_recovered"]) < 1e-5


def test_clt_replaces_every_layer_with_errors_feeding_forward(tiny, rng):
  model, tokens = tiny
  n = TINY.n_layers
  layers = tuple(random_params(rng, 32, 24, 32, clt_layers=n, source=l) for l in range(n))
  clt = CrossLayerTranscoder(layers, "jump_relu", "tiny")
  (r,) = evaluate(CFG, [clt], model, tokens, progress=False)

  # Reference replacement model, built layer by layer: mlp_in[l] is captured from the model with
  # layers < l already replaced, then layer l's output comes from the float64 CLT math.
  outs, xs = [], []
  for l in range(n):
    splice = {("mlp_out", j): _const_splice(outs[j], tokens) for j in range(l)}
    xs.append(_capture_with_splice(model, tokens, l, splice))
    _, ys = ref_clt(layers, _pad_layers(xs, n))
    outs.append(ys[l])
  splice = {("mlp_out", j): _const_splice(outs[j], tokens) for j in range(n)}
  want = _ce(_eager_logits(model, tokens, splice), tokens)
  assert rel_err(r.metrics["ce_spliced"], want) < 1e-5
  zero = {("mlp_out", j): _const_splice(0.0, tokens) for j in range(n)}
  assert rel_err(r.metrics["ce_zero_ablation"], _ce(_eager_logits(model, tokens, zero), tokens)) < 1e-5
  assert r.metrics["kl"] > 0 and len(r.metrics["l0_per_layer"]) == n


def _capture_with_splice(model, tokens, layer, splice):
  """mlp_in[layer] of the model with `splice` applied upstream (via the public logits splice)."""
  seen = {}
  def record(a):
    seen["x"] = a
    return a
  model_splice = {**splice, ("mlp_in", layer): record}
  _eager_logits(model, tokens, model_splice)
  return np.asarray(seen["x"], np.float64)


def _pad_layers(xs, n):
  """ref_clt wants every layer's input; layers not reached yet do not affect earlier outputs."""
  return np.stack(xs + [np.zeros_like(xs[0])] * (n - len(xs)))


@pytest.mark.parametrize("change,message", [
    (dict(layer=9), "transcoder mlp_in->mlp_out layer 9: layer 9 is out of range"),
    (dict(width_in=31), "layer 0: w_enc has width 31 but mlp_in of the model has 32"),
])
def test_bad_dictionaries_are_refused_before_any_forward(tiny, rng, change, message):
  model, tokens = tiny
  d_in = change.get("width_in", 32)
  d = Dictionary(random_params(rng, d_in, 16, 32), "transcoder", "jump_relu", "tiny",
                 change.get("layer", 0), "mlp_in", "mlp_out")
  with pytest.raises(ValueError, match=message):
    evaluate(CFG, [d], model, tokens, progress=False)


def test_bad_tokens_are_refused(tiny):
  model, tokens = tiny
  with pytest.raises(ValueError, match="token ids must lie in"):
    evaluate(CFG, [identity_sae(32, "resid_post", 0)], model, tokens + 1000, progress=False)
  with pytest.raises(ValueError, match="integer array"):
    evaluate(CFG, [identity_sae(32, "resid_post", 0)], model, tokens.astype(np.float32), progress=False)


def test_metrics_reach_tensorboard(tiny, tmp_path):
  model, tokens = tiny
  evaluate(EvalConfig(n_sequences=2, seq_len=12, batch_size=2, splice=False),
           [identity_sae(32, "mlp_out", 3)], model, tokens, log_dir=tmp_path, progress=False)
  tags = set()
  for path in tmp_path.glob("events.out.tfevents.*"):  # TFRecord framing: len, crc, data, crc
    data = path.read_bytes()
    while data:
      n = struct.unpack("<Q", data[:8])[0]
      event = event_pb2.Event.FromString(data[12:12 + n])
      tags.update(v.tag for v in event.summary.value)
      data = data[12 + n + 4:]
  assert any(t.endswith("/fvu") for t in tags) and any(t.endswith("/l0") for t in tags)


@pytest.mark.slow
def test_identity_sae_on_real_gemma3_270m(gemma270m):
  model, tokenizer = gemma270m
  ids = tokenizer.encode("The lighthouse keeper climbed the narrow stairs at dusk to light the "
                         "great lamp, as his father had done every evening before him.", add_bos=True)
  assert len(ids) >= 16
  tokens = np.asarray([ids[:14], [tokenizer.bos_id] + ids[2:15]], np.int32)
  (r,) = evaluate(EvalConfig(n_sequences=2, seq_len=14, batch_size=2),
                  [identity_sae(640, "resid_post", 6, "gemma3-270m")], model, tokens, progress=False)
  assert abs(r.metrics["delta_lm_loss"]) < 1e-4, r.metrics
  assert r.metrics["ce_zero_ablation"] > r.metrics["ce_clean"] + 0.1, r.metrics
  assert math.isfinite(r.metrics["ce_clean"]) and r.metrics["ce_clean"] < 8


def test_evaluate_then_release_then_load(tiny, rng, tmp_path):
  """The stage chain the CLI runs: evaluate -> write_release -> load, metrics carried along."""
  from allscope.release import ReleaseConfig, load, write_release
  model, tokens = tiny
  dicts = [Dictionary(random_params(rng, 32, 48, 32), "transcoder", "jump_relu", "tiny", l,
                      "mlp_in", "mlp_out") for l in range(TINY.n_layers)]
  results = evaluate(CFG, dicts, model, tokens, progress=False)
  root = write_release(ReleaseConfig(directory="rel"), dicts, tmp_path, evaluations=results)
  release = load(root)
  for r, metrics in zip(results, release.metrics()):
    assert metrics["delta_lm_loss"] == r.metrics["delta_lm_loss"]
    assert (root / r.path / "params.safetensors").exists()  # folder named by the measured L0
  assert "| `transcoder/layer_0_width_48_l0_" in (root / "README.md").read_text()


def test_clt_on_a_subset_of_layers_splices_only_those(tiny, rng):
  model, tokens = tiny
  layers = (1, 3)
  parts = []
  for i in range(len(layers)):
    p = random_params(rng, 32, 24, 32, clt_layers=len(layers), source=i)
    p["w_dec"][:] = 0.0
    p["b_dec"][:] = 0.0
    parts.append(p)
  clt = CrossLayerTranscoder(tuple(parts), "jump_relu", "tiny", layers=layers)
  (r,) = evaluate(CFG, [clt], model, tokens, progress=False)
  zero = {("mlp_out", l): _const_splice(0.0, tokens) for l in layers}
  want = _ce(_eager_logits(model, tokens, zero), tokens)
  assert rel_err(r.metrics["ce_spliced"], want) < 1e-5
  assert r.metrics["ce_zero_ablation"] == pytest.approx(r.metrics["ce_spliced"], rel=1e-6)


# -- prefix-cached splicing, standard errors, token counts ----------------------------------------

@pytest.mark.parametrize("spec_of", [
    lambda d, n: (("transcoder", n, "mlp_in", "mlp_out", "jump_relu", None), d.params),
    lambda d, n: (("zero_at", n, "mlp_out"), None),
    lambda d, n: (("sae", n, "resid_post", "jump_relu", None),
                  {k: v for k, v in d.params.items() if k != "affine_skip_connection"}),
])
def test_splice_from_the_cached_residual_equals_the_full_spliced_forward(tiny, rng, spec_of):
  """Each splice runs only the layers from its own onward, from the clean pass's residual."""
  from allscope.release.evaluate import _clean_pass, _spliced_hidden
  model, tokens = tiny
  tc = Dictionary(random_params(rng, 32, 48, 32, affine=True), "transcoder", "jump_relu", "tiny",
                  0, "mlp_in", "mlp_out")
  spec, params = spec_of(tc, TINY.n_layers)
  params = jax.tree.map(jnp.asarray, params)
  batch = jnp.asarray(tokens)
  mask = batch != TINY.pad_id
  keep = mask & (batch != TINY.bos_id)
  layers = tuple(range(TINY.n_layers))
  graphdef, state = nnx.split(model)
  captured, clean = _clean_pass(graphdef, state, batch, mask, ("resid_post",), layers)
  for layer in range(TINY.n_layers):
    full = _spliced_hidden(graphdef, state, batch, mask, keep, params, spec, jnp.int32(layer))
    resid = model.embed(batch) if layer == 0 else captured["resid_post"][:, :, layer - 1]
    tail = _spliced_hidden(graphdef, state, batch, mask, keep, params, spec, jnp.int32(layer),
                           jnp.int32(layer), resid)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(full) - np.asarray(clean)).max() > 1e-3  # the splice did act


@pytest.mark.parametrize("vocab,chunk", [(300, 64), (256, 256), (256, 1024)])
def test_streamed_vocabulary_pass_matches_float64_softmax(rng, vocab, chunk):
  """The online log-sum-exp, target logits and clean-weighted logit gaps equal the materialized
  float64 ones, with a last chunk shorter than the rest (300 = 4 x 64 + 44), one chunk, and
  chunk > V; 10 clean rows, then 2 blocks of 10 spliced rows."""
  from allscope.release.evaluate import _vocab_stats
  h = rng.normal(0, 3, (30, 16)).astype(np.float32)
  embed = rng.normal(0, 1, (vocab, 16)).astype(np.float32)
  embed[5] *= 8  # one dominant logit for some rows: the rescaling must carry it
  targets = rng.integers(0, vocab, 30).astype(np.int32)
  top, log_sum, target, gap = jax.jit(_vocab_stats, static_argnums=(3, 4))(h, embed, targets,
                                                                            10, chunk)
  z = h.astype(np.float64) @ embed.astype(np.float64).T
  want_lse = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
  p = np.exp(z[:10] - want_lse[:10, None])
  want_gap = np.sum(p * (z[:10] - z[10:].reshape(2, 10, vocab)), -1)
  lse = np.asarray(top, np.float64) + np.asarray(log_sum, np.float64)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(target), z[np.arange(30), targets], rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gap), want_gap, rtol=1e-5, atol=1e-5)


def test_splice_losses_equal_the_materialized_log_softmax(tiny, rng):
  """NLL and KL(clean || spliced) per sequence from the log-sum-exps alone equal the former
  computation from materialized float64 log-probs over the whole vocabulary."""
  from allscope.release.evaluate import _clean_pass, _splice_losses, _spliced_hidden
  model, tokens = tiny
  batch = jnp.asarray(tokens)
  mask = batch != TINY.pad_id
  keep = mask & (batch != TINY.bos_id)
  layers = tuple(range(TINY.n_layers))
  graphdef, state = nnx.split(model)
  _, clean = _clean_pass(graphdef, state, batch, mask, ("resid_post",), layers)
  hidden = []
  for layer in range(TINY.n_layers):
    d = Dictionary(random_params(rng, 32, 48, 32), "transcoder", "jump_relu", "tiny", layer,
                   "mlp_in", "mlp_out")
    spec = ("transcoder", TINY.n_layers, "mlp_in", "mlp_out", "jump_relu", None)
    hidden.append(_spliced_hidden(graphdef, state, batch, mask, keep,
                                  jax.tree.map(jnp.asarray, d.params), spec, jnp.int32(layer)))
  clean_nll, nll, kl, counts = _splice_losses(model.embed_tokens[...], clean, jnp.stack(hidden),
                                              batch, mask)

  embed = np.asarray(model.embed_tokens[...], np.float64)
  valid = (tokens[:, 1:] != TINY.pad_id) & (tokens[:, :-1] != TINY.pad_id)
  np.testing.assert_array_equal(np.asarray(counts), valid.sum(1))

  def log_probs(h):
    z = np.asarray(h, np.float64) @ embed.T
    return z - (np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1))[..., None]

  def seq_nll(logp):
    return np.where(valid, -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0], 0).sum(1)

  clean_logp = log_probs(clean)
  np.testing.assert_allclose(np.asarray(clean_nll), seq_nll(clean_logp), rtol=1e-5)
  for j, h in enumerate(hidden):
    logp = log_probs(h)
    want_kl = np.where(valid, np.sum(np.exp(clean_logp) * (clean_logp - logp), -1), 0).sum(1)
    np.testing.assert_allclose(np.asarray(nll[j]), seq_nll(logp), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(kl[j]), want_kl, rtol=1e-5, atol=1e-6)
    assert want_kl.max() > 1e-3  # the splices did act


def test_transcoder_kl_matches_a_reference_replacement(tiny, rng):
  """evaluate's kl against float64 log-probs of the eager clean and replacement forwards."""
  model, tokens = tiny
  layer = 1
  tc = Dictionary(random_params(rng, 32, 48, 32, affine=True), "transcoder", "jump_relu", "tiny",
                  layer, "mlp_in", "mlp_out")
  (r,) = evaluate(dataclasses.replace(CFG, zero_ablation=False), [tc], model, tokens,
                  progress=False)
  x = np.asarray(model.capture(tokens, sites=("mlp_in",), layers=(layer,))["mlp_in"][:, :, 0])
  recon = ref_decode(tc.params, ref_encode(tc.params, x), x)
  logp = lambda logits: np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], -1))
  p = logp(_eager_logits(model, tokens))
  q = logp(_eager_logits(model, tokens, {("mlp_out", layer): _const_splice(recon, tokens)}))
  mask = tokens != TINY.pad_id
  valid = mask[:, 1:] & mask[:, :-1]
  want = np.sum(np.exp(p) * (p - q), -1)[valid].mean()
  assert want > 1e-3 and rel_err(r.metrics["kl"], want) < 1e-4


def test_ratio_stderr_matches_a_numpy_computation(rng):
  from allscope.release.evaluate import ratio_stderr
  counts = rng.integers(0, 40, 50).astype(np.float64)
  sums = rng.normal(0.3, 1.0, 50) * counts
  keep = counts > 0
  s, c = sums[keep], counts[keep]
  r = s.sum() / c.sum()
  # Delta method for a ratio of means: var(r) = var(s - r c) / (n mean(c)^2)
  n = len(c)
  want = np.sqrt(np.var(s - r * c, ddof=1) / n) / c.mean()
  assert ratio_stderr(sums, counts) == pytest.approx(want, rel=1e-12)
  # Equal counts: the standard error of the per-sequence means.
  means = rng.normal(0, 1, 30)
  assert ratio_stderr(means * 7, np.full(30, 7.0)) == pytest.approx(
      np.std(means, ddof=1) / np.sqrt(30), rel=1e-12)
  assert math.isnan(ratio_stderr(np.array([1.0]), np.array([3.0])))


def test_delta_lm_stderr_and_token_counts_per_metric(tiny, rng):
  """FVU/L0 on every sequence; LM losses on the first splice_sequences; the stderr is the
  per-sequence spread of spliced minus clean NLL."""
  model, _ = tiny
  tokens = rng.integers(3, TINY.vocab_size, (7, 12)).astype(np.int32)
  tokens[:, 0] = TINY.bos_id
  tokens[1, 8:] = TINY.pad_id
  tc = Dictionary(random_params(rng, 32, 48, 32), "transcoder", "jump_relu", "tiny", 1,
                  "mlp_in", "mlp_out")
  cfg = EvalConfig(n_sequences=7, seq_len=12, batch_size=2, splice_sequences=5)
  (r,) = evaluate(cfg, [tc], model, tokens, progress=False)
  m = r.metrics
  assert m["n_tokens"] == int(_keep(tokens).sum())  # all 7 sequences
  sub = tokens[:5]
  valid = (sub[:, 1:] != TINY.pad_id) & (sub[:, :-1] != TINY.pad_id)
  assert m["delta_lm_tokens"] == int(valid.sum()) and m["delta_lm_sequences"] == 5
  # Reference: per-sequence NLL differences from eager forwards, float64.
  x = np.asarray(model.capture(sub, sites=("mlp_in",), layers=(1,))["mlp_in"][:, :, 0])
  recon = ref_decode(tc.params, ref_encode(tc.params, x), x)

  def per_seq(logits):
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], -1))
    nll = -np.take_along_axis(logp, sub[:, 1:, None], -1)[..., 0]
    return np.where(valid, nll, 0).sum(1)

  diff = (per_seq(_eager_logits(model, sub, {("mlp_out", 1): _const_splice(recon, sub)}))
          - per_seq(_eager_logits(model, sub)))
  n_s = valid.sum(1)
  r_mean = diff.sum() / n_s.sum()
  want = np.sqrt(5 / 4 * np.sum((diff - r_mean * n_s) ** 2)) / n_s.sum()
  assert rel_err(m["delta_lm_loss"], r_mean) < 1e-4
  assert rel_err(m["delta_lm_loss_stderr"], want) < 1e-3 and want > 0
  # Without the zero ablation: the same spliced figures, no zero-ablation keys.
  (r2,) = evaluate(dataclasses.replace(cfg, zero_ablation=False), [tc], model, tokens,
                   progress=False)
  assert r2.metrics["delta_lm_loss"] == pytest.approx(m["delta_lm_loss"], rel=1e-9)
  assert "ce_zero_ablation" not in r2.metrics and "fraction_loss_recovered" not in r2.metrics


@pytest.mark.parametrize("change,message", [
    (dict(splice_sequences=0), "evaluate.splice_sequences must be >= 1, or -1"),
    (dict(tokens="held.pt"), "must name a .npy file"),
])
def test_bad_eval_config_is_refused(change, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CFG, **change).validate()


def test_too_few_heldout_sequences_are_counted_right(tiny):
  model, tokens = tiny
  with pytest.raises(ValueError, match=r"evaluate.n_sequences=5 but the held-out tokens hold "
                                       r"only 3 sequences"):
    evaluate(EvalConfig(n_sequences=5, seq_len=12, batch_size=2),
             [identity_sae(32, "resid_post", 0)], model, tokens, progress=False)


def test_token_files_load_without_pickle(tmp_path):
  from allscope.release import load_tokens
  ids = np.arange(24, dtype=np.int64).reshape(3, 8)
  np.save(tmp_path / "ok.npy", ids)
  np.testing.assert_array_equal(load_tokens(tmp_path / "ok.npy"), ids)
  np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(ValueError, match="obj.npy is not a plain .npy array"):
    load_tokens(tmp_path / "obj.npy")
  np.save(tmp_path / "flat.npy", np.arange(5))
  with pytest.raises(ValueError, match=r"flat.npy holds int64 \(5,\)"):
    load_tokens(tmp_path / "flat.npy")
  with pytest.raises(ValueError, match="does not exist"):
    load_tokens(tmp_path / "missing.npy")
