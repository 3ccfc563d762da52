"""train.kernels: the chosen path is logged, bad choices fail before compiling, and the Pallas
kernels (interpret mode on CPU) train the same dictionaries as the sparse XLA path."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
import pytest

from allscope.trainers import TrainConfig, synthetic, train

SRC = synthetic.SyntheticSource(synthetic.SyntheticSpec(d=16, n_features=32, n_layers=3, l0=3),
                                n_rows=2048)
CFG = TrainConfig(kind="sae", activation="topk", layers=(0, 1, 2), width=32, k=3, batch_size=64,
                  steps=3, lr=1e-3, lr_warmup_steps=1, checkpoint_every=100, log_every=100,
                  kernels="xla")


def _norm():
  return {"mlp_in": np.ones(3), "mlp_out": np.ones(3), **SRC.norm_scale()}


@pytest.mark.parametrize("change,message", [
    (dict(kernels="cuda"), r"train.kernels='cuda' is unknown; use one of auto, pallas, xla"),
    (dict(kernels="pallas"), r"train.kernels='pallas' has no kernel on the 'cpu' backend; use "
                             r"train.kernels='xla' or 'auto'"),
])
def test_bad_kernels_fail_before_compiling(tmp_path, change, message):
  with pytest.raises(ValueError, match=message):
    train(dataclasses.replace(CFG, **change), synthetic.loader(SRC, 64), _norm(), tmp_path,
          progress=False)
  assert not (tmp_path / "checkpoints").exists()


def test_the_loop_logs_the_kernel_path(tmp_path, caplog):
  with caplog.at_level(logging.INFO, logger="allscope.trainers.loop"):
    train(dataclasses.replace(CFG, kernels="auto"), synthetic.loader(SRC, 64), _norm(), tmp_path,
          progress=False)
  assert ("train: sparse kernels xla (train.kernels=auto, backend cpu, mesh data 1 x model 1 x "
          "layer 1)") in caplog.text


@pytest.mark.parametrize("kind,activation", [
    ("sae", "topk"), ("sae", "batchtopk"), ("sae", "jumprelu"), ("clt", "topk")])
def test_pallas_interpret_trains_like_xla_over_20_steps(tmp_path, kind, activation):
  pytest.importorskip("allscope.kernels.pallas")
  # dead_tokens=128: AuxK (its own selection, encoder gradient and decode) runs from step 3.
  cfg = dataclasses.replace(CFG, kind=kind, activation=activation, steps=20, dead_tokens=128,
                            site_in="resid_post", site_out="resid_post", target_l0=3.0,
                            capacity=12 if activation != "topk" else 0)
  results = {}
  for kernels in ("xla", "pallas"):
    run = dataclasses.replace(cfg, kernels=kernels, pallas_interpret=kernels == "pallas")
    results[kernels] = train(run, synthetic.loader(SRC, 64), _norm(), tmp_path / kernels,
                             progress=False)
  got, want = results["pallas"], results["xla"]
  for name, w in want.state.params.items():
    w, g = np.asarray(jax.device_get(w)), np.asarray(jax.device_get(got.state.params[name]))
    err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
    assert err <= 1e-4, f"{kind}/{activation}: {name} differs after 20 steps (rel. error {err:.2e})"
  assert got.metrics["loss"] == pytest.approx(want.metrics["loss"], rel=1e-4)
