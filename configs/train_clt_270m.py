"""A cross-layer transcoder over all 18 layers of Gemma 3 270M (TopK, k=64 per layer).

`allscope train --config train_clt_270m`
"""

from allscope.launch.config import RunConfig
from allscope.trainers.config import TrainConfig


def get_config() -> RunConfig:
  return RunConfig(
      output_dir="outputs/clt_270m",
      train=TrainConfig(
          kind="clt", activation="topk", layers=tuple(range(18)), width=8192, k=64,
          batch_size=4096, steps=50_000, lr_warmup_steps=1000, aux_k=512,
          checkpoint_every=2000),
  )
