"""Every kind and activation: loss and gradients match the float64 numpy reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allscope import kernels
from allscope.kernels import clt_layout
from allscope.trainers import dictionaries, losses
from allscope.trainers.config import KINDS, TrainConfig
from tests.trainers import numpy_reference as ref

B, D, F, L = 24, 12, 40, 3


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def random_params(cfg: TrainConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
  shp = dictionaries.shapes(cfg, D, D)
  p = {"w_enc": rng.standard_normal(shp["w_enc"]) / np.sqrt(shp["w_enc"][1]),
       "b_enc": 0.1 * rng.standard_normal(shp["b_enc"]),
       "w_dec": rng.standard_normal(shp["w_dec"]) / np.sqrt(F),
       "b_dec": 0.1 * rng.standard_normal(shp["b_dec"])}
  if "log_threshold" in shp:
    p["log_threshold"] = np.log(rng.uniform(0.2, 0.9, shp["log_threshold"]))
  if "w_skip" in shp:
    p["w_skip"] = 0.1 * rng.standard_normal(shp["w_skip"])
  return {k: v.astype(np.float32) for k, v in p.items()}


CASES = [(kind, act) for kind in KINDS for act in ("jumprelu", "topk", "batchtopk", "relu")]


def _check(cfg: TrainConfig, seed: int, dead_fraction: float = 0.5,
           dead_counts: tuple[int, ...] | None = None) -> dict[str, float]:
  """Relative errors against the reference; `dead_counts` (one per group) overrides the random
  dead latents (`dead_fraction`) with that many, at random places."""
  rng = np.random.default_rng(seed)
  p = random_params(cfg, rng)
  x = rng.standard_normal((B, L, D)).astype(np.float32)
  y = rng.standard_normal((B, L, D)).astype(np.float32)
  dead = rng.random((cfg.n_groups, F)) < dead_fraction
  if dead_counts is not None:
    dead = np.stack([rng.permutation(F) < n for n in dead_counts])
  scale = 0.7
  # The reference works on the dense [G, F, G, d] CLT decoder (zeros below the diagonal).
  p_ref = {**p, "w_dec": np.asarray(kernels.causal_to_dense(p["w_dec"]))} if cfg.kind == "clt" else p
  want_loss, want_m, want_g = ref.loss_and_grads(p_ref, cfg, x, y, dead, scale)
  if cfg.kind == "clt":
    want_g["w_dec"] = clt_layout.from_dense(want_g["w_dec"])
  jp = {k: jnp.asarray(v) for k, v in p.items()}
  fn = lambda q: losses.loss_fn(q, cfg, dictionaries.prepare(cfg, jnp.asarray(x)),
                                dictionaries.prepare(cfg, jnp.asarray(y)), jnp.asarray(dead),
                                jnp.asarray(scale))
  (loss, (metrics, _)), grads = jax.value_and_grad(fn, has_aux=True)(jp)
  errors = {"loss": rel(loss, want_loss), "l0": rel(metrics["l0"], want_m["l0"]),
            "fvu": rel(metrics["fvu"], want_m["fvu"])}
  errors.update({f"d_{k}": rel(grads[k], want_g[k]) for k in want_g})
  if "auxk" in want_m:  # the AuxK ratio alone (aux_coef makes it a small part of the loss)
    errors["auxk"] = rel(metrics["auxk"], want_m["auxk"])
  for k, v in want_g.items():
    assert np.linalg.norm(v) > 0, f"reference gradient of {k} is zero: the test would be vacuous"
  return errors


@pytest.mark.parametrize("kind,activation", CASES)
def test_loss_and_gradients_match_float64_reference(kind, activation):
  cfg = TrainConfig(kind=kind, activation=activation, layers=tuple(range(L)), width=F, k=5,
                    capacity=F if activation != "topk" else 0, target_l0=6.0, bandwidth=0.3,
                    aux_k=8, l0_coef=0.5)
  errors = _check(cfg, seed=CASES.index((kind, activation)))
  assert max(errors.values()) < 2e-5, errors


@pytest.mark.parametrize("variant", [
    dict(l0_penalty="linear"),
    dict(freq_coef=3.0, freq_max=0.05),
    dict(matryoshka=(8, 24)),
])
def test_jumprelu_penalty_variants_match_reference(variant):
  cfg = TrainConfig(kind="transcoder", activation="jumprelu", layers=tuple(range(L)), width=F,
                    capacity=F, target_l0=6.0, bandwidth=0.3, l0_coef=0.5, **variant)
  errors = _check(cfg, seed=7)
  assert max(errors.values()) < 2e-5, errors


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_matryoshka_with_topk_matches_reference(activation):
  cfg = TrainConfig(kind="sae", activation=activation, layers=tuple(range(L)), width=F, k=5,
                    capacity=F if activation == "batchtopk" else 0, matryoshka=(10, 20), aux_k=8)
  errors = _check(cfg, seed=11)
  assert max(errors.values()) < 2e-5, errors


def test_threshold_gradient_is_only_the_pseudo_derivative():
  """With no latent inside the window, the thresholds get exactly zero gradient."""
  cfg = dataclasses.replace(TrainConfig(kind="sae", activation="jumprelu", layers=(0,), width=F,
                                        capacity=F, bandwidth=1e-4))
  rng = np.random.default_rng(3)
  p = {k: jnp.asarray(v) for k, v in random_params(
      dataclasses.replace(cfg, layers=tuple(range(L))), rng).items()}
  p = {k: v[:1] for k, v in p.items()}
  x = jnp.asarray(rng.standard_normal((B, 1, D)), jnp.float32)
  pre = np.einsum("bgi,gif->gbf", x, p["w_enc"]) + p["b_enc"][:, None]
  assert np.min(np.abs(pre - np.exp(p["log_threshold"])[:, None])) > 1e-4 / 2
  g = jax.grad(lambda q: losses.loss_fn(q, cfg, x, x, jnp.zeros((1, F), bool), 1.0)[0])(p)
  assert np.all(np.asarray(g["log_threshold"]) == 0)
  assert np.linalg.norm(g["w_enc"]) > 0


@pytest.mark.parametrize("aux_path", ["dense", "sparse"])
@pytest.mark.parametrize("kind,activation", [("sae", "topk"), ("skip_transcoder", "batchtopk"),
                                             ("crosscoder", "topk"), ("transcoder", "batchtopk")])
def test_auxk_dense_and_sparse_paths_match_reference(kind, activation, aux_path):
  """Both AuxK paths give the reference's loss and gradients when some group has more dead
  latents than aux_k (each row ranks its dead latents), and when none has (every dead latent is
  a candidate of every row, no ranking runs)."""
  cfg = TrainConfig(kind=kind, activation=activation, layers=tuple(range(L)), width=F, k=5,
                    capacity=F if activation != "topk" else 0, aux_k=12, aux_path=aux_path)
  assert dictionaries.aux_dense(cfg) == (aux_path == "dense")
  for counts, seed in (((5, 30, 12), 21), ((30,) * 3, 22), ((12, 3, 12), 23), ((1, 0, 7), 24),
                       ((2, 3, 1), 25)):
    errors = _check(cfg, seed=seed, dead_counts=counts[:cfg.n_groups])
    assert max(errors.values()) < 2e-5, (counts, errors)


@pytest.mark.parametrize("off", [dict(aux_k=0), dict(aux_coef=0.0)])
@pytest.mark.parametrize("kind,activation", [("transcoder", "topk"), ("clt", "batchtopk")])
def test_auxk_off_leaves_the_loss_without_its_term(kind, activation, off):
  """aux_k=0 or aux_coef=0 turns AuxK off: with dead latents in both regimes, the loss and
  gradients are the reference's without AuxK, and no auxk metric is reported."""
  cfg = TrainConfig(kind=kind, activation=activation, layers=tuple(range(L)), width=F, k=5,
                    capacity=F if activation != "topk" else 0, **off)
  assert not cfg.auxk
  for counts, seed in (((5, 30, 12), 51), ((2, 3, 1), 52)):
    errors = _check(cfg, seed=seed, dead_counts=counts)
    assert "auxk" not in errors and max(errors.values()) < 2e-5, (counts, errors)
  jp = {k: jnp.asarray(v) for k, v in random_params(cfg, np.random.default_rng(0)).items()}
  x = dictionaries.prepare(cfg, jnp.asarray(np.random.default_rng(1).standard_normal((B, L, D)),
                                            jnp.float32))
  _, (metrics, _) = losses.loss_fn(jp, cfg, x, x, jnp.ones((L, F), bool), jnp.asarray(1.0))
  assert "auxk" not in metrics


