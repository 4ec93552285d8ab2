"""The :class:`~cachedecor.backends.base.Store` of dogpile's Redis and Valkey backends.

One store for a single node and for a cluster (``dogpile.cache.redis_cluster``,
``valkey_cluster``). Reads, leases and fills of several keys go through one
pipeline: on a single node one round trip; on a cluster redis-py's cluster pipeline
groups the commands by the node of each key's slot and writes to every node before
reading, so one round trip per node touched. A plain ``MGET`` of keys in several
slots is refused by the cluster client (``all keys must map to the same key slot``):
both stores send one batch of ``GET`` per master (:func:`_get_by_node`) and fall
back to ``mget_nonatomic`` (one ``MGET`` per slot, in one pipeline) on any error. Deletes of
many keys are split by slot by the cluster client itself, in one pipeline; the fill
and release scripts take one key each, so ``EVALSHA`` is routed by it; model-wide
deletes ``SCAN`` every master. The bulk read always asks the masters, where
leases and fills are written; other reads follow the client's ``read_from_replicas``
(off by default).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

from cachedecor.backends.base import AsyncStore, Store, new_lease_marker, register_fork_aware
from cachedecor.keys import KeyPattern

__all__ = ["AsyncRedisStore", "RedisStore"]


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


def _is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis (or Valkey) Cluster client, sync or asyncio."""
    return hasattr(client, "mget_nonatomic")


def _queue_leases(pipe: Any, keys: Sequence[str], ttl: int) -> list[bytes]:
    """Queue a ``SET NX EX`` lease for each key on ``pipe``; the markers, in order."""
    markers = [new_lease_marker() for _ in keys]
    for key, marker in zip(keys, markers, strict=True):
        pipe.set(key, marker, nx=True, ex=ttl)
    return markers


def _leases(keys: Sequence[str], markers: Sequence[bytes], replies: Sequence[Any]) -> dict[str, Any]:
    """The leases taken, from the replies of :func:`_queue_leases`'s pipeline."""
    return {key: marker for key, marker, taken in zip(keys, markers, replies, strict=True) if taken}


