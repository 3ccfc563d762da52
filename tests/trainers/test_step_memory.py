"""Compile-only: one train step at Gemma 3 270M all-layer sizes fits in 3x its pre-activations.

Nothing is allocated: the step is lowered on abstract shapes and XLA's buffer assignment is read
(`memory_analysis().temp_size_in_bytes`). Before the sparse kernels these steps needed 22-25x
(transcoders) and 732x (CLT); benchmarks/step_memory.py prints every kind.
"""

from __future__ import annotations

import jax
import pytest

from allscope.trainers import mesh as mesh_lib, step
from allscope.trainers.config import TrainConfig

D, B = 640, 4096  # Gemma 3 270M's width; tokens per step


def temp_ratio(cfg: TrainConfig) -> float:
  mesh = mesh_lib.make_mesh(cfg, jax.devices()[:1])
  mem = step.lower_step(cfg, D, D, mesh).compile().memory_analysis()
  pre = len(cfg.layers) * cfg.batch_size * cfg.width * 4  # [L, B, F] float32
  return mem.temp_size_in_bytes / pre


@pytest.mark.parametrize("kind,activation,width,n_layers,bound", [
    ("transcoder", "topk", 16384, 18, 3.0),
    ("transcoder", "jumprelu", 16384, 18, 3.0),
    # All 18 layers take about a minute to compile on 2 cores (benchmarks/step_memory.py has
    # them); 6 layers is the same code at a real width and batch. Not yet at 3x: the main and
    # the AuxK decode each write a decoder-sized gradient (3.24x measured; the 3x target is open).
    ("clt", "topk", 8192, 6, 3.5),
])
def test_step_temporary_memory_is_bounded_by_the_pre_activations(kind, activation, width, n_layers,
                                                                 bound):
  cfg = TrainConfig(kind=kind, activation=activation, layers=tuple(range(n_layers)), width=width,
                    k=64, target_l0=64, batch_size=B, mesh_data=1, kernels="xla")
  ratio = temp_ratio(cfg)
  assert ratio <= bound, f"{kind}/{activation}: temporary memory is {ratio:.2f}x the pre-activations"
