"""Every Pallas kernel of the seam, in interpret mode on CPU, against a float64 numpy reference.

Inputs are fresh random draws with duplicate indices (within and across rows), zero-value slots,
a capacity C that is not a multiple of any block, and B not a multiple of the row block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from allscope.kernels import clt_layout, pallas
from allscope.kernels.pallas.clt_decode import pair
from allscope.kernels.pallas.top_k import candidates_per_chunk, gpu_blocks, two_stage
from tests.kernels import _pallas_refs as ref

# bf16 inputs are compared against a reference on the same rounded values: products of bf16
# numbers are exact in f32, so the f32 bound (accumulation order only) holds for them too.
F32_TOL = 1e-5

B, C, N, D = 21, 5, 13, 24  # B, C ragged against the blocks; N << B * C: many duplicates
L, F, DC = 3, 11, 16  # CLT: layers, latents per layer, model width
BT, CT = 11, 3  # the TPU interpreter models every row DMA: fewer tokens and slots (still ragged)
SMALL = dict(block_b=8, block_d=8)


def _cast(x, dtype):
  """The input as `dtype`, and the exact values the kernel sees (for the reference)."""
  x = jnp.asarray(x, dtype)
  return x, np.asarray(x.astype(jnp.float32))


@pytest.fixture
def rng():
  return np.random.default_rng()  # fresh inputs on every run


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_decode(rng, dtype):
  idx, val = ref.sparse_inputs(rng, B, C, N)
  table, table64 = _cast(rng.normal(size=(N, D)), dtype)
  val, val64 = _cast(val, dtype)
  out = pallas.gather_decode(idx, val, table, interpret=True, **SMALL)
  assert out.shape == (B, D) and out.dtype == jnp.float32
  assert ref.rel_err(out, ref.gather_decode(idx, val64, table64)) <= F32_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("slots,block_c", [(C, 4), (12, 4)])  # C = 5: one slot per program
def test_gather_dot(rng, dtype, slots, block_c):
  idx, _ = ref.sparse_inputs(rng, B, slots, N)
  g, g64 = _cast(rng.normal(size=(B, D)), dtype)
  table, table64 = _cast(rng.normal(size=(N, D)), dtype)
  out = pallas.gather_dot(idx, g, table, interpret=True, block_c=block_c, **SMALL)
  assert out.shape == (B, slots) and out.dtype == jnp.float32
  assert ref.rel_err(out, ref.gather_dot(idx, g64, table64)) <= F32_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_gather_kernels(rng, dtype):
  """The Mosaic versions (HBM table, row DMAs into VMEM) in the TPU interpreter."""
  idx, val = ref.sparse_inputs(rng, BT, CT, N)
  table, table64 = _cast(rng.normal(size=(N, 128)), dtype)
  g = rng.normal(size=(BT, 128)).astype(np.float32)
  out = pallas.gather_decode(idx, val, table, interpret=True, backend="tpu")
  assert ref.rel_err(out, ref.gather_decode(idx, val, table64)) <= F32_TOL
  out = pallas.gather_dot(idx, g, table, interpret=True, backend="tpu")
  assert ref.rel_err(out, ref.gather_dot(idx, g, table64)) <= F32_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scatter_outer(rng, dtype):
  idx, val = ref.sparse_inputs(rng, B, C, N + 4)  # some rows receive nothing: zeros
  val, val64 = _cast(val, dtype)
  src, src64 = _cast(rng.normal(size=(B, D)), dtype)
  out = pallas.scatter_outer(idx, val, src, N + 4, interpret=True, block_d=8, block_p=4)
  assert out.shape == (N + 4, D) and out.dtype == jnp.float32
  assert ref.rel_err(out, ref.scatter_outer(idx, val64, src64, N + 4)) <= F32_TOL


def test_tpu_scatter_outer(rng):
  """The Mosaic sort-based scatter (pair lists and src rows by DMA), TPU interpreter, with a hot
  row whose segment spans several chunks of pairs."""
  idx, val = ref.sparse_inputs(rng, BT, CT, N)
  idx[rng.random(idx.shape) < 0.5] = 3
  src = rng.normal(size=(BT, 128)).astype(np.float32)
  out = pallas.scatter_outer(idx, val, src, N, interpret=True, backend="tpu", block_p=4)
  assert ref.rel_err(out, ref.scatter_outer(idx, val, src, N)) <= F32_TOL


def test_scatter_outer_hot_row(rng):
  """One row takes most pairs: its segment spans many chunks of block_p."""
  idx, val = ref.sparse_inputs(rng, B, C, N)
  idx[rng.random(idx.shape) < 0.7] = 3
  src = rng.normal(size=(B, D)).astype(np.float32)
  out = pallas.scatter_outer(idx, val, src, N, interpret=True, block_d=8, block_p=4)
  assert ref.rel_err(out, ref.scatter_outer(idx, val, src, N)) <= F32_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_clt_decode(rng, dtype):
  idx, val = ref.sparse_inputs(rng, B, C, F, lead=(L,))
  val, val64 = _cast(val, dtype)
  w, w64 = _cast(rng.normal(size=(F, clt_layout.n_pairs(L), DC)), dtype)
  out = pallas.clt_decode(idx, val, w, interpret=True, **SMALL)
  assert out.shape == (B, L, DC) and out.dtype == jnp.float32
  assert ref.rel_err(out, ref.clt_decode(idx, val64, w64)) <= F32_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_clt_gather_dot(rng, dtype):
  idx, _ = ref.sparse_inputs(rng, B, C, F, lead=(L,))
  g, g64 = _cast(rng.normal(size=(B, L, DC)), dtype)
  w, w64 = _cast(rng.normal(size=(F, clt_layout.n_pairs(L), DC)), dtype)
  out = pallas.clt_gather_dot(idx, g, w, interpret=True, **SMALL)
  assert out.shape == (L, B, C) and out.dtype == jnp.float32
  assert ref.rel_err(out, ref.clt_gather_dot(idx, g64, w64)) <= F32_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_clt_kernels(rng, dtype):
  """The Mosaic CLT decode, d values and d w_dec (index/value blocks, pair lists and rows by
  DMA) in the TPU interpreter."""
  idx, val = ref.sparse_inputs(rng, BT, CT, F, lead=(L,))
  w, w64 = _cast(rng.normal(size=(F, clt_layout.n_pairs(L), 128)), dtype)
  g = rng.normal(size=(BT, L, 128)).astype(np.float32)
  out = pallas.clt_decode(idx, val, w, interpret=True, backend="tpu")
  assert ref.rel_err(out, ref.clt_decode(idx, val, w64)) <= F32_TOL
  out = pallas.clt_gather_dot(idx, g, w, interpret=True, backend="tpu")
  assert ref.rel_err(out, ref.clt_gather_dot(idx, g, w64)) <= F32_TOL
  out = pallas.clt_scatter_outer(idx, val, g, F, interpret=True, backend="tpu", block_p=4)
  assert ref.rel_err(out, ref.clt_scatter_outer(idx, val, g, F)) <= F32_TOL
  acc = rng.normal(size=out.shape).astype(np.float32)
  out = pallas.clt_scatter_outer(idx, val, g, F, jnp.asarray(acc), interpret=True, backend="tpu",
                                 block_p=4)
  assert ref.rel_err(out, acc + ref.clt_scatter_outer(idx, val, g, F)) <= F32_TOL


def test_scatter_outer_adds_into_acc(rng):
  """`acc` (aliased to the output): the sums are added to it, for the AuxK slots' gradients;
  Triton (GPU) and Mosaic (TPU) kernels."""
  idx, val = ref.sparse_inputs(rng, B, C, N)
  src = rng.normal(size=(B, D)).astype(np.float32)
  acc = rng.normal(size=(N, D)).astype(np.float32)
  want = acc + ref.scatter_outer(idx, val, src, N)
  out = jax.jit(lambda a: pallas.scatter_outer(idx, val, src, N, a, interpret=True, block_d=8,
                                               block_p=4))(jnp.asarray(acc))
  assert ref.rel_err(out, want) <= F32_TOL
  out = pallas.scatter_outer(idx, val, src, N, jnp.asarray(acc), interpret=True, backend="tpu",
                             block_p=4)
  assert ref.rel_err(out, want) <= F32_TOL
  with pytest.raises(ValueError, match="acc is"):
    pallas.scatter_outer(idx, val, src, N, jnp.asarray(acc[:-1]), interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_clt_scatter_outer(rng, dtype):
  idx, val = ref.sparse_inputs(rng, B, C, F, lead=(L,))
  val, val64 = _cast(val, dtype)
  g, g64 = _cast(rng.normal(size=(B, L, DC)), dtype)
  out = pallas.clt_scatter_outer(idx, val, g, F, interpret=True, block_d=8, block_p=4)
  assert out.shape == (F, clt_layout.n_pairs(L), DC) and out.dtype == jnp.float32
  assert ref.rel_err(out, ref.clt_scatter_outer(idx, val64, g64, F)) <= F32_TOL


def test_clt_scatter_outer_adds_into_acc(rng):
  """`acc` (aliased to the output): the sums are added to it, for the AuxK slots' d w_dec."""
  idx, val = ref.sparse_inputs(rng, B, C, F, lead=(L,))
  g = rng.normal(size=(B, L, DC)).astype(np.float32)
  acc = rng.normal(size=(F, clt_layout.n_pairs(L), DC)).astype(np.float32)
  out = jax.jit(lambda a: pallas.clt_scatter_outer(idx, val, g, F, a, interpret=True, block_d=8,
                                                   block_p=4))(jnp.asarray(acc))
  assert ref.rel_err(out, acc + ref.clt_scatter_outer(idx, val, g, F)) <= F32_TOL
  with pytest.raises(ValueError, match="acc is"):
    pallas.clt_scatter_outer(idx, val, g, F, jnp.asarray(acc[:-1]), interpret=True)


