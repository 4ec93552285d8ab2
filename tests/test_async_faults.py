"""Async callers fail open as sync ones do, and a failing cache never stalls the event loop.

Every test runs its coroutines with ``asyncio.run`` (one event loop per run, as an
application has) against real servers: memcached processes of the test's own that
it kills, pauses (SIGSTOP) and restarts, a ``redis-server`` of its own that it
pauses, and the rows in SQLite (aiosqlite) or PostgreSQL (asyncpg, a schema of its
own). The fakes, a server that accepts connections and never answers and one that
answers every request late, are said so where they are used.

"The loop never stalls" is measured by a ticker: a task that sleeps 5 ms in a loop
and records the longest gap between two of its wake-ups (less the time the thread
waited for a CPU that other processes of this shared machine had). A call that
blocked the loop's thread on a socket would show as a gap of its whole duration;
the tests run several such calls at once, so blocking calls would add up to
several timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy
from pymemcache.client.base import Client
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor.backends import NodeDown, NodeHealth
from cachedecor.backends.memcached.aio import AsyncMemcachedCluster
from cachedecor.config import configured_regions, region_settings
from tests.conftest import SQLCounter, _drop_pg, _pg_engine, memcached_config
from tests.models import Base, User
from tests.servers import PG_URL, Memcached, fake_server, free_port, unavailable, wait_for_port

T = TypeVar("T")

#: the configured ``timeout``/``connect_timeout`` (memcached) and ``socket_timeout`` (Redis)
TIMEOUT = 0.3
#: what a call may take beyond one TIMEOUT (a database read, the scheduler of a shared
#: machine running the whole suite); less than a second TIMEOUT, so a call that waited
#: twice fails
CALL_MARGIN = 0.25
#: the longest gap the ticker may see beyond one TIMEOUT
STALL_MARGIN = 0.1
#: the rows readers read; two more exist, for writers that run beside them
ROWS = 5

Sessions = async_sessionmaker[AsyncSession]


@cachedecor.cached_by_pk(User)
async def get_user(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


@cachedecor.cached_by_pk(User, many=True)
async def get_users(session: AsyncSession, user_ids: list[int]) -> list[User]:
    return list((await session.scalars(select(User).where(User.id.in_(user_ids)))).all())


@cachedecor.invalidates(User)
async def rename_user(session: AsyncSession, user_id: int, name: str) -> None:
    user = await session.get(User, user_id)
    assert user is not None
    user.name = name
    await session.commit()


# --------------------------------------------------------------------------------------
# databases: the rows, read through asyncio drivers


class Database:
    """Where the rows live: an async URL, and its engine made in each event loop."""

    def __init__(self, name: str, url: str, connect_args: dict[str, Any] | None = None) -> None:
        self.name = name
        self.url = url
        self.connect_args = connect_args or {}

    def engine(self) -> AsyncEngine:
        return create_async_engine(self.url, connect_args=self.connect_args)

    def seed(self, sync_engine: sqlalchemy.engine.Engine) -> None:
        with Session(sync_engine) as s:
            s.execute(sqlalchemy.delete(User))
            s.add_all([User(id=i, name=f"user{i}", bio="x" * 50) for i in range(1, ROWS + 3)])
            s.commit()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    path = tmp_path / "async.sqlite"
    sync_engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(sync_engine)
    db = Database("sqlite", f"sqlite+aiosqlite:///{path}")
    db.seed(sync_engine)
    sync_engine.dispose()
    yield db


@pytest.fixture(scope="module")
def pg_schema() -> Iterator[tuple[str, sqlalchemy.engine.Engine]]:
    sync_engine = _pg_engine()  # a schema of its own, as the suite's PostgreSQL fixtures
    Base.metadata.create_all(sync_engine)
    yield sync_engine.info["schema"], sync_engine  # type: ignore[attr-defined]
    _drop_pg(sync_engine)


@pytest.fixture
def pg_db(pg_schema: tuple[str, sqlalchemy.engine.Engine]) -> Database:
    schema, sync_engine = pg_schema
    for table in reversed(Base.metadata.sorted_tables):
        with sync_engine.begin() as conn:
            conn.execute(table.delete())
    url = PG_URL.replace("postgresql+psycopg://", "postgresql+asyncpg://")
    db = Database("postgresql", url, {"server_settings": {"search_path": schema}})
    db.seed(sync_engine)
    return db


@pytest.fixture
def db(sqlite_db: Database) -> Database:
    """The rows in SQLite, read with aiosqlite."""
    return sqlite_db


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest) -> Database:
    """The rows in SQLite (aiosqlite), then in PostgreSQL (asyncpg)."""
    return request.getfixturevalue("sqlite_db" if request.param == "sqlite" else "pg_db")  # type: ignore[no-any-return]


def run(db: Database, body: Callable[[Sessions], Awaitable[T]]) -> T:
    """Run ``body(sessions)`` in a new event loop; close that loop's connections after."""

    async def main() -> T:
        engine = db.engine()
        try:
            return await body(async_sessionmaker(engine, expire_on_commit=False))
        finally:
            for settings in configured_regions().values():
                astore: Any = settings.astore
                if hasattr(astore, "cluster"):
                    await astore.cluster.aclose()
                elif hasattr(astore, "aclose"):
                    await astore.aclose()
            await engine.dispose()

    return asyncio.run(main())


