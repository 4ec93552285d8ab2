"""A cache that is down, slow, or holds garbage never breaks the caller."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from pymemcache.client.base import Client
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor.config import region_settings
from tests.conftest import SQLCounter, memcached_config, once, wait_until
from tests.models import User
from tests.servers import fake_server, free_port


@cachedecor.cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cachedecor.cached_by_pk(User, many=True)
def get_users(session: Session, user_ids: list[int]) -> list[User]:
    return [u for u in (session.get(User, i) for i in user_ids) if u is not None]


@cachedecor.invalidates(User)
def rename_user(session: Session, user_id: int, name: str) -> None:
    session.get(User, user_id).name = name  # type: ignore[union-attr]
    session.commit()


@pytest.fixture
def rows(sqlite_engine: Engine) -> Engine:
    with Session(sqlite_engine) as s:
        s.add_all([User(id=i, name=f"user{i}", bio="x" * 50) for i in range(1, 4)])
        s.commit()
    return sqlite_engine


@pytest.fixture
def sql(rows: Engine) -> Iterator[SQLCounter]:
    counter = SQLCounter(rows)
    yield counter
    counter.close()


def counters() -> dict[str, int]:
    return cachedecor.stats("default")["default"]


def raw_client(port: int) -> Client:
    return Client(("127.0.0.1", port), connect_timeout=1, timeout=1)


class TestServerDown:
    def test_killed_server_falls_through_to_the_database(self, rows: Engine, memcached_factory: Any) -> None:
        server = memcached_factory()
        cachedecor.configure_regions(memcached_config(server.url))
        assert once(rows, get_user, 1).name == "user1"
        server.kill()
        assert once(rows, get_user, 1).name == "user1"
        assert once(rows, get_user, 2).name == "user2"
        assert counters()["errors"] >= 1
        assert counters()["hits"] == 0

    def test_nothing_listening_on_the_port(self, rows: Engine, sql: SQLCounter) -> None:
        cachedecor.configure_regions(memcached_config(f"127.0.0.1:{free_port()}"))
        assert once(rows, get_user, 1).name == "user1"
        assert [u.id for u in once(rows, get_users, [1, 2])] == [1, 2]
        assert counters()["errors"] >= 2

    def test_a_failed_node_is_skipped_until_dead_timeout(self, rows: Engine) -> None:
        url = f"127.0.0.1:{free_port()}"
        cachedecor.configure_regions(memcached_config(url, arguments={"dead_timeout": 60}))
        once(rows, get_user, 1)
        store = region_settings("default").store
        assert store.backend.health.down_nodes() == [url]  # type: ignore[attr-defined]
        with pytest.raises(Exception, match="marked down"):
            store.get("any-key")

    def test_failures_are_logged_once_per_interval_not_per_call(
        self, rows: Engine, caplog: pytest.LogCaptureFixture
    ) -> None:
        cachedecor.configure_regions(memcached_config(f"127.0.0.1:{free_port()}"))
        with caplog.at_level(logging.WARNING, logger="cachedecor"):
            for _ in range(20):
                once(rows, get_user, 1)
        get_failures = [r for r in caplog.records if "get failed" in r.getMessage()]
        assert len(get_failures) == 1
        assert counters()["errors"] == 20

    def test_restarted_server_is_used_again_without_an_error(
        self, rows: Engine, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        cachedecor.configure_regions(memcached_config(server.url))
        once(rows, get_user, 1)
        server.restart()  # the open connection is now dead; the server is fine
        once(rows, get_user, 1)  # reconnects at once: a miss, filled again
        once(rows, get_user, 1)
        assert counters()["errors"] == 0
        assert counters()["hits"] == 1

    def test_invalidation_while_down_does_not_break_the_commit(
        self, rows: Engine, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        cachedecor.configure_regions(memcached_config(server.url))
        once(rows, get_user, 1)
        server.kill()
        once(rows, rename_user, 1, "renamed while down")
        with Session(rows) as s:
            assert s.get(User, 1).name == "renamed while down"  # type: ignore[union-attr]
        assert counters()["invalidations_queued"] == 1

    def test_queued_invalidation_is_delivered_before_the_node_is_read_again(
        self, rows: Engine, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        cachedecor.configure_regions(
            memcached_config(
                server.url, arguments=dict(timeout=0.2, dead_timeout=0.5, invalidation_retry_interval=3600)
            )
        )
        once(rows, get_user, 1)
        health = region_settings("default").store.backend.health  # type: ignore[attr-defined]
        server.pause()
        try:
            once(rows, get_user, 2)  # times out: the node is marked down
        finally:
            server.resume()
        assert health.down_nodes() == [server.url]
        once(rows, rename_user, 1, "renamed while down")  # the delete is not even sent
        assert counters()["invalidations_queued"] == 1
        assert raw_client(server.port).get(get_user.cache_key(1)) is not None  # stale on the server
        wait_until(lambda: health.down_nodes() == [])
        assert once(rows, get_user, 1).name == "renamed while down"
        assert health.pending_count() == 0

    def test_queued_invalidation_is_retried_in_the_background(
        self, rows: Engine, memcached_factory: Any
    ) -> None:
        server = memcached_factory()
        cachedecor.configure_regions(
            memcached_config(
                server.url, arguments=dict(timeout=0.2, dead_timeout=0, invalidation_retry_interval=0.01)
            )
        )
        once(rows, get_user, 1)
        key = get_user.cache_key(1)
        server.pause()
        try:
            once(rows, rename_user, 1, "renamed while paused")
        finally:
            server.resume()
        health = region_settings("default").store.backend.health  # type: ignore[attr-defined]
        wait_until(lambda: health.pending_count() == 0)
        assert raw_client(server.port).get(key) is None

    def test_queued_invalidation_reaches_a_node_marked_down_as_soon_as_it_answers(
        self, rows: Engine, memcached_factory: Any
    ) -> None:
        """Other processes may read the node meanwhile: its deletes must not wait out
        ``dead_timeout`` (60 s here) because this process's breaker marked it down."""
        server = memcached_factory()
        cachedecor.configure_regions(
            memcached_config(
                server.url, arguments=dict(timeout=0.2, dead_timeout=60, invalidation_retry_interval=0.01)
            )
        )
        once(rows, get_user, 1)
        key = get_user.cache_key(1)
        health = region_settings("default").store.backend.health  # type: ignore[attr-defined]
        server.pause()
        try:
            once(rows, get_user, 2)  # times out: the node is marked down
            assert health.is_down(server.url)
            once(rows, rename_user, 1, "renamed while down")  # its delete is queued, never sent
            assert health.pending_count() == 1
        finally:
            server.resume()
        wait_until(lambda: health.pending_count() == 0)
        assert raw_client(server.port).get(key) is None
        assert not health.is_down(server.url)

    def test_invalidation_given_up_is_logged_with_its_keys(
        self, rows: Engine, memcached_factory: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        server = memcached_factory()
        cachedecor.configure_regions(
            memcached_config(
                server.url,
                arguments=dict(dead_timeout=0, invalidation_retry_interval=0.01, invalidation_retry_for=0.05),
            )
        )
        once(rows, get_user, 1)
        server.kill()
        with caplog.at_level(logging.ERROR, logger="cachedecor"):
            once(rows, rename_user, 1, "lost")
            wait_until(lambda: counters()["invalidations_lost"] == 1)
        assert any(
            "gave up" in r.getMessage() and get_user.cache_key(1) in r.getMessage() for r in caplog.records
        )


class TestSlowServer:
    def test_paused_server_returns_within_the_timeout(self, rows: Engine, memcached_factory: Any) -> None:
        server = memcached_factory()
        cachedecor.configure_regions(
            memcached_config(server.url, arguments=dict(timeout=0.2, connect_timeout=0.2))
        )
        once(rows, get_user, 1)
        server.pause()
        try:
            assert once(rows, get_user, 1).name == "user1"
            assert once(rows, get_user, 2).name == "user2"
        finally:
            server.resume()
        assert counters()["errors"] >= 1

    def test_server_that_accepts_but_never_answers(self, rows: Engine) -> None:
        # A fake: a listening socket that accepts connections and never replies,
        # which a real memcached cannot be made to do on demand.
        with fake_server() as url:
            cachedecor.configure_regions(memcached_config(url, arguments={"timeout": 0.2}))
            assert once(rows, get_user, 1).name == "user1"
            assert counters()["errors"] == 1


class TestOldServer:
    def test_a_server_without_meta_commands_switches_to_classic_leases(self, rows: Engine) -> None:
        # A fake: a server that answers ERROR to everything, as memcached < 1.6 does
        # to meta commands; no installed memcached can be made to do this.
        with fake_server(lambda data: b"ERROR\r\n" * max(1, data.count(b"\r\n"))) as url:
            cachedecor.configure_regions(memcached_config(url))
            assert once(rows, get_user, 1).name == "user1"
            assert region_settings("default").store.meta is False  # type: ignore[attr-defined]
            assert counters()["errors"] == 1


class TestGarbage:
    def test_garbage_entry_is_a_miss_deleted_and_counted(
        self, rows: Engine, cache: Any, sql: SQLCounter
    ) -> None:
        key = get_user.cache_key(1)
        raw_client(cache.port).set(key, b"\x01\x00\xff\xfe not msgpack", noreply=False)
        assert once(rows, get_user, 1).name == "user1"
        assert counters()["bad_entries"] == 1
        assert sql.selects() == 1
        sql.reset()
        assert once(rows, get_user, 1).name == "user1"  # refilled by the miss
        assert sql.count == 0

    def test_foreign_format_entry_is_a_miss(self, rows: Engine, cache: Any) -> None:
        raw_client(cache.port).set(get_user.cache_key(1), b"\x09hello", noreply=False)
        assert once(rows, get_user, 1).name == "user1"
        assert counters()["bad_entries"] == 1

    def test_a_pickle_in_the_cache_is_never_unpickled(self, rows: Engine, cache: Any) -> None:
        marker: list[str] = []

        class Exploit:
            def __reduce__(self) -> Any:
                return (marker.append, ("unpickled!",))

        # flags=1 is pymemcache's pickle flag
        raw_client(cache.port).set(get_user.cache_key(1), pickle.dumps(Exploit()), noreply=False, flags=1)
        assert once(rows, get_user, 1).name == "user1"
        assert marker == []
        assert counters()["bad_entries"] == 1

    def test_entry_of_the_wrong_shape_is_a_miss(self, rows: Engine, cache: Any) -> None:
        codec = region_settings("default").codec
        key = get_user.cache_key(1)
        raw_client(cache.port).set(key, codec.encode(key, [0, ["too", "few"]]), noreply=False)
        assert once(rows, get_user, 1).name == "user1"
        assert counters()["bad_entries"] == 1

    def test_garbage_in_a_multi_get_is_a_miss_for_that_key_only(self, rows: Engine, cache: Any) -> None:
        once(rows, get_users, [1, 2, 3])
        raw_client(cache.port).set(get_users.cache_key(2), b"garbage", noreply=False)
        assert [u.id for u in once(rows, get_users, [1, 2, 3])] == [1, 2, 3]
        assert counters()["bad_entries"] == 1
        assert counters()["hits"] == 2


class TestSigning:
    def test_changing_the_secret_invalidates_every_entry(
        self, rows: Engine, cache: Any, sql: SQLCounter
    ) -> None:
        cachedecor.configure_regions({**memcached_config(cache.url), "secret": "one"})
        once(rows, get_user, 1)
        cachedecor.configure_regions({**memcached_config(cache.url), "secret": "two"})
        sql.reset()
        assert once(rows, get_user, 1).name == "user1"
        assert sql.selects() == 1
        assert counters()["bad_entries"] == 1

    def test_unsigned_entry_is_refused_when_a_secret_is_set(self, rows: Engine, cache: Any) -> None:
        once(rows, get_user, 1)  # written unsigned
        cachedecor.configure_regions({**memcached_config(cache.url), "secret": "s3cret"})
        assert once(rows, get_user, 1).name == "user1"
        assert counters()["bad_entries"] == 1

    def test_signed_entry_copied_to_another_key_is_refused(self, rows: Engine, cache: Any) -> None:
        cachedecor.configure_regions({**memcached_config(cache.url), "secret": "s3cret"})
        once(rows, get_user, 1)
        client = raw_client(cache.port)
        client.set(get_user.cache_key(2), client.get(get_user.cache_key(1)), noreply=False)
        assert once(rows, get_user, 2).name == "user2"
        assert counters()["bad_entries"] == 1


class TestOversized:
    def test_entry_over_max_entry_size_is_not_cached(self, rows: Engine, cache: Any, sql: SQLCounter) -> None:
        cachedecor.configure_regions(memcached_config(cache.url, max_entry_size=8))
        assert once(rows, get_user, 1).name == "user1"
        assert once(rows, get_user, 1).name == "user1"
        assert sql.selects() == 2
        assert counters()["oversized"] == 2

    def test_value_the_server_refuses_is_not_cached(self, rows: Engine, memcached_factory: Any) -> None:
        server = memcached_factory(item_size="1m")
        cachedecor.configure_regions(
            memcached_config(server.url, compression="none", max_entry_size=4_000_000)
        )
        with Session(rows) as s:
            s.get(User, 3).name = "y" * 1_500_000  # type: ignore[union-attr]
            s.commit()
        assert len(once(rows, get_user, 3).name) == 1_500_000
        assert len(once(rows, get_user, 3).name) == 1_500_000
        assert counters()["fills"] == 0
        assert counters()["oversized"] == 2
        assert counters()["errors"] == 0  # the server answered: it is not marked down
