"""Several memcached nodes: placement of keys, node health, deletes owed to a node."""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from cachedecor.backends.base import PartialResult, UndeliveredInvalidation, register_fork_aware
from cachedecor.backends.memcached.protocol import MetaUnsupported, answered, server_spec, stale_connection
from cachedecor.backends.memcached.transport import Exchange

__all__ = [
    "ON_THEIR_WAY",
    "PLACEMENTS",
    "SLOTS",
    "MemcachedCluster",
    "NodeDown",
    "NodeHealth",
    "Placement",
    "RendezvousPlacement",
    "Routing",
    "SlotPlacement",
    "placement",
]


#: :meth:`NodeHealth.claim`: the deletes owed to a node are being delivered by another caller
ON_THEIR_WAY: Any = object()


class NodeDown(Exception):
    """The memcached node that owns a key is marked down; the call was not attempted."""


#: Number of slots of the ``slots`` placement (a key's slot: CRC-32 of the key, modulo this)
SLOTS = 1 << 16


class Placement:
    """Which of ``servers`` owns a key. Pure: the same servers always place a key alike."""

    #: the value of ``arguments.placement`` that selects this placement
    name = ""

    def __init__(self, servers: Sequence[str]) -> None:
        self.servers = list(servers)

    def node_for(self, key: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class RendezvousPlacement(Placement):
    """pymemcache's rendezvous hashing: murmur3 of ``f"{node}-{key}"`` for every node,
    the highest wins. The placement of every cachedecor release so far (the default);
    costs O(nodes) pure-Python hashes per key (16 us at 3 nodes, 110 us at 20)."""

    name = "rendezvous"

    def __init__(self, servers: Sequence[str]) -> None:
        from pymemcache.client.rendezvous import RendezvousHash

        super().__init__(servers)
        self._single = self.servers[0] if len(self.servers) == 1 else None
        self._hash = RendezvousHash(list(self.servers))

    def node_for(self, key: str) -> str:
        if self._single is not None:
            return self._single
        node: str = self._hash.get_node(key)
        return node


class SlotPlacement(Placement):
    """A key's slot is its CRC-32 modulo :data:`SLOTS`; a slot's owner is the node with
    the highest BLAKE2b of ``f"{node}-{slot}"`` (rendezvous hashing of slots).

    A slot's owner is computed on first use (O(nodes), in C-speed hashes) and kept
    in a table on this object, so placing a key costs one CRC-32 and one list index
    whatever the number of nodes. Adding or removing a node moves only the slots
    whose winner changes (the ideal 1/(n+1) of them). Thread-safe: two threads that
    compute a slot's owner at once compute the same one.

    Measured (``benchmarks/routing.py``; 100,000 keys): 0.15-0.21 us per key at 3-100
    nodes against rendezvous's 18.6-590 us; a slot's first use 1.6 us at 3 nodes, 62 us
    at 100. Keys per node / mean: 0.97-1.04 at 20 nodes (rendezvous 0.97-1.03),
    0.89-1.11 at 100 (rendezvous 0.91-1.08). Beyond the sample's noise, a node's share
    is its share of the slots: 0.97-1.03 of the mean at 20 nodes, 0.90-1.09 at 100.
    2**18 slots would make that 0.94-1.05 at 100 nodes for a table of 2 MB instead of
    512 KB and four times the first-use work in all (16 s of CPU at 100 nodes if every
    slot is used, against 4 s).
    """

    name = "slots"

    def __init__(self, servers: Sequence[str]) -> None:
        super().__init__(servers)
        self._names = [(server, server.encode() + b"-") for server in self.servers]
        self._owners: list[str | None] = [None] * SLOTS

    def node_for(self, key: str) -> str:
        slot = zlib.crc32(key.encode()) & (SLOTS - 1)
        owner = self._owners[slot]
        if owner is None:
            owner = self._owners[slot] = self.owner_of(slot)
        return owner

    def owner_of(self, slot: int) -> str:
        """The node that owns ``slot`` (computed, not memoized)."""
        suffix = b"%d" % slot
        best, best_score = self.servers[0], b""
        for server, prefix in self._names:
            score = hashlib.blake2b(prefix + suffix, digest_size=8).digest()
            if score > best_score:
                best, best_score = server, score
        return best


#: ``arguments.placement`` values and their classes
PLACEMENTS: Mapping[str, type[Placement]] = MappingProxyType(
    {"rendezvous": RendezvousPlacement, "slots": SlotPlacement}
)


def placement(name: str, servers: Sequence[str]) -> Placement:
    """The placement ``name`` (a key of :data:`PLACEMENTS`) over ``servers``.

    :raises ValueError: for an unknown name
    """
    kind = PLACEMENTS.get(name)
    if kind is None:
        raise ValueError(f"placement: {name!r} is not one of {', '.join(PLACEMENTS)}")
    return kind(servers)


class Routing:
    """Where a key is read and filled (``current``), and where its deletes go.

    Deletes go to the key's owner under ``current`` and, during a change of the
    server list or placement, under ``also`` too (once when both are the same
    node): processes still reading under ``also`` never keep an entry that a write
    deleted. Shared by a backend's threads and its asyncio cluster.
    """

    def __init__(self, current: Placement, also: Placement | None = None) -> None:
        self.current = current
        self.also = also
        self.servers = current.servers
        #: every node that reads or deletes may reach: ``current``'s, then ``also``'s others
        self.nodes = list(current.servers)
        if also is not None:
            self.nodes += [s for s in also.servers if s not in current.servers]

    def by_node(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """``keys`` grouped by their node under ``current`` (for reads and fills)."""
        node_for = self.current.node_for
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(node_for(key), []).append(key)
        return groups

    def delete_groups(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """``keys`` grouped by every node that must receive their deletes."""
        if self.also is None:
            return self.by_node(keys)
        node_for, also_for = self.current.node_for, self.also.node_for
        groups: dict[str, list[str]] = {}
        for key in keys:
            node = node_for(key)
            groups.setdefault(node, []).append(key)
            other = also_for(key)
            if other != node:
                groups.setdefault(other, []).append(key)
        return groups


class NodeHealth:
    """Circuit breaker and undelivered-invalidation queue, shared by one backend's threads.

    After ``failures`` consecutive failures a node is skipped for ``dead_timeout``
    seconds; the first call after that probes it again. Deletes that could not be
    delivered are kept per node (at most ``max_pending`` keys; beyond that the node
    is flushed instead) and retried every ``retry_interval`` seconds for up to
    ``retry_for`` seconds, whether or not the breaker marks the node down (a node
    that answers them is marked up again). While a node has undelivered deletes,
    its keys are neither read nor filled by this process: the deletes are
    delivered first.

    Both belong to one process. A process forked from this one starts with every
    node up, no queued deletes (they stay with the parent, which delivers them once)
    and no retry thread; locks held by the parent's other threads do not carry over.
    """

    def __init__(
        self,
        dead_timeout: float,
        failures: int = 1,
        *,
        retry_interval: float = 0.5,
        retry_for: float = 300.0,
        max_pending: int = 10_000,
    ) -> None:
        self.dead_timeout = dead_timeout
        self.failures = max(1, failures)
        self.retry_interval = retry_interval
        self.retry_for = retry_for
        self.max_pending = max_pending
        self.region = "?"
        #: the region's expiration_time (set by the configuration): how long an entry
        #: whose delete was given up may stay stale
        self.expiration_time: float | None = None
        self.client_factory: Any = None
        self._down_until: dict[str, float] = {}
        self._failed: dict[str, int] = {}
        self._pending: dict[str, dict[str, float]] = {}
        self._flush: dict[str, float] = {}
        # deliveries taken from the queue and not yet landed: node -> their sizes (keys)
        self._in_flight: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._retrier: threading.Thread | None = None
        self._wake = threading.Event()
        register_fork_aware(self)

    def _after_fork_in_child(self) -> None:
        self._down_until = {}
        self._failed = {}
        self._pending = {}
        self._flush = {}
        self._in_flight = {}
        self._lock = threading.Lock()
        self._retrier = None
        self._wake = threading.Event()

    # -- circuit breaker ---------------------------------------------------------------

    def is_down(self, node: str) -> bool:
        until = self._down_until.get(node)
        if until is None:
            return False
        if time.monotonic() >= until:
            # let one probe through; if it fails the node is marked down again
            with self._lock:
                self._down_until.pop(node, None)
            return False
        return True

    def failed(self, node: str) -> None:
        with self._lock:
            n = self._failed.get(node, 0) + 1
            self._failed[node] = n
            if n >= self.failures:
                self._down_until[node] = time.monotonic() + self.dead_timeout
                self._failed[node] = 0

    def succeeded(self, node: str) -> None:
        if self._failed.get(node):
            with self._lock:
                self._failed[node] = 0

    def recovered(self, node: str) -> None:
        """``node`` answered (a delete sent whatever the breaker said): use it again."""
        if node in self._down_until or self._failed.get(node):
            with self._lock:
                self._down_until.pop(node, None)
                self._failed[node] = 0

    def down_nodes(self) -> list[str]:
        now = time.monotonic()
        return sorted(n for n, until in self._down_until.items() if until > now)

    # -- undelivered invalidations -----------------------------------------------------

    def owes(self, node: str) -> bool:
        """Whether ``node`` has deletes (or a flush) that must be delivered before use,
        queued or on their way (taken by a delivery that has not landed yet)."""
        return node in self._pending or node in self._flush or node in self._in_flight

    def in_flight(self, node: str) -> bool:
        """Whether a delivery to ``node`` (by any thread or event loop) is on its way."""
        return node in self._in_flight

    def landed(self, node: str) -> None:
        """A delivery that :meth:`take` started has reached ``node``."""
        with self._lock:
            self._land(node)

    def _land(self, node: str) -> None:
        sizes = self._in_flight.get(node)
        if sizes:
            sizes.pop()
            if not sizes:
                del self._in_flight[node]

    def queue(self, node: str, keys: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            if node in self._flush:
                return
            pending = self._pending.setdefault(node, {})
            for key in keys:
                pending.setdefault(key, now)
            if len(pending) > self.max_pending:
                # too many to remember: the node is flushed when it can be reached
                self._flush[node] = min(pending.values())
                del self._pending[node]
        self._start_retrier()

    def take(self, node: str) -> tuple[bool, dict[str, float]]:
        """(flush needed, pending keys) of ``node``, removed from the queue and counted as
        on their way until :meth:`landed` (or :meth:`give_back`)."""
        with self._lock:
            # owes() reads without the lock: the deletes are marked on their way before
            # they leave the queue, so that it never sees them in neither
            flush = self._flush.get(node)
            pending = self._pending.get(node, {})
            if flush is not None or pending:
                self._in_flight.setdefault(node, []).append(1 if flush is not None else len(pending))
            self._flush.pop(node, None)
            self._pending.pop(node, None)
        if flush is not None:
            return True, {"": flush}
        return False, pending

    def claim(self, node: str) -> Any:
        """What a caller must deliver to ``node`` before using it: ``(flush, pending)``
        to send (taken, as :meth:`take`), ``None`` (nothing owed), or :data:`ON_THEIR_WAY`
        (another thread or loop is delivering them: look again shortly)."""
        flush, pending = self.take(node)
        if flush or pending:
            return flush, pending
        if self.in_flight(node):
            return ON_THEIR_WAY
        # a delivery that failed gives its deletes back and lands in one step: taken
        # again here if that happened since the first look
        flush, pending = self.take(node)
        return (flush, pending) if flush or pending else None

    def give_back(self, node: str, flush: bool, pending: dict[str, float]) -> None:
        """Requeue what :meth:`take` returned after a failed delivery; expire old entries."""
        from cachedecor.stats import counters as region_counters
        from cachedecor.stats import log

        now = time.monotonic()
        expired = [k for k, since in pending.items() if now - since > self.retry_for]
        with self._lock:
            if flush:
                if not expired:
                    self._flush.setdefault(node, pending[""])
            else:
                target = self._pending.setdefault(node, {})
                for key, since in pending.items():
                    if now - since <= self.retry_for:
                        target.setdefault(key, since)
                if not target:
                    del self._pending[node]
            self._land(node)  # back in the queue first (owes() reads without the lock)
        if expired:
            region_counters(self.region).invalidations_lost += len(expired) if not flush else 1
            bound = (
                f"{self.expiration_time:g}s (the region's expiration_time)"
                if self.expiration_time
                else "ever (the region has no expiration_time)"
            )
            log.error(
                "cache region %r: gave up invalidating %s on memcached node %s after %ss "
                "(invalidation_retry_for); they may be stale for up to %s: %s",
                self.region,
                "the whole node (a flush)" if flush else f"{len(expired)} key(s)",
                node,
                self.retry_for,
                bound,
                "(whole node flush)" if flush else ", ".join(sorted(expired)[:50]),
            )

    def owe_flush(self, node: str) -> None:
        """``node`` must be flushed before it is used again (a model-wide invalidation it missed)."""
        with self._lock:
            self._pending.pop(node, None)
            self._flush.setdefault(node, time.monotonic())
        self._start_retrier()

    def pending_count(self) -> int:
        """Deletes owed: queued, or on their way (a flush counts as one)."""
        with self._lock:
            on_their_way = sum(sum(sizes) for sizes in self._in_flight.values())
            return sum(len(p) for p in self._pending.values()) + len(self._flush) + on_their_way

    def _start_retrier(self) -> None:
        if self.client_factory is None:
            return
        with self._lock:
            if self._retrier is not None and self._retrier.is_alive():
                self._wake.set()
                return
            self._retrier = threading.Thread(
                target=self._retry_loop, name=f"cachedecor-retry-{self.region}", daemon=True
            )
            self._retrier.start()

    def _retry_loop(self) -> None:
        client: MemcachedCluster = self.client_factory()
        try:
            while True:
                self._wake.wait(self.retry_interval)
                self._wake.clear()
                with self._lock:
                    nodes = [n for n in {*self._pending, *self._flush}]
                if not nodes:
                    return
                for node in nodes:
                    if node in client.clients:
                        # tried whatever the breaker says: a node marked down by a hiccup
                        # must get its deletes as soon as it answers, not after
                        # dead_timeout, while other processes may read it
                        try:
                            client.deliver(node)
                        except Exception:
                            pass  # requeued by deliver(); tried again next round
                        else:
                            self.recovered(node)
        finally:
            client.close()


class MemcachedCluster:
    """A pymemcache-style client over one or more memcached nodes.

    Keys are placed by ``routing`` (by default rendezvous hashing over ``servers``)
    over the *configured* nodes; a failed node is never removed from the placement,
    so its keys are not remapped to other nodes (which would let a returning node
    serve entries whose invalidations went elsewhere). While a node is down,
    operations on its keys raise :class:`NodeDown` at once instead of waiting for a
    timeout.

    Connections belong to the process that opened them: in a forked child every
    cluster inherited from the parent has its sockets closed (in the child only;
    the parent's connections stay open) and reconnects on first use.
    """

    def __init__(
        self,
        servers: Sequence[str],
        health: NodeHealth,
        *,
        routing: Routing | None = None,
        retry_attempts: int = 0,
        retry_delay: float = 0.0,
        retry_for: tuple[type[BaseException], ...] = (),
        do_not_retry_for: tuple[type[BaseException], ...] = (),
        **client_kwargs: Any,
    ) -> None:
        from pymemcache.client.base import Client

        self.routing = routing if routing is not None else Routing(RendezvousPlacement(servers))
        self.servers = list(servers)
        #: every node this cluster may reach: ``servers``, then those only deletes reach
        self.nodes = self.routing.nodes
        self.health = health
        self.retry_attempts = retry_attempts
        self.retry_delay = retry_delay
        self.retry_for = retry_for
        self.do_not_retry_for = do_not_retry_for
        self.clients = {s: Client(server_spec(s), **client_kwargs) for s in self.nodes}
        register_fork_aware(self)

    def _after_fork_in_child(self) -> None:
        self.close()

    # -- routing -----------------------------------------------------------------------

    def node_for(self, key: str) -> str:
        """The server (``host:port``) that owns ``key``: where it is read and filled."""
        return self.routing.current.node_for(key)

    def delete_groups(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """``keys`` grouped by every node that must receive their deletes (see :class:`Routing`)."""
        return self.routing.delete_groups(keys)

    def deliver(self, node: str) -> None:
        """Deliver the deletes (or flush) ``node`` is owed; on failure requeue and raise.

        When another thread (or event loop) has taken them and they are on their way,
        wait for them to land (up to the client's timeout), so that the caller never
        reads the node before its deletes.
        """
        health = self.health
        deadline = time.monotonic() + (self.clients[node].timeout or 1.0)
        while (claimed := health.claim(node)) is ON_THEIR_WAY:
            if time.monotonic() > deadline:
                raise TimeoutError(f"deletes owed to memcached node {node} are still on their way")
            time.sleep(0.001)
        if claimed is None:
            return
        flush, pending = claimed
        client = self.clients[node]
        try:
            if flush:
                client.flush_all(noreply=False)
            else:
                client.delete_many(list(pending), noreply=False)
        except Exception:
            client.close()
            health.give_back(node, flush, pending)
            health.failed(node)
            raise
        health.landed(node)
        health.succeeded(node)

    def _call(self, node: str, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._run(node, lambda client: getattr(client, name)(*args, **kwargs))

    def meta(self, key: str, command: bytes) -> tuple[bytes, list[bytes], bytes | None]:
        """Send one meta command for ``key`` and return its reply (code, flags, value)."""
        replies: list[tuple[bytes, list[bytes], bytes | None]] = self._run(
            self.node_for(key), Exchange(command, 1)
        )
        return replies[0]

    def meta_many(self, commands: dict[str, bytes]) -> dict[str, tuple[bytes, list[bytes], bytes | None]]:
        """Send one meta command per key, pipelined per node (one round trip each)."""
        out: dict[str, tuple[bytes, list[bytes], bytes | None]] = {}
        error: BaseException | None = None
        for node, group in self._by_node(commands).items():
            payload = b"".join(commands[k] for k in group)
            try:
                replies = self._run(node, Exchange(payload, len(group)))
            except MetaUnsupported:
                raise
            except Exception as exc:
                error = exc
                continue
            out.update(zip(group, replies, strict=True))
        if error is not None:
            raise PartialResult(out, error)
        return out

    def _run(self, node: str, operation: Any) -> Any:
        health = self.health
        if health.is_down(node):
            raise NodeDown(f"memcached node {node} is marked down")
        if health.owes(node):
            self.deliver(node)
        client = self.clients[node]
        attempts = self.retry_attempts
        while True:
            reused = client.sock is not None
            try:
                result = operation(client)
            except Exception as exc:
                if isinstance(exc, MetaUnsupported) or answered(exc):
                    raise  # the server is fine: it answered, with an error about this request
                client.close()
                if reused and stale_connection(exc):
                    # a connection the server closed while idle (a restart, an idle
                    # timeout): one immediate retry on a new connection, not a failure
                    continue
                if attempts > 0 and self._retries(exc):
                    attempts -= 1
                    if self.retry_delay:
                        time.sleep(self.retry_delay)
                    continue
                self.health.failed(node)
                raise
            self.health.succeeded(node)
            return result

    def _retries(self, exc: BaseException) -> bool:
        """Whether a failed connection may be retried (``retry_for``/``do_not_retry_for``)."""
        if self.retry_for and not isinstance(exc, self.retry_for):
            return False
        return not isinstance(exc, self.do_not_retry_for)

    def _by_node(self, keys: Iterable[str]) -> dict[str, list[str]]:
        return self.routing.by_node(keys)

    # -- the pymemcache client API used by dogpile and cachedecor ---------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self._call(self.node_for(key), "get", key, default)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Values of the keys that are present. A failing node raises (after the others)."""
        out: dict[str, Any] = {}
        error: BaseException | None = None
        for node, group in self._by_node(keys).items():
            try:
                out.update(self._call(node, "get_many", group))
            except Exception as exc:
                error = exc
        if error is not None:
            raise PartialResult(out, error)
        return out

    get_multi = get_many

    def gets(self, key: str) -> tuple[Any, Any]:
        result: tuple[Any, Any] = self._call(self.node_for(key), "gets", key)
        return result

    def set(self, key: str, value: Any, expire: int = 0, noreply: bool | None = None) -> bool:
        return bool(self._call(self.node_for(key), "set", key, value, expire, noreply))

    def set_many(self, values: dict[str, Any], expire: int = 0, noreply: bool | None = None) -> list[str]:
        """Store values; returns the keys not stored. A failing node raises (after the others)."""
        failed: list[str] = []
        error: BaseException | None = None
        for node, group in self._by_node(values).items():
            try:
                failed += self._call(node, "set_many", {k: values[k] for k in group}, expire, noreply)
            except Exception as exc:
                error = exc
        if error is not None:
            raise error
        return failed

    set_multi = set_many

    def add(self, key: str, value: Any, expire: int = 0, noreply: bool | None = None) -> bool:
        return bool(self._call(self.node_for(key), "add", key, value, expire, noreply))

    def cas(self, key: str, value: Any, cas: Any, expire: int = 0) -> bool | None:
        result: bool | None = self._call(self.node_for(key), "cas", key, value, cas, expire, False)
        return result

    def delete(self, key: str, noreply: bool | None = None) -> bool:
        return self.delete_many([key], noreply)

    def delete_many(self, keys: Iterable[str], noreply: bool | None = None) -> bool:
        """Delete keys; those of unreachable nodes are queued for retry (and reported)."""
        error: BaseException | None = None
        queued: list[str] = []
        for node, group in self.routing.delete_groups(keys).items():
            try:
                self._call(node, "delete_many", group, noreply)
            except Exception as exc:
                self.health.queue(node, group)
                queued += group
                error = exc
        if error is not None:
            raise UndeliveredInvalidation(queued, error)
        return True

    delete_multi = delete_many

    def stats(self) -> dict[str, dict[bytes, Any] | BaseException]:
        """Each node's ``stats`` (or the exception it raised)."""
        out: dict[str, dict[bytes, Any] | BaseException] = {}
        for node, client in self.clients.items():
            try:
                out[node] = client.stats()
            except Exception as exc:
                client.close()
                out[node] = exc
        return out

    def close(self) -> None:
        """Close this process's connections; the next call opens new ones.

        Only the file descriptors are closed (no ``quit``, no ``shutdown``), so a
        connection that another process shares stays open for that process.
        """
        for client in self.clients.values():
            client.close()
