"""Per-region counters and rate-limited logging of cache failures.

Counters are process-global and cheap (plain integer increments). They are
read with :func:`stats` and reset with :func:`reset_stats`. They count the work of
one process: a process forked from another starts with every counter at zero.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

from cachedecor import _runtime

__all__ = ["RegionStats", "dump_stats", "reset_stats", "stats"]

log = logging.getLogger("cachedecor")

#: The same failure is logged at most once per this many seconds per region.
LOG_INTERVAL = 10.0


@dataclass
class RegionStats:
    """Counters of one region since start-up (or the last :func:`reset_stats`)."""

    hits: int = 0
    """Entries served from the cache (the near cache's included)."""
    local_hits: int = 0
    """Hits served by this process's near cache (``local_entries``), without a round trip."""
    misses: int = 0
    """Keys not found (or found unusable). Each call counts once: a hit or a miss.
    A miss that waited for another reader's fill is also in ``lease_waits``."""
    fills: int = 0
    """Entries written to the cache after a miss."""
    errors: int = 0
    """Backend failures (down, timeout, refused) that fell through to the database."""
    bad_entries: int = 0
    """Entries that failed to decode or verify; each was deleted and treated as a miss."""
    mismatches: int = 0
    """Entries that held another row, or a row written under another mapping (another
    deployed version of the model); each was deleted and treated as a miss."""
    uncacheable: int = 0
    """Calls that could not be cached and ran the function: an argument with no cache key,
    or a result that is not the row asked for (logged)."""
    invalidations: int = 0
    """Keys deleted because their rows changed."""
    model_invalidations: int = 0
    """Model-wide invalidations (every row of a model), for writes not resolved to rows."""
    bypasses: int = 0
    """Reads that skipped the cache because the session has uncommitted writes."""
    lease_wins: int = 0
    """Misses that took the fill lease for their key."""
    lease_losses: int = 0
    """Misses whose fill was refused because the key was invalidated or re-leased meanwhile."""
    lease_waits: int = 0
    """Misses that found another process filling the key and waited for it."""
    oversized: int = 0
    """Entries not cached because they exceed the region's ``max_entry_size`` (or the server refused them)."""
    invalidations_queued: int = 0
    """Invalidations that could not be delivered at once and were queued for retry."""
    invalidations_lost: int = 0
    """Queued invalidations given up after ``invalidation_retry_for`` seconds (logged with their keys)."""

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


def counters(region: str) -> RegionStats:
    """The live counter object of ``region`` (created on first use)."""
    found = _runtime.counters.get(region)
    if found is None:
        found = _runtime.counters.setdefault(region, RegionStats())
    return found


def stats(region: str | None = None) -> dict[str, dict[str, int]]:
    """Return the counters of every region (or of ``region`` only), by region name.

    >>> import cachedecor
    >>> sorted(cachedecor.stats("default")["default"])[:3]
    ['bad_entries', 'bypasses', 'errors']
    """
    if region is not None:
        return {region: counters(region).as_dict()}
    return {name: c.as_dict() for name, c in sorted(_runtime.counters.items())}


def dump_stats(path: str) -> None:
    """Write the counters of this process to ``path`` as JSON (atomically).

    ``cachedecor stats --counters PATH`` prints such a file; a service can call this
    periodically or at shutdown to make its client-side counters visible.
    """
    import json

    data = {"pid": os.getpid(), "time": time.time(), "regions": stats()}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def reset_stats() -> None:
    """Set every counter back to zero (for tests and benchmarks)."""
    _runtime.reset_counters()


def log_failure(region: str, what: str, exc: BaseException | str, level: int = logging.WARNING) -> None:
    """Log a cache failure, at most once per :data:`LOG_INTERVAL` per region and kind."""
    now = time.monotonic()
    key = (region, what)
    with _runtime.log_lock:
        last = _runtime.last_logged.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            return
        _runtime.last_logged[key] = now
    log.log(
        level,
        "cache region %r: %s failed (%s); falling through to the database",
        region,
        what,
        exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}",
    )
