"""No stale fill and single-flight, with the race forced deterministically.

The slow reader is simulated by running the writer *inside* the reader's wrapped
function, after its database read and before cachedecor writes the cache: the
exact interleaving that leaves stale rows behind with plain cache-aside.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import cached_by_pk, invalidates
from tests.conftest import once, wait_until
from tests.models import User


@invalidates(User)
def bump(session: Session, user_id: int) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.version += 1
    session.commit()


def version_in_db(engine: Engine, user_id: int) -> int:
    with Session(engine) as s:
        user = s.get(User, user_id)
        assert user is not None
        return user.version


@pytest.fixture
def row(engine: Engine, backend: str) -> Engine:
    with Session(engine) as s:
        s.add(User(id=1, name="racer", version=0))
        s.commit()
    return engine


def counters(region: str = "default") -> dict[str, int]:
    return cachedecor.stats(region)[region]


class TestNoStaleFill:
    def test_write_between_a_readers_read_and_its_fill_wins(self, row: Engine) -> None:
        @cached_by_pk(User)
        def slow_reader(session: Session, user_id: int) -> User | None:
            user = session.get(User, user_id)
            assert user is not None
            user.version  # noqa: B018 - the database read is done
            once(row, bump, user_id)  # a writer commits and invalidates meanwhile
            return user

        stale = once(row, slow_reader, 1)
        assert stale.version == 0
        assert counters()["lease_losses"] == 1
        assert counters()["fills"] == 0
        assert version_in_db(row, 1) == 1

        @cached_by_pk(User)
        def reader(session: Session, user_id: int) -> User | None:
            return session.get(User, user_id)

        assert once(row, reader, 1).version == 1
        assert once(row, reader, 1).version == 1
        assert counters()["hits"] == 1

    def test_many_reader_loses_its_fill_to_a_concurrent_write(self, row: Engine) -> None:
        @cached_by_pk(User, many=True)
        def slow_many(session: Session, ids: list[int]) -> list[User]:
            users = [session.get(User, i) for i in ids]
            once(row, bump, 1)
            return [u for u in users if u is not None]

        assert [u.version for u in once(row, slow_many, [1])] == [0]
        assert counters()["lease_losses"] == 1
        assert version_in_db(row, 1) == 1

    def test_naive_cache_aside_would_have_left_the_stale_row(self, row: Engine) -> None:
        """Control: the same interleaving with a plain get/set leaves the old version behind."""
        region = cachedecor.get_region()
        key = "naive:user:1"

        with Session(row) as s:
            user = s.get(User, 1)
            assert user is not None
            old_version = user.version
            once(row, bump, 1)
            region.delete(key)  # the writer's invalidation
            region.set(key, old_version)  # the slow reader's late set
        assert region.get(key) == 0 != version_in_db(row, 1)


@cached_by_pk(User)
def read_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@pytest.fixture
def pg_row(pg_engine: Engine, backend: str) -> Engine:
    with Session(pg_engine) as s:
        s.add(User(id=1, name="racer", version=0))
        s.commit()
    return pg_engine


class TestSnapshotIsolation:
    """At REPEATABLE READ a transaction reads a snapshot from its first statement."""

    def test_a_transaction_with_an_older_snapshot_does_not_fill(self, pg_row: Engine) -> None:
        engine = pg_row.execution_options(isolation_level="REPEATABLE READ")
        with Session(engine) as old:
            old.execute(select(User.id)).all()  # the snapshot starts here
            once(pg_row, bump, 1)  # committed and invalidated after it
            assert read_user(old, 1).version == 0  # what this snapshot sees ...
        assert cachedecor.stats()["default"]["fills"] == 0  # ... is never cached
        assert once(engine, read_user, 1).version == 1

    def test_a_transaction_without_a_statement_yet_fills(self, pg_row: Engine) -> None:
        engine = pg_row.execution_options(isolation_level="REPEATABLE READ")
        assert once(engine, read_user, 1).version == 0
        assert cachedecor.stats()["default"]["fills"] == 1

    def test_read_committed_transactions_fill_after_earlier_statements(self, pg_row: Engine) -> None:
        with Session(pg_row) as s:
            s.execute(select(User.id)).all()
            assert read_user(s, 1).version == 0
        assert cachedecor.stats()["default"]["fills"] == 1


class TestSingleFlight:
    def test_concurrent_misses_fill_once_and_the_waiter_gets_the_value(self, row: Engine) -> None:
        entered = threading.Event()
        release = threading.Event()
        calls: list[int] = []

        @cached_by_pk(User)
        def blocking_reader(session: Session, user_id: int) -> User | None:
            calls.append(user_id)
            if len(calls) == 1:
                entered.set()
                assert release.wait(10)
            return session.get(User, user_id)

        settings = cachedecor.config.region_settings("default")
        cachedecor.configure_regions({"regions": {"default": {**_same_backend(settings), "lease_wait": 5}}})
        results: dict[str, Any] = {}

        def first() -> None:
            results["first"] = once(row, blocking_reader, 1).name

        def second() -> None:
            results["second"] = once(row, blocking_reader, 1).name

        t1 = threading.Thread(target=first)
        t1.start()
        assert entered.wait(10)
        t2 = threading.Thread(target=second)
        t2.start()
        wait_until(lambda: counters()["lease_waits"] == 1)
        release.set()
        t1.join(10)
        t2.join(10)
        assert results == {"first": "racer", "second": "racer"}
        assert calls == [1]
        assert counters()["fills"] == 1

    def test_with_lease_wait_zero_a_concurrent_miss_reads_through_without_filling(self, row: Engine) -> None:
        settings = cachedecor.config.region_settings("default")
        cachedecor.configure_regions({"regions": {"default": {**_same_backend(settings), "lease_wait": 0}}})
        calls: list[int] = []

        @cached_by_pk(User)
        def nested_reader(session: Session, user_id: int) -> User | None:
            calls.append(user_id)
            if len(calls) == 1:
                # another reader misses while this one holds the lease
                assert once(row, nested_reader, user_id).name == "racer"
            return session.get(User, user_id)

        assert once(row, nested_reader, 1).name == "racer"
        assert calls == [1, 1]
        assert counters()["fills"] == 1
        assert counters()["lease_wins"] == 1


def _same_backend(settings: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"backend": settings.backend, "arguments": dict(settings.arguments)}
    return options
