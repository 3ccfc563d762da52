"""Host memory: with the CLI's allocator settings XLA:CPU reuses freed arrays without page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from allscope.launch import host_memory

# A jitted pass over a 64 MiB float32 array, called 24 times: each output, freed, is allocated
# again by a later call. Prints the minor page faults of each call after the first (compiling).
_SCRIPT = textwrap.dedent("""
    import json, resource
    from allscope.launch import host_memory
    applied = host_memory.keep_freed_memory()
    import jax, jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (2048, 8192))
    f = jax.jit(lambda x: jnp.maximum(x + 1.0, 0.0))
    f(x).block_until_ready()
    faults = []
    for _ in range(23):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults}))
""")
PAGES = 2048 * 8192 * 4 // 4096  # of one output


def _run(opt_out: bool) -> dict:
  env = {k: v for k, v in os.environ.items() if k != host_memory.OPT_OUT}
  if opt_out:
    env[host_memory.OPT_OUT] = "1"
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_arrays_are_reused_without_page_faults_and_the_opt_out_keeps_glibc_defaults():
  kept, default = _run(opt_out=False), _run(opt_out=True)
  assert kept["applied"] and not default["applied"]
  # glibc's defaults map every 64 MiB output afresh: each call faults in all its pages
  assert min(default["faults"]) >= PAGES, default
  # kept: only calls that grow the heap (a later output allocated before an earlier one is freed)
  # fault, and most calls reuse freed memory as it is
  assert sorted(kept["faults"])[len(kept["faults"]) // 2] < PAGES // 100, kept


def test_the_opt_out_changes_nothing():
  assert not host_memory.keep_freed_memory({host_memory.OPT_OUT: "1"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_release_gives_kept_memory_back():
  """Freed memory stays resident once kept, until release_freed_memory (between workloads)."""
  script = textwrap.dedent("""
      import json, os
      from allscope.launch import host_memory
      host_memory.keep_freed_memory()
      import numpy as np
      rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
      a = np.ones(1 << 27, np.uint8)  # 128 MiB, touched
      del a
      kept = rss()
      host_memory.release_freed_memory()
      print(json.dumps({"kept": kept, "released": rss()}))
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       timeout=60)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["kept"] - got["released"] > 100 << 20, got
