"""Pallas implementations of the kernel seam (the same signatures as `allscope.kernels.xla`,
plus `interpret: bool = False`; interpret mode runs them on CPU for tests).

GPU: the Triton lowering. TPU: Mosaic, with row gathers by DMA from HBM (`_tpu`). Both have
every primitive (`BACKENDS`); the TPU kernels are checked only in the TPU interpreter and by
lowering from a CPU.

Keyword-only extras beyond the seam: block sizes (tuning knobs with working defaults) and
`backend=` ("gpu" / "tpu": lower for that platform instead of `jax.default_backend()`).
"""

from allscope.kernels.pallas._common import BACKENDS
from allscope.kernels.pallas.clt_decode import clt_decode
from allscope.kernels.pallas.clt_gather_dot import clt_gather_dot
from allscope.kernels.pallas.clt_scatter_outer import clt_scatter_outer
from allscope.kernels.pallas.gather_decode import gather_decode
from allscope.kernels.pallas.gather_dot import gather_dot
from allscope.kernels.pallas.scatter_outer import scatter_outer
from allscope.kernels.pallas.top_k import top_k

__all__ = [
    "BACKENDS", "clt_decode", "clt_gather_dot", "clt_scatter_outer", "gather_decode",
    "gather_dot", "scatter_outer", "top_k",
]