TOPK_SMALL = dict(chunk=64, rows=4)
NX, K = 1000, 12  # m = 8 < K candidates per chunk of 64: the overflow check is live


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_top_k(rng, dtype):
  x, x64 = _cast(rng.normal(size=(B, NX)), dtype)  # N ragged against the chunk
  values, indices = pallas.top_k(x, K, interpret=True, **TOPK_SMALL)
  want_v, want_i = ref.top_k(x64, K)
  assert values.dtype == dtype and indices.dtype == jnp.int32
  np.testing.assert_array_equal(indices, want_i)
  np.testing.assert_array_equal(np.asarray(values.astype(jnp.float32)), want_v)


def test_top_k_ties_go_to_the_lower_index(rng):
  """Repeated values (ties inside and across chunks) and -inf runs, as lax.top_k, without the
  fallback: the candidates alone get ties right."""
  x = rng.integers(-60, 61, size=(B, NX)).astype(np.float32)
  finite = x[:3, 10::160].copy()
  x[:3] = -np.inf  # 6 finite values: the top K spills into a -inf run, ties to the lower index
  x[:3, 10::160] = finite
  for k in (1, 7, K):
    values, indices, overflow = two_stage(x, k, interpret=True, **TOPK_SMALL)
    assert not overflow
    want_v, want_i = lax.top_k(x, k)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_array_equal(values, want_v)
    np.testing.assert_array_equal(indices, ref.top_k(x, k)[1])