@pytest.mark.parametrize("kind", ["transcoder", "crosscoder"])
def test_auxk_columns_regime_takes_the_smallest_size_that_holds_every_group(kind, monkeypatch):
  """Whatever column count the widest group's silent latents select (4, aux_k = 8, or 16 =
  2 aux_k, where each row keeps its top aux_k of them), the loss and gradients are the
  reference's; past the widest size (F / 2 caps it at 16 here) the ranked regime takes over."""
  monkeypatch.setattr(dictionaries, "AUX_COLUMN_SIZES", (4,))
  cfg = TrainConfig(kind=kind, activation="topk", layers=tuple(range(L)), width=F, k=5,
                    aux_k=8)
  assert dictionaries.aux_column_sizes(cfg) == (4, 8, 16)
  for counts, seed, columns in (((2, 3, 1), 41, True), ((5, 8, 1), 42, True),
                                ((12, 3, 9), 43, True), ((16, 16, 2), 44, True),
                                ((17, 3, 9), 45, False)):
    counts = counts[:cfg.n_groups]
    dead = np.stack([np.arange(F) < n for n in counts])
    assert bool(dictionaries.aux_regimes(cfg, jnp.asarray(dead))[1]) == columns, counts
    errors = _check(cfg, seed=seed, dead_counts=counts)
    assert max(errors.values()) < 2e-5, (counts, errors)


