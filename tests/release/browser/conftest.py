"""Fixtures: the Gemma 3 tokenizer (metadata only, no weights), a text store and a release."""

from __future__ import annotations

from pathlib import Path

import pytest

from allscope import models, pipelines

from .helpers import random_release, write_text_store


@pytest.fixture(scope="session")
def tokenizer():
  return models.describe("gemma3-270m")[1]


@pytest.fixture(scope="module")
def text_store(tokenizer, tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  manifest, truth = write_text_store(root / "store", tokenizer)
  return pipelines.open_store(root / "store"), truth


@pytest.fixture(scope="module")
def release_dir(text_store):
  store, _ = text_store
  root, dicts = random_release(Path(store.path).parent)
  return root, dicts