def test_top_k_falls_back_when_a_chunk_overflows(rng):
  """All of the top k in one chunk: more than its m candidates, so the exact fallback runs."""
  x = rng.normal(size=(B, NX)).astype(np.float32)
  x[:, 130:150] += 100.0
  assert two_stage(x, K, interpret=True, **TOPK_SMALL)[2]
  values, indices = pallas.top_k(x, K, interpret=True, **TOPK_SMALL)
  want_v, want_i = ref.top_k(x, K)
  np.testing.assert_array_equal(indices, want_i)
  np.testing.assert_array_equal(values, want_v)


def test_top_k_under_vmap_folds_the_mapped_axis_into_rows(rng):
  """A vmapped top_k (one dictionary per layer) is one call over all rows: its fallback stays a
  real lax.cond on one scalar, not a select that would run the full lax.top_k every time."""
  x = rng.normal(size=(3, B, NX)).astype(np.float32)
  fn = jax.vmap(lambda a: pallas.top_k(a, K, interpret=True, **TOPK_SMALL))
  values, indices = fn(x)
  want_v, want_i = lax.top_k(x, K)
  np.testing.assert_array_equal(indices, want_i)
  np.testing.assert_array_equal(values, want_v)
  jaxpr = str(jax.make_jaxpr(fn)(x))
  assert "cond[" in jaxpr and jaxpr.count("pallas_call") == 1


