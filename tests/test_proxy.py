"""memcached behind twemproxy (``nutcracker``): two real memcached servers, one proxy.

twemproxy passes get/gets/set/add/cas/delete and closes the connection on any other
command (meta commands, ``lru_crawler``, ``flush_all``). A region pointed at it must
find out, use the classic add/gets/cas lease, and keep every guarantee it gives.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pymemcache.client.base import Client
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import _runtime
from cachedecor.config import region_settings
from tests.conftest import SQLCounter, memcached_config, once, wait_until
from tests.models import User
from tests.servers import Memcached, Nutcracker, fake_server

USERS = range(1, 21)


@cachedecor.cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cachedecor.cached_by_pk(User, many=True)
def get_users(session: Session, user_ids: list[int]) -> list[User]:
    calls.append(list(user_ids))
    return [u for u in (session.get(User, i) for i in user_ids) if u is not None]


calls: list[list[int]] = []


@cachedecor.invalidates(User)
def rename_user(session: Session, user_id: int, name: str) -> None:
    session.get(User, user_id).name = name  # type: ignore[union-attr]
    session.commit()


@pytest.fixture
def rows(sqlite_engine: Engine) -> Engine:
    with Session(sqlite_engine) as s:
        s.add_all([User(id=i, name=f"user{i}", version=0) for i in USERS])
        s.commit()
    calls.clear()
    return sqlite_engine


@pytest.fixture
def sql(rows: Engine) -> Iterator[SQLCounter]:
    counter = SQLCounter(rows)
    yield counter
    counter.close()


@pytest.fixture
def proxied(nutcracker: Nutcracker, monkeypatch: pytest.MonkeyPatch) -> Nutcracker:
    """Region ``default`` on twemproxy, meta commands on (the default): it has to find out."""
    monkeypatch.setattr(_runtime, "meta_fallback_logged", False)
    cachedecor.configure_regions(memcached_config(nutcracker.url))
    return nutcracker


def counters() -> dict[str, int]:
    return cachedecor.stats("default")["default"]


def store() -> Any:
    return region_settings("default").store


def raw(server: Memcached) -> Client:
    return Client(("127.0.0.1", server.port), connect_timeout=1, timeout=1)


def on_backends(proxy: Nutcracker, key: str) -> list[bytes]:
    """What each backend of ``proxy`` holds under ``key`` (asked of the backends directly)."""
    found = []
    for backend in proxy.backends:
        client = raw(backend)
        value = client.get(key)
        client.close()
        if value is not None:
            found.append(value)
    return found


class TestDetection:
    def test_a_region_on_twemproxy_finds_no_meta_commands_and_takes_classic_leases(
        self, rows: Engine, proxied: Nutcracker, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="cachedecor"):
            assert once(rows, get_user, 1).name == "user1"
        assert store().meta is False
        assert "twemproxy" in caplog.text and "add/gets/cas" in caplog.text
        c = counters()
        assert (c["errors"], c["misses"], c["lease_wins"], c["fills"]) == (0, 1, 1, 1)
        assert store().client.health.down_nodes() == []
        assert len(on_backends(proxied, get_user.cache_key(1))) == 1

    def test_detection_on_a_connection_that_was_already_open(self, rows: Engine, proxied: Nutcracker) -> None:
        assert store().client.get("opens-a-connection") is None
        assert once(rows, get_user, 1).name == "user1"
        assert store().meta is False
        assert counters()["errors"] == 0
        assert store().client.health.down_nodes() == []

    def test_a_many_read_finds_out_too(self, rows: Engine, proxied: Nutcracker) -> None:
        assert [u.id for u in once(rows, get_users, list(USERS))] == list(USERS)
        assert store().meta is False
        assert counters()["errors"] == 0
        assert counters()["fills"] == len(USERS)

    def test_a_server_that_hangs_up_on_everything_is_a_failure_not_a_proxy(self, rows: Engine) -> None:
        # A fake: a server that closes every connection as soon as a command arrives,
        # which neither memcached nor twemproxy does.
        with fake_server(hang_up=True) as url:
            cachedecor.configure_regions(memcached_config(url))
            assert once(rows, get_user, 1).name == "user1"
            assert store().meta is True
            assert counters()["errors"] == 1
            assert store().client.health.down_nodes() == [url]

    def test_memcached_itself_keeps_the_meta_protocol(self, rows: Engine, memcached: Memcached) -> None:
        cachedecor.configure_regions(memcached_config(memcached.url))
        assert once(rows, get_user, 1).name == "user1"
        assert once(rows, get_user, 1).name == "user1"
        assert store().meta is True
        assert counters()["hits"] == 1


class TestReadsAndWrites:
    def test_a_miss_fills_and_the_next_read_hits(
        self, rows: Engine, proxied: Nutcracker, sql: SQLCounter
    ) -> None:
        assert once(rows, get_user, 3).name == "user3"
        assert once(rows, get_user, 3).name == "user3"
        assert sql.selects() == 1
        assert (counters()["misses"], counters()["hits"]) == (1, 1)
        assert on_backends(proxied, get_user.cache_key(3)) == [store().get(get_user.cache_key(3))]

    def test_a_many_read_fills_both_backends_and_then_hits(self, rows: Engine, proxied: Nutcracker) -> None:
        once(rows, get_users, list(USERS))
        assert [u.name for u in once(rows, get_users, list(USERS))] == [f"user{i}" for i in USERS]
        assert calls == [list(USERS)]
        assert counters()["hits"] == len(USERS)
        holders = {proxied.backend_for(get_user.cache_key(i)).port for i in USERS}
        assert holders == {b.port for b in proxied.backends}

    def test_a_committed_write_deletes_the_entry_on_its_backend(
        self, rows: Engine, proxied: Nutcracker
    ) -> None:
        key = get_user.cache_key(5)
        once(rows, get_user, 5)
        backend = proxied.backend_for(key)
        once(rows, rename_user, 5, "renamed")
        client = raw(backend)
        assert client.get(key) is None
        client.close()
        assert counters()["invalidations"] == 1
        assert once(rows, get_user, 5).name == "renamed"
        assert once(rows, get_user, 5).name == "renamed"
        assert counters()["hits"] == 1

    def test_direct_invalidation_goes_through(self, rows: Engine, proxied: Nutcracker) -> None:
        once(rows, get_users, [1, 2, 3])
        cachedecor.invalidate_many(User, [1, 2])
        assert on_backends(proxied, get_user.cache_key(1)) == []
        assert on_backends(proxied, get_user.cache_key(2)) == []
        assert len(on_backends(proxied, get_user.cache_key(3))) == 1


class TestLeases:
    def test_a_write_between_a_readers_read_and_its_fill_leaves_nothing_stale(
        self, rows: Engine, proxied: Nutcracker
    ) -> None:
        @cachedecor.cached_by_pk(User)
        def slow_reader(session: Session, user_id: int) -> User | None:
            user = session.get(User, user_id)
            assert user is not None
            user.name  # noqa: B018 - the database read is done
            once(rows, rename_user, user_id, "new")  # a writer commits and invalidates meanwhile
            return user

        assert once(rows, slow_reader, 7).name == "user7"
        assert store().meta is False
        assert (counters()["lease_losses"], counters()["fills"]) == (1, 0)
        assert on_backends(proxied, get_user.cache_key(7)) == []
        assert once(rows, get_user, 7).name == "new"

    def test_concurrent_misses_through_the_proxy_read_the_database_once(
        self, rows: Engine, proxied: Nutcracker
    ) -> None:
        cachedecor.configure_regions(memcached_config(proxied.url, lease_wait=5))
        entered = threading.Event()
        release = threading.Event()
        seen: list[int] = []

        @cachedecor.cached_by_pk(User)
        def blocking_reader(session: Session, user_id: int) -> User | None:
            seen.append(user_id)
            if len(seen) == 1:
                entered.set()
                assert release.wait(10)
            return session.get(User, user_id)

        results: dict[str, str] = {}

        def read(name: str) -> None:
            results[name] = once(rows, blocking_reader, 9).name

        first = threading.Thread(target=read, args=("first",))
        first.start()
        assert entered.wait(10)
        second = threading.Thread(target=read, args=("second",))
        second.start()
        wait_until(lambda: counters()["lease_waits"] == 1)
        release.set()
        first.join(10)
        second.join(10)
        assert results == {"first": "user9", "second": "user9"}
        assert seen == [9]
        assert counters()["fills"] == 1

    def test_a_reader_that_fails_gives_its_lease_back(self, rows: Engine, proxied: Nutcracker) -> None:
        @cachedecor.cached_by_pk(User)
        def failing_reader(session: Session, user_id: int) -> User | None:
            raise RuntimeError("database gone")

        with pytest.raises(RuntimeError):
            once(rows, failing_reader, 11)
        assert on_backends(proxied, get_user.cache_key(11)) == []
        assert once(rows, get_user, 11).name == "user11"
        assert counters()["fills"] == 1


class TestModelWideInvalidation:
    def test_it_fails_open_and_says_the_entries_stay_until_they_expire(
        self, rows: Engine, proxied: Nutcracker, caplog: pytest.LogCaptureFixture
    ) -> None:
        once(rows, get_users, [1, 2])
        with caplog.at_level(logging.WARNING, logger="cachedecor"):
            cachedecor.invalidate_model(User)  # twemproxy passes no lru_crawler: nothing to list
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "'default'" in errors[0] and "stale for up to 300s" in errors[0]
        assert "lru_crawler metadump" in caplog.text and "twemproxy" in caplog.text
        assert counters()["errors"] == 1
        assert counters()["model_invalidations"] == 0
        # nothing is owed to the proxy (it refuses flush_all too): the cache keeps serving
        health = store().client.health
        assert (health.down_nodes(), health.pending_count()) == ([], 0)
        assert [u.id for u in once(rows, get_users, [1, 2])] == [1, 2]
        assert counters()["hits"] == 2

    def test_row_invalidation_keeps_working_after_it(self, rows: Engine, proxied: Nutcracker) -> None:
        once(rows, get_user, 4)
        cachedecor.invalidate_model(User)
        once(rows, rename_user, 4, "after")
        assert (counters()["invalidations"], counters()["errors"]) == (1, 1)
        assert on_backends(proxied, get_user.cache_key(4)) == []
        assert once(rows, get_user, 4).name == "after"
        assert once(rows, get_user, 4).name == "after"
        assert counters()["hits"] == 1


class TestBackendDown:
    def test_an_owed_delete_stops_the_whole_pool_until_its_backend_is_back(
        self, rows: Engine, proxied: Nutcracker
    ) -> None:
        cachedecor.configure_regions(
            memcached_config(
                proxied.url, arguments={"invalidation_retry_interval": 0.05, "dead_timeout": 0.05}
            )
        )
        once(rows, get_users, list(USERS))
        down = proxied.backend_for(get_user.cache_key(1))
        alive = next(i for i in USERS if proxied.backend_for(get_user.cache_key(i)) is not down)
        down.kill()

        once(rows, rename_user, 1, "while down")  # twemproxy answers SERVER_ERROR for its keys
        assert counters()["invalidations_queued"] == 1
        # cachedecor sees one node: until the delete is delivered, no key of the pool is served
        assert once(rows, get_user, alive).name == f"user{alive}"
        assert counters()["hits"] == 0
        assert once(rows, get_user, 1).name == "while down"

        down.start()  # empty, as a restarted memcached is
        health = store().client.health
        wait_until(lambda: health.pending_count() == 0)
        assert once(rows, get_user, 1).name == "while down"
        hits = counters()["hits"]
        assert once(rows, get_user, alive).name == f"user{alive}"
        assert counters()["hits"] == hits + 1

    def test_a_hung_backend_costs_only_its_keys_when_the_proxy_times_out_first(
        self, rows: Engine, nutcracker: Nutcracker
    ) -> None:
        # twemproxy's timeout (100 ms) below cachedecor's (1 s): twemproxy answers
        # SERVER_ERROR for the hung backend's keys, and the proxy is never marked down.
        quick = Nutcracker(nutcracker.backends, timeout_ms=100)
        try:
            cachedecor.configure_regions(memcached_config(quick.url, arguments={"timeout": 1.0}))
            once(rows, get_users, list(USERS))
            hung = quick.backend_for(get_user.cache_key(1))
            alive = next(i for i in USERS if quick.backend_for(get_user.cache_key(i)) is not hung)
            hung.pause()
            try:
                assert once(rows, get_user, 1).name == "user1"
                assert once(rows, get_user, alive).name == f"user{alive}"
                assert counters()["hits"] == 1
                assert counters()["errors"] >= 1
                assert store().client.health.down_nodes() == []
            finally:
                hung.resume()
        finally:
            quick.stop()
