"""train.kernels resolves to one Ops, and bad choices fail before anything compiles."""

from __future__ import annotations

import pytest

from allscope import kernels
from allscope.kernels import dispatch
from allscope.trainers.config import TrainConfig


def test_auto_is_xla_on_cpu_and_xla_is_xla_everywhere():
  assert kernels.resolve("auto", backend="cpu") is kernels.XLA
  assert kernels.resolve("xla", backend="gpu") is kernels.XLA
  # every field a kernel primitive, but row_count and compact: helpers that a mesh may replace
  assert set(dispatch.PRIMITIVES) == {f.name for f in dispatch.dataclasses.fields(kernels.Ops)} - {
      "name", "row_count", "compact"}


def test_unknown_choice_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"train.kernels='triton' is unknown; use one of auto, pallas, xla"):
    kernels.resolve("triton")
  with pytest.raises(ValueError, match=r"train.kernels='cuda' is unknown; use one of auto, pallas, xla"):
    TrainConfig(kernels="cuda").validate()


def test_pallas_on_cpu_without_interpret_fails_with_the_fix():
  with pytest.raises(ValueError, match=r"no kernel on the 'cpu' backend; use train.kernels='xla'"):
    kernels.resolve("pallas", backend="cpu")


def test_pallas_interpret_resolves_when_the_kernels_exist():
  pytest.importorskip("allscope.kernels.pallas")
  ops = kernels.resolve("pallas", interpret=True, backend="cpu")
  assert ops.name == "pallas-interpret" and ops == kernels.resolve("pallas", interpret=True)