def test_top_k_adds_the_offset_row_as_it_reads(rng):
  """`offset` (a bias per latent, -inf where masked out) is added inside the kernel: exactly
  lax.top_k(x + offset), for one offset row per matrix, under vmap (mapped or shared offset),
  and where a group's rows do not fill whole row blocks (added before the kernel)."""
  x = rng.normal(size=(3, B, NX)).astype(np.float32)
  offset = rng.normal(size=(3, NX)).astype(np.float32)
  offset[:, rng.random(NX) < 0.5] = -np.inf  # AuxK: only the dead latents' scores
  want_v, want_i = lax.top_k(x + offset[:, None, :], K)
  for fn in (lambda a, o: pallas.top_k(a, K, o, interpret=True, **TOPK_SMALL),
             jax.vmap(lambda a, o: pallas.top_k(a, K, o, interpret=True, **TOPK_SMALL))):
    values, indices = fn(x, offset)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_array_equal(values, want_v)
  shared = jax.vmap(lambda a: pallas.top_k(a, K, offset[0], interpret=True, **TOPK_SMALL))(x)
  np.testing.assert_array_equal(shared[1], lax.top_k(x + offset[0], K)[1])
  ragged = pallas.top_k(x[:, :6], K, offset, interpret=True, **TOPK_SMALL)  # 6 rows, blocks of 4
  np.testing.assert_array_equal(ragged[1], lax.top_k(x[:, :6] + offset[:, None, :], K)[1])
  with pytest.raises(ValueError, match="offset"):
    pallas.top_k(x, K, offset[0], interpret=True)


def test_top_k_gpu_blocks_hold_1024_elements_per_warp():
  """512-wide chunks unless they need more candidates per chunk than 256-wide ones."""
  assert gpu_blocks(4096, 16384, 64) == (512, 2)
  assert gpu_blocks(4096, 65536, 64) == (256, 4)  # 512 would need m = 16 instead of 8
  assert gpu_blocks(4096, 65536, 256) == (512, 2)


def test_top_k_masked_rows_with_fewer_than_k_finite(rng):
  """A masked selector's scores: few finite entries, the rest -inf. Rows with fewer than k
  finite scores end with the lowest-index -inf entries, exactly, and without the fallback."""
  x = np.full((B, NX), -np.inf, np.float32)
  keep = rng.random((B, NX)) < 6 / NX  # ~6 finite per row
  keep[:4, ::60] = True  # rows with more than K finite entries: no -inf selected
  x[keep] = rng.normal(size=keep.sum())
  x[5, 0] = 3.0  # a finite entry inside the -inf prefix
  x[6] = -np.inf  # all K slots from the first chunk's -inf entries: more than its m candidates
  values, indices, overflow = two_stage(x, K, interpret=True, **TOPK_SMALL)
  assert not overflow
  want_v, want_i = ref.top_k(x, K)
  np.testing.assert_array_equal(indices, want_i)
  np.testing.assert_array_equal(values, want_v)


def test_top_k_masked_rows_with_a_finite_overflow(rng):
  """Masked rows next to a row whose first chunk holds more than m of the top K (ties at 0.5):
  flagged, and the fallback is exact for every row."""
  x = rng.normal(size=(B, NX)).astype(np.float32)
  x[:, 300:] = -np.inf
  x[0, 5:] = -np.inf  # 5 finite: 7 -inf slots
  x[1, :300:2] = -np.inf
  x[2, 5:300] = 0.5
  assert two_stage(x, K, interpret=True, **TOPK_SMALL)[2]
  values, indices = pallas.top_k(x, K, interpret=True, **TOPK_SMALL)
  want_v, want_i = ref.top_k(x, K)
  np.testing.assert_array_equal(indices, want_i)
  np.testing.assert_array_equal(values, want_v)


def test_top_k_tpu_tiles(rng):
  """The Mosaic tiling ((16, 256) blocks) in the TPU interpreter, ragged B and N."""
  x = rng.normal(size=(B, 700)).astype(np.float32)
  values, indices = pallas.top_k(x, K, interpret=True, backend="tpu")
  want_v, want_i = ref.top_k(x, K)
  np.testing.assert_array_equal(indices, want_i)
  np.testing.assert_array_equal(values, want_v)


def test_top_k_candidates_per_chunk():
  """The real shape gets m = 8 from S = 256 (the 1e-3 fallback budget); m never exceeds k."""
  assert candidates_per_chunk(4096, 65536, 64, 256) == 8
  assert candidates_per_chunk(B, NX, K, 64) == 8
  assert candidates_per_chunk(4, 64, 2, 32) <= 2


