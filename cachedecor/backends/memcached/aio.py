"""The asyncio transport for memcached: the cluster of :mod:`.cluster`, driven by an event loop.

It sends the bytes :mod:`.protocol` builds and parses replies with the same
:class:`~cachedecor.backends.memcached.protocol.ReplyParser` as the threaded
transport; keys are placed by the same rendezvous hashing over the same server
list (a key lives on the same node for sync and async callers); and it can share
the sync cluster's :class:`~cachedecor.backends.memcached.cluster.NodeHealth`, so
that a node marked down, or owed deletes, is so for both. Nothing here blocks the
loop: sockets are non-blocking and waited on by the loop, timeouts are the
loop's. ``NodeHealth``'s lock is a thread lock, held only for dictionary updates,
which is short enough to take on the loop; its retry thread (started only when a
sync backend set its ``client_factory``) delivers owed deletes off the loop.

Connections: a small pool per node per event loop (``max_connections``, opened on
demand), per process (a forked child closes its copies of the parent's sockets
and opens its own). A connection whose exchange failed, timed out or was
cancelled is closed, never reused out of step.

Libraries weighed, none of which gives leases, asyncio and clusters together:

- aiomcache: classic commands only (``gets``/``cas``, no meta commands, so a
  lookup cannot take the lease in its own round trip), one host per client.
- emcache: rendezvous hashing and a connection pool, but no meta commands, and a
  Cython extension to build.
- memcache 0.14: meta commands, but its async API is marked experimental and it
  pins ``anyio<4``, which clashes with FastAPI's anyio 4.
- meta-memcache: meta commands and clusters, sync only.

What is left here is small: connection pooling, timeouts, and the same failure
handling as :meth:`MemcachedCluster._run` (a connection the server closed while
idle is retried once on a new one; a new connection closed under a meta command by
a server that answers classic ones is a proxy without meta commands).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import sys
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

from cachedecor.backends.base import PartialResult, UndeliveredInvalidation, register_fork_aware
from cachedecor.backends.memcached.cluster import (
    ON_THEIR_WAY,
    NodeDown,
    NodeHealth,
    RendezvousPlacement,
    Routing,
)
from cachedecor.backends.memcached.protocol import (
    PROBE,
    ConnectionClosed,
    ErrorReply,
    MetaUnsupported,
    Reply,
    ReplyParser,
    classic_delete,
    classic_get,
    classic_store,
    fill_outcomes,
    fill_result,
    lookup_result,
    md_release,
    mg_lookup,
    mg_peek,
    ms_fill,
    peek_result,
    probe_verdict,
    server_spec,
    stale_connection,
)

__all__ = ["AsyncMemcachedCluster", "Item"]

_T = TypeVar("_T")
_RECV_SIZE = 1 << 16


class Item(NamedTuple):
    """A value read with a classic ``get``/``gets``: its bytes, pymemcache flags and cas."""

    value: bytes
    flags: int
    cas: bytes | None


async def _within(awaitable: Awaitable[_T], seconds: float | None, what: str) -> _T:
    """``await awaitable``, raising :class:`TimeoutError` (naming ``what``) after ``seconds``."""
    if not seconds:
        return await awaitable
    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(seconds):
                return await awaitable
        else:
            return await asyncio.wait_for(awaitable, seconds)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{what}: no answer within {seconds}s") from None


class _Pool:
    """One node's connections in one event loop, and the delivery of its owed deletes
    under way in that loop (which every other call to the node waits for)."""

    __slots__ = ("delivery", "idle", "slots")

    def __init__(self, size: int) -> None:
        self.idle: list[socket.socket] = []
        self.slots = asyncio.Semaphore(size)
        self.delivery: asyncio.Future[None] | None = None

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class AsyncMemcachedCluster:
    """memcached nodes for asyncio callers: meta commands pipelined per node, classic fallback.

    ``servers`` and the placement are those of
    :class:`~cachedecor.backends.memcached.cluster.MemcachedCluster`; pass its
    ``health`` to share the circuit breaker and the deletes owed to a node. While a
    node is down, calls for its keys raise :class:`NodeDown` at once. A connect
    that takes longer than ``connect_timeout``, or an exchange longer than
    ``timeout``, raises :class:`TimeoutError` and counts as a failure of the node.
    A call that finds every connection of its loop busy waits for one: a read or a
    fill at most ``timeout`` (then :class:`TimeoutError`), a delete until one is
    free. That wait says something about the loop, not the node, and never counts
    as a failure of the node.
    """

    def __init__(
        self,
        servers: Sequence[str],
        health: NodeHealth | None = None,
        *,
        routing: Routing | None = None,
        connect_timeout: float | None = 1.0,
        timeout: float | None = 1.0,
        max_connections: int = 4,
        dead_timeout: float = 30.0,
    ) -> None:
        self.routing = routing if routing is not None else Routing(RendezvousPlacement(servers))
        self.servers = list(servers)
        self.health = health if health is not None else NodeHealth(dead_timeout)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_connections = max(1, max_connections)
        self._addresses = {s: server_spec(s) for s in self.routing.nodes}
        self._pools: dict[asyncio.AbstractEventLoop, dict[str, _Pool]] = {}
        register_fork_aware(self)

    def _after_fork_in_child(self) -> None:
        for pools in self._pools.values():
            for pool in pools.values():
                pool.close()  # the child's copies only: the parent's connections stay open
        self._pools = {}

    # -- routing -----------------------------------------------------------------------

    def node_for(self, key: str) -> str:
        """The server (``host:port``) that owns ``key``, as for the sync cluster."""
        return self.routing.current.node_for(key)

    def _by_node(self, keys: Iterable[str]) -> dict[str, list[str]]:
        return self.routing.by_node(keys)

    # -- connections -------------------------------------------------------------------

    def _pool(self, loop: asyncio.AbstractEventLoop, node: str) -> _Pool:
        pools = self._pools.get(loop)
        if pools is None:
            for old in [old for old in list(self._pools) if old.is_closed()]:
                for stale in self._pools.pop(old, {}).values():
                    stale.close()  # a finished loop's: nothing of it is in flight
            pools = self._pools[loop] = {}
        pool = pools.get(node)
        if pool is None:
            pool = pools[node] = _Pool(self.max_connections)
        return pool

    async def _connect(self, loop: asyncio.AbstractEventLoop, node: str) -> socket.socket:
        address = self._addresses[node]
        target: Any
        if isinstance(address, str):
            family, kind, proto, target = socket.AF_UNIX, socket.SOCK_STREAM, 0, address
        else:
            infos = await loop.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)
            family, kind, proto, _, target = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, target)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    async def _exchange(
        loop: asyncio.AbstractEventLoop, sock: socket.socket, payload: bytes, parser: ReplyParser
    ) -> list[Reply]:
        await loop.sock_sendall(sock, payload)
        while not parser.done:
            data = await loop.sock_recv(sock, _RECV_SIZE)
            if not data:
                raise ConnectionClosed("memcached closed the connection before it had answered")
            parser.feed(data)
        return parser.replies

    async def _run(
        self,
        node: str,
        payload: bytes,
        count: int,
        *,
        classic: bool = False,
        owed: bool = True,
        patient: bool = False,
    ) -> list[Reply]:
        """Send ``payload`` (``count`` commands) to ``node`` and return its replies.

        What the node is owed is delivered first (``owed=False``: this is that delivery).
        When every connection of this loop to the node is busy, the call waits for one:
        at most ``timeout``, or (``patient``, for deletes) as long as the calls holding
        them take, each bounded by the timeout. Either wait is the loop's business, not
        the node's: it never counts as a failure of the node.
        """
        health = self.health
        if health.is_down(node):
            raise NodeDown(f"memcached node {node} is marked down")
        loop = asyncio.get_running_loop()
        pool = self._pool(loop, node)
        if owed and (pool.delivery is not None or health.owes(node)):
            await self._settle(loop, pool, node)
        if pool.slots.locked():  # every connection busy: wait for one
            if patient:
                await pool.slots.acquire()
            else:
                await _within(
                    pool.slots.acquire(), self.timeout, f"memcached node {node} (no free connection)"
                )
            if health.is_down(node):
                # marked down while this call waited (the calls before it failed): it
                # fails at once, as a call that arrives now does, not after a timeout more
                pool.slots.release()
                raise NodeDown(f"memcached node {node} is marked down")
        else:
            await pool.slots.acquire()  # returns at once
        try:
            while True:
                sock = pool.idle.pop() if pool.idle else None
                reused = sock is not None
                try:
                    if sock is None:
                        sock = await _within(
                            self._connect(loop, node), self.connect_timeout, f"connecting to memcached {node}"
                        )
                    parser = ReplyParser(count, classic=classic)
                    replies = await _within(
                        self._exchange(loop, sock, payload, parser), self.timeout, f"memcached node {node}"
                    )
                except BaseException as exc:
                    if sock is not None:
                        sock.close()  # out of step: never reused
                    if isinstance(exc, MetaUnsupported) or not isinstance(exc, Exception):
                        raise  # the server answered; or this task was cancelled
                    if reused and stale_connection(exc):
                        # closed by the server while idle (a restart, an idle timeout): so
                        # are the others of this pool; one retry on a new connection
                        pool.close()
                        continue
                    if not classic and stale_connection(exc) and await self._answers_classic(loop, node):
                        raise MetaUnsupported(
                            "the server closed the connection on a meta command and answers classic "
                            "commands: a proxy without meta commands (such as twemproxy)"
                        ) from exc
                    health.failed(node)
                    raise
                health.succeeded(node)
                pool.idle.append(sock)
                return replies
        finally:
            pool.slots.release()

    async def _answers_classic(self, loop: asyncio.AbstractEventLoop, node: str) -> bool:
        """Whether a new connection to ``node`` answers a classic ``get`` (then closed)."""

        async def probe() -> bool:
            sock = await self._connect(loop, node)
            try:
                await loop.sock_sendall(sock, PROBE)
                received = b""
                while (verdict := probe_verdict(received)) is None:
                    data = await loop.sock_recv(sock, _RECV_SIZE)
                    if not data:
                        return False
                    received += data
                return verdict
            finally:
                sock.close()

        try:
            return await _within(probe(), self.timeout, f"memcached node {node}")
        except Exception:
            return False

    async def _settle(self, loop: asyncio.AbstractEventLoop, pool: _Pool, node: str) -> None:
        """Deliver what ``node`` is owed before anything else is sent to it.

        The deletes leave the queue when their delivery starts, so a call that only
        looked at the queue could read the node while they are still on their way. The
        calls of this loop therefore wait for the one delivery under way, started by the
        first of them, and fail with it if it fails (each call costs at most one
        timeout). The delivery runs as a task of its own: a caller that is cancelled
        does not cancel it for the others.
        """
        while True:
            delivery = pool.delivery
            if delivery is not None and delivery.done():
                # ended, and its done-callback (which clears it) has not run yet: awaiting
                # a finished future does not yield, so this loop would never let it run
                pool.delivery = delivery = None
            if delivery is None:
                if not self.health.owes(node):
                    return
                delivery = pool.delivery = loop.create_task(self.deliver(node))
                delivery.add_done_callback(functools.partial(_delivered, pool))
            # every pass awaits a delivery that has not ended (a task started above runs
            # only after this suspends): each one suspends the caller
            await asyncio.shield(delivery)

    async def _classic(
        self, node: str, payload: bytes, count: int = 1, *, owed: bool = True, patient: bool = False
    ) -> list[Reply]:
        """Classic commands: error lines raise :class:`ErrorReply` (the connection is fine)."""
        replies = await self._run(node, payload, count, classic=True, owed=owed, patient=patient)
        for code, tokens, _ in replies:
            if code in (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"):
                raise ErrorReply(b" ".join([code, *tokens]).decode("ascii", "replace"))
        return replies

    async def deliver(self, node: str) -> None:
        """Deliver the deletes (or flush) ``node`` is owed; on failure requeue and raise.

        When another thread (the sync retry thread, a sync caller) has taken them and
        they are on their way, wait for them to land (up to ``timeout``).
        """
        health = self.health
        deadline = time.monotonic() + (self.timeout or 1.0)
        while (claimed := health.claim(node)) is ON_THEIR_WAY:
            if time.monotonic() > deadline:
                raise TimeoutError(f"deletes owed to memcached node {node} are still on their way")
            await asyncio.sleep(0.001)
        if claimed is None:
            return
        flush, pending = claimed
        payload = b"flush_all\r\n" if flush else b"".join(classic_delete(k) for k in pending)
        try:
            await self._classic(node, payload, 1 if flush else len(pending), owed=False, patient=True)
        except Exception:
            health.give_back(node, flush, pending)
            health.failed(node)
            raise
        except BaseException:  # cancelled: back in the queue, the node is not at fault
            health.give_back(node, flush, pending)
            raise
        health.landed(node)

    async def aclose(self) -> None:
        """Close the running event loop's idle connections; the next call opens new ones.

        Call it when no call of this loop is in flight (at shutdown): a connection in
        use is not in the pool, and is left for the garbage collector to close.
        """
        for pool in self._pools.pop(asyncio.get_running_loop(), {}).values():
            pool.close()

    # -- meta commands -----------------------------------------------------------------

    async def meta(self, key: str, command: bytes) -> Reply:
        """Send one meta command for ``key`` and return its reply (code, flags, value)."""
        return (await self._run(self.node_for(key), command, 1))[0]

    async def meta_many(self, commands: dict[str, bytes]) -> dict[str, Reply]:
        """One meta command per key, pipelined per node, the nodes concurrently.

        A failing node raises :class:`PartialResult` (after the others) holding the
        replies of the others; :class:`MetaUnsupported` is raised as such.
        """
        groups = self._by_node(commands)
        results = await _each(
            self._run(node, b"".join(commands[k] for k in group), len(group))
            for node, group in groups.items()
        )
        out: dict[str, Reply] = {}
        error: BaseException | None = None
        for group, result in zip(groups.values(), results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, MetaUnsupported):
                    raise result
                error = result
                continue
            out.update(zip(group, result, strict=True))
        if error is not None:
            raise PartialResult(out, error)
        return out

    async def lookup(self, key: str, ttl: int) -> tuple[bytes | None, Any]:
        """``mg <key> v c N<ttl>``: ``(entry, None)``, ``(None, lease token)`` or ``(None, None)``."""
        return lookup_result(*await self.meta(key, mg_lookup(key, ttl)))

    async def lookup_many(self, keys: Sequence[str], ttl: int) -> dict[str, tuple[bytes | None, Any]]:
        """:meth:`lookup` of several keys (:class:`PartialResult` holds the replies that came)."""
        try:
            replies = await self.meta_many({k: mg_lookup(k, ttl) for k in keys})
        except PartialResult as exc:
            out = {k: lookup_result(*r) for k, r in exc.found.items()}
            raise PartialResult({k: out.get(k, (None, None)) for k in keys}, exc.error) from exc.error
        return {k: lookup_result(*replies[k]) for k in keys}

    async def peek(self, key: str) -> bytes | None:
        """The stored bytes of ``key`` (an entry, or a lease marker), taking no lease."""
        return peek_result(*await self.meta(key, mg_peek(key)))

    async def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        """``ms <key> C<cas>``: store ``value`` only while lease ``token`` holds."""
        code, flags, _ = await self.meta(key, ms_fill(key, value, token, ttl))
        return fill_result(code, flags)

    async def fill_many(self, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> dict[str, Any]:
        """:meth:`fill` of several keys: key -> True, False, or the exception it raised."""
        commands = {key: ms_fill(key, value, token, ttl) for key, value, token in items}
        try:
            return fill_outcomes(commands, await self.meta_many(commands), None)
        except PartialResult as exc:
            return fill_outcomes(commands, exc.found, exc.error)

    async def release(self, key: str, token: Any) -> None:
        """``md <key> C<cas>``: give up a lease without filling."""
        await self.meta(key, md_release(key, token))

    # -- classic commands (the fallback, and deletes) -----------------------------------

    async def get(self, key: str) -> Item | None:
        return _items(await self._classic(self.node_for(key), classic_get([key]))).get(key)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Item]:
        """Items of the keys that are present. A failing node raises :class:`PartialResult`."""
        groups = self._by_node(keys)
        results = await _each(self._classic(node, classic_get(group)) for node, group in groups.items())
        out: dict[str, Item] = {}
        error: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                error = result
                continue
            out.update(_items(result))
        if error is not None:
            raise PartialResult(out, error)
        return out

    async def gets(self, key: str) -> Item | None:
        """The item of ``key`` with its cas token (``None`` when absent)."""
        return _items(await self._classic(self.node_for(key), classic_get([key], cas=True))).get(key)

    async def add(self, key: str, value: bytes, expire: int = 0, flags: int = 0) -> bool:
        """Store ``value`` if ``key`` is absent; whether it was stored."""
        replies = await self._classic(self.node_for(key), classic_store(b"add", key, value, flags, expire))
        return replies[0][0] == b"STORED"

    async def cas(self, key: str, value: bytes, cas: Any, expire: int = 0, flags: int = 0) -> bool | None:
        """Store ``value`` if ``key``'s cas is still ``cas``: True, False (it changed), None (gone)."""
        payload = classic_store(b"cas", key, value, flags, expire, cas)
        code = (await self._classic(self.node_for(key), payload))[0][0]
        return True if code == b"STORED" else None if code == b"NOT_FOUND" else False

    async def delete(self, key: str) -> None:
        await self.delete_many([key])

    async def delete_many(self, keys: Iterable[str]) -> None:
        """Delete keys; those of unreachable nodes are queued (in :attr:`health`) and reported
        with :class:`UndeliveredInvalidation`. A call cancelled before every node had
        answered (waiting for a connection, or for its reply) queues every key before the
        cancellation propagates: a delete sent twice costs a round trip, one dropped a
        stale entry until it expires."""
        groups = self.routing.delete_groups(keys)
        try:
            results = await _each(
                self._classic(node, b"".join(classic_delete(k) for k in group), len(group), patient=True)
                for node, group in groups.items()
            )
        except BaseException:  # cancelled: owed to the nodes, delivered before they are read
            for node, group in groups.items():
                self.health.queue(node, group)
            raise
        error: BaseException | None = None
        queued: list[str] = []
        for (node, group), result in zip(groups.items(), results, strict=True):
            if isinstance(result, BaseException):
                self.health.queue(node, group)
                queued += group
                error = result
        if error is not None:
            raise UndeliveredInvalidation(queued, error)


async def _each(calls: Iterable[Awaitable[_T]]) -> list[_T | Exception]:
    """Await one call per node, concurrently: each one's result or the exception it raised.

    A cancellation (or any other :class:`BaseException`) is raised, not returned.
    """
    pending = list(calls)
    if len(pending) == 1:  # one node: no task to create
        try:
            return [await pending[0]]
        except Exception as exc:
            return [exc]
    results = await asyncio.gather(*pending, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result
    return results  # type: ignore[return-value]


def _delivered(pool: _Pool, delivery: asyncio.Future[None]) -> None:
    """The delivery of a node's owed deletes ended: the next call may start another."""
    if pool.delivery is delivery:
        pool.delivery = None
    if not delivery.cancelled():
        delivery.exception()  # retrieved: a failure is the waiting callers' to raise


def _items(replies: list[Reply]) -> dict[str, Item]:
    out: dict[str, Item] = {}
    for code, tokens, value in replies:
        if code == b"VALUE" and value is not None:
            cas = tokens[2] if len(tokens) > 2 else None
            out[tokens[0].decode()] = Item(value, int(tokens[1]), cas)
    return out
