"""Process-wide state that the layers below :mod:`cachedecor.config` read.

:mod:`cachedecor.config` is the composition root: it builds the regions and writes
them here; the commit pipeline, the outbox deliverer and the near caches read them
from here, so that none of them imports the configuration (the import graph points
down only). Reads take no lock: a region's settings are replaced whole, never
edited, and a dict lookup is atomic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cachedecor.config.regions import RegionSettings

__all__ = ["configured_regions", "regions"]

#: the configured regions of this process, by name (written by :mod:`cachedecor.config`)
regions: dict[str, RegionSettings] = {}


def configured_regions() -> dict[str, RegionSettings]:
    """A snapshot of every configured region's settings."""
    return dict(regions)