def test_sae_primitives_are_adjoint(rng):
  """gather_dot and scatter_outer are the two VJPs of gather_decode (d values, d table):
  <decode(v, T), G> = <v, gather_dot(G, T)> = <T, scatter_outer(v, G)>."""
  idx, val = ref.sparse_inputs(rng, B, C, N)
  table = rng.normal(size=(N, D)).astype(np.float32)
  g = rng.normal(size=(B, D)).astype(np.float32)
  decoded = pallas.gather_decode(idx, val, table, interpret=True, **SMALL)
  dots = pallas.gather_dot(idx, g, table, interpret=True, **SMALL)
  outer = pallas.scatter_outer(idx, val, g, N, interpret=True, block_d=8, block_p=4)
  inner = float(np.vdot(np.float64(decoded), g))
  assert abs(np.vdot(np.float64(dots), val) - inner) <= F32_TOL * abs(inner) + 1e-4
  assert abs(np.vdot(np.float64(outer), table) - inner) <= F32_TOL * abs(inner) + 1e-4


def test_clt_primitives_are_adjoint(rng):
  """The same identities for the causal CLT decoder."""
  idx, val = ref.sparse_inputs(rng, B, C, F, lead=(L,))
  w = rng.normal(size=(F, clt_layout.n_pairs(L), DC)).astype(np.float32)
  g = rng.normal(size=(B, L, DC)).astype(np.float32)
  decoded = pallas.clt_decode(idx, val, w, interpret=True, **SMALL)
  dots = pallas.clt_gather_dot(idx, g, w, interpret=True, **SMALL)
  outer = pallas.clt_scatter_outer(idx, val, g, F, interpret=True, block_d=8, block_p=4)
  inner = float(np.vdot(np.float64(decoded), g))
  assert abs(np.vdot(np.float64(dots), val) - inner) <= F32_TOL * abs(inner) + 1e-4
  assert abs(np.vdot(np.float64(outer), w) - inner) <= F32_TOL * abs(inner) + 1e-4


def test_decode_vjp_built_from_the_primitives(rng):
  """A custom_vjp decode whose backward is gather_dot (d values) and scatter_outer (d table),
  as the composite ops use them, has the gradients autodiff gives the dense decode."""

  @jax.custom_vjp
  def decode(values, table):
    return pallas.gather_decode(idx, values, table, interpret=True, **SMALL)

  def fwd(values, table):
    return decode(values, table), (values, table)

  def bwd(res, g):
    values, table = res
    return (pallas.gather_dot(idx, g, table, interpret=True, **SMALL),
            pallas.scatter_outer(idx, values, g, N, interpret=True, block_d=8, block_p=4))

  decode.defvjp(fwd, bwd)
  idx, val = ref.sparse_inputs(rng, B, C, N)
  table = rng.normal(size=(N, D)).astype(np.float32)
  target = rng.normal(size=(B, D)).astype(np.float32)

  def dense(values, table):
    codes = jnp.zeros((B, N)).at[jnp.arange(B)[:, None], idx].add(values)
    return codes @ table

  loss = lambda f: lambda v, t: jnp.sum((f(v, t) - target) ** 2)
  with jax.default_matmul_precision("highest"):
    want = jax.grad(loss(dense), argnums=(0, 1))(val, table)
  got = jax.grad(loss(decode), argnums=(0, 1))(val, table)
  for g, w in zip(got, want):
    assert ref.rel_err(g, w) <= F32_TOL


@pytest.mark.parametrize("num_layers", [1, 4, 18, 26])
def test_kernel_pair_arithmetic_is_the_causal_layout(num_layers):
  """The in-kernel p(s, t) and the pair tables the scatter walks agree with clt_layout: P pairs,
  source-major, each latent's targets contiguous."""
  s, t = np.meshgrid(np.arange(num_layers), np.arange(num_layers), indexing="ij")
  want = clt_layout.pair_index(num_layers)
  got = np.asarray(pair(jnp.asarray(s), jnp.asarray(t), num_layers))
  np.testing.assert_array_equal(np.where(t >= s, got, -1), want)
  sources, targets = clt_layout.pair_source(num_layers), clt_layout.pair_target(num_layers)
  assert len(sources) == clt_layout.n_pairs(num_layers)
  np.testing.assert_array_equal(want[sources, targets], np.arange(len(sources)))
