"""Redis Cluster as a backend: bulk reads, fills and invalidation across the masters.

Every test runs against a real local cluster of 3 masters and 3 replicas
(:mod:`tests.redis_cluster`), through the decorators, on SQLite (sync) and aiosqlite
(async). What each master holds is read from the master itself, not through the store.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import ConfigError, cached_by_pk, invalidates
from cachedecor.config import configured_regions
from tests.conftest import SQLCounter
from tests.models import Base, User
from tests.redis_cluster import LocalRedisCluster, clean_redis_cluster, redis_cluster_server  # noqa: F401  (fixtures)

N = 50
IDS = list(range(1, N + 1))


@cached_by_pk(User, many=True)
def get_users(session: Session, user_ids: list[int]) -> list[User]:
    return list(session.scalars(select(User).where(User.id.in_(user_ids))))


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@invalidates(User)
def rename_all(session: Session, user_ids: list[int], suffix: str) -> None:
    for user in session.scalars(select(User).where(User.id.in_(user_ids))):
        user.name = f"user{user.id}{suffix}"
    session.commit()


@cached_by_pk(User, many=True)
async def aget_users(session: AsyncSession, user_ids: list[int]) -> list[User]:
    return list(await session.scalars(select(User).where(User.id.in_(user_ids))))


@cached_by_pk(User)
async def aget_user(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


@invalidates(User)
async def arename_all(session: AsyncSession, user_ids: list[int], suffix: str) -> None:
    for user in await session.scalars(select(User).where(User.id.in_(user_ids))):
        user.name = f"user{user.id}{suffix}"
    await session.commit()


@pytest.fixture
def cluster(redis_cluster: LocalRedisCluster) -> LocalRedisCluster:
    """Region ``default`` on the local cluster (by the URL of one node), the cluster empty."""
    cachedecor.configure_regions(
        {
            "regions": {
                "default": {
                    "backend": "dogpile.cache.redis_cluster",
                    "expiration_time": 300,
                    "arguments": {"url": redis_cluster.url},
                }
            }
        }
    )
    return redis_cluster


@pytest.fixture
def db(tmp_path: Any) -> Iterator[Engine]:
    """A SQLite database of N users."""
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'cluster.sqlite'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in IDS])
        s.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def sql(db: Engine) -> Iterator[SQLCounter]:
    counter = SQLCounter(db)
    yield counter
    counter.close()


def entries_per_master(cluster: LocalRedisCluster) -> dict[int, int]:
    """How many keys each master holds (entries, and leases if any were left)."""
    out = {}
    for port in cluster.masters():
        with cluster.client(port) as node:
            out[port] = int(node.dbsize())
    return out


def round_trips(
    cluster: LocalRedisCluster,
    call: Callable[[], Any],
    *,
    before_each: Callable[[], Any] = lambda: None,
    repeat: int = 5,
) -> dict[int, int]:
    """The round trips ``call`` makes to each master: the read events the master
    processed meanwhile (``total_reads_processed``) less the one of the ``INFO`` that
    reads the counter. Replication acks add a read now and then, so each master's count
    is the least over ``repeat`` calls, each after ``before_each()`` (not counted)."""
    clients = {port: cluster.client(port) for port in cluster.masters()}

    def reads() -> dict[int, int]:
        return {port: int(c.info("stats")["total_reads_processed"]) for port, c in clients.items()}

    best: dict[int, int] = {}
    try:
        for _ in range(repeat):
            before_each()
            before = reads()
            call()
            after = reads()
            for port in clients:
                trips = after[port] - before[port] - 1
                best[port] = min(best.get(port, trips), trips)
    finally:
        for c in clients.values():
            c.close()
    return best


def names(users: list[User]) -> dict[int, str]:
    return {u.id: u.name for u in users}


def cluster_source(form: str, url: str, tmp_path: Any) -> Any:
    """Region ``default`` on the cluster at ``url``, written as ``form``."""
    backend = "dogpile.cache.redis_cluster"
    if form == "ini":
        path = tmp_path / "cache.ini"
        path.write_text(
            "[cachedecor]\nregions = default\n\n"
            f"[cachedecor.default]\nbackend = {backend}\nexpiration_time = 300\narguments.url = {url}\n"
        )
        return str(path)
    if form == "flat":
        return {
            "cachedecor.regions": "default",
            "cachedecor.default.backend": backend,
            "cachedecor.default.expiration_time": "300",
            "cachedecor.default.arguments.url": url,
        }
    return {"regions": {"default": {"backend": backend, "expiration_time": 300, "arguments": {"url": url}}}}


@pytest.mark.parametrize("form", ["ini", "flat", "nested"])
def test_a_cluster_configured_by_url_in_each_form_serves_bulk_reads(
    form: str, redis_cluster: LocalRedisCluster, db: Engine, sql: SQLCounter, tmp_path: Any
) -> None:
    cachedecor.configure_regions(cluster_source(form, redis_cluster.url, tmp_path))
    for _ in range(2):
        with Session(db) as s:
            assert len(get_users(s, IDS)) == N
    assert sql.selects() == 1
    assert all(entries_per_master(redis_cluster).values())


class TestSyncBulkReads:
    def test_many_of_fifty_keys_fills_all_of_them_over_every_master(
        self, cluster: LocalRedisCluster, db: Engine, sql: SQLCounter
    ) -> None:
        with Session(db) as s:
            assert len(get_users(s, IDS)) == N
        held = entries_per_master(cluster)
        assert sum(held.values()) == N
        assert all(count > 0 for count in held.values()), held
        assert cachedecor.stats("default")["default"]["fills"] == N

    def test_many_hits_after_a_fill_without_the_database(
        self, cluster: LocalRedisCluster, db: Engine, sql: SQLCounter
    ) -> None:
        with Session(db) as s:
            get_users(s, IDS)
        sql.reset()
        with Session(db) as s:
            users = get_users(s, IDS)
        assert sql.selects() == 0
        assert names(users) == {i: f"user{i}" for i in IDS}
        assert cachedecor.stats("default")["default"]["hits"] == N

    def test_a_bulk_fill_on_masters_that_lost_the_fill_script_loads_it(
        self, cluster: LocalRedisCluster, db: Engine, sql: SQLCounter
    ) -> None:
        """A restarted or promoted node has no scripts: the pipelined EVALSHA gets NOSCRIPT."""
        with Session(db) as s:
            get_users(s, IDS[:1])  # the fill script is known to the client
        for port in cluster.masters():
            with cluster.client(port) as node:
                node.script_flush()
                node.flushall()
        with Session(db) as s:
            get_users(s, IDS)
        sql.reset()
        with Session(db) as s:
            assert names(get_users(s, IDS)) == {i: f"user{i}" for i in IDS}
        assert sql.selects() == 0
        assert all(entries_per_master(cluster).values())

    def test_the_lease_of_a_row_not_found_is_released_on_its_master(
        self, cluster: LocalRedisCluster, db: Engine
    ) -> None:
        missing = list(range(1000, 1010))
        with Session(db) as s:
            assert len(get_users(s, IDS + missing)) == N
        assert sum(entries_per_master(cluster).values()) == N  # no lease left behind

    def test_single_reads_fill_and_hit_through_the_scripts(
        self, cluster: LocalRedisCluster, db: Engine, sql: SQLCounter
    ) -> None:
        for _ in range(2):
            with Session(db) as s:
                assert [get_user(s, i).name for i in IDS[:10]] == [f"user{i}" for i in IDS[:10]]  # type: ignore[union-attr]
        assert sql.selects() == 10
        assert sum(entries_per_master(cluster).values()) == 10

    def test_invalidation_removes_the_entries_on_every_master(
        self, cluster: LocalRedisCluster, db: Engine, sql: SQLCounter
    ) -> None:
        with Session(db) as s:
            get_users(s, IDS)
        assert sum(entries_per_master(cluster).values()) == N
        with Session(db) as s:
            rename_all(s, IDS, "-renamed")
        assert entries_per_master(cluster) == dict.fromkeys(cluster.masters(), 0)
        sql.reset()
        with Session(db) as s:
            assert names(get_users(s, IDS)) == {i: f"user{i}-renamed" for i in IDS}
        assert sql.selects() == 1


class TestModelWideInvalidation:
    def test_invalidate_model_empties_every_master(self, cluster: LocalRedisCluster, db: Engine) -> None:
        with Session(db) as s:
            get_users(s, IDS)
        assert sum(entries_per_master(cluster).values()) == N
        cachedecor.invalidate_model(User)
        assert entries_per_master(cluster) == dict.fromkeys(cluster.masters(), 0)

    def test_ainvalidate_model_empties_every_master(
        self, cluster: LocalRedisCluster, adb: AsyncEngine
    ) -> None:
        run_async(adb, lambda s: aget_users(s, IDS))
        assert sum(entries_per_master(cluster).values()) == N
        run_async(adb, lambda s: cachedecor.ainvalidate_model(User))
        assert entries_per_master(cluster) == dict.fromkeys(cluster.masters(), 0)


class TestRedirections:
    def test_a_bulk_read_routed_by_a_stale_slot_table_is_read_again(
        self, cluster: LocalRedisCluster, db: Engine, sql: SQLCounter, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Keys sent to the wrong master get ``MOVED``: the batch is read again through
        redis-py's redirections, and the next bulk read gets its own replies."""
        with Session(db) as s:
            get_users(s, IDS)
        client = configured_regions()["default"].store.reader  # type: ignore[attr-defined]
        slot_of = client.keyslot
        monkeypatch.setattr(client, "keyslot", lambda key: (slot_of(key) + 5461) % 16384)
        sql.reset()
        with Session(db) as s:
            assert names(get_users(s, IDS)) == {i: f"user{i}" for i in IDS}
        monkeypatch.undo()
        with Session(db) as s:
            assert names(get_users(s, IDS[::-1])) == {i: f"user{i}" for i in IDS}
        assert sql.selects() == 0
        assert cachedecor.stats("default")["default"]["hits"] == 2 * N

    def test_an_async_bulk_read_routed_by_a_stale_slot_table_is_read_again(
        self, cluster: LocalRedisCluster, adb: AsyncEngine, asql: SQLCounter, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from redis.asyncio.cluster import RedisCluster

        run_async(adb, lambda s: aget_users(s, IDS))
        slot_of = RedisCluster.keyslot
        monkeypatch.setattr(RedisCluster, "keyslot", lambda self, key: (slot_of(self, key) + 5461) % 16384)
        asql.reset()
        assert names(run_async(adb, lambda s: aget_users(s, IDS))) == {i: f"user{i}" for i in IDS}
        monkeypatch.undo()
        assert names(run_async(adb, lambda s: aget_users(s, IDS[::-1]))) == {i: f"user{i}" for i in IDS}
        assert asql.selects() == 0
        assert cachedecor.stats("default")["default"]["hits"] == 2 * N


class TestRoundTrips:
    def test_a_bulk_hit_costs_one_round_trip_per_master(
        self, cluster: LocalRedisCluster, db: Engine, sql: SQLCounter
    ) -> None:
        with Session(db) as s:
            get_users(s, IDS)  # fills, and opens a connection to each master

        def read() -> None:
            with Session(db) as s:
                get_users(s, IDS)

        assert round_trips(cluster, read) == dict.fromkeys(cluster.masters(), 1)
        assert sql.selects() == 1

    def test_a_bulk_miss_costs_three_round_trips_per_master(
        self, cluster: LocalRedisCluster, db: Engine
    ) -> None:
        """Read, take the leases, fill: each one pipeline, so one round trip per master."""
        with Session(db) as s:
            get_users(s, IDS)

        def miss_and_fill() -> None:
            with Session(db) as s:
                get_users(s, IDS)

        trips = round_trips(cluster, miss_and_fill, before_each=cluster.flush)
        assert trips == dict.fromkeys(cluster.masters(), 3)
        assert sum(entries_per_master(cluster).values()) == N


@pytest.fixture
def adb(db: Engine) -> AsyncEngine:
    """The same database through aiosqlite."""
    return create_async_engine(db.url.set(drivername="sqlite+aiosqlite"))


@pytest.fixture
def asql(adb: AsyncEngine) -> Iterator[SQLCounter]:
    counter = SQLCounter(adb.sync_engine)
    yield counter
    counter.close()


class TestInvalidationRoundTrips:
    def test_invalidating_fifty_rows_costs_one_round_trip_per_master(
        self, cluster: LocalRedisCluster, db: Engine
    ) -> None:
        with Session(db) as s:
            get_users(s, IDS)
        suffixes = iter(range(100))

        def rename() -> None:
            with Session(db) as s:
                rename_all(s, IDS, f"-{next(suffixes)}")

        assert round_trips(cluster, rename) == dict.fromkeys(cluster.masters(), 1)


def run_async(adb: AsyncEngine, body: Callable[[AsyncSession], Any]) -> Any:
    """``body(session)`` in an AsyncSession on ``adb``, on an event loop of its own;
    the loop's cache clients and database connections are closed afterwards."""

    async def main() -> Any:
        try:
            async with AsyncSession(adb) as session:
                return await body(session)
        finally:
            for settings in configured_regions().values():
                await settings.astore.aclose()
            await adb.dispose()

    return asyncio.run(main())


class TestAsync:
    def test_many_fills_every_master_then_hits_without_the_database(
        self, cluster: LocalRedisCluster, adb: AsyncEngine, asql: SQLCounter
    ) -> None:
        assert len(run_async(adb, lambda s: aget_users(s, IDS))) == N
        held = entries_per_master(cluster)
        assert sum(held.values()) == N and all(held.values()), held
        asql.reset()
        users = run_async(adb, lambda s: aget_users(s, IDS))
        assert asql.selects() == 0
        assert names(users) == {i: f"user{i}" for i in IDS}

    def test_an_entry_filled_by_a_sync_caller_hits_an_async_one(
        self, cluster: LocalRedisCluster, db: Engine, adb: AsyncEngine, asql: SQLCounter
    ) -> None:
        with Session(db) as s:
            get_users(s, IDS)
        asql.reset()
        user = run_async(adb, lambda s: aget_user(s, 7))
        assert user.name == "user7"
        assert asql.selects() == 0

    def test_invalidation_removes_the_entries_on_every_master(
        self, cluster: LocalRedisCluster, adb: AsyncEngine, asql: SQLCounter
    ) -> None:
        run_async(adb, lambda s: aget_users(s, IDS))
        assert sum(entries_per_master(cluster).values()) == N
        run_async(adb, lambda s: arename_all(s, IDS, "-async"))
        assert entries_per_master(cluster) == dict.fromkeys(cluster.masters(), 0)
        asql.reset()
        users = run_async(adb, lambda s: aget_users(s, IDS))
        assert names(users) == {i: f"user{i}-async" for i in IDS}
        assert asql.selects() == 1

    def test_a_bulk_hit_costs_one_round_trip_per_master(
        self, cluster: LocalRedisCluster, adb: AsyncEngine, asql: SQLCounter
    ) -> None:
        run_async(adb, lambda s: aget_users(s, IDS))

        async def twice(s: AsyncSession) -> dict[int, int]:
            await aget_users(s, IDS)  # the loop's cluster client connects to each master
            loop = asyncio.get_running_loop()

            def read() -> None:
                s.expunge_all()
                asyncio.run_coroutine_threadsafe(aget_users(s, IDS), loop).result()

            return await asyncio.to_thread(round_trips, cluster, read)

        assert run_async(adb, twice) == dict.fromkeys(cluster.masters(), 1)
        assert asql.selects() == 1


class TestFailover:
    def test_bulk_reads_hit_again_once_a_replica_replaced_a_killed_master(
        self, cluster: LocalRedisCluster, db: Engine, sql: SQLCounter
    ) -> None:
        """The client's slot table still names the dead master: the batched read falls
        back to redis-py's routing, which learns the new master. A read at that moment
        may still go to the database (redis-py asks for the new slot table after a
        failed command, and the promoted replica may not have answered it yet: 4 runs
        in 13 did); within a few reads, every row is a hit again."""
        with Session(db) as s:
            get_users(s, IDS)
        dead = cluster.masters()[0]
        for port in cluster.masters():
            with cluster.client(port) as node:
                node.wait(1, 2000)  # each master's entries reached its replica
        cluster.kill(dead)
        hit_again = False
        try:
            cluster.wait_promoted(dead)
            for _ in range(5):
                before = sql.selects()
                with Session(db) as s:
                    assert names(get_users(s, IDS)) == {i: f"user{i}" for i in IDS}
                if sql.selects() == before:
                    hit_again = True
                    break
        finally:
            cluster.restart(dead)
        assert hit_again, "after the failover, no bulk read was served from the cache"


TIMEOUT = 0.25
PAUSE = 3.0


class TestTimeouts:
    def test_a_read_of_a_key_on_a_paused_master_falls_through_within_the_socket_timeout(
        self, redis_cluster: LocalRedisCluster, db: Engine, sql: SQLCounter
    ) -> None:
        """dogpile's cluster backend passes only ``url`` and ``connection_kwargs`` to
        ``RedisCluster``: ``socket_timeout`` beside them reaches the nodes only because
        cachedecor moves it into ``connection_kwargs``."""
        cachedecor.configure_regions(
            {
                "regions": {
                    "default": {
                        "backend": "dogpile.cache.redis_cluster",
                        "expiration_time": 300,
                        "arguments": {"url": redis_cluster.url, "socket_timeout": TIMEOUT},
                    }
                }
            }
        )
        with Session(db) as s:
            assert get_user(s, 2) is not None  # connects to the cluster, learns its slots
        client = configured_regions()["default"].store.writer
        paused = client.get_node_from_key(get_user.cache_key(1)).port
        redis_cluster.pause(paused)
        resume = threading.Timer(PAUSE, redis_cluster.resume, [paused])
        resume.start()
        try:
            started = time.monotonic()
            with Session(db) as s:
                user = get_user(s, 1)
            elapsed = time.monotonic() - started
        finally:
            resume.cancel()
            redis_cluster.resume(paused)
        assert user is not None and user.name == "user1"
        assert elapsed < 5 * TIMEOUT, f"{elapsed:.2f}s with socket_timeout={TIMEOUT}s, the pause {PAUSE}s"
        assert sql.selects() == 2

    def test_a_connection_pool_which_a_cluster_would_ignore_is_a_config_error_naming_it(self) -> None:
        with pytest.raises(
            ConfigError, match=r"^cachedecor\.default\.arguments\.connection_pool: would have no"
        ):
            cachedecor.configure_regions(
                {
                    "regions": {
                        "default": {
                            "backend": "dogpile.cache.redis_cluster",
                            "arguments": {"url": "redis://127.0.0.1:1", "connection_pool": object()},
                        }
                    }
                }
            )
