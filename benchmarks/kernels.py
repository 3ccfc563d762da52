"""The kernel seam's primitives, Pallas against XLA against the hardware floor.

For every primitive it checks the Pallas kernel's output against the XLA version's (`err`: the
largest relative error of its float outputs, or the fraction of indices that differ) and times
the Pallas kernel (GPU: Triton, TPU: Mosaic; elsewhere the column
is skipped) and the XLA version
(`allscope.kernels.xla`), and prints the floor: the bytes the primitive must move divided by
the measured memory bandwidth of this device (a large elementwise copy). The dense encoder
product x @ w_enc at the same shape is printed for context: every primitive should cost well
under it.

  python benchmarks/kernels.py            # real shapes: SAE B=4096 C=64 F=65536 D=2304,
                                          # CLT L=18 F=8192 d=640 (GPU; tens of GB on CPU)
  python benchmarks/kernels.py --quick    # small shapes, minutes on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from allscope.kernels import clt_layout, dispatch, xla as xla_kernels
from allscope.launch import host_memory


@dataclasses.dataclass(frozen=True)
class Shapes:
  batch: int
  slots: int
  rows: int  # SAE latents F
  dim: int  # SAE model width D
  k: int
  layers: int  # CLT
  clt_rows: int
  clt_dim: int


FULL = Shapes(batch=4096, slots=64, rows=65536, dim=2304, k=64, layers=18, clt_rows=8192,
              clt_dim=640)
QUICK = Shapes(batch=512, slots=32, rows=8192, dim=256, k=32, layers=4, clt_rows=1024,
               clt_dim=128)


def xla_ops() -> tuple[str, dict[str, Callable]]:
  return "allscope.kernels.xla", {name: getattr(xla_kernels, name) for name in dispatch.PRIMITIVES}


def _time(fn, args, n: int) -> float:
  """Median seconds of n calls (after a compile-and-warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def mismatch(out, ref) -> float:
  """Largest relative error over float outputs; fraction of differing entries for integer ones."""
  worst = 0.0
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    if jnp.issubdtype(b.dtype, jnp.integer):
      worst = max(worst, float(np.mean(np.asarray(a) != np.asarray(b))))
    else:
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
  return worst


def bandwidth(n: int, mib: int) -> float:
  """Bytes/s of a large in-place elementwise op (read + write): the practical memory floor."""
  step = jax.jit(lambda x: x * 0.5 + 1.0, donate_argnums=0)  # donated: no fresh pages per call
  x = jax.block_until_ready(step(jnp.ones((mib << 20) // 4, jnp.float32)))
  nbytes = 2 * x.nbytes
  times = []
  for _ in range(n):
    t = time.perf_counter()
    x = jax.block_until_ready(step(x))
    times.append(time.perf_counter() - t)
  return nbytes / float(np.median(times))


def cases(sh: Shapes, dtype):
  """(name, shape label, args, static kwargs, bytes the primitive must move)."""
  key = iter(jax.random.split(jax.random.key(0), 16))
  e = jnp.dtype(dtype).itemsize
  b, c, f, d = sh.batch, sh.slots, sh.rows, sh.dim
  el, fc, dc = sh.layers, sh.clt_rows, sh.clt_dim
  p = clt_layout.n_pairs(el)
  idx = jax.random.randint(next(key), (b, c), 0, f, jnp.int32)
  val = jax.random.normal(next(key), (b, c), dtype)
  table = jax.random.normal(next(key), (f, d), dtype)
  src = jax.random.normal(next(key), (b, d), dtype)
  # Pre-activations are the encoder product's float32 output; drawn in float32 (jax.random's
  # bfloat16 normals have a heavily tied tail, which sends every row to top_k's exact fallback).
  pre = jax.random.normal(next(key), (b, f), jnp.float32)
  cidx = jax.random.randint(next(key), (el, b, c), 0, fc, jnp.int32)
  cval = jax.random.normal(next(key), (el, b, c), dtype)
  w_dec = jax.random.normal(next(key), (fc, p, dc), dtype)
  g = jax.random.normal(next(key), (b, el, dc), dtype)
  sae = f"B={b} C={c} F={f} D={d}"
  clt = f"L={el} B={b} C={c} F={fc} d={dc}"
  rows, crows = b * c * d * e, b * c * p * dc * e  # gathered rows: the bulk of every primitive
  return [
      ("gather_decode", sae, (idx, val, table), {}, rows + b * d * 4),
      ("gather_dot", sae, (idx, src, table), {}, rows + b * d * e + b * c * 4),
      ("scatter_outer", sae, (idx, val, src), {"num_rows": f}, rows + f * d * 4),
      ("top_k", f"B={b} N={f} k={sh.k}", (pre,), {"k": sh.k}, b * f * 4),
      ("clt_decode", clt, (cidx, cval, w_dec), {}, crows + b * el * dc * 4),
      ("clt_gather_dot", clt, (cidx, g, w_dec), {}, crows + b * el * dc * e + el * b * c * 4),
      ("clt_scatter_outer", clt, (cidx, cval, g), {"num_rows": fc}, crows + fc * p * dc * 4),
  ]


def main() -> None:
  host_memory.keep_freed_memory()  # as the CLI runs: freed memory reused
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small shapes (CPU)")
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--iters", type=int, default=5, help="timed calls per cell (median)")
  ap.add_argument("--only", nargs="*", help="primitive names to run")
  args = ap.parse_args()
  sh = QUICK if args.quick else FULL
  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  backend = jax.default_backend()
  has_pallas = backend in ("gpu", "tpu")
  xla_name, xla = xla_ops()
  pallas = None
  if has_pallas:
    from allscope.kernels import pallas
  bw = bandwidth(args.iters, 256 if args.quick else 2048)
  x = jax.random.normal(jax.random.key(1), (sh.batch, sh.dim), dtype)
  w = jax.random.normal(jax.random.key(2), (sh.dim, sh.rows), dtype)
  gemm = _time(jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32)),
               (x, w), args.iters)
  del x, w
  print(f"backend {jax.default_backend()} ({dev.device_kind}), {args.dtype} inputs, XLA column: "
        f"{xla_name}, Pallas: "
        f"{dict(gpu='Triton', tpu='Mosaic').get(backend, 'skipped (no accelerator)')}")
  print(f"measured bandwidth {bw / 1e9:.0f} GB/s; encoder GEMM x @ w_enc "
        f"[{sh.batch}, {sh.dim}] x [{sh.dim}, {sh.rows}]: {1e3 * gemm:.3f} ms")
  head = (f"{'primitive':<18} {'shape':<28} {'GB':>6} {'floor ms':>9} {'xla ms':>9} "
          f"{'pallas ms':>9} {'err':>8} {'xla/floor':>9} {'pal/floor':>9} {'xla/pal':>7} "
          f"{'xla/gemm':>8} {'pal/gemm':>8}")
  print(head)
  print("-" * len(head))
  for name, label, inputs, static, nbytes in cases(sh, dtype):
    if args.only and name not in args.only:
      continue
    floor = nbytes / bw
    xla_fn = jax.jit(lambda *a, f=xla[name], s=static: f(*a, **s))
    t_xla = _time(xla_fn, inputs, args.iters)
    cells = [f"{1e3 * t_xla:>9.3f}"]
    if pallas is not None:
      fn = jax.jit(lambda *a, f=getattr(pallas, name), s=static: f(*a, **s))
      try:
        err = mismatch(fn(*inputs), xla_fn(*inputs))
        t_pal = _time(fn, inputs, args.iters)
      except Exception as e:  # one kernel's failure (on a new device) spares the rest
        print(f"{name:<18} {label:<28} pallas failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      cells += [f"{1e3 * t_pal:>9.3f}", f"{err:>8.1e}", f"{t_xla / floor:>9.1f}",
                f"{t_pal / floor:>9.1f}", f"{t_xla / t_pal:>7.2f}", f"{t_xla / gemm:>8.2f}",
                f"{t_pal / gemm:>8.2f}"]
    else:
      cells += [f"{'-':>9}", f"{'-':>8}", f"{t_xla / floor:>9.1f}", f"{'-':>9}", f"{'-':>7}",
                f"{t_xla / gemm:>8.2f}", f"{'-':>8}"]
    print(f"{name:<18} {label:<28} {nbytes / 1e9:>6.2f} {1e3 * floor:>9.3f} " + " ".join(cells),
          flush=True)


if __name__ == "__main__":
  main()
