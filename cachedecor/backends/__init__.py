"""Cache backends and the storage adapters that give them lease-protected fills.

* :class:`PyMemcacheBackend`, a dogpile.cache backend registered as
  ``cachedecor.pymemcache``. It is dogpile's pymemcache backend with the settings
  production needs (``connect_timeout``, ``timeout``, ``no_delay``, a per-node
  circuit breaker) and a client that never remaps keys of a failed node to another
  node (see :doc:`/resilience`). cachedecor also uses it for regions configured
  with ``dogpile.cache.pymemcache``.
* :class:`Store` adapters: the handful of operations the decorators need (get,
  get-many, lease, fill, delete) on memcached, dogpile's memory backend and Redis.
  One mechanism, small adapters: the decorators never branch on the backend.

Each store has an asyncio twin (:class:`AsyncStore`) over the same entries and
leases: the memory store's operations run on the loop, Redis uses
``redis.asyncio``, memcached the asyncio transport in :mod:`.memcached.aio`.

Modules: :mod:`.base` (the interfaces, leases, errors), :mod:`.memory`,
:mod:`.redis`, and :mod:`.memcached` (``protocol``, ``transport`` the threaded
transport, ``aio`` the asyncio transport, ``cluster``, ``store`` and the dogpile
backend in ``dogpile``).
"""

from __future__ import annotations

from typing import Any

from cachedecor.backends.base import (
    LEASE_PREFIX,
    AsyncStore,
    PartialResult,
    Store,
    UndeliveredInvalidation,
    ValueRefused,
    is_lease,
    new_lease_marker,
)
from cachedecor.backends.memcached.cluster import PLACEMENTS, MemcachedCluster, NodeDown, NodeHealth
from cachedecor.backends.memcached.dogpile import MEMCACHED_ARGUMENTS, MEMCACHED_DEFAULTS, PyMemcacheBackend
from cachedecor.backends.memcached.protocol import MetaUnsupported, ProtocolError
from cachedecor.backends.memcached.store import AsyncMemcachedStore, MemcachedStore
from cachedecor.backends.memory import AsyncMemoryStore, MemoryStore
from cachedecor.backends.redis import AsyncRedisStore, RedisStore

__all__ = [
    "LEASE_PREFIX",
    "MEMCACHED_ARGUMENTS",
    "MEMCACHED_DEFAULTS",
    "PLACEMENTS",
    "AsyncMemcachedStore",
    "AsyncMemoryStore",
    "AsyncRedisStore",
    "AsyncStore",
    "MemcachedCluster",
    "MemcachedStore",
    "MemoryStore",
    "MetaUnsupported",
    "NodeDown",
    "NodeHealth",
    "PartialResult",
    "ProtocolError",
    "PyMemcacheBackend",
    "RedisStore",
    "Store",
    "UndeliveredInvalidation",
    "ValueRefused",
    "async_store_for",
    "is_lease",
    "new_lease_marker",
    "store_for",
]


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


def async_store_for(store: Store) -> AsyncStore:
    """The asyncio twin of ``store``: same entries, same leases, no blocking I/O.

    Made when a region is configured; it opens no connection until an async caller
    uses it.
    """
    if isinstance(store, MemcachedStore):
        return AsyncMemcachedStore(store)
    if isinstance(store, MemoryStore):
        return AsyncMemoryStore(store)
    if isinstance(store, RedisStore):
        return AsyncRedisStore(store)
    raise TypeError(f"no asyncio store for {type(store).__name__}")
