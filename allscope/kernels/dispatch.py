"""Which implementation of the kernel seam a step runs: `Ops`, resolved from `kernels`.

`kernels="auto"` takes Pallas on GPU and TPU and XLA on CPU; "pallas" and "xla" force one.
`interpret=True` runs the Pallas kernels in interpret mode (how they are tested on CPU).
`allscope.kernels.pallas` is imported only when Pallas is chosen.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from allscope.kernels import xla

CHOICES = ("auto", "pallas", "xla")
PRIMITIVES = ("gather_decode", "gather_dot", "scatter_outer", "top_k", "clt_decode",
              "clt_gather_dot", "clt_scatter_outer")
_PALLAS_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True, eq=False)
class Ops:
  """One implementation of every seam primitive (signatures in allscope.kernels.xla).

  Equal (and hashed) by `name`, so jit caches and custom_vjp's static argument see two
  resolutions of the same choice as one.
  """

  name: str  # "xla", "pallas" or "pallas-interpret"
  gather_decode: Callable
  gather_dot: Callable
  scatter_outer: Callable
  top_k: Callable
  clt_decode: Callable
  clt_gather_dot: Callable
  clt_scatter_outer: Callable
  # not kernels: the selections' chunked count and compaction, replaced where the latents are
  # split on a mesh
  row_count: Callable = xla.row_count
  compact: Callable = xla.compact

  def __eq__(self, other) -> bool:
    return isinstance(other, Ops) and other.name == self.name

  def __hash__(self) -> int:
    return hash(("allscope.kernels.Ops", self.name))


XLA = Ops("xla", **{name: getattr(xla, name) for name in PRIMITIVES})


def _pallas_ops(interpret: bool) -> Ops:
  from allscope.kernels import pallas  # lazy: only a run that chose Pallas needs it

  return Ops("pallas-interpret" if interpret else "pallas",
             **{name: functools.partial(getattr(pallas, name), interpret=interpret)
                for name in PRIMITIVES})


def resolve(kernels: str = "auto", interpret: bool = False, backend: str | None = None) -> Ops:
  """The Ops for a `train.kernels` choice on `backend` (default: JAX's default backend).

  Fails, before anything compiles, on an unknown choice or on Pallas where no kernel runs.
  """
  if kernels not in CHOICES:
    raise ValueError(f"train.kernels={kernels!r} is unknown; use one of {', '.join(CHOICES)}")
  backend = backend or jax.default_backend()
  has_kernel = backend in _PALLAS_BACKENDS or interpret
  if kernels == "xla" or (kernels == "auto" and not has_kernel):
    return XLA
  if not has_kernel:
    raise ValueError(
        f"train.kernels='pallas' has no kernel on the {backend!r} backend; use train.kernels="
        f"'xla' or 'auto' there (or train.pallas_interpret=True to run Pallas in interpret mode)")
  return _pallas_ops(interpret)