def _queue_fills(pipe: Any, sha: str, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> None:
    """Queue the fill script (``EVALSHA``, routed by its one key) for each item on ``pipe``."""
    for key, value, token in items:
        pipe.evalsha(sha, 1, key, token, value, int(ttl or 0))


class _Fills(NamedTuple):
    """What a pipeline of fills answered: key -> True/False/exception, and the items
    whose node did not know the script yet (to fill one by one, which loads it)."""

    done: dict[str, Any]
    unloaded: list[tuple[str, bytes, Any]]


def _fills(items: Sequence[tuple[str, bytes, Any]], replies: Sequence[Any], no_script: type) -> _Fills:
    done: dict[str, Any] = {}
    unloaded = []
    for item, reply in zip(items, replies, strict=True):
        if isinstance(reply, no_script):
            unloaded.append(item)
        else:
            done[item[0]] = reply if isinstance(reply, Exception) else bool(reply)
    return _Fills(done, unloaded)


def _found(keys: Sequence[str], values: Sequence[Any]) -> dict[str, bytes]:
    return {k: v for k, v in zip(keys, values, strict=True) if v is not None}


def _mget(client: Any, keys: Sequence[str]) -> dict[str, bytes]:
    return _found(keys, client.mget(keys))


def _by_node(client: Any, keys: Sequence[str]) -> list[tuple[Any, list[str]]]:
    """``keys`` grouped by the master of their slot, in the cluster client's slot table
    (sync or asyncio): ``(node, keys)`` pairs. Raises if a slot has no known node."""
    batches: dict[str, tuple[Any, list[str]]] = {}
    slots = client.nodes_manager
    for key in keys:
        node = slots.get_node_from_slot(client.keyslot(key))
        batches.setdefault(node.name, (node, []))[1].append(key)
    return list(batches.values())


def _gets(connection: Any, keys: Sequence[str]) -> Any:
    """The packed ``GET`` of each key, for ``connection.send_packed_command``."""
    return connection.pack_commands([("GET", key) for key in keys])


def _rerouted(client: Any, keys: Sequence[str]) -> Any:
    """``mget_nonatomic``, tried twice: after a master died, redis-py's cluster pipeline
    raises ``ConnectionError`` for it and only asks for a new slot table, which the next
    command fetches first. Measured (tests/test_redis_cluster.py, TestFailover): with one
    try, the first bulk read after a failover went to the database; with two, it hit."""
    try:
        return client.mget_nonatomic(keys)
    except Exception:
        return client.mget_nonatomic(keys)


async def _arerouted(client: Any, keys: Sequence[str]) -> Any:
    """:func:`_rerouted` on an asyncio cluster client."""
    try:
        return await client.mget_nonatomic(keys)
    except Exception:
        return await client.mget_nonatomic(keys)


def _get_by_node(client: Any, keys: Sequence[str]) -> dict[str, bytes]:
    """``GET`` of ``keys`` on a sync cluster client: one batch per master holding them,
    written to every master before any reply is read, so one round trip per master.

    The plain way, ``mget_nonatomic`` (one ``MGET`` per slot through redis-py's cluster
    pipeline), costs the same round trips but routes each command again: measured on a
    local 3-master cluster (2 vCPUs, 100 keys of 200 bytes, alternated runs), 1,055 us
    against 587 us here and 306 us for one ``MGET`` on one node; through
    ``@cached_by_pk(many=True)`` 1.81x one node instead of 1.28-1.51x. Keys are routed
    by the client's slot table to masters (leases and fills are written there). Any
    error (a slot moved: ``MOVED``/``ASK``, a node down) drops the connections left
    mid-reply and reads again through ``mget_nonatomic``, which follows redirections
    and refreshes the slot table.
    """
    sent: list[tuple[Any, Any, list[str]]] = []
    unread = set()
    try:
        for node, batch in _by_node(client, keys):
            pool = client.get_redis_connection(node).connection_pool
            connection = pool.get_connection()
            sent.append((pool, connection, batch))
            unread.add(connection)
            connection.send_packed_command(_gets(connection, batch))
        out: dict[str, bytes] = {}
        for _, connection, batch in sent:
            for key in batch:
                value = connection.read_response()
                if value is not None:
                    out[key] = value
            unread.discard(connection)
        return out
    except Exception:
        return _found(keys, _rerouted(client, keys))
    finally:
        for pool, connection, _ in sent:
            if connection in unread:  # its pending replies would answer the next caller
                connection.disconnect()
            pool.release(connection)


async def _aget_by_node(client: Any, keys: Sequence[str]) -> dict[str, bytes]:
    """:func:`_get_by_node` on an asyncio cluster client. Measured as there, through
    ``many=True`` of 100 keys: ``mget_nonatomic`` 2.21x one node, this way 1.52-1.80x."""
    sent: list[tuple[Any, Any, list[str]]] = []
    unread = set()
    try:
        await client.initialize()  # the slot table, on a new loop's first call (then a no-op)
        for node, batch in _by_node(client, keys):
            connection = node.acquire_connection()
            sent.append((node, connection, batch))
            unread.add(connection)
            await connection.send_packed_command(_gets(connection, batch))
        out: dict[str, bytes] = {}
        for _, connection, batch in sent:
            for key in batch:
                value = await connection.read_response()
                if value is not None:
                    out[key] = value
            unread.discard(connection)
        return out
    except Exception:
        return _found(keys, await _arerouted(client, keys))
    finally:
        for node, connection, _ in sent:
            if connection in unread:  # also when cancelled: the node disconnects it on release
                connection.mark_for_reconnect()
            node.release(connection)


def _retry_chosen(backend: Any) -> bool:
    """Whether the user chose the cluster client's retries (in ``connection_kwargs``)."""
    return bool({"retry", "cluster_error_retry_attempts"} & set(backend.connection_kwargs or ()))


def _no_retry(module: str, library: str) -> Any:
    """A ``Retry`` (of ``module``: ``redis.retry``, ``redis.asyncio.retry``, ...) that tries
    a command three times without backoff, the cluster clients' retry unless the user chose
    one. redis-py's cluster client retries 3 times after a timeout or a refused connection,
    with backoffs of up to 1, 2 and 4 seconds: measured on the local cluster with
    ``socket_timeout=0.25``, a ``GET`` of a key on a paused master raised after 6.6 s
    (7.0 s for a ``SET``); without backoff, after 0.75 s (0.25 s tried once, 0.50 s twice).
    The retries stay because redis-py refreshes its slot table between tries: the
    failover test's first bulk read after a promotion needs them (it went to the database
    in 2 runs of 5 with one retry, as in 1 of 4 with redis-py's default; flaky either way)."""
    backoff = importlib.import_module(f"{library}.backoff").NoBackoff()
    return importlib.import_module(module).Retry(backoff, 2)


class RedisStore(Store):
    """Leases with ``SET NX EX`` and compare-and-set scripts for the fill and the release."""

    name = "redis"

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.reader = backend.reader_client
        self.writer = backend.writer_client
        #: a Redis/Valkey Cluster client: several keys are read per slot, in one pipeline
        self.cluster = _is_cluster(self.reader)
        self._get_many = partial(_get_by_node if self.cluster else _mget, self.reader)
        self._fill = self.writer.register_script(_REDIS_FILL)
        self._release = self.writer.register_script(_REDIS_RELEASE)
        library = type(self.writer).__module__.split(".")[0]  # redis, or valkey
        self._no_script: type = importlib.import_module(f"{library}.exceptions").NoScriptError
        if self.cluster and not _retry_chosen(backend):
            self.writer.set_retry(_no_retry(f"{library}.retry", library))

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self.reader.get(key)
        return value

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        found: dict[str, bytes] = self._get_many(keys)
        return found

    def lease(self, key: str, ttl: int) -> Any:
        marker = new_lease_marker()
        if self.writer.set(key, marker, nx=True, ex=ttl):
            return marker
        return None

    def lease_many(self, keys: Sequence[str], ttl: int) -> dict[str, Any]:
        if len(keys) < 2:
            return super().lease_many(keys, ttl)
        pipe = self.writer.pipeline(transaction=False)
        markers = _queue_leases(pipe, keys, ttl)
        return _leases(keys, markers, pipe.execute())

    def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        return bool(self._fill(keys=[key], args=[token, value, int(ttl or 0)]))

    def fill_many(self, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> dict[str, Any]:
        if len(items) < 2:
            return super().fill_many(items, ttl)
        pipe = self.writer.pipeline(transaction=False)
        _queue_fills(pipe, self._fill.sha, items, ttl)
        done, unloaded = _fills(items, pipe.execute(raise_on_error=False), self._no_script)
        return {**done, **super().fill_many(unloaded, ttl)}

    def release(self, key: str, token: Any) -> None:
        self._release(keys=[key], args=[token])

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            self.writer.delete(*keys)

    def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        deleted = 0
        for pattern in patterns:
            glob = _glob(pattern)
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


def _glob(pattern: KeyPattern) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in pattern.prefix) + "*"


def _cluster_connector(library: str, class_name: str, backend: Any) -> Any:
    """A function making an asyncio cluster client (``RedisCluster``, ``ValkeyCluster``)
    as dogpile made the sync one: from the backend's ``url`` or ``startup_nodes``, with
    its ``connection_kwargs``."""
    cluster = importlib.import_module(f"{library}.asyncio.cluster")
    client_class = getattr(cluster, class_name)
    url = backend.url
    kwargs = dict(backend.connection_kwargs)
    if not _retry_chosen(backend):
        kwargs["retry"] = _no_retry(f"{library}.asyncio.retry", library)
    nodes = [cluster.ClusterNode(node.host, node.port) for node in backend.startup_nodes or ()]

    def connect() -> Any:
        if url is not None:
            return client_class.from_url(url, **kwargs)
        return client_class(startup_nodes=nodes, **kwargs)

    return connect


class _LoopClient:
    """The asyncio client of one event loop, with its scripts."""

    __slots__ = ("client", "fill", "release")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.fill = client.register_script(_REDIS_FILL)
        self.release = client.register_script(_REDIS_RELEASE)


class AsyncRedisStore(AsyncStore):
    """:class:`RedisStore` for asyncio callers, on ``redis.asyncio`` (or ``valkey.asyncio``).

    Its clients connect with the connection settings of the region's sync client
    (host, port, database, credentials, ``socket_timeout``, ...), one client per event
    loop and per process, so the same keys and leases serve both kinds of caller.
    """

    name = "redis"

    def __init__(self, store: RedisStore) -> None:
        self.sync = store
        self._connect: Any = None
        self._clients: dict[asyncio.AbstractEventLoop, _LoopClient] = {}
        register_fork_aware(self)

    def _after_fork_in_child(self) -> None:
        self._clients = {}  # the parent's connections are left to the parent

    def _connector(self) -> Any:
        """A function making a client like the sync one (same settings), for this loop."""
        writer = self.sync.writer
        library = type(writer).__module__.split(".")[0]  # redis, or valkey
        if self.sync.cluster:
            return _cluster_connector(library, type(writer).__name__, self.sync.backend)
        pool = getattr(writer, "connection_pool", None)
        if pool is None:
            raise TypeError(f"no asyncio client for {type(writer).__name__}")
        kwargs = dict(pool.connection_kwargs)
        aio = importlib.import_module(f"{library}.asyncio")
        connection = importlib.import_module(f"{library}.asyncio.connection")
        sync_class = pool.connection_class.__name__
        if "path" in kwargs or "Unix" in sync_class:
            kwargs["connection_class"] = connection.UnixDomainSocketConnection
        elif "SSL" in sync_class:
            kwargs["connection_class"] = connection.SSLConnection

        def connect() -> Any:
            return aio.Redis(connection_pool=aio.ConnectionPool(**kwargs))

        return connect

    def _client(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [old for old in self._clients if old.is_closed()]:
                del self._clients[old]
            if self._connect is None:
                self._connect = self._connector()
            client = self._clients[loop] = _LoopClient(self._connect())
        return client

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._client().client.get(key)
        return value

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        client = self._client().client
        if self.sync.cluster:
            return await _aget_by_node(client, keys)
        return _found(keys, await client.mget(keys))

    async def lease(self, key: str, ttl: int) -> Any:
        marker = new_lease_marker()
        if await self._client().client.set(key, marker, nx=True, ex=ttl):
            return marker
        return None

    async def lease_many(self, keys: Sequence[str], ttl: int) -> dict[str, Any]:
        if len(keys) < 2:
            return await super().lease_many(keys, ttl)
        pipe = self._client().client.pipeline(transaction=False)
        markers = _queue_leases(pipe, keys, ttl)
        return _leases(keys, markers, await pipe.execute())

    async def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        return bool(await self._client().fill(keys=[key], args=[token, value, int(ttl or 0)]))

    async def fill_many(self, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> dict[str, Any]:
        if len(items) < 2:
            return await super().fill_many(items, ttl)
        pipe = self._client().client.pipeline(transaction=False)
        _queue_fills(pipe, self.sync._fill.sha, items, ttl)
        done, unloaded = _fills(items, await pipe.execute(raise_on_error=False), self.sync._no_script)
        return {**done, **await super().fill_many(unloaded, ttl)}

    async def release(self, key: str, token: Any) -> None:
        await self._client().release(keys=[key], args=[token])

    async def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            await self._client().client.delete(*keys)

    async def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        client = self._client().client
        deleted = 0
        for pattern in patterns:
            batch: list[Any] = []
            async for key in client.scan_iter(match=_glob(pattern), count=1000):
                text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
                if not pattern.matches(text):
                    continue
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(await client.delete(*batch))
                    batch = []
            if batch:
                deleted += int(await client.delete(*batch))
        return deleted

    async def aclose(self) -> None:
        """Close the running event loop's client."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.client.aclose()
