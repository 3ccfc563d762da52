"""The feature browser written into every release: `<release>/browser/index.html`, offline."""

from allscope.release.browser.build import browse, build, units_of
from allscope.release.browser.config import BrowseConfig
from allscope.release.browser.logits import Unembedding, logit_effects
from allscope.release.browser.scan import LatentStats, Unit, scan

__all__ = ["BrowseConfig", "LatentStats", "Unembedding", "Unit", "browse", "build",
           "logit_effects", "scan", "units_of"]
