"""Harvest (Beam job), activation store format and Grain reader.

    from allscope import pipelines
    manifest = pipelines.harvest(HarvestConfig(...), ModelConfig(), "outputs/store")
    store = pipelines.ActivationStore("outputs/store")
    loader = store.loader(batch_size=4096, sites=("mlp_in", "mlp_out"), layers=(3,))
"""

from allscope.pipelines.config import SITES, CorpusConfig, HarvestConfig
from allscope.pipelines.job import HarvestError, harvest, plan
from allscope.pipelines.reader import ActivationSource, ActivationStore, IndexSource, open_store
from allscope.pipelines.store import CorruptShardError, IncompleteStoreError, StoreError

__all__ = [
    "SITES", "ActivationSource", "ActivationStore", "CorpusConfig", "CorruptShardError",
    "HarvestConfig", "HarvestError", "IncompleteStoreError", "IndexSource", "StoreError",
    "harvest", "open_store", "plan",
]
