"""Cache backends and the storage adapters that give them lease-protected fills.

Two things live here:

* :class:`PyMemcacheBackend`, a dogpile.cache backend registered as
  ``cachedecor.pymemcache``. It is dogpile's pymemcache backend with the settings
  production needs (``connect_timeout``, ``timeout``, ``no_delay``, a per-node
  circuit breaker) and a client that never remaps keys of a failed node to another
  node (see :doc:`/resilience`). cachedecor also uses it for regions configured
  with ``dogpile.cache.pymemcache``.
* :class:`Store` adapters: the handful of operations the decorators need (get,
  get-many, lease, fill, delete) on memcached, dogpile's memory backend and Redis.
  One mechanism, small adapters: the decorators never branch on the backend.

A *lease* is a marker written with an atomic "add if absent" before the database
is read. The value is later written only if the marker is still the one this
reader wrote (memcached ``gets``/``cas``, a compare-and-set script in Redis, a
locked check in memory). An invalidation deletes the key, and with it any lease in
flight, so a reader that read the database before a write committed can never put
its older copy back.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from dogpile.cache.api import NO_VALUE, DefaultSerialization
from dogpile.cache.backends.memcached import PyMemcacheBackend as _DogpilePyMemcacheBackend

from cachedecor.keys import KeyPattern

__all__ = [
    "LEASE_PREFIX",
    "MemcachedCluster",
    "NodeDown",
    "PyMemcacheBackend",
    "Store",
    "UndeliveredInvalidation",
    "ValueRefused",
]

#: Every lease marker starts with this byte; real entries start with the format version.
LEASE_PREFIX = b"\x00L"
#: memcached treats an expiry above 30 days as a Unix timestamp.
_MEMCACHED_MAX_RELATIVE = 30 * 24 * 3600


def is_lease(data: bytes) -> bool:
    """Whether a stored value is a lease marker rather than an entry."""
    return data[:2] == LEASE_PREFIX


def new_lease_marker() -> bytes:
    """A lease marker unique to this attempt."""
    return LEASE_PREFIX + os.urandom(10)


# --------------------------------------------------------------------------------------
# processes: a forked child gets connections, locks and queues of its own


class _ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


#: Live objects that hold connections, locks or queues of the process that made them.
_fork_aware: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for obj in list(_fork_aware):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------------------
# memcached: a client over several nodes that never moves keys between nodes


class NodeDown(Exception):
    """The memcached node that owns a key is marked down; the call was not attempted."""


class _RawSerde:
    """pymemcache serde that stores and returns bytes only and never unpickles.

    dogpile-level values reach the client already serialized (the backend's
    ``serializer``), cachedecor's own entries are bytes, and dogpile's distributed
    lock stores the integer 1, so bytes, text and integers are all it needs.
    """

    @staticmethod
    def serialize(key: Any, value: Any) -> tuple[bytes, int]:
        if isinstance(value, bytes):
            return value, 0
        if isinstance(value, str):
            return value.encode(), 0
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value).encode(), 0
        raise TypeError(f"cachedecor's memcached client stores bytes, not {type(value).__name__}")

    @staticmethod
    def deserialize(key: Any, value: bytes, flags: int) -> bytes:
        return value


class UndeliveredInvalidation(Exception):
    """Deleting keys failed; they were queued and are retried in the background."""

    def __init__(self, keys: Sequence[str], error: BaseException) -> None:
        super().__init__(f"{len(keys)} key(s) queued for retry after {type(error).__name__}: {error}")
        self.keys = list(keys)
        self.error = error


class NodeHealth:
    """Circuit breaker and undelivered-invalidation queue, shared by one backend's threads.

    After ``failures`` consecutive failures a node is skipped for ``dead_timeout``
    seconds; the first call after that probes it again. Deletes that could not be
    delivered are kept per node (at most ``max_pending`` keys; beyond that the node
    is flushed instead) and retried every ``retry_interval`` seconds for up to
    ``retry_for`` seconds. While a node has undelivered deletes, its keys are
    neither read nor filled: the deletes are delivered first.

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
        self.client_factory: Any = None
        self._down_until: dict[str, float] = {}
        self._failed: dict[str, int] = {}
        self._pending: dict[str, dict[str, float]] = {}
        self._flush: dict[str, float] = {}
        self._lock = threading.Lock()
        self._retrier: threading.Thread | None = None
        self._wake = threading.Event()
        _fork_aware.add(self)

    def _after_fork_in_child(self) -> None:
        self._down_until = {}
        self._failed = {}
        self._pending = {}
        self._flush = {}
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

    def down_nodes(self) -> list[str]:
        now = time.monotonic()
        return sorted(n for n, until in self._down_until.items() if until > now)

    # -- undelivered invalidations -----------------------------------------------------

    def owes(self, node: str) -> bool:
        """Whether ``node`` has deletes (or a flush) that must be delivered before use."""
        return node in self._pending or node in self._flush

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
        """(flush needed, pending keys) of ``node``, removed from the queue."""
        with self._lock:
            flush = self._flush.pop(node, None)
            pending = self._pending.pop(node, {})
        if flush is not None:
            return True, {"": flush}
        return False, pending

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
        if expired:
            region_counters(self.region).invalidations_lost += len(expired) if not flush else 1
            log.error(
                "cache region %r: gave up invalidating on memcached node %s after %ss; "
                "these entries may be stale until they expire (the region's expiration_time): %s",
                self.region,
                node,
                self.retry_for,
                "(whole node flush)" if flush else ", ".join(sorted(expired)[:50]),
            )

    def owe_flush(self, node: str) -> None:
        """``node`` must be flushed before it is used again (a model-wide invalidation it missed)."""
        with self._lock:
            self._pending.pop(node, None)
            self._flush.setdefault(node, time.monotonic())
        self._start_retrier()

    def pending_count(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._pending.values()) + len(self._flush)

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
                    if node in client.clients and not self.is_down(node):
                        try:
                            client.deliver(node)
                        except Exception:
                            pass  # requeued by deliver(); tried again next round
        finally:
            client.close()


