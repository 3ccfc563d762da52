"""What every Pallas kernel here shares: the lowering choice, block sizes, padding to whole blocks.

GPU kernels use the Triton lowering: JAX 0.10/0.11 default to Mosaic GPU, so the Triton
`CompilerParams` are passed explicitly. Triton tensors must have power-of-2 sizes, so block sizes
are powers of 2 and the wrappers pad the small operands (indices, values, batch rows) to whole
blocks instead of masking; large tables are never padded or copied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

# Backends with a compiled kernel for every primitive: Triton on GPU, Mosaic on TPU.
BACKENDS = ("gpu", "tpu")


def target(interpret: bool, backend: str | None) -> str:
  """Which kernel to build: "tpu" (Mosaic) or "gpu" (Triton; also the CPU interpret path).

  `backend` defaults to `jax.default_backend()` at trace time; naming it lowers for another
  platform from this host (the CI checks lower for CUDA and TPU from a CPU), and
  `backend="tpu", interpret=True` runs the TPU kernel in the TPU interpreter on CPU.
  """
  if backend is None:
    backend = "cpu" if interpret else jax.default_backend()
  return "tpu" if backend == "tpu" else "gpu"


def interpret_mode(interpret: bool, where: str):
  """`pallas_call`'s interpret argument: the TPU interpreter (DMAs, semaphores) for TPU kernels."""
  if not interpret:
    return False
  return pltpu.InterpretParams() if where == "tpu" else True


def compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 2):
  """Triton compiler params for a GPU kernel; None in interpret mode.

  JAX 0.10/0.11 lower `pallas_call` on GPU with Mosaic GPU unless given Triton's params.
  """
  if interpret:
    return None
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(num_grid_dims: int):
  """Mosaic params: every grid axis is parallel (no kernel here revisits an output block)."""
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_grid_dims)


def pow2_divisor(n: int, cap: int) -> int:
  """The largest power of 2 <= cap dividing n: a block size that tiles n exactly."""
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


def feature_block(d: int, cap: int, interpret: bool, name: str) -> int:
  """A power-of-2 block over a feature dim d (never padded: it is the table's row length)."""
  block = pow2_divisor(d, cap)
  if not interpret and block < 16:
    raise ValueError(f"{name}: the feature size {d} must be a multiple of 16 for the Triton "
                     "kernels (Gemma widths are multiples of 128); use kernels='xla'.")
  return block


def row_block(n: int, cap: int) -> int:
  """A power-of-2 block over a batch dim: cap, or the next power of 2 >= n when n is small."""
  return min(cap, 1 << max(0, (n - 1).bit_length()))


def pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  """Pads `axis` up to a multiple (a no-op, no copy, when it already is one)."""
  extra = -x.shape[axis] % multiple
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)
