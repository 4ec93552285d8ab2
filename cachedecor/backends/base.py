"""What every store shares: the :class:`Store` interface, lease markers, backend errors.

A *lease* is a marker written with an atomic "add if absent" before the database
is read. The value is later written only if the marker is still the one this
reader wrote (memcached ``gets``/``cas`` or meta ``ms C<cas>``, a compare-and-set
script in Redis, a locked check in memory). An invalidation deletes the key, and
with it any lease in flight, so a reader that read the database before a write
committed can never put its older copy back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

# a forked child gets connections, locks and queues of its own: a store that holds them
# registers itself (the one fork hook, in the runtime, calls its _after_fork_in_child())
from cachedecor._runtime import register_fork_aware
from cachedecor.keys import KeyPattern

__all__ = [
    "LEASE_PREFIX",
    "AsyncStore",
    "PartialResult",
    "Store",
    "UndeliveredInvalidation",
    "ValueRefused",
    "is_lease",
    "lookups",
    "new_lease_marker",
    "register_fork_aware",
]

#: Every lease marker starts with this byte; real entries start with the format version.
LEASE_PREFIX = b"\x00L"


def is_lease(data: bytes) -> bool:
    """Whether a stored value is a lease marker rather than an entry."""
    return data[:2] == LEASE_PREFIX


def new_lease_marker() -> bytes:
    """A lease marker unique to this attempt."""
    return LEASE_PREFIX + os.urandom(10)


class UndeliveredInvalidation(Exception):
    """Deleting keys failed; they were queued and are retried in the background."""

    def __init__(self, keys: Sequence[str], error: BaseException) -> None:
        super().__init__(f"{len(keys)} key(s) queued for retry after {type(error).__name__}: {error}")
        self.keys = list(keys)
        self.error = error


class PartialResult(Exception):
    """Some nodes of a multi-get failed; ``found`` holds what the others returned."""

    def __init__(self, found: dict[str, Any], error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.found = found
        self.error = error


class ValueRefused(Exception):
    """The server refused to store a value (too large, out of memory, ...)."""


def lookups(
    keys: Sequence[str], found: dict[str, bytes], tokens: dict[str, Any], error: BaseException | None
) -> dict[str, tuple[bytes | None, Any]]:
    """What :meth:`Store.lookup_many` answers, from what it read (``found``), the leases
    it took for the keys it did not find (``tokens``) and the error of a partial read:
    ``(entry, None)`` for an entry, ``(None, lease or None)`` otherwise; with ``error``,
    raised as :class:`PartialResult` holding every key."""
    out: dict[str, tuple[bytes | None, Any]] = {}
    for key in keys:
        data = found.get(key)
        out[key] = (data, None) if data is not None and not is_lease(data) else (None, tokens.get(key))
    if error is not None:
        raise PartialResult(out, error)
    return out


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
        return lookups(keys, found, tokens, error)

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

    def delete_now(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` now, on every node, even one a circuit breaker skips; raise if any
        delete was not delivered. Nothing is queued: the caller (the outbox) keeps them."""
        self.delete_many(keys)

    def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        """Delete every key (entries and leases) that one of ``patterns`` matches.

        Returns how many keys were deleted. Slow (it lists the server's keys): for
        model-wide invalidation only.
        """
        raise NotImplementedError


class AsyncStore:
    """:class:`Store`'s operations for asyncio callers, as coroutines.

    The same keys, values, leases and errors as the :class:`Store` of the same
    region (sync and async callers share entries and leases). Nothing here blocks
    the event loop: a store that needs the network uses an asyncio client, one set
    of connections per event loop and per process.
    """

    name = "abstract"

    async def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        raise NotImplementedError

    async def lease(self, key: str, ttl: int) -> Any:
        raise NotImplementedError

    async def lease_many(self, keys: Sequence[str], ttl: int) -> dict[str, Any]:
        out = {}
        for key in keys:
            token = await self.lease(key, ttl)
            if token is not None:
                out[key] = token
        return out

    async def lookup(self, key: str, ttl: int) -> tuple[bytes | None, Any]:
        """See :meth:`Store.lookup`."""
        data = await self.get(key)
        if data is None:
            token = await self.lease(key, ttl)
            if token is not None:
                return None, token
            data = await self.get(key)
        if data is not None and not is_lease(data):
            return data, None
        return None, None

    async def lookup_many(self, keys: Sequence[str], ttl: int) -> dict[str, tuple[bytes | None, Any]]:
        """See :meth:`Store.lookup_many`."""
        error: BaseException | None = None
        try:
            found = await self.get_many(keys)
        except PartialResult as exc:
            found, error = exc.found, exc.error
        missing = [k for k in keys if k not in found]
        tokens = await self.lease_many(missing, ttl) if missing and error is None else {}
        return lookups(keys, found, tokens, error)

    async def peek(self, key: str) -> bytes | None:
        return await self.get(key)

    async def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        raise NotImplementedError

    async def fill_many(self, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value, token in items:
            try:
                out[key] = await self.fill(key, value, token, ttl)
            except Exception as exc:
                out[key] = exc
        return out

    async def release(self, key: str, token: Any) -> None:
        raise NotImplementedError

    async def delete_many(self, keys: Sequence[str]) -> None:
        raise NotImplementedError

    async def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the connections of the running event loop (at its shutdown); the next
        call opens new ones."""
