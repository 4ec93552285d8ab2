"""The asyncio transport for memcached, against real memcached processes.

Each test runs its coroutines with ``asyncio.run``: a plain pytest test, one event
loop per run, as an application has.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from pymemcache.client.base import Client

from cachedecor.backends.base import LEASE_PREFIX, PartialResult, UndeliveredInvalidation
from cachedecor.backends.memcached.aio import AsyncMemcachedCluster
from cachedecor.backends.memcached.cluster import MemcachedCluster, NodeDown, NodeHealth
from cachedecor.backends.memcached.protocol import MetaUnsupported, ProtocolError, ReplyParser
from tests.servers import Memcached, fake_server

pytestmark = pytest.mark.memcached

T = TypeVar("T")


def run(cluster: AsyncMemcachedCluster, body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body`` in a new event loop, closing that loop's connections after."""

    async def main() -> T:
        try:
            return await body()
        finally:
            await cluster.aclose()

    return asyncio.run(main())


def raw(server: Memcached) -> Client:
    return Client(("127.0.0.1", server.port), connect_timeout=1, timeout=1)


async def longest_stall(call: Awaitable[Any]) -> tuple[BaseException | None, float, float]:
    """Run ``call`` beside a task that sleeps 5 ms in a loop; return (its error, its
    duration, the longest gap the ticker saw between two wake-ups)."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(tick())
    await asyncio.sleep(0)
    start = time.monotonic()
    error: BaseException | None = None
    try:
        await call
    except Exception as exc:
        error = exc
    elapsed = time.monotonic() - start
    stop.set()
    await task
    return error, elapsed, max(gaps)


# --------------------------------------------------------------------------------------
# the reply parser both transports use


class TestReplyParser:
    STREAM = b"VA 3 c7 W\r\nabc\r\nHD\r\nEN\r\nVA 0\r\n\r\n"
    REPLIES = [(b"VA", [b"c7", b"W"], b"abc"), (b"HD", [], None), (b"EN", [], None), (b"VA", [], b"")]

    def test_replies_are_the_same_whatever_the_chunks(self) -> None:
        whole = ReplyParser(4)
        assert whole.feed(self.STREAM)
        assert whole.replies == self.REPLIES
        bytewise = ReplyParser(4)
        done = [bytewise.feed(self.STREAM[i : i + 1]) for i in range(len(self.STREAM))]
        assert done == [False] * (len(self.STREAM) - 1) + [True]
        assert bytewise.replies == self.REPLIES

    def test_bytes_after_the_last_reply_are_a_protocol_error(self) -> None:
        with pytest.raises(ProtocolError):
            ReplyParser(1).feed(b"HD\r\nHD\r\n")

    def test_error_to_a_meta_command_means_no_meta_commands(self) -> None:
        with pytest.raises(MetaUnsupported):
            ReplyParser(2).feed(b"HD\r\nERROR\r\n")

    def test_a_data_block_of_the_wrong_length_is_a_protocol_error(self) -> None:
        with pytest.raises(ProtocolError):
            ReplyParser(1).feed(b"VA 2\r\nabc\r\n")

    def test_classic_retrievals_end_at_end(self) -> None:
        parser = ReplyParser(2, classic=True)
        assert not parser.feed(b"VALUE k 0 2 9\r\nab\r\nEND\r\n")
        assert parser.feed(b"NOT_STORED\r\n")
        assert parser.replies == [
            (b"VALUE", [b"k", b"0", b"9"], b"ab"),
            (b"END", [], None),
            (b"NOT_STORED", [], None),
        ]


class TestSameBytes:
    def test_classic_commands_are_the_bytes_pymemcache_sends(self) -> None:
        received: list[bytes] = []

        def answer(data: bytes) -> bytes:
            received.append(data)
            return b"STORED\r\n" if data.startswith((b"add", b"cas")) else b"DELETED\r\n"

        with fake_server(answer) as url:
            host, port = url.rsplit(":", 1)
            client = Client((host, int(port)), connect_timeout=1, timeout=1)
            client.add("k", b"v", 30, noreply=False)
            client.cas("k", b"w", b"42", 30, noreply=False)
            client.delete_many(["k"], noreply=False)
            client.close()
            sync_bytes = list(received)
            received.clear()
            cluster = AsyncMemcachedCluster([url])

            async def body() -> None:
                await cluster.add("k", b"v", 30)
                await cluster.cas("k", b"w", b"42", 30)
                await cluster.delete_many(["k"])

            run(cluster, body)
        assert received == sync_bytes


# --------------------------------------------------------------------------------------
# round trips


class TestRoundTrips:
    def test_a_miss_wins_the_lease_the_fill_is_read_back(self, memcached: Memcached) -> None:
        cluster = AsyncMemcachedCluster([memcached.url])

        async def body() -> None:
            entry, token = await cluster.lookup("k", 30)
            assert entry is None and token is not None
            assert await cluster.peek("k") == LEASE_PREFIX
            assert await cluster.fill("k", b"value", token, 60)
            assert await cluster.lookup("k", 30) == (b"value", None)
            assert await cluster.peek("k") == b"value"

        run(cluster, body)

    def test_a_released_lease_is_taken_by_the_next_reader(self, memcached: Memcached) -> None:
        cluster = AsyncMemcachedCluster([memcached.url])

        async def body() -> None:
            _, token = await cluster.lookup("k", 30)
            assert (await cluster.lookup("k", 30)) == (None, None)  # leased by the first
            await cluster.release("k", token)
            assert await cluster.peek("k") is None
            _, again = await cluster.lookup("k", 30)
            assert again is not None
            assert not await cluster.fill("k", b"late", token, 60)  # the old lease is gone

        run(cluster, body)

    def test_a_delete_removes_a_lease_in_flight(self, memcached: Memcached) -> None:
        cluster = AsyncMemcachedCluster([memcached.url])

        async def body() -> None:
            _, token = await cluster.lookup("k", 30)
            await cluster.delete_many(["k", "absent"])
            assert not await cluster.fill("k", b"stale", token, 60)
            assert await cluster.peek("k") is None

        run(cluster, body)

    def test_classic_commands(self, memcached: Memcached) -> None:
        cluster = AsyncMemcachedCluster([memcached.url])

        async def body() -> None:
            assert await cluster.get("k") is None
            assert await cluster.add("k", b"marker", 30)
            assert not await cluster.add("k", b"other", 30)
            item = await cluster.gets("k")
            assert item is not None and item.value == b"marker" and item.cas
            assert await cluster.cas("k", b"value", item.cas, 60)
            assert await cluster.cas("k", b"again", item.cas, 60) is False
            assert await cluster.cas("absent", b"x", item.cas, 60) is None
            got = await cluster.get("k")
            assert got is not None and (got.value, got.flags) == (b"value", 0)
            await cluster.delete("k")
            assert await cluster.get_many(["k"]) == {}

        run(cluster, body)

    def test_classic_values_are_what_pymemcache_reads(self, memcached: Memcached) -> None:
        client = raw(memcached)
        client.set("text", "é".encode())
        cluster = AsyncMemcachedCluster([memcached.url])

        async def body() -> None:
            assert await cluster.add("b", b"\x00\r\nbinary", 30)
            item = await cluster.get("text")
            assert item is not None and item.value == "é".encode()

        run(cluster, body)
        assert client.get("b") == b"\x00\r\nbinary"
        client.close()

    def test_two_concurrent_lookups_of_a_missing_key_give_one_lease(self, memcached: Memcached) -> None:
        cluster = AsyncMemcachedCluster([memcached.url])

        async def body() -> list[tuple[bytes | None, Any]]:
            return list(await asyncio.gather(*(cluster.lookup("k", 30) for _ in range(8))))

        results = run(cluster, body)
        assert sum(token is not None for _, token in results) == 1
        assert all(entry is None for entry, _ in results)


# --------------------------------------------------------------------------------------
# several nodes


class TestNodes:
    def test_many_keys_are_pipelined_across_nodes(self, memcached_factory: Any) -> None:
        servers = [memcached_factory() for _ in range(3)]
        cluster = AsyncMemcachedCluster([s.url for s in servers])
        keys = [f"k{i}" for i in range(300)]

        async def body() -> None:
            leased = await cluster.lookup_many(keys, 30)
            assert all(entry is None and token is not None for entry, token in leased.values())
            filled = await cluster.fill_many([(k, k.encode(), leased[k][1]) for k in keys], 60)
            assert filled == dict.fromkeys(keys, True)
            assert await cluster.lookup_many(keys, 30) == {k: (k.encode(), None) for k in keys}

        run(cluster, body)
        on_node = {s.url: set(raw(s).get_many(keys)) for s in servers}
        assert all(on_node.values())  # every node holds some
        assert {k for found in on_node.values() for k in found} == set(keys)

    def test_a_key_lives_on_the_node_the_sync_cluster_uses(self, memcached_factory: Any) -> None:
        servers = [memcached_factory() for _ in range(3)]
        urls = [s.url for s in servers]
        sync = MemcachedCluster(urls, NodeHealth(1.0), connect_timeout=1, timeout=1)
        cluster = AsyncMemcachedCluster(urls)
        keys = [f"model:{i}" for i in range(2000)]
        assert [cluster.node_for(k) for k in keys] == [sync.node_for(k) for k in keys]

        async def body() -> None:
            await asyncio.gather(*(cluster.add(k, b"v", 60) for k in keys[:50]))

        run(cluster, body)
        assert sync.get_many(keys[:50]) == dict.fromkeys(keys[:50], b"v")
        sync.close()

    def test_a_failing_node_leaves_the_others_results(self, memcached_factory: Any) -> None:
        servers = [memcached_factory() for _ in range(2)]
        cluster = AsyncMemcachedCluster([s.url for s in servers], timeout=0.5)
        keys = [f"k{i}" for i in range(40)]
        servers[1].kill()

        async def body() -> None:
            with pytest.raises(PartialResult) as caught:
                await cluster.lookup_many(keys, 30)
            alive = [k for k in keys if cluster.node_for(k) == servers[0].url]
            assert alive and all(caught.value.found[k][1] is not None for k in alive)

        run(cluster, body)


# --------------------------------------------------------------------------------------
# faults: the loop never stalls


class TestFaults:
    def test_a_paused_server_fails_the_call_within_the_timeout_and_never_stalls_the_loop(
        self, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        cluster = AsyncMemcachedCluster([server.url], timeout=0.3)

        async def body() -> tuple[BaseException | None, float, float]:
            await cluster.lookup("warm", 30)  # a connection to reuse
            server.pause()
            try:
                return await longest_stall(cluster.lookup("k", 30))
            finally:
                server.resume()

        error, elapsed, stall = run(cluster, body)
        assert isinstance(error, TimeoutError)
        assert 0.25 < elapsed < 0.6
        assert stall < 0.1

    def test_a_paused_server_fails_a_new_connection_within_the_timeout(self, memcached_factory: Any) -> None:
        server = memcached_factory()
        cluster = AsyncMemcachedCluster([server.url], connect_timeout=0.3, timeout=0.3)
        server.pause()
        try:
            error, elapsed, stall = run(cluster, lambda: longest_stall(cluster.get_many(["a", "b"])))
        finally:
            server.resume()
        assert isinstance(error, PartialResult) and isinstance(error.error, TimeoutError)
        assert elapsed < 0.7 and stall < 0.1

    def test_a_killed_server_fails_promptly(self, memcached_factory: Any) -> None:
        server = memcached_factory()
        cluster = AsyncMemcachedCluster([server.url], timeout=2.0)

        async def body() -> tuple[BaseException | None, float, float]:
            await cluster.lookup("warm", 30)
            server.kill()
            return await longest_stall(cluster.lookup("k", 30))

        error, elapsed, stall = run(cluster, body)
        assert isinstance(error, ConnectionRefusedError)
        assert elapsed < 0.2 and stall < 0.1

    def test_a_restarted_server_is_reconnected_to(self, memcached_factory: Any) -> None:
        server = memcached_factory()
        cluster = AsyncMemcachedCluster([server.url])

        async def body() -> None:
            await asyncio.gather(*(cluster.lookup(f"k{i}", 30) for i in range(4)))  # several connections
            server.restart()
            _, token = await cluster.lookup("k0", 30)  # the old connections are dead: a new one
            assert token is not None
            assert cluster.health.down_nodes() == []

        run(cluster, body)

    def test_failures_mark_the_node_down_for_the_sync_cluster_too(self, memcached_factory: Any) -> None:
        server = memcached_factory()
        health = NodeHealth(dead_timeout=30.0)
        sync = MemcachedCluster([server.url], health, connect_timeout=1, timeout=1)
        cluster = AsyncMemcachedCluster([server.url], health)
        server.kill()

        async def body() -> None:
            with pytest.raises(ConnectionRefusedError):
                await cluster.get("k")
            with pytest.raises(NodeDown):
                await cluster.get("k")

        run(cluster, body)
        with pytest.raises(NodeDown):
            sync.get("k")

    def test_undelivered_deletes_are_delivered_before_the_node_is_used_again(
        self, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        health = NodeHealth(dead_timeout=0.0)  # probe again at once
        cluster = AsyncMemcachedCluster([server.url], health)
        server.kill()

        async def invalidate() -> None:
            with pytest.raises(UndeliveredInvalidation):
                await cluster.delete_many(["k"])

        run(cluster, invalidate)
        assert health.owes(server.url)
        server.start()
        client = raw(server)
        client.set("k", b"stale")  # what the delete was for, still on the node

        async def read() -> None:
            assert await cluster.get("k") is None

        run(cluster, read)
        assert not health.owes(server.url)
        client.close()


# --------------------------------------------------------------------------------------
# servers without meta commands


class TestFallback:
    def test_a_server_answering_error_to_meta_commands_is_detected(self) -> None:
        # memcached cannot switch meta commands off: a fake server answers ERROR to them
        # (as memcached < 1.6 does) and END to a classic get
        def answer(data: bytes) -> bytes:
            return b"END\r\n" if data.startswith(b"get ") else b"ERROR\r\n"

        with fake_server(answer) as url:
            cluster = AsyncMemcachedCluster([url], timeout=1.0)

            async def body() -> None:
                with pytest.raises(MetaUnsupported):
                    await cluster.lookup("k", 30)
                assert await cluster.get("k") is None  # the classic commands still work
                assert cluster.health.down_nodes() == []

            run(cluster, body)

    def test_a_proxy_that_hangs_up_on_meta_commands_is_detected(self, nutcracker: Any) -> None:
        cluster = AsyncMemcachedCluster([nutcracker.url], timeout=1.0)

        async def body() -> None:
            with pytest.raises(MetaUnsupported):
                await cluster.lookup("k", 30)
            assert await cluster.add("k", b"marker", 30)
            item = await cluster.gets("k")
            assert item is not None and await cluster.cas("k", b"value", item.cas, 60)
            got = await cluster.get("k")
            assert got is not None and got.value == b"value"

        run(cluster, body)


# --------------------------------------------------------------------------------------
# event loops and processes


class TestLoopsAndProcesses:
    def test_each_event_loop_has_its_own_connections(self, memcached: Memcached) -> None:
        cluster = AsyncMemcachedCluster([memcached.url])

        async def once() -> bytes | None:
            item = await cluster.get("k")
            await cluster.add("k", b"v", 30)
            return item.value if item else None

        # no aclose between the runs: the second loop must not touch the first's sockets
        assert asyncio.run(once()) is None
        assert asyncio.run(once()) == b"v"
        assert len(cluster._pools) == 1  # the closed loop's pools were dropped

    def test_a_forked_child_opens_its_own_connections(self, memcached: Memcached) -> None:
        cluster = AsyncMemcachedCluster([memcached.url])

        async def parent_call() -> None:
            await cluster.add("k", b"v", 30)

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(parent_call())
            (pool,) = cluster._pools[loop].values()
            (sock,) = pool.idle
            pid = os.fork()
            if pid == 0:  # the child: new connections, in a new loop
                code = 1
                try:
                    if not cluster._pools:
                        item = asyncio.run(cluster.get("k"))
                        code = 0 if item is not None and item.value == b"v" else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            item = loop.run_until_complete(cluster.get("k"))  # the parent's socket still works
            assert item is not None and pool.idle == [sock]
            loop.run_until_complete(cluster.aclose())
        finally:
            loop.close()


@pytest.mark.parametrize(
    ("data", "shortcut"),
    [
        (b"VA 3 c17 W\r\nabc\r\n", True),
        (b"VA 0 c3 W\r\n\r\n", True),
        (b"HD c9\r\n", True),
        (b"EN\r\n", True),
        (b"NF\r\n", True),
        (b"VA 2 c1\r\nab\r\nHD\r\n", False),  # two replies
        (b"VA 5 c1\r\nab", False),  # incomplete
        (b"VA 2 c1\r\nabXY", False),  # no \r\n after the data
        (b"ERROR\r\n", False),
        (b"VA x\r\n", False),
    ],
)
def test_the_single_reply_shortcut_agrees_with_the_parser_or_leaves_it_the_decision(
    data: bytes, shortcut: bool
) -> None:
    from cachedecor.backends.memcached.protocol import single_meta_reply

    quick = single_meta_reply(data)
    assert (quick is not None) == shortcut
    if shortcut:
        parser = ReplyParser(1)
        assert parser.feed(data)
        assert parser.replies == [quick]
