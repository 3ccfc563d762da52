"""Shared fixtures. The real Gemma 3 270M loads once per test session (about 30 s on 2 cores)."""

from __future__ import annotations

import os

import pytest

from allscope.launch import host_memory

# The suite never touches the network: Hugging Face clients read only local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Workers keep glibc's allocator defaults: host_memory's settings suit one workload per process
# (the `allscope` command), while a worker runs hundreds: under them one grew to 15 GB.


@pytest.fixture(autouse=True, scope="module")
def _free_memory_after_each_module():
  """Each module's compiled functions and freed arrays go back after it. Kept, they grew each
  worker to 7-12 GB, and the suite's processes together to 23 of CI's 24 GB; freed, to 13 GB, in
  the same time."""
  yield
  import jax

  jax.clear_caches()
  host_memory.release_freed_memory()


@pytest.fixture(scope="session")
def gemma270m():
  """`(model, tokenizer)` for the real Gemma 3 270M in float32, from the bundled GGUF."""
  from allscope import models

  return models.load("gemma3-270m", dtype="float32")
