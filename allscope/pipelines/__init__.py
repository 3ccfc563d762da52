"""Harvest (Beam job), activation store format and Grain reader.

    from allscope import pipelines
    manifest = pipelines.harvest(HarvestConfig(...), ModelConfig(), "outputs/store")
    store = pipelines.ActivationStore("outputs/store")
    loader = store.loader(batch_size=4096, sites=("mlp_in", "mlp_out"), layers=(3,))

Names are imported on first use, so reading configs or stores does not import Apache Beam.
"""

from __future__ import annotations

import importlib

from allscope.pipelines.config import SITES, CorpusConfig, HarvestConfig

_LAZY = {
    "harvest": "allscope.pipelines.job", "plan": "allscope.pipelines.job",
    "HarvestError": "allscope.pipelines.job",
    "ActivationStore": "allscope.pipelines.reader", "ActivationSource": "allscope.pipelines.reader",
    "IndexSource": "allscope.pipelines.reader", "open_store": "allscope.pipelines.reader",
    "StoreError": "allscope.pipelines.store", "IncompleteStoreError": "allscope.pipelines.store",
    "CorruptShardError": "allscope.pipelines.store",
    "codecs": "allscope.pipelines.codecs", "store": "allscope.pipelines.store",
}

__all__ = ["SITES", "CorpusConfig", "HarvestConfig", *_LAZY]


def __getattr__(name: str):
  if name in _LAZY:
    module = importlib.import_module(_LAZY[name])
    return module if module.__name__.endswith("." + name) else getattr(module, name)
  raise AttributeError(f"module 'allscope.pipelines' has no attribute {name!r}")
