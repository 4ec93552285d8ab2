"""cachedecor: a memcached cache in front of SQLAlchemy data-access code.

``@cached_by_pk(Model)`` serves rows from the cache, keyed by primary key;
``@invalidates(Model)`` deletes the entries of the rows a function changes once
its transaction commits. Regions are dogpile.cache regions configured by
:func:`configure_regions`.
"""

from cachedecor.codec import Codec
from cachedecor.config import aclose, configure_regions, get_region, reset
from cachedecor.errors import (
    CacheError,
    ConfigError,
    InvalidKeyError,
    MissingExtra,
    RegionNotConfigured,
    SessionWarning,
    UsageError,
)
from cachedecor.keys import key_for
from cachedecor.outbox import outbox_table
from cachedecor.read import AsyncCachedFunction, CachedFunction, cached_by_pk
from cachedecor.stats import RegionStats, dump_stats, reset_stats, stats
from cachedecor.write import (
    ainvalidate,
    ainvalidate_many,
    ainvalidate_model,
    invalidate,
    invalidate_many,
    invalidate_model,
    invalidates,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncCachedFunction",
    "CacheError",
    "CachedFunction",
    "Codec",
    "ConfigError",
    "InvalidKeyError",
    "MissingExtra",
    "RegionNotConfigured",
    "RegionStats",
    "SessionWarning",
    "UsageError",
    "aclose",
    "ainvalidate",
    "ainvalidate_many",
    "ainvalidate_model",
    "cached_by_pk",
    "configure_regions",
    "dump_stats",
    "get_region",
    "invalidate",
    "invalidate_many",
    "invalidate_model",
    "invalidates",
    "key_for",
    "outbox_table",
    "reset",
    "reset_stats",
    "stats",
]