def test_auxk_path_auto_is_dense_only_for_a_sizeable_fraction_of_the_width():
  base = TrainConfig(kind="skip_transcoder", activation="batchtopk", layers=(0,), width=1024)
  frac = dictionaries.AUX_DENSE_MIN_FRACTION
  assert dictionaries.aux_dense(dataclasses.replace(base, aux_k=int(1024 * frac)))
  assert not dictionaries.aux_dense(dataclasses.replace(base, aux_k=int(1024 * frac) - 1))
  assert not dictionaries.aux_dense(dataclasses.replace(base, kind="clt", aux_k=1024))
  with pytest.raises(ValueError, match="aux_path"):
    dataclasses.replace(base, kind="clt", aux_path="dense").validate()


@pytest.mark.parametrize("dead_counts", [(0, 0, 0), (20, 30, 12), (8, 3, 0)])
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_clt_auxk_decoded_with_the_main_code_matches_reference(activation, dead_counts):
  """A CLT decodes AuxK's latents in the main decode's op (one decoder-gradient buffer): loss and
  gradients match the reference with more dead latents than aux_k (ranked per row), with at
  most aux_k (all of them in every row's slots), and with none (AuxK off, its gradient 0)."""
  cfg = TrainConfig(kind="clt", activation=activation, layers=tuple(range(L)), width=F, k=5,
                    capacity=F if activation != "topk" else 0, aux_k=8)
  errors = _check(cfg, seed=31, dead_counts=dead_counts)
  assert max(errors.values()) < 2e-5, errors
