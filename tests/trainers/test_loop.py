"""The train loop: non-finite values stop the run cleanly; bad input fails before compiling."""

from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorboardX  # noqa: F401  (the loop writes event files with it)

from allscope.trainers import TrainConfig, TrainingDiverged, synthetic, train

SRC = synthetic.SyntheticSource(synthetic.SyntheticSpec(d=16, n_features=32, n_layers=2, l0=3),
                                n_rows=2048)
CFG = TrainConfig(kind="sae", activation="topk", layers=(0, 1), width=32, k=3, batch_size=64,
                  steps=12, lr=1e-3, lr_warmup_steps=1, checkpoint_every=4, log_every=100)


class PoisonAt:
  """Global batches whose n-th batch (1-based) carries a NaN."""

  def __init__(self, batches, n: int):
    self.batches, self.n, self.global_batch = batches, n, batches.global_batch

  def local(self, row_start, row_stop):
    def poison(k, batch):
      if k == self.n - 1:
        batch = {key: v.copy() for key, v in batch.items()}
        batch["resid_post"][3, 1, 5] = np.nan
      return batch
    return self.batches.local(row_start, row_stop).map_with_index(poison)


def test_nan_input_stops_with_step_and_cause_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(TrainingDiverged, match=r"step 6: a non-finite value .* input batch.*step 4"):
    train(CFG, PoisonAt(synthetic.loader(SRC, 64), 6), SRC.norm_scale(), tmp_path, progress=False)
  mngr = ocp.CheckpointManager(tmp_path / "checkpoints")
  assert mngr.all_steps() == [4]
  restored = mngr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  for v in restored["state"]["params"].values():  # readable without the TrainState class
    assert np.all(np.isfinite(v))


def test_diverging_update_is_named(tmp_path):
  cfg = dataclasses.replace(CFG, lr=1e38, grad_clip=1e38, decoder_norm="none", steps=4,
                            checkpoint_every=100)
  with pytest.raises(TrainingDiverged, match="non-finite (loss|gradient or parameter update)"):
    train(cfg, synthetic.loader(SRC, 64), SRC.norm_scale(), tmp_path, progress=False)


def test_resume_with_a_different_dictionary_is_refused(tmp_path):
  train(dataclasses.replace(CFG, steps=4), synthetic.loader(SRC, 64), SRC.norm_scale(), tmp_path,
        progress=False)
  with pytest.raises(ValueError, match="train.width=32.*64"):
    train(dataclasses.replace(CFG, steps=8, width=64), synthetic.loader(SRC, 64),
          SRC.norm_scale(), tmp_path, progress=False)
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("change,message", [
    (dict(kind="autoencoder"), "train.kind='autoencoder' is unknown"),
    (dict(activation="gelu"), "train.activation='gelu' is unknown"),
    (dict(d_in=17), "width mismatch: site 'resid_post' has width 16 .* train.d_in=17"),
    (dict(width=30, mesh_model=4), "width=30 is not divisible by train.mesh_model=4"),
    (dict(batch_size=63), "serves global batches of 64 rows but train.batch_size=63"),
    (dict(kind="transcoder"), "the data has no site 'mlp_in' \\(the input of a transcoder\\)"),
    (dict(layers=(0, 1, 2)), "holds 2 layers per row but train.layers lists 3"),
    (dict(mesh_data=2), "does not fit 1 devices"),
    (dict(mesh_data=3), "batch_size=64 is not divisible by train.mesh_data=3"),
])
def test_bad_input_is_reported_before_compiling(tmp_path, change, message):
  cfg = dataclasses.replace(CFG, **change)
  norm = {"mlp_in": np.ones(2), "mlp_out": np.ones(2), **SRC.norm_scale()}
  with pytest.raises(ValueError, match=message):
    train(cfg, synthetic.loader(SRC, 64), norm, tmp_path, progress=False)
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_norm_scale_must_cover_the_sites(tmp_path):
  with pytest.raises(ValueError, match="norm_scale has no entry for site 'resid_post'"):
    train(CFG, synthetic.loader(SRC, 64), {"mlp_in": np.ones(2)}, tmp_path, progress=False)


