"""Evaluation, export to the Gemma Scope 2 release layout, model card and publishing."""

from __future__ import annotations

from allscope.release.config import EvalConfig, ReleaseConfig
from allscope.release.convert import from_exported
from allscope.release.dictionary import CrossLayerTranscoder, Dictionary
from allscope.release.evaluate import Evaluation, check_tokens, evaluate, load_tokens
from allscope.release.export import write_dictionary
from allscope.release.load import Release, ReleaseError, load
from allscope.release.publish import PublishError, publish
from allscope.release.saelens import write_saelens
from allscope.release.write import release_dir, write_release

__all__ = [
    "CrossLayerTranscoder", "Dictionary", "EvalConfig", "Evaluation", "Release", "ReleaseConfig",
    "ReleaseError", "PublishError", "check_tokens", "evaluate", "from_exported", "load", "load_tokens", "publish",
    "release_dir", "write_dictionary", "write_release", "write_saelens",
]
