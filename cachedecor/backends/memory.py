"""The :class:`~cachedecor.backends.base.Store` of dogpile's in-process memory backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from cachedecor.backends.base import AsyncStore, Store, new_lease_marker, register_fork_aware
from cachedecor.keys import KeyPattern

__all__ = ["AsyncMemoryStore", "MemoryStore"]


class MemoryStore(Store):
    """dogpile's in-process memory backend; expiry and leases kept beside the values."""

    name = "memory"

    def __init__(self, backend: Any) -> None:
        self.cache: dict[str, Any] = backend._cache
        self.lock = threading.Lock()
        register_fork_aware(self)

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


class AsyncMemoryStore(AsyncStore):
    """The :class:`MemoryStore` of a region, for asyncio callers.

    Its operations update a dictionary under a lock held for that update only, so
    they run on the event loop directly; they share entries and leases with the
    region's sync callers.
    """

    name = "memory"

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def get(self, key: str) -> bytes | None:
        return self.store.get(key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        return self.store.get_many(keys)

    async def lease(self, key: str, ttl: int) -> Any:
        return self.store.lease(key, ttl)

    async def lookup(self, key: str, ttl: int) -> tuple[bytes | None, Any]:
        return self.store.lookup(key, ttl)

    async def lookup_many(self, keys: Sequence[str], ttl: int) -> dict[str, tuple[bytes | None, Any]]:
        return self.store.lookup_many(keys, ttl)

    async def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        return self.store.fill(key, value, token, ttl)

    async def fill_many(self, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> dict[str, Any]:
        return self.store.fill_many(items, ttl)

    async def release(self, key: str, token: Any) -> None:
        self.store.release(key, token)

    async def delete_many(self, keys: Sequence[str]) -> None:
        self.store.delete_many(keys)

    async def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        return self.store.delete_matching(patterns)
