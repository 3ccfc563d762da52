"""Evaluation, export to the Gemma Scope 2 release layout, model card and publishing."""

from __future__ import annotations

from allscope.release.config import EvalConfig, ReleaseConfig
from allscope.release.convert import from_exported
from allscope.release.dictionary import CrossLayerTranscoder, Dictionary
from allscope.release.evaluate import Evaluation, evaluate, load_tokens
from allscope.release.export import write_dictionary
from allscope.release.load import Release, ReleaseError, load
from allscope.release.publish import publish
from allscope.release.saelens import write_saelens
from allscope.release.write import release_dir, write_release

__all__ = [
    "CrossLayerTranscoder", "Dictionary", "EvalConfig", "Evaluation", "Release", "ReleaseConfig",
    "ReleaseError", "evaluate", "from_exported", "load", "load_tokens", "publish", "release_dir",
    "write_dictionary",
    "write_release", "write_saelens",
]
