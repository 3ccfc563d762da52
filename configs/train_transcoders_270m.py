"""JumpReLU transcoders (mlp_in -> mlp_out) on all 18 layers of Gemma 3 270M, in one pass.

`allscope train --config train_transcoders_270m [train.steps=...]`
"""

from allscope.launch.config import RunConfig
from allscope.trainers.config import TrainConfig


def get_config() -> RunConfig:
  return RunConfig(
      output_dir="outputs/transcoders_270m",
      train=TrainConfig(
          kind="transcoder", activation="jumprelu", layers=tuple(range(18)), width=16384,
          target_l0=64, l0_penalty="quadratic", l0_coef=1.0, bandwidth=0.01,
          batch_size=4096, steps=50_000, lr_warmup_steps=1000,
          sparsity_warmup_steps=5000, checkpoint_every=2000, mesh_layer=1),
  )
