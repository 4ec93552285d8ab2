"""The :class:`~cachedecor.backends.base.Store` of memcached: meta-protocol leases, classic fallback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cachedecor import _runtime
from cachedecor.backends.base import (
    AsyncStore,
    PartialResult,
    Store,
    UndeliveredInvalidation,
    ValueRefused,
    new_lease_marker,
)
from cachedecor.backends.memcached.cluster import MemcachedCluster
from cachedecor.backends.memcached.protocol import (
    CommandRefused,
    MetaUnsupported,
    answered,
    fill_outcomes,
    fill_result,
    lookup_result,
    md_release,
    memcached_expire,
    mg_lookup,
    mg_peek,
    ms_fill,
    peek_result,
)
from cachedecor.backends.memcached.transport import metadump
from cachedecor.keys import KeyPattern

if TYPE_CHECKING:
    from cachedecor.backends.memcached.aio import AsyncMemcachedCluster
    from cachedecor.backends.memcached.dogpile import PyMemcacheBackend

__all__ = ["AsyncMemcachedStore", "MemcachedStore"]


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
        value = self._clients.memcached.get(key)
        return value if value is None or type(value) is bytes else _NOT_AN_ENTRY

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        try:
            found: dict[str, Any] = self._clients.memcached.get_many(keys)
        except PartialResult as exc:
            raise PartialResult(_entries(exc.found), exc.error) from exc.error
        return _entries(found)

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

    def delete_now(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` on their nodes, a node marked down included (a delete that
        reaches it marks it up again); raise :class:`UndeliveredInvalidation` with the
        keys that were not delivered (not queued: the caller keeps them)."""
        client = self.client
        failed: list[str] = []
        error: BaseException | None = None
        for node, group in client.delete_groups(keys).items():
            try:
                client.clients[node].delete_many(group, noreply=False)
            except Exception as exc:
                client.clients[node].close()
                failed += group
                error = exc
                continue
            client.health.recovered(node)
        if error is not None:
            raise UndeliveredInvalidation(failed, error)

    def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        """Lists each node's keys with ``lru_crawler metadump`` and deletes the matches.

        A node that cannot be listed is flushed when it can be reached again (its
        deletes are owed, as for any undelivered invalidation). A proxy that refuses
        ``lru_crawler`` (twemproxy) refuses ``flush_all`` too: nothing is owed to it,
        :class:`CommandRefused` is raised, and its entries stay until they expire.
        """
        return self._delete_listed(
            lambda node, key: any(p.matches(key) for p in patterns), [repr(p) for p in patterns], owe=True
        )

    def purge_misplaced(self) -> int:
        """Delete, on every node (``url`` and ``also_invalidate_url``), the entries that
        node does not own under ``url`` and ``placement``; returns how many.

        No process reading under ``url`` reads them, and no process fills them, but they
        are leftovers of an earlier server list or placement, whose deletes went
        elsewhere: a change that makes their node the owner again would serve them. Step 2
        of :doc:`/scaling`. A node that cannot be listed or reached raises
        :class:`UndeliveredInvalidation` (after the others): run it again.
        """
        client = self.client
        return self._delete_listed(lambda node, key: client.node_for(key) != node, ["misplaced entries"])

    def _delete_listed(self, select: Any, what: list[str], *, owe: bool = False) -> int:
        """Delete the keys ``select(node, key)`` picks among each node's listed keys.

        With ``owe``, a node that cannot be listed is owed a flush and undelivered deletes
        are queued (delivered before the node is used again)."""
        client = self.client
        deleted = 0
        failed: BaseException | None = None
        refused: CommandRefused | None = None
        for node in client.nodes:
            try:
                keys = [k for k in metadump(client, node) if select(node, k)]
            except CommandRefused as exc:
                refused = exc
                continue
            except Exception as exc:
                if owe:
                    client.health.owe_flush(node)
                failed = exc
                continue
            for start in range(0, len(keys), 500):
                batch = keys[start : start + 500]
                try:
                    client._call(node, "delete_many", batch, False)
                except Exception as exc:
                    if owe:
                        client.health.queue(node, batch)
                    failed = exc
                deleted += len(batch)
        if failed is not None:
            raise UndeliveredInvalidation(what, failed)
        if refused is not None:
            raise refused
        return deleted

    # -- meta-protocol operations -------------------------------------------------------

    def _unsupported(self) -> None:
        self.meta = False
        log_meta_fallback()

    def lookup(self, key: str, ttl: int) -> tuple[bytes | None, Any]:
        if self.meta:
            try:
                code, flags, value = self.client.meta(key, mg_lookup(key, ttl))
            except MetaUnsupported:
                self._unsupported()
            else:
                return lookup_result(code, flags, value)
        return super().lookup(key, ttl)

    def lookup_many(self, keys: Sequence[str], ttl: int) -> dict[str, tuple[bytes | None, Any]]:
        if self.meta:
            commands = {k: mg_lookup(k, ttl) for k in keys}
            try:
                replies = self.client.meta_many(commands)
            except MetaUnsupported:
                self._unsupported()
            except PartialResult as exc:
                out = {k: lookup_result(*r) for k, r in exc.found.items()}
                raise PartialResult({k: out.get(k, (None, None)) for k in keys}, exc.error) from exc.error
            else:
                return {k: lookup_result(*replies[k]) for k in keys}
        return super().lookup_many(keys, ttl)

    def peek(self, key: str) -> bytes | None:
        if self.meta:
            return peek_result(*self.client.meta(key, mg_peek(key)))
        return self.get(key)

    def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        if self.meta:
            code, flags, _ = self.client.meta(key, ms_fill(key, value, token, ttl))
            return fill_result(code, flags)
        try:
            return bool(self.client.cas(key, value, token, memcached_expire(ttl)))
        except Exception as exc:
            if answered(exc):
                raise ValueRefused(str(exc)) from exc
            raise

    def fill_many(self, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> dict[str, Any]:
        if not self.meta:
            return super().fill_many(items, ttl)
        commands = {key: ms_fill(key, value, token, ttl) for key, value, token in items}
        try:
            return fill_outcomes(commands, self.client.meta_many(commands), None)
        except PartialResult as exc:
            return fill_outcomes(commands, exc.found, exc.error)

    def release(self, key: str, token: Any) -> None:
        if self.meta:
            self.client.meta(key, md_release(key, token))
            return
        # memcached's classic protocol has no compare-and-delete. Deleting is safe:
        # if the lease is no longer ours the key holds another lease (whose fill then
        # fails) or a fresh entry (which costs one miss).
        self.client.delete(key, noreply=False)


class AsyncMemcachedStore(AsyncStore):
    """:class:`MemcachedStore` for asyncio callers, on :class:`AsyncMemcachedCluster`.

    The cluster is made on first use from the region's backend: the same servers and
    placement, timeouts, and the same :class:`NodeHealth` (a node marked down, or
    owed deletes, is so for sync and async callers alike). Meta commands with the
    classic ``add``/``gets``/``cas`` lease as the fallback, as for sync callers.

    memcached over TLS (``arguments.tls_context``) is served by the sync store in
    worker threads (``asyncio.to_thread``): the loop never blocks, each operation
    costs a thread hand-off.
    """

    name = "memcached"

    def __new__(cls, store: MemcachedStore) -> AsyncMemcachedStore:
        if cls is AsyncMemcachedStore and store.backend.tls_context is not None:
            return _ThreadedMemcachedStore(store)
        return super().__new__(cls)

    def __init__(self, store: MemcachedStore) -> None:
        self.sync = store
        self._cluster: AsyncMemcachedCluster | None = None

    @property
    def meta(self) -> bool:
        return self.sync.meta  # one verdict for both kinds of caller

    @property
    def cluster(self) -> AsyncMemcachedCluster:
        cluster = self._cluster
        if cluster is None:
            from cachedecor.backends.memcached.aio import AsyncMemcachedCluster

            backend = self.sync.backend
            cluster = self._cluster = AsyncMemcachedCluster(
                backend.url,
                backend.health,
                routing=backend.routing,
                connect_timeout=backend.connect_timeout,
                timeout=backend.timeout,
            )
        return cluster

    def _unsupported(self) -> None:
        self.sync._unsupported()

    async def aclose(self) -> None:
        """Close the running event loop's idle connections (at shutdown)."""
        if self._cluster is not None:
            await self._cluster.aclose()

    # -- classic commands (the fallback) ------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        item = await self.cluster.get(key)
        return None if item is None else item.value if item.flags == 0 else _NOT_AN_ENTRY

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        try:
            found = await self.cluster.get_many(keys)
        except PartialResult as exc:
            raise PartialResult(_item_entries(exc.found), exc.error) from exc.error
        return _item_entries(found)

    async def lease(self, key: str, ttl: int) -> Any:
        cluster = self.cluster
        marker = new_lease_marker()
        if not await cluster.add(key, marker, memcached_expire(ttl)):
            return None
        item = await cluster.gets(key)
        if item is None or item.value != marker:
            return None
        return item.cas

    async def delete_many(self, keys: Sequence[str]) -> None:
        await self.cluster.delete_many(keys)

    async def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        import asyncio

        # lists every key of every node (lru_crawler metadump): slow by nature, so
        # run by the sync store in a worker thread, never on the loop
        return await asyncio.to_thread(self.sync.delete_matching, patterns)

    # -- meta-protocol operations -------------------------------------------------------

    async def lookup(self, key: str, ttl: int) -> tuple[bytes | None, Any]:
        if self.meta:
            try:
                return await self.cluster.lookup(key, ttl)
            except MetaUnsupported:
                self._unsupported()
        return await super().lookup(key, ttl)

    async def lookup_many(self, keys: Sequence[str], ttl: int) -> dict[str, tuple[bytes | None, Any]]:
        if self.meta:
            try:
                return await self.cluster.lookup_many(keys, ttl)
            except MetaUnsupported:
                self._unsupported()
        return await super().lookup_many(keys, ttl)

    async def peek(self, key: str) -> bytes | None:
        if self.meta:
            return await self.cluster.peek(key)
        return await self.get(key)

    async def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        if self.meta:
            return await self.cluster.fill(key, value, token, ttl)
        try:
            return bool(await self.cluster.cas(key, value, token, memcached_expire(ttl)))
        except Exception as exc:
            if answered(exc):
                raise ValueRefused(str(exc)) from exc
            raise

    async def fill_many(self, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> dict[str, Any]:
        if not self.meta:
            return await super().fill_many(items, ttl)
        return await self.cluster.fill_many(items, ttl)

    async def release(self, key: str, token: Any) -> None:
        if self.meta:
            await self.cluster.release(key, token)
            return
        await self.cluster.delete_many([key])  # no compare-and-delete: see MemcachedStore.release


class _ThreadedMemcachedStore(AsyncMemcachedStore):
    """memcached over TLS for asyncio callers: each operation of the sync store in a thread."""

    async def _run(self, method: Any, *args: Any) -> Any:
        import asyncio

        return await asyncio.to_thread(method, *args)

    async def get(self, key: str) -> bytes | None:
        return await self._run(self.sync.get, key)  # type: ignore[no-any-return]

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        return await self._run(self.sync.get_many, keys)  # type: ignore[no-any-return]

    async def lease(self, key: str, ttl: int) -> Any:
        return await self._run(self.sync.lease, key, ttl)

    async def lookup(self, key: str, ttl: int) -> tuple[bytes | None, Any]:
        return await self._run(self.sync.lookup, key, ttl)  # type: ignore[no-any-return]

    async def lookup_many(self, keys: Sequence[str], ttl: int) -> dict[str, tuple[bytes | None, Any]]:
        return await self._run(self.sync.lookup_many, keys, ttl)  # type: ignore[no-any-return]

    async def peek(self, key: str) -> bytes | None:
        return await self._run(self.sync.peek, key)  # type: ignore[no-any-return]

    async def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        return await self._run(self.sync.fill, key, value, token, ttl)  # type: ignore[no-any-return]

    async def fill_many(self, items: Sequence[tuple[str, bytes, Any]], ttl: int | None) -> dict[str, Any]:
        return await self._run(self.sync.fill_many, items, ttl)  # type: ignore[no-any-return]

    async def release(self, key: str, token: Any) -> None:
        await self._run(self.sync.release, key, token)

    async def delete_many(self, keys: Sequence[str]) -> None:
        await self._run(self.sync.delete_many, keys)

    async def aclose(self) -> None:
        """Nothing of the loop's: the threads' connections are the sync store's."""


#: What the classic commands return for a value stored under other pymemcache flags
#: than plain bytes (a str, an int, a pickle written through dogpile's region API):
#: never a cachedecor entry, so it decodes as a bad entry (counted, deleted, a miss).
_NOT_AN_ENTRY = b""


def _item_entries(found: dict[str, Any]) -> dict[str, bytes]:
    return {k: item.value if item.flags == 0 else _NOT_AN_ENTRY for k, item in found.items()}


def _entries(found: dict[str, Any]) -> dict[str, bytes]:
    return {k: v if type(v) is bytes else _NOT_AN_ENTRY for k, v in found.items()}


def log_meta_fallback() -> None:
    """Warn, once per process, that a server refused the meta commands."""
    if not _runtime.meta_fallback_logged:
        _runtime.meta_fallback_logged = True
        from cachedecor.stats import log

        log.warning(
            "memcached does not take meta commands (memcached < 1.6, or a proxy such as twemproxy): "
            "using add/gets/cas leases, which cost two more round trips per miss"
        )
