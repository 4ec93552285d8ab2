"""The :class:`~cachedecor.backends.base.Store` of dogpile's Redis and Valkey backends."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Sequence
from typing import Any

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
        pool = getattr(writer, "connection_pool", None)
        if pool is None:
            raise TypeError(
                f"no asyncio client for {type(writer).__name__} (Redis Cluster is sync only here)"
            )
        kwargs = dict(pool.connection_kwargs)
        library = type(writer).__module__.split(".")[0]  # redis, or valkey
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
        values = await self._client().client.mget(keys)
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    async def lease(self, key: str, ttl: int) -> Any:
        marker = new_lease_marker()
        if await self._client().client.set(key, marker, nx=True, ex=ttl):
            return marker
        return None

    async def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        return bool(await self._client().fill(keys=[key], args=[token, value, int(ttl or 0)]))

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