def test_sigint_checkpoints_at_the_next_step_and_the_restart_ends_where_it_would_have(tmp_path):
  from allscope.trainers import preemption

  def interrupt(step, ctx):
    if step == 5:
      os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C; the loop sees it at the next boundary

  straight = train(CFG, synthetic.loader(SRC, 64), SRC.norm_scale(), tmp_path / "a",
                   progress=False)
  with pytest.raises(preemption.Preempted, match=r"checkpoint at step 6 .* same command again"):
    train(CFG, synthetic.loader(SRC, 64), SRC.norm_scale(), tmp_path / "b", hooks=[interrupt],
          progress=False)
  assert ocp.CheckpointManager(tmp_path / "b" / "checkpoints").latest_step() == 6
  resumed = train(CFG, synthetic.loader(SRC, 64), SRC.norm_scale(), tmp_path / "b",
                  progress=False)
  assert resumed.resumed_from == 6
  for k, v in straight.params.items():
    assert np.array_equal(v, resumed.params[k]), k


def test_tensorboard_holds_learning_rate_and_per_layer_curves(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  cfg = dataclasses.replace(CFG, steps=8, lr_warmup_steps=4, log_every=2, checkpoint_every=8)
  train(cfg, synthetic.loader(SRC, 64), SRC.norm_scale(), tmp_path, progress=False)
  events = EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  scalars = lambda tag: {e.step: e.value for e in events.Scalars(tag)}
  # Linear warm-up over 4 updates, flat, then linear decay over the last 20% (int(1.6) = 1 step):
  # step s applies the rate of update count s - 1.
  lr = scalars("train/lr")
  assert sorted(lr) == [2, 4, 6, 8]
  np.testing.assert_allclose([lr[2], lr[4], lr[6], lr[8]], [2.5e-4, 7.5e-4, 1e-3, 1e-3], rtol=1e-6)
  for name in ("fvu", "l0", "dead"):
    assert {t for t in events.Tags()["scalars"] if t.startswith(f"{name}/")} == {
        f"{name}/layer_0", f"{name}/layer_1"}
  for step in (2, 4, 6, 8):
    per_layer_l0 = [scalars(f"l0/layer_{l}")[step] for l in (0, 1)]
    assert np.mean(per_layer_l0) == pytest.approx(scalars("train/l0")[step], rel=1e-6)
    assert all(v <= 3 for v in per_layer_l0)  # TopK, k=3
    assert all(0 <= scalars(f"fvu/layer_{l}")[step] < 2 for l in (0, 1))
    assert all(0 <= scalars(f"dead/layer_{l}")[step] <= 1 for l in (0, 1))


def test_jumprelu_warns_once_when_its_capacity_drops_firing_latents(tmp_path, caplog):
  # Thresholds start at 0.001: about half of the 32 latents fire on every row, 2 slots hold them.
  cfg = dataclasses.replace(CFG, activation="jumprelu", target_l0=3.0, capacity=2, steps=4,
                            sparsity_warmup_steps=1, log_every=1, checkpoint_every=100)
  with caplog.at_level("WARNING", logger="allscope.trainers.loop"):
    result = train(cfg, synthetic.loader(SRC, 64), SRC.norm_scale(), tmp_path, progress=False)
  assert result.metrics["overflow"] > 0
  warnings = [r.getMessage() for r in caplog.records if "lack of capacity" in r.getMessage()]
  assert len(warnings) == 1 and "steps 2-2 dropped" in warnings[0], warnings
  assert "train.capacity=2 slots per row" in warnings[0] and "raise train.capacity" in warnings[0]


def test_a_capacity_that_binds_after_warm_up_is_warned_about_once_naming_the_fix(tmp_path, caplog):
  """JumpReLU's capacity bounds memory, never the sparsity: firing latents dropped for lack of
  slots once training settles (after the sparsity warm-up, or in the second half of a shorter
  run) log one warning naming train.capacity, even when they fall between log steps; the
  default capacity on the same data drops none and stays silent."""
  base = dataclasses.replace(CFG, activation="jumprelu", target_l0=3.0, steps=12, log_every=5,
                             checkpoint_every=100)  # warm-up 100 > 12 steps: second half counts
  with caplog.at_level("WARNING", logger="allscope.trainers.loop"):
    train(dataclasses.replace(base, capacity=1), synthetic.loader(SRC, 64), SRC.norm_scale(),
          tmp_path / "tight", progress=False)
  warnings = [r.getMessage() for r in caplog.records if "lack of capacity" in r.getMessage()]
  assert len(warnings) == 1 and "raise train.capacity" in warnings[0], warnings
  assert "steps 7-" in warnings[0], warnings  # counted from the first step of the second half
  caplog.clear()
  with caplog.at_level("WARNING", logger="allscope.trainers.loop"):
    train(base, synthetic.loader(SRC, 64), SRC.norm_scale(), tmp_path / "default", progress=False)
  assert not [r for r in caplog.records if "lack of capacity" in r.getMessage()]
