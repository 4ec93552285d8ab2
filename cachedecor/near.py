"""The near cache: decoded rows kept in each process, in front of the remote cache.

A region with ``local_entries = N`` keeps up to N rows, checked and decoded
(:class:`~cachedecor.rows.Row`, at most ``local_max_bytes`` of them as counted by
:attr:`Row.size <cachedecor.rows.Row.size>`), in a per-process LRU. A hit builds
an instance from the row without a round trip and without decoding; every hit gets
copies of the row's mutable values (JSON documents), never the row's own.
Coherence across processes comes from the commits themselves
(:mod:`cachedecor.broadcast`): every invalidation is also broadcast, and each
process evicts the keys it receives. Rules:

* Filled only from what the remote cache returned (a remote hit) or from a fill
  this process won with the lease and stored; never from a transaction that wrote.
* A process's own commits evict its entries before the commit returns.
* A fill that started before an eviction of its key is refused (the eviction
  sequence): a broadcast that arrives between a remote read and the near fill can
  never be overtaken by the older row.
* No entry lives longer than ``local_ttl`` seconds, whatever else happens.
* While the broadcast connection is down (or not yet up), the near cache is
  emptied and neither read nor filled: a process that may miss invalidations
  never serves from it.
* A forked child starts with an empty near cache, deaf until its own broadcast
  listener has connected.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cachedecor._runtime import configured_regions, near_state, register_fork_hook
from cachedecor.backends.base import register_fork_aware

if TYPE_CHECKING:
    from cachedecor.rows import Row

__all__ = ["Ear", "NearCache", "active", "evict_everywhere", "flush_everywhere", "hearing"]

#: How many recent evictions are remembered to refuse fills that started before them.
_REMEMBERED = 50_000


class NearCache:
    """One region's near cache in this process."""

    __slots__ = (
        "__weakref__",
        "_entries",
        "_evicted",
        "_floor",
        "_lock",
        "_seq",
        "bytes",
        "evictions",
        "max_bytes",
        "max_entries",
        "refused",
        "ttl",
    )

    def __init__(self, max_entries: int, ttl: float, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._entries: OrderedDict[str, tuple[Row, float]] = OrderedDict()  # key -> (row, expires)
        self._lock = threading.Lock()
        self._seq = 0  # eviction sequence: +1 per eviction batch
        self._evicted: OrderedDict[str, int] = OrderedDict()  # key -> seq of its last eviction
        self._floor = 0  # evictions at or below this seq are forgotten
        self.bytes = 0
        self.evictions = 0
        self.refused = 0
        near_state.caches.add(self)
        register_fork_aware(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._entries.clear()
        self.bytes = 0

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> Row | None:
        """The row of a live entry, or ``None``. Not while deaf.

        The listeners are checked before the entry is read: an entry read after the
        check is one the listener had not evicted when the check found it caught up.
        """
        now = time.monotonic()
        state = near_state
        if now >= state.heard_until or not state.listening or not caught_up(now):
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[1]:
            with self._lock:
                self._drop(key)
            return None
        try:
            self._entries.move_to_end(key)
        except KeyError:  # evicted by another thread meanwhile: still a consistent copy
            pass
        return entry[0]

    def get_many(self, keys: Iterable[str]) -> dict[str, Row]:
        """:meth:`get` for many keys: the rows of the live entries among ``keys``, in order."""
        now = time.monotonic()
        state = near_state
        if now >= state.heard_until or not state.listening or not caught_up(now):
            return {}
        entries = self._entries
        move = entries.move_to_end
        found: dict[str, Row] = {}
        expired = []
        for key in keys:
            entry = entries.get(key)
            if entry is None:
                continue
            if now >= entry[1]:
                expired.append(key)
                continue
            try:
                move(key)
            except KeyError:  # evicted by another thread meanwhile: still a consistent copy
                pass
            found[key] = entry[0]
        if expired:
            with self._lock:
                for key in expired:
                    self._drop(key)
        return found

    def mark(self) -> int:
        """The eviction sequence now: pass it to :meth:`put` for a read starting now."""
        return self._seq

    # -- writes --------------------------------------------------------------------------

    def put(self, key: str, row: Row, since: int) -> bool:
        """Keep ``row`` (shared: :meth:`Row.share <cachedecor.rows.Row.share>`) for ``key``.

        Refused (``False``) while deaf, when ``key`` was evicted after ``since`` (the
        sequence when the read that produced the entry started), or when the
        eviction that would have told is forgotten.
        """
        if not near_state.listening or time.monotonic() >= near_state.heard_until:
            return False
        size = row.size
        if size > self.max_bytes:
            return False
        with self._lock:
            last = self._evicted.get(key)
            if since < self._floor or (last is not None and last > since):
                self.refused += 1
                return False
            self._drop(key)
            self._entries[key] = (row, time.monotonic() + self.ttl)
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, (dropped, _) = self._entries.popitem(last=False)
                self.bytes -= dropped.size
        return True

    def evict(self, keys: Iterable[str]) -> None:
        """Forget ``keys`` (and refuse fills of them that started before now)."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            evicted = self._evicted
            for key in keys:
                self._drop(key)
                evicted[key] = seq
                evicted.move_to_end(key)
                self.evictions += 1
            while len(evicted) > _REMEMBERED:
                _, forgotten = evicted.popitem(last=False)
                self._floor = max(self._floor, forgotten)

    def evict_matching(self, patterns: Iterable[Any]) -> None:
        """Forget every key one of ``patterns`` (:class:`~cachedecor.keys.KeyPattern`) matches."""
        patterns = list(patterns)
        self.evict([k for k in list(self._entries) if any(p.matches(k) for p in patterns)])
        with self._lock:
            self._floor = self._seq  # fills of other keys of the patterns may be under way

    def flush(self) -> None:
        """Forget everything, and refuse every fill under way."""
        with self._lock:
            self._seq += 1
            self._floor = self._seq
            self._entries.clear()
            self._evicted.clear()
            self.bytes = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[0].size

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------------------
# every near cache of this process, and what its listeners hear
#
# The state lives in cachedecor._runtime's near_state: its near caches (caches),
# whether invalidations reach this process (listening: a broadcast listener is
# connected) and until when, at least (heard_until: a listener renews it each time it
# hears from its server, a message or the answer to its keep-alive; a server that
# stops answering without closing the connection makes the process deaf when it
# passes).

#: how long one answer of a server vouches for its connection
HEARD_FOR = 1.5

# --------------------------------------------------------------------------------------
# reading what a listener has not taken yet
#
# A listener is a thread: while the process's other threads keep the CPUs (or, on a
# CPython with the GIL, the interpreter) busy serving near hits, an invalidation can
# wait on its socket for milliseconds. So a near read first checks that no listener
# has something it has not taken; if one has, the read goes to the remote cache, and
# so does every read after it until the listener has taken it.
#
# Two facts are checked, neither of which depends on when threads are scheduled:
# the listener's own flag (Ear.taking), set before its client reads anything from
# the socket and cleared once everything read is handled; and the sockets
# themselves, looked at by the reading threads with one system call (epoll_wait on a
# set of them on Linux, else a poll() of their own), at most every CHECK_EVERY
# seconds. An invalidation that is on a listener's socket CHECK_EVERY seconds before
# a near read begins is therefore seen by it: either still on the socket, or being
# handled. A message that arrived less than that before the read may still be
# missed. (The listener once also waited in the C library's poll() through
# ctypes, and reads checked the ``revents`` the kernel wrote as that wait ended. In
# the race harness it cut near-redis stale reads from 5-12 to 2-7 per 15 s storm,
# all within milliseconds, but it relied on no other thread entering the
# interpreter between two lines of the listener: true of CPython with the GIL only.)

#: seconds between two looks at the listeners' sockets by the reading threads (when
#: the next look is due: ``near_state.next_check``); an unread message is seen by
#: every near read that begins this long after it reached the socket
CHECK_EVERY = 0.0002


class Ear:
    """One broadcast listener, as this process's near reads see it.

    The listener keeps it current: its socket (:attr:`fd`), whether it is reading or
    handling messages (:attr:`taking`), whether what arrives is the answer to its
    keep-alive (:attr:`answer_due`), and when it last heard from its server. The
    process hears while at least one attached ear does: with two transports, every
    invalidation is sent on both, so either alone is enough.
    """

    __slots__ = ("answer_due", "fd", "heard_until", "listening", "taking")

    def __init__(self) -> None:
        self.fd: int | None = None  #: the listener's socket; ``None``: not connected
        self.taking = False  #: reading or handling what its socket held
        #: asked its server for a keep-alive answer: what arrives meanwhile is most
        #: likely that answer, and reads do not wait for it (a message that comes with
        #: it waits for the listener, as every message did before reads looked)
        self.answer_due = False
        self.listening = False
        self.heard_until = 0.0

    def wait(self, timeout: float) -> bool:
        """Block until the socket has something to read, or ``timeout`` seconds have
        passed; whether it has. When it has, the listener counts as :attr:`taking`
        from then on (before its client reads the socket): the caller resets that
        once it has taken everything. Meanwhile near reads see what arrives by
        looking at the socket. Where gevent or eventlet has patched the standard
        library, this is the patched poll, and the listener a green thread."""
        fd = self.fd
        if fd is None:
            raise ConnectionError("the listener is not connected")
        waiting = select.poll()
        waiting.register(fd, select.POLLIN)
        ready = waiting.poll(max(0, int(timeout * 1000)))
        if not ready:
            return False
        if ready[0][1] & select.POLLNVAL:
            # the number is no file any more (closed under the listener): every wait
            # would return at once, and every look find it "unread"; the listener
            # reconnects instead
            raise ConnectionError(f"the listener's socket {fd} was closed under it")
        self.taking = True
        return True

    def attach(self) -> None:
        """Count this ear among the process's (a listener starts)."""
        state = near_state
        with state.ears_lock:
            if self not in state.ears:
                state.ears = (*state.ears, self)  # a new tuple: reads iterate without the lock
            _rewatch()

    def detach(self) -> None:
        """Stop counting it (its listener stopped for good)."""
        self.down()
        state = near_state
        with state.ears_lock:
            if self in state.ears:
                state.ears = tuple(ear for ear in state.ears if ear is not self)
            _recount()

    def up(self, fd: int | None) -> None:
        """The listener is connected and subscribed, on socket ``fd``. A process that was
        deaf flushes first: what it missed meanwhile is unknown."""
        with near_state.ears_lock:
            deaf = not hearing()
            self.fd = fd
            self.listening = True
            self.heard_until = time.monotonic() + HEARD_FOR
            if deaf:
                flush_everywhere()
            _recount()
            _rewatch()

    def down(self) -> None:
        """The listener lost its connection. A process no longer hearing on any ear
        flushes, and bypasses its near caches until one is up again."""
        with near_state.ears_lock:
            self.fd = None
            self.taking = False
            self.answer_due = False
            self.listening = False
            _recount()
            _rewatch()
            if not near_state.listening:
                flush_everywhere()

    def heard(self) -> None:
        """The listener heard from its server just now. After a silence long enough to
        have made the process deaf, the near caches are flushed first."""
        with near_state.ears_lock:
            now = time.monotonic()
            if now >= near_state.heard_until:
                flush_everywhere()
            self.heard_until = now + HEARD_FOR
            _recount()

    def hearing(self) -> bool:
        """Whether this listener's server answered recently."""
        return self.listening and time.monotonic() < self.heard_until


def _recount() -> None:
    """The process's hearing from its ears' (under ``near_state.ears_lock``)."""
    state = near_state
    live = [ear.heard_until for ear in state.ears if ear.listening]
    state.heard_until = max(live, default=0.0)
    state.listening = bool(live)


def caught_up(now: float) -> bool:
    """Whether this process has taken every invalidation its listeners' sockets hold.

    Called by every near read, before it reads its entry. It reads memory first: a
    listener taking (reading or handling what its socket held). Then, at most every
    :data:`CHECK_EVERY` seconds, it looks at the sockets themselves, with a system
    call: a woken listener's thread may wait for a CPU (or the interpreter) before it
    takes anything, while what arrived is on the socket at once."""
    state = near_state
    for ear in state.ears:
        if ear.taking:
            return False
    return now < state.next_check or _look(now)


def _look(now: float) -> bool:
    """Look at the listeners' sockets (but not for a keep-alive's answer)."""
    state = near_state
    watching = state.watching
    if watching is None:
        unread = _poll_sockets()
    else:
        try:
            ready = watching.poll(0)
        except (OSError, ValueError):  # being replaced: a listener came or went
            unread = True
        else:
            unread = bool(ready) and _confirm(ready)
    if unread:
        state.next_check = 0.0  # the next read looks again
        return False
    state.next_check = now + CHECK_EVERY
    return True


def _poll_sockets(fds: set[int] | None = None) -> bool:
    """Whether a listener's socket (of ``fds``, if given) has something unread, by a
    poll object of this call's own: one poll object must not be polled by two threads
    at once (CPython raises), and reading threads look concurrently."""
    looking = select.poll()
    try:
        for ear in near_state.ears:
            fd = ear.fd
            if fd is not None and not ear.answer_due and (fds is None or fd in fds):
                looking.register(fd, select.POLLIN)
        return bool(looking.poll(0))
    except (OSError, ValueError):  # a socket is being closed: its listener reconnects
        return True


def _confirm(ready: list[tuple[int, int]]) -> bool:
    """Whether what the epoll set named is unread on a listener's socket: not when it
    is a keep-alive's answer, nor when the set names a socket no listener reads any
    more (a closed socket whose file lives on in a forked child stays in the set: the
    set is then made again)."""
    fds = {fd for fd, _ in ready}
    if _poll_sockets(fds):
        return True
    if any(ear.fd in fds for ear in near_state.ears if ear.answer_due):
        return False
    _rewatch()
    return False


def _rewatch() -> None:
    """Make the epoll set of the listeners' sockets again (a listener came or went):
    ``near_state.watching`` (Linux; a look is then one epoll_wait, which reads the set's
    ready list, filled as data arrives, instead of asking each socket; ``None``
    elsewhere, or while no listener has a socket). A new set, never an edited one: a
    socket closed while a forked child still holds its file would otherwise stay in it."""
    state = near_state
    with state.ears_lock:
        fds = {ear.fd for ear in state.ears if ear.fd is not None}
        new = None
        if fds and hasattr(select, "epoll"):
            try:
                new = select.epoll()
                for fd in fds:
                    new.register(fd, select.EPOLLIN)
            except OSError:
                if new is not None:
                    new.close()
                new = None  # looks use poll objects
        # the old set is not closed here: a reading thread may be polling it, and its
        # number could be reused by another file meanwhile. It closes when the last
        # reference to it goes (a read in flight finishes with it first).
        state.watching = new


def active() -> bool:
    """Whether any near cache exists in this process."""
    return bool(near_state.caches)


def hearing() -> bool:
    """Whether invalidations are reaching this process now."""
    return near_state.listening and time.monotonic() < near_state.heard_until


def evict_everywhere(keys_by_region: dict[str, tuple[list[str], list[Any]]]) -> None:
    """Evict keys (and key patterns) by region name, in this process's near caches."""
    regions = configured_regions()
    for name, (keys, patterns) in keys_by_region.items():
        settings = regions.get(name)
        near = getattr(settings, "near", None) if settings is not None else None
        if near is None:
            continue
        if keys:
            near.evict(keys)
        if patterns:
            near.evict_matching(patterns)


def flush_everywhere() -> None:
    for near in list(near_state.caches):
        near.flush()


def after_fork() -> None:
    """In a forked child, once (whoever calls first: :mod:`cachedecor._runtime`'s fork
    hook, or a listener restarting in the child, which calls it before it starts): the
    parent's listeners are not this process's, which is deaf until one of its own has
    connected. Whether it has run is ``near_state.pid``."""
    state = near_state
    if state.pid == os.getpid():
        return
    state.pid = os.getpid()
    state.ears_lock = threading.RLock()
    if state.watching is not None:
        state.watching.close()  # the parent's set (shared with it until closed here)
        state.watching = None
    for ear in state.ears:
        ear.fd = None
        ear.taking = False
        ear.answer_due = False
        ear.listening = False
    _recount()


register_fork_hook(after_fork)