async def read(sessions: Sessions, user_id: int) -> tuple[int, str] | None:
    """A cached read in a session of its own: (id, name) of the row it returned."""
    async with sessions() as session:
        user = await get_user(session, user_id)
        return None if user is None else (user.id, user.name)


async def read_many(sessions: Sessions, user_ids: list[int]) -> list[tuple[int, str]]:
    async with sessions() as session:
        return [(u.id, u.name) for u in await get_users(session, user_ids)]


async def rename(sessions: Sessions, user_id: int, name: str) -> None:
    async with sessions() as session:
        await rename_user(session, user_id, name)


def row(user_id: int) -> tuple[int, str]:
    return user_id, f"user{user_id}"


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await call
    return result, loop.time() - start


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll an observable condition from the loop until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        await asyncio.sleep(0.002)


def waited_for_a_cpu() -> float:
    """Seconds this thread has spent runnable but not running (waiting for a CPU that
    other processes had), from ``/proc/thread-self/schedstat``; 0 where it is not kept."""
    try:
        with open("/proc/thread-self/schedstat") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class Ticker:
    """A task that sleeps 5 ms in a loop and records, for each wake-up, how long the
    loop kept it waiting.

    :attr:`longest` is the longest gap between two wake-ups, less the time the loop's
    thread spent waiting for a CPU meanwhile: the machine is shared, and a process
    that is not scheduled stalls whatever it runs. What is left is the time the loop
    was running something else or was blocked (in a system call, on a lock), which a
    blocking cache call would show.
    """

    def __init__(self) -> None:
        self.gaps: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start, waited = loop.time(), waited_for_a_cpu()
            await asyncio.sleep(0.005)
            self.gaps.append((loop.time() - start, waited_for_a_cpu() - waited))

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._tick())
        await until(lambda: len(self.gaps) > 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    @property
    def longest(self) -> float:
        return max(gap - waited for gap, waited in self.gaps)


def run_unless_stuck(body: Callable[[], Awaitable[T]], seconds: float = 60) -> T:
    """``asyncio.run(body())`` in a thread of its own; fails when its loop has not finished
    within ``seconds`` (a loop that spins never returns, and would hang the test)."""
    outcome: list[T] = []
    thread = threading.Thread(target=lambda: outcome.append(asyncio.run(body())), daemon=True)  # type: ignore[arg-type]
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the event loop has not finished within {seconds}s: stuck (spinning?)"
    return outcome[0]


def counters() -> dict[str, int]:
    return cachedecor.stats("default")["default"]


def raw_memcached(server: Memcached) -> Client:
    return Client(("127.0.0.1", server.port), connect_timeout=1, timeout=1)


def unread_bytes(port: int) -> list[int]:
    """Per established connection to the server on ``port``: the bytes clients sent
    that it has not read yet.

    The kernel's receive queues of the server's side of the loopback connections
    (``/proc/net/tcp``): above zero once a request has reached a server that is
    paused.
    """
    queues: list[int] = []
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            local, state, queue = fields[1], fields[3], fields[4]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                queues.append(int(queue.split(":")[1], 16))
    return queues


def memcached_region(url: str, **arguments: Any) -> None:
    cachedecor.configure_regions(
        memcached_config(url, arguments={"timeout": TIMEOUT, "connect_timeout": TIMEOUT, **arguments})
    )


def health() -> Any:
    """The memcached circuit breaker and pending queue of region ``default`` (sync and async)."""
    return region_settings("default").store.backend.health  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------
# Redis: a server of our own, which can be paused without disturbing anyone


class RedisServer:
    """``redis-server`` on a free loopback port, without persistence, that tests can pause."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        assert binary is not None
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _state(self) -> str:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]

    def _wait_for(self, stopped: bool) -> None:
        deadline = time.monotonic() + 10
        while (self._state() in ("T", "t")) != stopped:
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server {self.proc.pid} did not {'stop' if stopped else 'resume'}")
            time.sleep(0.001)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self._wait_for(stopped=True)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self._wait_for(stopped=False)

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=5)
        client.flushdb()
        client.close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def redis_server_process() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_server_process: RedisServer) -> Iterator[RedisServer]:
    """Our own Redis, running and empty; region ``default`` on it with a 0.2 s socket timeout."""
    redis_server_process.flush()
    redis_region(redis_server_process.url)
    yield redis_server_process
    redis_server_process.resume()


def redis_region(url: str) -> None:
    cachedecor.configure_regions(
        {
            "regions": {
                "default": {
                    "backend": "dogpile.cache.redis",
                    "arguments": {"url": url, "socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT},
                }
            }
        }
    )


# --------------------------------------------------------------------------------------
# the instrument


class TestTicker:
    def test_the_ticker_sees_a_call_that_blocks_the_loop(self, db: Database) -> None:
        # What the other tests rule out: a call that holds the loop's thread.
        async def body(sessions: Sessions) -> float:
            async with Ticker() as ticker:
                await asyncio.sleep(0.02)
                time.sleep(TIMEOUT + STALL_MARGIN)  # blocks the loop, on purpose
                await asyncio.sleep(0.02)
            return ticker.longest

        assert run(db, body) >= TIMEOUT + STALL_MARGIN


# --------------------------------------------------------------------------------------
# 1. memcached killed


@pytest.mark.memcached
class TestMemcachedKilled:
    def test_reads_return_the_row_from_the_database_counted_and_logged(
        self, any_db: Database, memcached_factory: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        server = memcached_factory()
        memcached_region(server.url)

        async def body(sessions: Sessions) -> list[Any]:
            assert await read(sessions, 1) == row(1)  # filled
            server.kill()
            return [await read(sessions, 1), await read(sessions, 2), await read_many(sessions, [3, 1])]

        with caplog.at_level(logging.WARNING, logger="cachedecor"):
            results = run(any_db, body)
        assert results == [row(1), row(2), [row(3), row(1)]]
        assert counters()["errors"] >= 1
        assert counters()["hits"] == 0
        assert any("falling through to the database" in r.getMessage() for r in caplog.records)

    def test_a_commit_while_down_does_not_raise_and_queues_the_deletes(
        self, any_db: Database, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        memcached_region(server.url)

        async def body(sessions: Sessions) -> Any:
            await read(sessions, 1)
            server.kill()
            await rename(sessions, 1, "renamed while down")
            async with sessions() as session:
                return await get_user.uncached(session, 1)

        assert run(any_db, body).name == "renamed while down"
        assert counters()["invalidations_queued"] == 1
        assert health().pending_count() == 1

    def test_queued_deletes_are_delivered_before_the_restarted_node_is_read(
        self, any_db: Database, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        memcached_region(server.url, dead_timeout=0.5, invalidation_retry_interval=3600)
        key = get_user.cache_key(1)

        async def body(sessions: Sessions) -> tuple[int, str] | None:
            await read(sessions, 1)
            old_entry = raw_memcached(server).get(key)
            assert old_entry is not None
            server.kill()
            assert await read(sessions, 2) == row(2)  # fails: the node is marked down
            assert health().down_nodes() == [server.url]
            await rename(sessions, 1, "renamed while down")
            assert counters()["invalidations_queued"] == 1
            server.start()  # the same port, empty
            # A restarted memcached holds nothing; put the old entry back, as a node that
            # was only unreachable would still hold it, to show the order of delivery.
            raw_memcached(server).set(key, old_entry, noreply=False)
            await until(lambda: health().down_nodes() == [])
            return await read(sessions, 1)

        assert run(any_db, body) == (1, "renamed while down")
        assert health().pending_count() == 0
        assert counters()["invalidations"] == 0  # delivered from the queue, not by the commit


@pytest.mark.memcached
class TestOwedDeletes:
    def test_concurrent_readers_wait_for_the_delivery_under_way(self) -> None:
        # A delete leaves the node's queue when its delivery starts. Coroutines that
        # read the node meanwhile must wait for that delivery, not read beside it: on
        # a memcached with several worker threads, reads sent on other connections
        # while the delete was on its way returned the stale entry (64 of 2,400 reads).
        server = Memcached(threads=4)
        raw = raw_memcached(server)
        cluster = AsyncMemcachedCluster([server.url], NodeHealth(5), max_connections=8)

        async def body() -> list[bytes | None]:
            seen: list[bytes | None] = []
            try:
                for _ in range(100):
                    raw.set("k", b"stale", noreply=False)
                    cluster.health.queue(server.url, ["k"])
                    seen += await asyncio.gather(*(cluster.peek("k") for _ in range(8)))
            finally:
                await cluster.aclose()
            return seen

        try:
            seen = asyncio.run(body())
        finally:
            raw.close()
            server.stop()
        assert seen == [None] * 800

    def test_readers_that_meet_a_delivery_as_it_ends_do_not_spin(self) -> None:
        # Readers are on their way to a paused node when a delete becomes owed to it; the
        # next caller starts its delivery. When the node resumes, the delivery and the
        # readers' replies arrive together: a reader woken in the iteration in which the
        # delivery ended, before its done-callback ran, found it still set. Awaiting a
        # finished future does not yield, so that reader spun at 100% CPU and the loop
        # never ran the callback (seen in the field: 2 of 2 runs with the node killed,
        # 2 of 3 paused).
        server = Memcached(threads=4)
        cluster = AsyncMemcachedCluster(
            [server.url], NodeHealth(5), timeout=5, connect_timeout=5, max_connections=4
        )

        async def twice(key: str) -> None:
            await cluster.peek(key)
            await cluster.peek(key)  # the call made as the first returns

        async def body() -> tuple[float, int]:
            rounds = 0
            async with Ticker() as ticker:
                for rounds in range(1, 41):
                    await asyncio.gather(*(cluster.peek(f"k{i}") for i in range(4)))  # 4 connections
                    server.pause()
                    readers = [asyncio.create_task(twice(f"k{i}")) for i in range(3)]
                    await until(lambda: sum(q > 0 for q in unread_bytes(server.port)) >= 3)
                    cluster.health.queue(server.url, [f"k{rounds}"])
                    readers.append(asyncio.create_task(twice("k0")))  # starts the delivery
                    await until(lambda: sum(q > 0 for q in unread_bytes(server.port)) >= 4)
                    server.resume()
                    await asyncio.gather(*readers)
            await cluster.aclose()
            return ticker.longest, rounds

        try:
            longest, rounds = run_unless_stuck(body)
        finally:
            server.stop()
        assert rounds == 40
        assert cluster.health.pending_count() == 0
        assert longest < STALL_MARGIN, longest

    @pytest.mark.parametrize("fault", ["killed", "paused"])
    def test_the_loop_keeps_ticking_when_a_node_owed_deletes_comes_back_under_reads(self, fault: str) -> None:
        server = Memcached(threads=4)
        cluster = AsyncMemcachedCluster(
            [server.url], NodeHealth(0.05), timeout=TIMEOUT, connect_timeout=TIMEOUT, max_connections=4
        )
        keys = [f"k{i}" for i in range(40)]
        finished = [False]

        async def reader(done: list[int]) -> None:
            while not finished[0]:
                try:
                    await cluster.peek(keys[len(done) % len(keys)])
                except Exception:
                    await asyncio.sleep(0.001)  # the node is down or timed out: try again
                done.append(1)

        async def body() -> tuple[float, int]:
            done: list[int] = []
            async with Ticker() as ticker:
                tasks = [asyncio.create_task(reader(done)) for _ in range(24)]
                for _ in range(3):  # down, owed deletes, back: three times
                    await asyncio.sleep(0.2)
                    server.kill() if fault == "killed" else server.pause()
                    for key in keys:
                        cluster.health.queue(server.url, [key])
                    await asyncio.sleep(0.3)
                    server.start() if fault == "killed" else server.resume()
                    for i in range(200):  # deletes owed to the node now and then, while read
                        cluster.health.queue(server.url, [keys[i % len(keys)]])
                        await asyncio.sleep(0.002)
                finished[0] = True
                await asyncio.gather(*tasks)
            for _ in range(500):  # a call delivers what is left, once the node is no longer down
                try:
                    await cluster.peek(keys[0])
                    break
                except NodeDown:
                    await asyncio.sleep(0.01)
            await cluster.aclose()
            return ticker.longest, len(done)

        try:
            longest, reads = run_unless_stuck(body)
        finally:
            server.stop()
        assert reads > 300
        assert cluster.health.pending_count() == 0  # every owed delete was delivered
        assert longest < TIMEOUT + STALL_MARGIN, longest


# --------------------------------------------------------------------------------------
# 2. memcached paused, 3. a server that never answers


@pytest.mark.memcached
class TestMemcachedPaused:
    def test_each_call_returns_within_the_timeout(self, db: Database, memcached_factory: Any) -> None:
        server = memcached_factory()
        memcached_region(server.url, dead_timeout=0)  # no breaker: every call meets the pause

        async def body(sessions: Sessions) -> list[tuple[Any, float]]:
            await read(sessions, 1)
            server.pause()
            try:
                return [
                    await timed(read(sessions, 1)),
                    await timed(read(sessions, 2)),
                    await timed(read_many(sessions, [3, 4])),
                ]
            finally:
                server.resume()

        (one, t1), (two, t2), (many, t3) = run(db, body)
        assert (one, two, many) == (row(1), row(2), [row(3), row(4)])
        assert max(t1, t2, t3) < TIMEOUT + CALL_MARGIN
        assert counters()["errors"] == 3

    def test_the_circuit_breaker_then_skips_the_node_for_sync_and_async_callers(
        self, db: Database, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        memcached_region(server.url, dead_timeout=60)

        async def body(sessions: Sessions) -> list[Any]:
            await read(sessions, 1)
            server.pause()
            try:
                first = await read(sessions, 1)  # times out: the node is marked down
                assert health().down_nodes() == [server.url]
                with pytest.raises(NodeDown):
                    await region_settings("default").astore.lookup(get_user.cache_key(1), 30)
                return [first, await read(sessions, 2), await read(sessions, 3)]
            finally:
                server.resume()

        assert run(db, body) == [row(1), row(2), row(3)]
        assert counters()["errors"] == 3
        with pytest.raises(NodeDown, match="marked down"):  # the sync callers' breaker is the same
            region_settings("default").store.get("any-key")

    def test_commits_while_paused_return_within_the_timeout(
        self, any_db: Database, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        memcached_region(server.url, dead_timeout=0.5, invalidation_retry_interval=3600)

        async def body(sessions: Sessions) -> tuple[list[float], list[Any]]:
            await readers(sessions, 1, ROWS)
            server.pause()
            try:
                commits = (timed(rename(sessions, i, f"renamed {i}")) for i in range(1, 5))
                done = await asyncio.gather(*commits)
            finally:
                server.resume()
            await until(lambda: health().down_nodes() == [])
            return [t for _, t in done], [await read(sessions, i) for i in range(1, 5)]

        durations, after = run(any_db, body)
        assert max(durations) < TIMEOUT + CALL_MARGIN, durations
        assert counters()["invalidations_queued"] == 4
        assert after == [(i, f"renamed {i}") for i in range(1, 5)]

    def test_calls_queued_for_a_connection_fail_at_once_when_the_node_is_marked_down(
        self, db: Database, memcached_factory: Any
    ) -> None:
        # Four reads hold the node's four connections; four more wait for one. When the
        # first four time out the node is marked down, and the waiting reads give up
        # then, rather than send to the node and wait a timeout more.
        server = memcached_factory()
        memcached_region(server.url, dead_timeout=60)

        async def body(sessions: Sessions) -> list[tuple[Any, float]]:
            await asyncio.gather(*(read(sessions, i) for i in range(1, 5)))  # four connections open
            server.pause()
            try:
                first = [asyncio.ensure_future(timed(read(sessions, i))) for i in range(1, 5)]
                await until(lambda: sum(1 for q in unread_bytes(server.port) if q) == 4)
                late = [timed(read(sessions, 1 + i % ROWS)) for i in range(4, 8)]
                return list(await asyncio.gather(*first, *late))
            finally:
                server.resume()

        results = run(db, body)
        assert [r for r, _ in results] == [row(1 + i % ROWS) for i in range(8)]
        durations = [t for _, t in results]
        assert max(durations) < TIMEOUT + CALL_MARGIN, durations
        assert counters()["errors"] == 8

    def test_one_paused_node_of_two_costs_its_keys_only(self, db: Database, memcached_factory: Any) -> None:
        paused, healthy = memcached_factory(), memcached_factory()
        cachedecor.configure_regions(
            memcached_config(
                paused.url, healthy.url, arguments={"timeout": TIMEOUT, "connect_timeout": TIMEOUT}
            )
        )
        ids = list(range(100, 140))  # enough rows that both nodes own some, whatever their ports
        cluster = region_settings("default").astore.cluster  # type: ignore[attr-defined]
        on_healthy = [i for i in ids if cluster.node_for(get_user.cache_key(i)) == healthy.url]
        assert 0 < len(on_healthy) < len(ids)

        async def body(sessions: Sessions) -> tuple[Any, float]:
            async with sessions() as session:
                session.add_all([User(id=i, name=f"user{i}") for i in ids])
                await session.commit()
            await read_many(sessions, ids)
            paused.pause()
            try:
                cachedecor.reset_stats()
                return await timed(read_many(sessions, ids))
            finally:
                paused.resume()

        rows, seconds = run(db, body)
        assert rows == [row(i) for i in ids]
        assert seconds < TIMEOUT + CALL_MARGIN
        assert counters()["hits"] == len(on_healthy)
        assert counters()["errors"] == 1
        assert health().down_nodes() == [paused.url]


def slow_answers(data: bytes) -> bytes:
    """A memcached that answers every request correctly, 0.15 s late: a miss to each
    meta get, ``NOT_FOUND`` to each delete."""
    time.sleep(0.15)  # the fault: a slow server (not synchronisation)
    lines = [line for line in data.split(b"\r\n") if line]
    return b"".join(b"NOT_FOUND\r\n" if line.startswith(b"delete") else b"EN\r\n" for line in lines)


class TestBusyConnections:
    """A fake: a server that answers every request correctly but 0.15 s late, within the
    0.2 s timeout; a real memcached cannot be made that slow on demand."""

    def test_a_read_that_waited_too_long_for_a_connection_does_not_mark_the_node_down(self) -> None:
        # One connection: the first read holds it 0.15 s, the second 0.15 s more; the
        # third gives up waiting at 0.2 s. Every exchange answered within the timeout:
        # the node is healthy, and stays up (a node marked down has its deletes queued
        # rather than sent, and other processes then read what they should have deleted).
        with fake_server(slow_answers) as url:
            cluster = AsyncMemcachedCluster([url], NodeHealth(60), timeout=TIMEOUT, max_connections=1)

            async def body() -> list[Any]:
                try:
                    reads = (cluster.peek(f"k{i}") for i in range(3))
                    return list(await asyncio.gather(*reads, return_exceptions=True))
                finally:
                    await cluster.aclose()

            results = asyncio.run(body())
        assert results[:2] == [None, None]
        assert isinstance(results[2], TimeoutError)
        assert cluster.health.down_nodes() == []

    def test_deletes_wait_for_a_connection_and_are_sent(self) -> None:
        with fake_server(slow_answers) as url:
            cluster = AsyncMemcachedCluster([url], NodeHealth(60), timeout=TIMEOUT, max_connections=1)

            async def body() -> list[Any]:
                try:
                    return list(
                        await asyncio.gather(
                            *(cluster.delete_many([f"k{i}"]) for i in range(3)), return_exceptions=True
                        )
                    )
                finally:
                    await cluster.aclose()

            results = asyncio.run(body())
        assert results == [None, None, None]
        assert cluster.health.pending_count() == 0
        assert cluster.health.down_nodes() == []


@pytest.mark.memcached
class TestSilentServer:
    def test_a_server_that_accepts_and_never_answers_costs_one_timeout(self, db: Database) -> None:
        """A fake: a listening socket that accepts connections and never replies, which a
        real memcached cannot be made to do on demand."""
        with fake_server() as url:
            memcached_region(url)

            async def body(sessions: Sessions) -> list[tuple[Any, float]]:
                return [await timed(read(sessions, 1)), await timed(read(sessions, 2))]

            (one, t1), (two, t2) = run(db, body)
        assert (one, two) == (row(1), row(2))
        assert max(t1, t2) < TIMEOUT + CALL_MARGIN
        assert counters()["errors"] == 2
        assert health().down_nodes() == [url]


# --------------------------------------------------------------------------------------
# 4. garbage


@pytest.mark.memcached
class TestGarbage:
    def test_garbage_entry_is_a_miss_deleted_and_counted(self, db: Database, memcached: Memcached) -> None:
        memcached_region(memcached.url)
        key = get_user.cache_key(1)
        raw_memcached(memcached).set(key, b"\x01\x00\xff\xfe not an entry", noreply=False)

        async def body(sessions: Sessions) -> tuple[Any, Any, int]:
            engine = sessions.kw["bind"]
            sql = SQLCounter(engine.sync_engine)
            try:
                first = await read(sessions, 1)
                assert sql.selects() == 1
                sql.reset()
                second = await read(sessions, 1)  # filled again by the miss
                return first, second, sql.count
            finally:
                sql.close()

        first, second, statements = run(db, body)
        assert first == second == row(1)
        assert statements == 0
        assert counters()["bad_entries"] == 1
        assert raw_memcached(memcached).get(key) != b"\x01\x00\xff\xfe not an entry"

    def test_garbage_in_a_multi_get_is_a_miss_for_that_key_only(
        self, db: Database, memcached: Memcached
    ) -> None:
        memcached_region(memcached.url)

        async def body(sessions: Sessions) -> list[tuple[int, str]]:
            await read_many(sessions, [1, 2, 3])
            raw_memcached(memcached).set(get_users.cache_key(2), b"garbage", noreply=False)
            cachedecor.reset_stats()
            return await read_many(sessions, [1, 2, 3])

        assert run(db, body) == [row(1), row(2), row(3)]
        assert counters()["bad_entries"] == 1
        assert counters()["hits"] == 2

    @pytest.mark.redis
    def test_garbage_in_redis_is_a_miss_deleted_and_counted(
        self, db: Database, redis_server: RedisServer
    ) -> None:
        import redis

        key = get_user.cache_key(1)
        client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
        client.set(key, b"\x01\x00 not an entry")

        async def body(sessions: Sessions) -> list[Any]:
            return [await read(sessions, 1), await read(sessions, 1)]

        assert run(db, body) == [row(1), row(1)]
        assert counters()["bad_entries"] == 1
        assert counters()["hits"] == 1
        assert client.get(key) != b"\x01\x00 not an entry"
        client.close()


# --------------------------------------------------------------------------------------
# 5. Redis unreachable or paused


@pytest.mark.redis
class TestRedis:
    def test_nothing_listening_reads_and_commits_fall_through(
        self, db: Database, caplog: pytest.LogCaptureFixture
    ) -> None:
        redis_region(f"redis://127.0.0.1:{free_port()}/0")

        async def body(sessions: Sessions) -> list[Any]:
            results: list[Any] = [await read(sessions, 1), await read_many(sessions, [2, 3])]
            await rename(sessions, 4, "renamed while unreachable")
            async with sessions() as session:
                results.append((await get_user.uncached(session, 4)).name)  # type: ignore[union-attr]
            return results

        with caplog.at_level(logging.WARNING, logger="cachedecor"):
            results = run(db, body)
        assert results == [row(1), [row(2), row(3)], "renamed while unreachable"]
        assert counters()["errors"] >= 3
        assert any(
            r.levelno == logging.ERROR and get_user.cache_key(4) in r.getMessage() for r in caplog.records
        )

    def test_paused_server_each_call_returns_within_the_socket_timeout(
        self, db: Database, redis_server: RedisServer
    ) -> None:
        async def body(sessions: Sessions) -> list[tuple[Any, float]]:
            await read(sessions, 1)
            redis_server.pause()
            try:
                return [
                    await timed(read(sessions, 1)),
                    await timed(read(sessions, 2)),
                    await timed(read_many(sessions, [3, 4])),
                    await timed(rename(sessions, 5, "renamed while paused")),
                ]
            finally:
                redis_server.resume()

        results = run(db, body)
        assert [r for r, _ in results] == [row(1), row(2), [row(3), row(4)], None]
        durations = [t for _, t in results]
        assert max(durations) < TIMEOUT + CALL_MARGIN, durations
        assert counters()["errors"] == 4

    def test_after_the_pause_reads_are_served_from_the_cache_again(
        self, db: Database, redis_server: RedisServer
    ) -> None:
        async def body(sessions: Sessions) -> list[Any]:
            await read(sessions, 1)
            redis_server.pause()
            try:
                await read(sessions, 1)
            finally:
                redis_server.resume()
            cachedecor.reset_stats()
            return [await read(sessions, 1), await read(sessions, 2), await read(sessions, 2)]

        assert run(db, body) == [row(1), row(2), row(2)]
        assert counters()["hits"] == 2
        assert counters()["errors"] == 0


# --------------------------------------------------------------------------------------
# 6. the loop never stalls


async def readers(sessions: Sessions, tasks: int, calls: int) -> list[list[Any]]:
    """``tasks`` concurrent readers, each reading ``calls`` rows one after the other."""

    async def reader(n: int) -> list[Any]:
        return [await read(sessions, 1 + (n + i) % ROWS) for i in range(calls)]

    return list(await asyncio.gather(*(reader(n) for n in range(tasks))))


def expected_reads(tasks: int, calls: int) -> list[list[Any]]:
    return [[row(1 + (n + i) % ROWS) for i in range(calls)] for n in range(tasks)]


@pytest.mark.memcached
class TestTheLoopNeverStalls:
    def test_concurrent_reads_on_a_paused_memcached(self, db: Database, memcached_factory: Any) -> None:
        server = memcached_factory()
        memcached_region(server.url, dead_timeout=0)  # no breaker: every call meets the pause

        async def body(sessions: Sessions) -> tuple[Any, float]:
            await readers(sessions, 1, ROWS)  # warm: filled, connections open
            server.pause()
            try:
                async with Ticker() as ticker:
                    results = await readers(sessions, 6, 3)
            finally:
                server.resume()
            return results, ticker.longest

        results, longest = run(db, body)
        assert results == expected_reads(6, 3)
        assert counters()["errors"] >= 18
        assert longest < TIMEOUT + STALL_MARGIN

    def test_concurrent_reads_on_a_server_that_never_answers(self, db: Database) -> None:
        """A fake: a listening socket that accepts connections and never replies, which a
        real memcached cannot be made to do on demand."""
        with fake_server() as url:
            memcached_region(url, dead_timeout=0)

            async def body(sessions: Sessions) -> tuple[Any, float]:
                async with Ticker() as ticker:
                    results = await readers(sessions, 6, 3)
                return results, ticker.longest

            results, longest = run(db, body)
        assert results == expected_reads(6, 3)
        assert counters()["errors"] >= 18
        assert longest < TIMEOUT + STALL_MARGIN

    def test_after_commit_invalidations_on_a_paused_memcached(
        self, any_db: Database, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        memcached_region(server.url, dead_timeout=0, invalidation_retry_interval=3600)

        async def body(sessions: Sessions) -> tuple[list[Any], float]:
            await readers(sessions, 1, ROWS)
            server.pause()
            try:
                async with Ticker() as ticker:
                    await asyncio.gather(*(rename(sessions, i, f"renamed {i}") for i in range(1, 5)))
            finally:
                server.resume()
            return [await read(sessions, i) for i in range(1, 5)], ticker.longest

        after, longest = run(any_db, body)
        assert after == [(i, f"renamed {i}") for i in range(1, 5)]  # queued deletes delivered first
        assert counters()["invalidations_queued"] >= 1
        assert longest < TIMEOUT + STALL_MARGIN

    @pytest.mark.redis
    def test_concurrent_reads_and_commits_on_a_paused_redis(
        self, db: Database, redis_server: RedisServer
    ) -> None:
        async def body(sessions: Sessions) -> tuple[Any, float]:
            await readers(sessions, 1, ROWS)
            redis_server.pause()
            try:
                async with Ticker() as ticker:
                    results = await asyncio.gather(
                        readers(sessions, 6, 3),
                        *(rename(sessions, i, f"renamed {i}") for i in (ROWS + 1, ROWS + 2)),
                    )
            finally:
                redis_server.resume()
            async with sessions() as session:
                written = [(await get_user.uncached(session, i)).name for i in (ROWS + 1, ROWS + 2)]  # type: ignore[union-attr]
            return (results[0], written), ticker.longest

        (results, written), longest = run(db, body)
        assert results == expected_reads(6, 3)
        assert written == [f"renamed {ROWS + 1}", f"renamed {ROWS + 2}"]
        assert counters()["errors"] >= 20
        assert longest < TIMEOUT + STALL_MARGIN


# --------------------------------------------------------------------------------------
# 7. cancelled reads


async def cancel_when_sent(call: Awaitable[Any], port: int, *, until_cancelled: bool = False) -> None:
    """Start ``call``, wait until its request has reached the (paused) server on ``port``,
    cancel it, and check that it was cancelled.

    ``until_cancelled``: cancel again at each turn of the loop until the call ends.
    redis-py sends each command under ``asyncio.wait_for``, which before Python 3.12
    drops a cancellation that arrives as the send completes (the call then waits for
    its ``socket_timeout``); a second cancellation is honoured.
    """
    before = sum(unread_bytes(port))
    task = asyncio.ensure_future(call)
    await until(lambda: task.done() or sum(unread_bytes(port)) > before)
    assert not task.done(), f"the call ended before it was cancelled: {task.result()!r}"
    task.cancel()
    while until_cancelled and not task.done():
        await asyncio.sleep(0)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.memcached
class TestCancelledReads:
    def test_a_read_cancelled_on_a_paused_memcached_leaves_no_connection_out_of_step(
        self, any_db: Database, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        memcached_region(server.url, timeout=10)  # the caller gives up first

        async def body(sessions: Sessions) -> list[Any]:
            await readers(sessions, 1, ROWS)  # every row cached
            server.pause()
            try:
                await cancel_when_sent(read(sessions, 1), server.port)
                await cancel_when_sent(read_many(sessions, [2, 3, 4]), server.port)
            finally:
                server.resume()
            cachedecor.reset_stats()
            # a connection left in step with the cancelled requests would answer these
            # with the replies meant for them
            return [await read(sessions, 5), await read_many(sessions, [4, 3]), await read(sessions, 2)]

        assert run(any_db, body) == [row(5), [row(4), row(3)], row(2)]
        assert counters()["hits"] == 4
        assert counters()["errors"] == counters()["mismatches"] == counters()["bad_entries"] == 0

    @pytest.mark.redis
    def test_a_read_cancelled_on_a_paused_redis_leaves_no_connection_out_of_step(
        self, db: Database, redis_server: RedisServer
    ) -> None:
        cachedecor.configure_regions(
            {
                "regions": {
                    "default": {
                        "backend": "dogpile.cache.redis",
                        "arguments": {"url": redis_server.url, "socket_timeout": 10},
                    }
                }
            }
        )

        async def body(sessions: Sessions) -> list[Any]:
            await readers(sessions, 1, ROWS)
            redis_server.pause()
            try:
                again = sys.version_info < (3, 12)
                port = redis_server.port
                await cancel_when_sent(read(sessions, 1), port, until_cancelled=again)
                await cancel_when_sent(read_many(sessions, [2, 3, 4]), port, until_cancelled=again)
            finally:
                redis_server.resume()
            cachedecor.reset_stats()
            return [await read(sessions, 5), await read_many(sessions, [4, 3]), await read(sessions, 2)]

        assert run(db, body) == [row(5), [row(4), row(3)], row(2)]
        assert counters()["hits"] == 4
        assert counters()["errors"] == counters()["mismatches"] == counters()["bad_entries"] == 0


# --------------------------------------------------------------------------------------
# 8. cancelled writes: a committed invalidation is never dropped


@pytest.mark.memcached
class TestCancelledWrites:
    def test_a_writer_cancelled_after_its_commit_while_its_delete_waits_for_a_connection(
        self, any_db: Database, memcached_factory: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Issue 20, item 4 of the field report: four reads hold the node's four
        # connections (paused: no answer); the writer commits, its delete waits for a
        # connection, and asyncio.wait_for cancels it there. Nothing of that delete was
        # sent: unless it is queued, the old row stays cached until it expires.
        server = memcached_factory()
        memcached_region(server.url, timeout=10)  # the reads and the writer's caller give up first

        async def body(sessions: Sessions) -> tuple[Any, Any, list[Any]]:
            await readers(sessions, 1, ROWS)  # every row cached
            server.pause()
            try:
                held = [asyncio.ensure_future(read(sessions, i)) for i in range(2, 6)]
                await until(lambda: sum(1 for q in unread_bytes(server.port) if q) == 4)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(rename(sessions, 1, "renamed"), 1.0)
                async with sessions() as session:
                    committed = await get_user.uncached(session, 1)  # the commit happened
                assert not any(t.done() for t in held)  # the delete was still waiting then
            finally:
                server.resume()
            readers_after = await asyncio.gather(*held)  # the node answers again
            return (committed.id, committed.name), await read(sessions, 1), readers_after

        with caplog.at_level(logging.WARNING, logger="cachedecor"):
            committed, after, held = run(any_db, body)
        assert committed == (1, "renamed")
        assert held == [row(i) for i in range(2, 6)]
        assert after == (1, "renamed")  # the first read once the node is back
        assert counters()["invalidations_queued"] == 1
        assert any("cancel" in r.getMessage() and "1 key(s)" in r.getMessage() for r in caplog.records)

    def test_deletes_given_up_are_logged_with_their_count_and_bound(
        self, db: Database, memcached_factory: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        server = memcached_factory()
        memcached_region(server.url, invalidation_retry_interval=0.05, invalidation_retry_for=0.2)

        async def body(sessions: Sessions) -> None:
            await read(sessions, 1)
            server.kill()
            await rename(sessions, 1, "renamed while down")
            await until(lambda: counters()["invalidations_lost"] == 1)

        with caplog.at_level(logging.ERROR, logger="cachedecor"):
            run(db, body)
        given_up = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
        assert len(given_up) == 1
        assert "1 key(s)" in given_up[0] and "up to 300s" in given_up[0], given_up
