"""Process-wide state: all of it, one fork hook, one exit hook and :func:`reset`.

The modules above read and write these attributes through this module
(``_runtime.counters``, ``_runtime.current_outbox``...) and keep no copy of their
own; :mod:`cachedecor.config`, the composition root, writes the configured regions.
This module is the bottom layer: it imports nothing of cachedecor at run time.
Reads take no lock: a region's settings are replaced whole, never edited, and a dict
lookup is atomic.

In a process forked from another, :func:`_after_fork_in_child` gives every lock a
new one (one another thread of the parent held at the fork would never be
released), sets every counter to zero, runs each registered fork hook
(:func:`register_fork_hook`) and lets each registered object
(:func:`register_fork_aware`) drop the parent's connections, threads and queues.
At interpreter exit, :func:`_at_exit` sends what the broadcast still has queued.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import asyncio

    from opentelemetry.metrics import Instrument
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

    from cachedecor.broadcast import Broadcast
    from cachedecor.config.regions import RegionSettings
    from cachedecor.keys import KeyMaker
    from cachedecor.metrics import PrometheusCollector
    from cachedecor.near import Ear, NearCache
    from cachedecor.outbox import Outbox
    from cachedecor.rows import ModelPlan
    from cachedecor.stats import RegionStats

__all__ = [
    "AsyncClasses",
    "ForkAware",
    "NearState",
    "activate",
    "async_classes",
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
    "near_state",
    "opentelemetry_instruments",
    "pending_inserts",
    "pending_returns",
    "prometheus_collectors",
    "regions",
    "regions_lock",
    "register_fork_aware",
    "register_fork_hook",
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


def activate(slot: Literal["current_outbox", "current_broadcast"], new: Outbox | Broadcast | None) -> None:
    """Make ``new`` this process's outbox or broadcast (``slot``; ``None``: none): the one
    it replaces is stopped, and ``new`` started (its threads)."""
    old = globals()[slot]
    globals()[slot] = new
    if old is not None and old is not new:
        old.stop()
    if new is not None:
        new.start()


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
#: connection -> the UPDATE or DELETE it is running, made to return the primary keys
#: of its rows, and where to record them (cachedecor.tracking.statements)
pending_returns: weakref.WeakKeyDictionary[Connection, tuple[Any, ...]] = weakref.WeakKeyDictionary()
#: table -> the mapped classes whose rows live in it (emptied when a class is mapped)
table_models: dict[Any, tuple[type, ...]] = {}
#: mapped class -> (its mapper, the schema of its keys)
tracked_models: dict[Any, tuple[Any, Any]] = {}

# -- SQLAlchemy's asyncio extension (cachedecor._sa) -----------------------------------


class AsyncClasses:
    """The classes of ``sqlalchemy.ext.asyncio`` that tell sessions apart, found once the
    application has imported it (it is never imported for the sync API)."""

    __slots__ = ("all_sessions", "async_sessions", "scoped", "session", "sessionmaker")

    def __init__(
        self, session: type[Any], scoped: type[Any], sessionmaker: type[Any], sync: tuple[type[Any], ...]
    ) -> None:
        self.session = session
        self.scoped = scoped
        self.sessionmaker = sessionmaker
        self.async_sessions = (session, scoped)
        #: ``sync`` (the sync session types) and the two async ones
        self.all_sessions = (*sync, session, scoped)


#: the asyncio extension's classes, once it is imported (``None`` before)
async_classes: AsyncClasses | None = None

# -- the async driver (cachedecor.drivers) --------------------------------------------

#: per event loop: key -> an event set when this loop's fill of the key (whose lease
#: one of its coroutines won) is stored or given up
fills: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Event]] = (
    weakref.WeakKeyDictionary()
)

# -- the near caches and what the broadcast listeners tell them (cachedecor.near) ------


class NearState:
    """What this process's near caches and broadcast listeners share. One object whose
    attributes :mod:`cachedecor.near` reads and writes (``near_state.listening``):
    a near hit reads a few of them, one attribute lookup each (a function call per
    hit would cost more than the lookups)."""

    __slots__ = (
        "caches",
        "ears",
        "ears_lock",
        "heard_until",
        "listening",
        "next_check",
        "pid",
        "watching",
    )

    def __init__(self) -> None:
        #: every near cache of this process (held weakly)
        self.caches: weakref.WeakSet[NearCache] = weakref.WeakSet()
        #: the broadcast listeners, as the near reads see them (attached, not yet
        #: detached): a tuple, replaced under :attr:`ears_lock`, which reads iterate
        #: without taking the lock
        self.ears: tuple[Ear, ...] = ()
        #: held while :attr:`ears` and what is computed from them are written
        self.ears_lock = threading.RLock()
        #: whether invalidations reach this process (a listener is connected), and
        #: until when at least (each listener renews it when it hears from its server)
        self.listening = False
        self.heard_until = 0.0
        #: when the reading threads look at the listeners' sockets next (time.monotonic())
        self.next_check = 0.0
        #: an epoll set of the listeners' sockets (Linux), or ``None``
        self.watching: Any = None
        #: the process this state is of: a forked child's differs until
        #: :func:`cachedecor.near.after_fork` has run in it (once, whoever calls first)
        self.pid = os.getpid()


near_state = NearState()

# -- processes ------------------------------------------------------------------------


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


#: live objects that hold connections, locks, threads or queues of the process that made them
fork_aware: weakref.WeakSet[ForkAware] = weakref.WeakSet()


#: functions of the modules above, called in every forked child (in the order registered)
#: before the objects of :data:`fork_aware`
fork_hooks: list[Callable[[], None]] = []


def register_fork_aware(obj: ForkAware) -> None:
    """Call ``obj._after_fork_in_child()`` in every process forked after this."""
    fork_aware.add(obj)


def register_fork_hook(hook: Callable[[], None]) -> None:
    """Call ``hook()`` in every process forked after this, before the fork-aware objects'
    hooks (which may call it themselves: it must do its work once per process)."""
    if hook not in fork_hooks:
        fork_hooks.append(hook)


def _after_fork_in_child() -> None:
    global regions_lock, log_lock, exporters_lock
    regions_lock = threading.Lock()
    log_lock = threading.Lock()
    exporters_lock = threading.Lock()
    reset_counters()  # a child counts its own work (before the objects below count any)
    for hook in list(fork_hooks):
        hook()
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
    zero, no outbox deliverer and no broadcast listener (both stopped), every near
    cache empty. Once no listener is left attached (those of the broadcast stopped
    here detach themselves), the process is deaf, as a fresh one: not listening,
    heard until 0, no epoll set of sockets; the next near read looks at the sockets.

    Kept: the exporters registered with Prometheus and OpenTelemetry (their registries
    still hold them), the async fills in flight (each belongs to a live event loop),
    the objects registered for forks and the near caches still alive (they unregister
    by being collected: a near cache still in use must go on being flushed with the
    others), a listener still attached (one started outside :data:`current_broadcast`:
    it is running), the lock of the listeners (another thread may hold it) and the C
    library's poll() as resolved (the same in every process of this interpreter).
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
    near = near_state
    with near.ears_lock:
        if not near.ears:
            near.listening = False
            near.heard_until = 0.0
            watching, near.watching = near.watching, None
            if watching is not None:
                watching.close()
        near.next_check = 0.0
    for cache in list(near.caches):
        cache.flush()
