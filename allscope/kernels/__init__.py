"""Sparse kernels behind one seam: selection, sparse encode/decode, CLT decode.

The seam is a few primitives (gather_decode, gather_dot, scatter_outer, top_k, clt_decode,
clt_gather_dot, clt_scatter_outer) with one XLA implementation (`xla`) and one Pallas
implementation (`pallas`); `dispatch.resolve` picks one as an `Ops`. The differentiable ops here
take that `Ops` (default: XLA) and call only its primitives, forward and backward.
"""

from allscope.kernels import clt_layout
from allscope.kernels.clt_decode import (causal_mask, causal_to_dense, clt_decode,
                                         clt_decode_with_aux, dense_clt_decode)
from allscope.kernels.dispatch import CHOICES, XLA, Ops, resolve
from allscope.kernels.selection import Selection, batchtopk, jumprelu, relu, topk
from allscope.kernels.sparse_decode import decode_with_aux, dense_decode, sparse_decode
from allscope.kernels.sparse_encode import (dense_encode, encoder_grad, gather_pre, sparse_encode,
                                           sparse_encode_with_aux)
from allscope.kernels.xla import column_max, compact_mask, nth_largest, row_count

__all__ = [
    "CHOICES", "Ops", "Selection", "XLA", "batchtopk", "causal_mask", "causal_to_dense",
    "clt_decode", "clt_decode_with_aux", "clt_layout", "column_max", "compact_mask",
    "decode_with_aux", "dense_clt_decode", "dense_decode", "dense_encode", "encoder_grad",
    "gather_pre", "jumprelu", "nth_largest", "relu", "resolve", "row_count", "sparse_decode",
    "sparse_encode", "sparse_encode_with_aux", "topk",
]
