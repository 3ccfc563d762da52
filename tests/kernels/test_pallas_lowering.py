"""Every Pallas kernel lowers from this CPU host, at real shapes, for CUDA to a Triton call and
for TPU to a Mosaic call.

`lowering_platforms=("cuda",)` runs the whole Pallas -> Triton lowering (block shapes, power-of-2
tensor sizes, indexing), so a kernel that cannot compile for a GPU fails CI without one; the TPU
lowering checks block shapes, memory spaces and the Mosaic lowering (not the TPU compiler).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from allscope.kernels import clt_layout, pallas

B, C, F, D = 4096, 64, 65536, 2304  # SAE: Gemma 2 2B-like width, 64k latents
L, FC, DC = 18, 8192, 640  # CLT over all 18 layers of Gemma 3 270M
K = 64
TRITON = "__gpu$xla.gpu.triton"


def S(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


I32 = jnp.int32
P = clt_layout.n_pairs(L)
CASES = {
    "gather_decode": (pallas.gather_decode, (S((B, C), I32), S((B, C)), S((F, D))), {}),
    "gather_dot": (pallas.gather_dot, (S((B, C), I32), S((B, D)), S((F, D))), {}),
    "scatter_outer": (pallas.scatter_outer, (S((B, C), I32), S((B, C)), S((B, D))),
                      {"num_rows": F}),
    # AuxK's d w_dec (or d w_enc) added into the main one's (aux_k = 256 slots)
    "scatter_outer_acc": (lambda i, v, src, acc, **kw: pallas.scatter_outer(i, v, src, F, acc, **kw),
                          (S((B, 4 * C), I32), S((B, 4 * C)), S((B, D)), S((F, D), jnp.float32)),
                          {}),
    "top_k": (pallas.top_k, (S((B, F)),), {"k": K}),
    # the trainers' form: f32 encoder product + the bias row, added in the kernel
    "top_k_offset": (lambda x, o, **kw: pallas.top_k(x, K, o, **kw),
                     (S((B, F), jnp.float32), S((F,), jnp.float32)), {}),
    "clt_decode": (pallas.clt_decode, (S((L, B, C), I32), S((L, B, C)), S((FC, P, DC))), {}),
    "clt_gather_dot": (pallas.clt_gather_dot,
                       (S((L, B, C), I32), S((B, L, DC)), S((FC, P, DC))), {}),
    "clt_scatter_outer": (pallas.clt_scatter_outer,
                          (S((L, B, C), I32), S((L, B, C)), S((B, L, DC))), {"num_rows": FC}),
    # AuxK's d w_dec added into the main one's (aux_k = 256 slots)
    "clt_scatter_outer_acc": (
        lambda i, v, g, acc, **kw: pallas.clt_scatter_outer(i, v, g, FC, acc, **kw),
        (S((L, B, 4 * C), I32), S((L, B, 4 * C)), S((B, L, DC)), S((FC, P, DC), jnp.float32)),
        {}),
}


def _as(dtype, args):
  """The float inputs in `dtype` (params and activations are f32 or bf16 by `matmul_dtype`)."""
  return tuple(S(a.shape, dtype) if a.dtype == jnp.bfloat16 else a for a in args)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_lowers_for_cuda_to_triton(name, dtype):
  fn, args, static = CASES[name]
  args = _as(dtype, args)
  lowered = jax.jit(lambda *a: fn(*a, **static)).trace(*args).lower(lowering_platforms=("cuda",))
  assert TRITON in lowered.as_text()


@pytest.mark.parametrize("name", ["scatter_outer", "clt_scatter_outer"])
def test_scatter_plans_leave_no_loop_for_the_gpu_host_to_drive(name):
  """The sort-based plan finds each row's segment without a `while`: XLA:GPU tests a loop's
  condition from the host, so jnp's default searchsorted (a loop of 19 trips at B C = 262144)
  was 19 host round trips per scatter plan, the GPU idle in between."""
  fn, args, static = CASES[name]
  lowered = jax.jit(lambda *a: fn(*a, **static)).trace(*args).lower(lowering_platforms=("cuda",))
  assert "stablehlo.while" not in lowered.as_text()


def test_ragged_batch_lowers_for_cuda():
  """B not a multiple of the row block: the wrappers pad; the kernels see whole blocks."""
  args = (S((1000, 37), I32), S((1000, 37)), S((F, D)))
  lowered = jax.jit(pallas.gather_decode).trace(*args).lower(lowering_platforms=("cuda",))
  assert TRITON in lowered.as_text()


def test_feature_size_without_a_block_is_refused():
  """A width the Triton blocks cannot tile fails before lowering, naming the fix."""
  args = (S((64, 8), I32), S((64, 8)), S((128, 100)))
  with pytest.raises(ValueError, match="multiple of 16.*kernels='xla'"):
    jax.jit(pallas.gather_decode).trace(*args)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_lowers_for_tpu_to_mosaic(name, dtype):
  """Every primitive lowers for TPU through Mosaic: block shapes, SMEM/ANY memory spaces, DMAs. (Not
  Mosaic's own layout passes or the TPU compile, which need a TPU.)"""
  fn, args, static = CASES[name]
  args = _as(dtype, args)
  lowered = (jax.jit(lambda *a: fn(*a, backend="tpu", **static)).trace(*args)
             .lower(lowering_platforms=("tpu",)))
  assert "tpu_custom_call" in lowered.as_text()
