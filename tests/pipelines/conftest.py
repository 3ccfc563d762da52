"""Fixtures shared by the pipelines tests."""

from __future__ import annotations

import pytest

from tests.pipelines.helpers import write_random_store


@pytest.fixture
def random_store(tmp_path):
  manifest, truth = write_random_store(tmp_path / "store")
  return tmp_path / "store", manifest, truth