class MemcachedCluster:
    """A pymemcache-style client over one or more memcached nodes.

    Keys are placed by rendezvous hashing over the *configured* nodes; a failed node
    is never removed from the hash, so its keys are not remapped to other nodes
    (which would let a returning node serve entries whose invalidations went
    elsewhere). While a node is down, operations on its keys raise :class:`NodeDown`
    at once instead of waiting for a timeout.

    Connections belong to the process that opened them: in a forked child every
    cluster inherited from the parent has its sockets closed (in the child only;
    the parent's connections stay open) and reconnects on first use.
    """

    def __init__(
        self,
        servers: Sequence[str],
        health: NodeHealth,
        *,
        retry_attempts: int = 0,
        retry_delay: float = 0.0,
        **client_kwargs: Any,
    ) -> None:
        from pymemcache.client.base import Client
        from pymemcache.client.rendezvous import RendezvousHash

        self.servers = list(servers)
        self.health = health
        self.retry_attempts = retry_attempts
        self.retry_delay = retry_delay
        self.clients = {s: Client(_server_spec(s), **client_kwargs) for s in self.servers}
        self._single = self.clients[self.servers[0]] if len(self.servers) == 1 else None
        self._hash = RendezvousHash(list(self.servers))
        _fork_aware.add(self)

    def _after_fork_in_child(self) -> None:
        self.close()

    # -- routing -----------------------------------------------------------------------

    def node_for(self, key: str) -> str:
        """The server (``host:port``) that owns ``key``."""
        if self._single is not None:
            return self.servers[0]
        node: str = self._hash.get_node(key)
        return node

    def deliver(self, node: str) -> None:
        """Deliver the deletes (or flush) ``node`` is owed; on failure requeue and raise."""
        flush, pending = self.health.take(node)
        if not flush and not pending:
            return
        client = self.clients[node]
        try:
            if flush:
                client.flush_all(noreply=False)
            else:
                client.delete_many(list(pending), noreply=False)
        except Exception:
            client.close()
            self.health.give_back(node, flush, pending)
            self.health.failed(node)
            raise
        self.health.succeeded(node)

    def _call(self, node: str, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._run(node, lambda client: getattr(client, name)(*args, **kwargs))

    def meta(self, key: str, command: bytes) -> tuple[bytes, list[bytes], bytes | None]:
        """Send one meta command for ``key`` and return its reply (code, flags, value)."""
        replies: list[tuple[bytes, list[bytes], bytes | None]] = self._run(
            self.node_for(key), _Exchange(command, 1)
        )
        return replies[0]

    def meta_many(self, commands: dict[str, bytes]) -> dict[str, tuple[bytes, list[bytes], bytes | None]]:
        """Send one meta command per key, pipelined per node (one round trip each)."""
        out: dict[str, tuple[bytes, list[bytes], bytes | None]] = {}
        error: BaseException | None = None
        for node, group in self._by_node(commands).items():
            payload = b"".join(commands[k] for k in group)
            try:
                replies = self._run(node, _Exchange(payload, len(group)))
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
                if isinstance(exc, MetaUnsupported) or _answered(exc):
                    raise  # the server is fine: it answered, with an error about this request
                client.close()
                if reused and _stale_connection(exc):
                    # a connection the server closed while idle (a restart, an idle
                    # timeout): one immediate retry on a new connection, not a failure
                    continue
                if attempts > 0:
                    attempts -= 1
                    if self.retry_delay:
                        time.sleep(self.retry_delay)
                    continue
                self.health.failed(node)
                raise
            self.health.succeeded(node)
            return result

    def _by_node(self, keys: Iterable[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(self.node_for(key), []).append(key)
        return groups

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
        failed: list[str] = []
        for node, group in self._by_node(values).items():
            failed += self._call(node, "set_many", {k: values[k] for k in group}, expire, noreply)
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
        for node, group in self._by_node(keys).items():
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


class PartialResult(Exception):
    """Some nodes of a multi-get failed; ``found`` holds what the others returned."""

    def __init__(self, found: dict[str, Any], error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.found = found
        self.error = error


class ValueRefused(Exception):
    """The server refused to store a value (too large, out of memory, ...)."""


class MetaUnsupported(Exception):
    """The server answered ERROR to a meta command: it predates memcached 1.6."""


_META_CODES = frozenset((b"HD", b"EN", b"NF", b"EX", b"NS", b"MN"))


def _exchange(client: Any, payload: bytes, count: int) -> list[tuple[bytes, list[bytes], bytes | None]]:
    """Write ``payload`` (``count`` meta commands) and read ``count`` replies.

    Uses pymemcache's connection (timeouts, TCP_NODELAY, TLS) and its line reader.
    A reply the protocol does not allow closes the connection, so that a stream
    out of step is never reused.
    """
    _readline, _readvalue = _readers()
    if client.sock is None:
        client._connect()
    sock = client.sock
    sock.sendall(payload)
    buf = b""
    replies: list[tuple[bytes, list[bytes], bytes | None]] = []
    for _ in range(count):
        buf, line = _readline(sock, buf)
        parts = line.split()
        code = parts[0] if parts else b""
        if code == b"VA":
            buf, value = _readvalue(sock, buf, int(parts[1]))
            replies.append((code, parts[2:], value))
        elif code in _META_CODES or code == b"SERVER_ERROR":
            replies.append((code, parts[1:], None))
        else:
            client.close()
            if line == b"ERROR":
                raise MetaUnsupported("the server does not know meta commands")
            raise ProtocolError(line.decode("ascii", "replace"))
    if buf:
        client.close()
        raise ProtocolError("unexpected bytes after the last reply")
    return replies


def _metadump(cluster: MemcachedCluster, node: str) -> list[str]:
    """Every key stored on ``node`` (``lru_crawler metadump``), on a connection of its own.

    The crawler walks the hash table (``hash``): a walk of the LRUs (``all``, the
    fallback for servers without ``hash``) misses items that reads are moving between
    LRUs, which are the recently read ones (measured on memcached 1.6.18).
    """
    from urllib.parse import unquote

    from pymemcache.client.base import Client

    template = cluster.clients[node]
    client = Client(
        _server_spec(node),
        connect_timeout=template.connect_timeout or 1.0,
        timeout=max(template.timeout or 0, 5.0),
        no_delay=True,
    )
    mode = b"hash"
    try:
        for attempt in range(50):
            client._connect()
            client.sock.sendall(b"lru_crawler metadump %b\r\n" % mode)
            buf = b""
            while not (buf.endswith(b"END\r\n") or buf.startswith((b"BUSY", b"ERROR", b"CLIENT_ERROR"))):
                chunk = client.sock.recv(1 << 16)
                if not chunk:
                    raise ProtocolError("connection closed during metadump")
                buf += chunk
                if buf.startswith((b"BUSY", b"ERROR", b"CLIENT_ERROR")) and buf.endswith(b"\r\n"):
                    break
            if buf.startswith(b"BUSY"):  # another crawl is running: wait for it
                client.close()
                time.sleep(0.02 * (attempt + 1))
                continue
            if not buf.endswith(b"END\r\n"):
                if mode == b"hash":  # a server without the hash-table walk
                    client.close()
                    mode = b"all"
                    continue
                raise ProtocolError(f"metadump refused: {buf[:80]!r}")
            keys = []
            for line in buf[:-5].split(b"\n"):
                if line.startswith(b"key="):
                    keys.append(unquote(line[4:].split(b" ", 1)[0].decode("ascii")))
            return keys
        raise ProtocolError("the LRU crawler stayed busy")
    finally:
        client.close()


def _readers() -> Any:
    global _READERS
    if _READERS is None:
        from pymemcache.client import base

        _READERS = (base._readline, base._readvalue)
    return _READERS


_READERS: Any = None


class _Exchange:
    """A pipelined meta exchange, as an operation for :meth:`MemcachedCluster._run`."""

    __slots__ = ("count", "payload")

    def __init__(self, payload: bytes, count: int) -> None:
        self.payload = payload
        self.count = count

    def __call__(self, client: Any) -> list[tuple[bytes, list[bytes], bytes | None]]:
        return _exchange(client, self.payload, self.count)


class ProtocolError(Exception):
    """memcached answered something the protocol does not allow here."""


def _stale_connection(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection was closed by the other side (not a timeout)."""
    from pymemcache.exceptions import MemcacheUnexpectedCloseError

    return isinstance(
        exc, (MemcacheUnexpectedCloseError, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
    )


def _answered(exc: BaseException) -> bool:
    """Whether ``exc`` is the server's answer to a request (not a failed connection)."""
    from pymemcache.exceptions import MemcacheClientError, MemcacheServerError, MemcacheUnexpectedCloseError

    return isinstance(exc, (MemcacheServerError, MemcacheClientError)) and not isinstance(
        exc, MemcacheUnexpectedCloseError
    )


def _server_spec(server: str) -> Any:
    if server.startswith("/"):
        return server  # unix socket
    host, sep, port = server.rpartition(":")
    if not sep:
        return (server, 11211)
    return (host.strip("[]"), int(port))


#: Arguments of ``cachedecor.pymemcache`` (and ``dogpile.cache.pymemcache``), with types.
MEMCACHED_ARGUMENTS: dict[str, type] = {
    "url": list,
    "connect_timeout": float,
    "timeout": float,
    "no_delay": bool,
    "dead_timeout": float,
    "hashclient_dead_timeout": float,
    "hashclient_retry_timeout": float,
    "hashclient_retry_attempts": int,
    "enable_retry_client": bool,
    "retry_attempts": int,
    "retry_delay": float,
    "default_noreply": bool,
    "memcached_expire_time": int,
    "distributed_lock": bool,
    "lock_timeout": int,
    "socket_keepalive": object,
    "tls_context": object,
    "invalidation_retry_interval": float,
    "invalidation_retry_for": float,
    "max_pending_invalidations": int,
    "meta_protocol": bool,
}

#: Defaults cachedecor applies where dogpile's backend would wait forever.
MEMCACHED_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 0.25,
    "timeout": 0.25,
    "no_delay": True,
    "dead_timeout": 5.0,
    "hashclient_retry_attempts": 1,
    "retry_attempts": 0,
    "retry_delay": 0.0,
    "invalidation_retry_interval": 0.5,
    "invalidation_retry_for": 300.0,
    "max_pending_invalidations": 10_000,
    "meta_protocol": True,
}


class PyMemcacheBackend(DefaultSerialization, _DogpilePyMemcacheBackend):  # type: ignore[misc]
    """dogpile.cache backend ``cachedecor.pymemcache``: pymemcache with timeouts.

    Accepts dogpile's ``dogpile.cache.pymemcache`` arguments plus ``connect_timeout``,
    ``timeout``, ``no_delay``, ``dead_timeout``, ``retry_attempts``, ``retry_delay``,
    ``invalidation_retry_interval``, ``invalidation_retry_for``,
    ``max_pending_invalidations`` and ``meta_protocol`` (see :doc:`/configuration`
    for types and defaults). Values that dogpile itself
    stores through this backend are pickled by dogpile as with its Redis backend;
    cachedecor's own entries are plain bytes and are never unpickled.
    """

    def __init__(self, arguments: dict[str, Any]) -> None:
        args = {**MEMCACHED_DEFAULTS, **arguments}
        if "dead_timeout" not in arguments:
            # dogpile's names for the same wait, in order of precedence
            for alias in ("hashclient_dead_timeout", "hashclient_retry_timeout"):
                if alias in arguments:
                    args["dead_timeout"] = arguments[alias]
                    break
        super().__init__(  # type: ignore[no-untyped-call]
            {k: v for k, v in args.items() if k not in MEMCACHED_DEFAULTS}
        )
        self.connect_timeout = float(args["connect_timeout"])
        self.timeout = float(args["timeout"])
        self.no_delay = bool(args["no_delay"])
        self.retry_attempts_ = int(args["retry_attempts"]) if args.get("enable_retry_client", True) else 0
        self.retry_delay_ = float(args["retry_delay"] or 0.0)
        self.health = NodeHealth(
            float(args["dead_timeout"]),
            int(args["hashclient_retry_attempts"]),
            retry_interval=float(args["invalidation_retry_interval"]),
            retry_for=float(args["invalidation_retry_for"]),
            max_pending=int(args["max_pending_invalidations"]),
        )
        self.health.client_factory = self._create_client
        self.meta_protocol = bool(args["meta_protocol"])

    def _create_client(self) -> MemcachedCluster:
        kwargs: dict[str, Any] = {
            "serde": _RawSerde(),
            "connect_timeout": self.connect_timeout,
            "timeout": self.timeout,
            "no_delay": self.no_delay,
            "default_noreply": self.default_noreply,
        }
        if self.tls_context is not None:
            kwargs["tls_context"] = self.tls_context
        if self.socket_keepalive is not None:
            kwargs["socket_keepalive"] = self.socket_keepalive
        return MemcachedCluster(
            self.url,
            self.health,
            retry_attempts=self.retry_attempts_,
            retry_delay=self.retry_delay_,
            **kwargs,
        )

    def get_serialized(self, key: str) -> Any:
        value = self.client.get(key)
        return NO_VALUE if value is None else value

    def get_serialized_multi(self, keys: Iterable[str]) -> list[Any]:
        keys = list(keys)
        values = self.client.get_many(keys)
        return [values.get(k, NO_VALUE) for k in keys]

    def set_serialized(self, key: str, value: bytes) -> None:
        self.client.set(key, value, **self.set_arguments)

    def set_serialized_multi(self, mapping: Mapping[str, bytes]) -> None:
        self.client.set_many(dict(mapping), **self.set_arguments)


# --------------------------------------------------------------------------------------
# Store adapters


class Store:
    """The operations cachedecor needs from a backend.

    ``get``/``get_many`` return raw stored bytes (``None``/absent when missing).
    ``lease`` tries to take the fill lease of a missing key and returns a token, or
    ``None`` when the key is present or another reader holds the lease. ``fill``
    writes the value only if the token still holds. Every method may raise; callers
    treat that as the cache being unavailable.
    """

    name = "abstract"

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        raise NotImplementedError

    def lease(self, key: str, ttl: int) -> Any:
        raise NotImplementedError

    def lease_many(self, keys: Sequence[str], ttl: int) -> dict[str, Any]:
        """Leases of several keys; keys whose lease was not taken are left out."""
        out = {}
        for key in keys:
            token = self.lease(key, ttl)
            if token is not None:
                out[key] = token
        return out

    def lookup(self, key: str, ttl: int) -> tuple[bytes | None, Any]:
        """Read ``key``, taking its fill lease if it is missing.

        Returns ``(entry, None)`` on a hit, ``(None, token)`` when the caller now
        holds the lease, and ``(None, None)`` when another reader holds it.
        """
        data = self.get(key)
        if data is None:
            token = self.lease(key, ttl)
            if token is not None:
                return None, token
            data = self.get(key)  # lost the race for the lease: filled, or leased
        if data is not None and not is_lease(data):
            return data, None
        return None, None

    def lookup_many(self, keys: Sequence[str], ttl: int) -> dict[str, tuple[bytes | None, Any]]:
        """:meth:`lookup` of several keys. A partial failure raises :class:`PartialResult`
        whose ``found`` holds every key (failed ones as ``(None, None)``)."""
        error: BaseException | None = None
        try:
            found = self.get_many(keys)
        except PartialResult as exc:  # some nodes failed: no leases, only what was read
            found, error = exc.found, exc.error
        missing = [k for k in keys if k not in found]
        tokens = self.lease_many(missing, ttl) if missing and error is None else {}
        out: dict[str, tuple[bytes | None, Any]] = {}
        for key in keys:
            data = found.get(key)
            out[key] = (data, None) if data is not None and not is_lease(data) else (None, tokens.get(key))
        if error is not None:
            raise PartialResult(out, error)
        return out

    def peek(self, key: str) -> bytes | None:
        """The stored bytes of ``key`` (an entry or a lease marker), without taking a lease."""
        return self.get(key)

    def fill_many(self, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> dict[str, Any]:
        """:meth:`fill` of several keys: key -> True, False, or the exception it raised."""
        out: dict[str, Any] = {}
        for key, value, token in items:
            try:
                out[key] = self.fill(key, value, token, ttl)
            except Exception as exc:
                out[key] = exc
        return out

    def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        raise NotImplementedError

    def release(self, key: str, token: Any) -> None:
        """Give up a lease without filling, so other readers need not wait for it."""
        raise NotImplementedError

    def delete_many(self, keys: Sequence[str]) -> None:
        raise NotImplementedError

    def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        """Delete every key (entries and leases) that one of ``patterns`` matches.

        Returns how many keys were deleted. Slow (it lists the server's keys): for
        model-wide invalidation only.
        """
        raise NotImplementedError


def _memcached_expire(ttl: int | None) -> int:
    if not ttl or ttl <= 0:
        return 0
    if ttl > _MEMCACHED_MAX_RELATIVE:
        return int(time.time()) + ttl
    return ttl


class MemcachedStore(Store):
    """memcached with its meta protocol, falling back to ``add``/``gets``/``cas``.

    With memcached 1.6 meta commands a read takes the lease in the same round trip
    (``mg <key> v c N<ttl>``: a miss creates an empty placeholder and tells exactly
    one client it won), and the fill is ``ms <key> C<cas>``: a miss costs two round
    trips, as plain cache-aside does. Servers without meta commands get the classic
    lease: ``add`` of a marker, ``gets``, then ``cas`` (two more round trips).
    """

    name = "memcached"

    def __init__(self, backend: PyMemcacheBackend) -> None:
        self.backend = backend
        self._clients = backend._clients
        self.meta = bool(backend.meta_protocol)

    @property
    def client(self) -> MemcachedCluster:
        client: MemcachedCluster = self._clients.memcached
        return client

    # -- classic commands (also the fallback) -------------------------------------------

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self._clients.memcached.get(key)
        return value

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        return self._clients.memcached.get_many(keys)  # type: ignore[no-any-return]

    def lease(self, key: str, ttl: int) -> Any:
        client = self.client
        marker = new_lease_marker()
        if not client.add(key, marker, ttl, noreply=False):
            return None
        value, cas = client.gets(key)
        if value != marker:
            return None
        return cas

    def delete_many(self, keys: Sequence[str]) -> None:
        self.client.delete_many(keys, noreply=False)

    def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        """Lists each node's keys with ``lru_crawler metadump`` and deletes the matches.

        A node that cannot be listed is flushed when it can be reached again (its
        deletes are owed, as for any undelivered invalidation).
        """
        client = self.client
        deleted = 0
        failed: BaseException | None = None
        for node in client.servers:
            try:
                keys = [k for k in _metadump(client, node) if any(p.matches(k) for p in patterns)]
            except Exception as exc:
                client.health.owe_flush(node)
                failed = exc
                continue
            for start in range(0, len(keys), 500):
                batch = keys[start : start + 500]
                try:
                    client._call(node, "delete_many", batch, False)
                except Exception as exc:
                    client.health.queue(node, batch)
                    failed = exc
                deleted += len(batch)
        if failed is not None:
            raise UndeliveredInvalidation([repr(p) for p in patterns], failed)
        return deleted

    # -- meta-protocol operations -------------------------------------------------------

    def _unsupported(self) -> None:
        self.meta = False
        log_meta_fallback()

    def lookup(self, key: str, ttl: int) -> tuple[bytes | None, Any]:
        if self.meta:
            try:
                code, flags, value = self.client.meta(key, b"mg %b v c N%d\r\n" % (key.encode(), ttl))
            except MetaUnsupported:
                self._unsupported()
            else:
                return _lookup_result(code, flags, value)
        return super().lookup(key, ttl)

    def lookup_many(self, keys: Sequence[str], ttl: int) -> dict[str, tuple[bytes | None, Any]]:
        if self.meta:
            commands = {k: b"mg %b v c N%d\r\n" % (k.encode(), ttl) for k in keys}
            try:
                replies = self.client.meta_many(commands)
            except MetaUnsupported:
                self._unsupported()
            except PartialResult as exc:
                out = {k: _lookup_result(*r) for k, r in exc.found.items()}
                raise PartialResult({k: out.get(k, (None, None)) for k in keys}, exc.error) from exc.error
            else:
                return {k: _lookup_result(*replies[k]) for k in keys}
        return super().lookup_many(keys, ttl)

    def peek(self, key: str) -> bytes | None:
        if self.meta:
            code, flags, value = self.client.meta(key, b"mg %b v\r\n" % key.encode())
            if code != b"VA":
                return None
            if b"W" in flags or b"Z" in flags or not value:
                return LEASE_PREFIX  # the placeholder of a reader that is filling it
            return value
        return self.get(key)

    def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        if self.meta:
            code, flags, _ = self.client.meta(key, _ms(key, value, token, ttl))
            return _stored(code, flags)
        try:
            return bool(self.client.cas(key, value, token, _memcached_expire(ttl)))
        except Exception as exc:
            if _answered(exc):
                raise ValueRefused(str(exc)) from exc
            raise

    def fill_many(self, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> dict[str, Any]:
        if not self.meta:
            return super().fill_many(items, ttl)
        commands = {key: _ms(key, value, token, ttl) for key, value, token in items}
        try:
            replies = self.client.meta_many(commands)
        except PartialResult as exc:
            replies = exc.found
            failed: dict[str, Any] = {k: exc.error for k in commands if k not in replies}
        else:
            failed = {}
        out: dict[str, Any] = dict(failed)
        for key, (code, flags, _) in replies.items():
            try:
                out[key] = _stored(code, flags)
            except ValueRefused as exc:
                out[key] = exc
        return out

    def release(self, key: str, token: Any) -> None:
        if self.meta:
            self.client.meta(key, b"md %b C%b\r\n" % (key.encode(), _cas_bytes(token)))
            return
        # memcached's classic protocol has no compare-and-delete. Deleting is safe:
        # if the lease is no longer ours the key holds another lease (whose fill then
        # fails) or a fresh entry (which costs one miss).
        self.client.delete(key, noreply=False)


def _cas_bytes(token: Any) -> bytes:
    return token if isinstance(token, bytes) else str(int(token)).encode()


def _ms(key: str, value: bytes, token: Any, ttl: int | None) -> bytes:
    return b"ms %b %d C%b T%d\r\n%b\r\n" % (
        key.encode(),
        len(value),
        _cas_bytes(token),
        _memcached_expire(ttl),
        value,
    )


def _stored(code: bytes, flags: list[bytes]) -> bool:
    if code == b"HD":
        return True
    if code in (b"EX", b"NF", b"NS"):
        return False
    raise ValueRefused(b" ".join([code, *flags]).decode("ascii", "replace"))


def _lookup_result(code: bytes, flags: list[bytes], value: bytes | None) -> tuple[bytes | None, Any]:
    if code != b"VA":
        return None, None  # EN: nothing stored and nothing vivified; read through
    won = lost = False
    cas = None
    for flag in flags:
        if flag == b"W":
            won = True
        elif flag == b"Z":
            lost = True
        elif flag[:1] == b"c":
            cas = flag[1:]
    if won:
        return None, cas
    if lost or not value:
        return None, None
    return value, None


_meta_fallback_logged = False


def log_meta_fallback() -> None:
    global _meta_fallback_logged
    if not _meta_fallback_logged:
        _meta_fallback_logged = True
        from cachedecor.stats import log

        log.warning(
            "memcached does not speak the meta protocol (memcached < 1.6): using add/gets/cas "
            "leases, which cost two more round trips per miss"
        )


class MemoryStore(Store):
    """dogpile's in-process memory backend; expiry and leases kept beside the values."""

    name = "memory"

    def __init__(self, backend: Any) -> None:
        self.cache: dict[str, Any] = backend._cache
        self.lock = threading.Lock()
        _fork_aware.add(self)

    def _after_fork_in_child(self) -> None:
        self.lock = threading.Lock()

    def _live(self, key: str) -> Any:
        item = self.cache.get(key)
        if item is None or type(item) is not tuple or len(item) != 2:
            return None
        value, deadline = item
        if deadline is not None and time.monotonic() >= deadline:
            self.cache.pop(key, None)
            return None
        return value

    def get(self, key: str) -> bytes | None:
        value = self._live(key)
        return value if isinstance(value, bytes) else None

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        out = {}
        for key in keys:
            value = self._live(key)
            if isinstance(value, bytes):
                out[key] = value
        return out

    def lease(self, key: str, ttl: int) -> Any:
        with self.lock:
            if self._live(key) is not None:
                return None
            marker = new_lease_marker()
            self.cache[key] = (marker, time.monotonic() + ttl)
            return marker

    def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        with self.lock:
            if self._live(key) != token:
                return False
            self.cache[key] = (value, time.monotonic() + ttl if ttl else None)
            return True

    def release(self, key: str, token: Any) -> None:
        with self.lock:
            if self._live(key) == token:
                self.cache.pop(key, None)

    def delete_many(self, keys: Sequence[str]) -> None:
        with self.lock:
            for key in keys:
                self.cache.pop(key, None)

    def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        with self.lock:
            keys = [k for k in list(self.cache) if isinstance(k, str) and any(p.matches(k) for p in patterns)]
            for key in keys:
                self.cache.pop(key, None)
        return len(keys)


_REDIS_FILL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if tonumber(ARGV[3]) > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  else
    redis.call('SET', KEYS[1], ARGV[2])
  end
  return 1
end
return 0
"""

_REDIS_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore(Store):
    """Leases with ``SET NX EX`` and compare-and-set scripts for the fill and the release."""

    name = "redis"

    def __init__(self, backend: Any) -> None:
        self.reader = backend.reader_client
        self.writer = backend.writer_client
        self._fill = self.writer.register_script(_REDIS_FILL)
        self._release = self.writer.register_script(_REDIS_RELEASE)

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self.reader.get(key)
        return value

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        return {k: v for k, v in zip(keys, self.reader.mget(keys), strict=True) if v is not None}

    def lease(self, key: str, ttl: int) -> Any:
        marker = new_lease_marker()
        if self.writer.set(key, marker, nx=True, ex=ttl):
            return marker
        return None

    def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        return bool(self._fill(keys=[key], args=[token, value, int(ttl or 0)]))

    def release(self, key: str, token: Any) -> None:
        self._release(keys=[key], args=[token])

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            self.writer.delete(*keys)

    def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        deleted = 0
        for pattern in patterns:
            glob = "".join("\\" + c if c in "*?[]\\" else c for c in pattern.prefix) + "*"
            batch: list[Any] = []
            for key in self.writer.scan_iter(match=glob, count=1000):
                text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
                if not pattern.matches(text):
                    continue
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(self.writer.delete(*batch))
                    batch = []
            if batch:
                deleted += int(self.writer.delete(*batch))
        return deleted


def store_for(backend: Any) -> Store | None:
    """The adapter for a configured dogpile backend, or ``None`` if none fits."""
    from dogpile.cache.backends.memory import MemoryBackend

    if isinstance(backend, PyMemcacheBackend):
        return MemcachedStore(backend)
    if isinstance(backend, MemoryBackend):
        return MemoryStore(backend)
    try:
        from dogpile.cache.backends.redis import RedisBackend
    except ImportError:  # pragma: no cover
        RedisBackend = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(backend, RedisBackend):
        return RedisStore(backend)
    try:
        from dogpile.cache.backends.valkey import ValkeyBackend
    except ImportError:  # pragma: no cover
        ValkeyBackend = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(backend, ValkeyBackend):
        return RedisStore(backend)
    return None
