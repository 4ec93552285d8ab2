"""Process-wide state: all of it, one fork hook, one exit hook and :func:`reset`.

The modules above read and write these attributes through this module
(``_runtime.counters``, ``_runtime.current_outbox``...) and keep no copy of their
own; :mod:`cachedecor.config`, the composition root, writes the configured regions.
This module is the bottom layer: it imports nothing of cachedecor at run time.
Reads take no lock: a region's settings are replaced whole, never edited, and a dict
lookup is atomic.

In a process forked from another, :func:`_after_fork_in_child` gives every lock a
new one (one another thread of the parent held at the fork would never be
released), sets every counter to zero and lets each registered object
(:func:`register_fork_aware`) drop the parent's connections, threads and queues.
At interpreter exit, :func:`_at_exit` sends what the broadcast still has queued.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

    from opentelemetry.metrics import Instrument
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

    from cachedecor.broadcast import Broadcast
    from cachedecor.config.regions import RegionSettings
    from cachedecor.keys import KeyMaker
    from cachedecor.metrics import PrometheusCollector
    from cachedecor.outbox import Outbox
    from cachedecor.rows import ModelPlan
    from cachedecor.stats import RegionStats

__all__ = [
    "ForkAware",
    "configured_regions",
    "connection_owners",
    "counters",
    "current_broadcast",
    "current_outbox",
    "exporters_lock",
    "fills",
    "fork_aware",
    "key_makers",
    "last_logged",
    "log_lock",
    "meta_fallback_logged",
    "model_plans",
    "opentelemetry_instruments",
    "pending_inserts",
    "prometheus_collectors",
    "regions",
    "regions_lock",
    "register_fork_aware",
    "reset",
    "reset_counters",
    "table_models",
    "tracked_models",
]

# -- configuration (written by cachedecor.config) -------------------------------------

#: the configured regions of this process, by name
regions: dict[str, RegionSettings] = {}
#: held while :data:`regions` is written (readers take no lock)
regions_lock = threading.Lock()
#: the outbox whose deliverer runs in this process (:func:`cachedecor.outbox.activate`)
current_outbox: Outbox | None = None
#: the broadcast whose listeners run in this process (:func:`cachedecor.broadcast.activate`)
current_broadcast: Broadcast | None = None


def configured_regions() -> dict[str, RegionSettings]:
    """A snapshot of every configured region's settings."""
    return dict(regions)


# -- counters and logging (cachedecor.stats) ------------------------------------------

#: each region's live counters, created on first use; read paths keep the object, so
#: it is zeroed in place, never replaced
counters: dict[str, RegionStats] = {}
#: (region, failure) -> when it was last logged (time.monotonic()), under :data:`log_lock`
last_logged: dict[tuple[str, str], float] = {}
log_lock = threading.Lock()
#: whether the warning that memcached refused meta commands was logged
meta_fallback_logged = False


def reset_counters() -> None:
    """Set every counter back to its default (zero) and forget when failures were logged."""
    for region_counters in counters.values():
        for field in dataclasses.fields(region_counters):
            setattr(region_counters, field.name, field.default)
    with log_lock:
        last_logged.clear()


# -- exporters (cachedecor.metrics) ---------------------------------------------------

#: held while the exporters below are looked up and written
exporters_lock = threading.Lock()

#: registry -> the collector registered with it
prometheus_collectors: weakref.WeakKeyDictionary[Any, PrometheusCollector] = weakref.WeakKeyDictionary()
#: meter provider -> the instruments created on it
opentelemetry_instruments: weakref.WeakKeyDictionary[Any, list[Instrument]] = weakref.WeakKeyDictionary()

# -- memos of the mapped classes (cachedecor.keys, cachedecor.rows) -------------------
# Pure functions of a class, fixed once it is mapped: true in a forked child and after
# reset() as well, so neither clears them. Plain dicts, not functools.cache: key_maker()
# looks its maker up by the hierarchy's base class, which a cache decorator would cost
# one more call for (measured: +13 ns on 290 ns, about 4%, per key_maker()).

#: (base class of a hierarchy, namespace) -> its key maker
key_makers: dict[tuple[type, str], KeyMaker] = {}
#: mapped class -> its model plan
model_plans: dict[type, ModelPlan] = {}

# -- the session tracking (cachedecor.tracking) ---------------------------------------

#: connection -> the session that began a transaction on it (held weakly)
connection_owners: weakref.WeakKeyDictionary[Connection, weakref.ref[Session]] = weakref.WeakKeyDictionary()
#: connection -> an ORM INSERT under way on it, whose keys its RETURNING rows name
pending_inserts: weakref.WeakKeyDictionary[Connection, tuple[Any, ...]] = weakref.WeakKeyDictionary()
#: table -> the mapped classes whose rows live in it (emptied when a class is mapped)
table_models: dict[Any, tuple[type, ...]] = {}
#: mapped class -> (its mapper, the schema of its keys)
tracked_models: dict[Any, tuple[Any, Any]] = {}

# -- the async driver (cachedecor.drivers) --------------------------------------------

#: per event loop: key -> an event set when this loop's fill of the key (whose lease
#: one of its coroutines won) is stored or given up
fills: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Event]] = (
    weakref.WeakKeyDictionary()
)

# -- processes ------------------------------------------------------------------------


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


#: live objects that hold connections, locks, threads or queues of the process that made them
fork_aware: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def register_fork_aware(obj: ForkAware) -> None:
    """Call ``obj._after_fork_in_child()`` in every process forked after this."""
    fork_aware.add(obj)


def _after_fork_in_child() -> None:
    global regions_lock, log_lock, exporters_lock
    regions_lock = threading.Lock()
    log_lock = threading.Lock()
    exporters_lock = threading.Lock()
    reset_counters()  # a child counts its own work (before the objects below count any)
    for obj in list(fork_aware):
        obj._after_fork_in_child()


def _at_exit() -> None:
    """Send what the broadcast has queued before the interpreter exits (a script, a
    command, a worker that invalidates and exits at once), within a few seconds."""
    if current_broadcast is not None:
        current_broadcast.stop(wait=2.0)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)


def reset() -> None:
    """Return to the state of a fresh process: no configured region, every counter at
    zero, no outbox deliverer and no broadcast listener (both stopped).

    Kept: the exporters registered with Prometheus and OpenTelemetry (their registries
    still hold them), the async fills in flight (each belongs to a live event loop),
    and the objects registered for forks (they unregister by being collected).
    """
    global current_outbox, current_broadcast, meta_fallback_logged
    with regions_lock:
        regions.clear()
    reset_counters()
    meta_fallback_logged = False
    box, current_outbox = current_outbox, None
    if box is not None:
        box.stop()
    sender, current_broadcast = current_broadcast, None
    if sender is not None:
        sender.stop()
