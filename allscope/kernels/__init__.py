"""Sparse kernels behind one seam: selection, sparse encode/decode, CLT decode.

Each function here is the plain-XLA reference with a custom VJP. Pallas versions slot in behind
these names (dispatch by backend) without changes to the trainers.
"""

from allscope.kernels.clt_decode import causal_mask, clt_decode
from allscope.kernels.selection import Selection, batchtopk, jumprelu, relu, topk
from allscope.kernels.sparse_decode import dense_decode, sparse_decode
from allscope.kernels.sparse_encode import encoder_grad, sparse_encode

__all__ = [
    "Selection", "batchtopk", "causal_mask", "clt_decode", "dense_decode", "encoder_grad",
    "jumprelu", "relu", "sparse_decode", "sparse_encode", "topk",
]
