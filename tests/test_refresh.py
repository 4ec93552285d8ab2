"""The wrapper's ``refresh()`` (call through, refill under a lease) and ``uncached()`` (no cache)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from tests.conftest import SQLCounter, once, rename_behind_the_cache
from tests.models import User

#: run inside the wrapped functions after they read: a write racing with the read
after_read: list[Callable[[], None]] = []


@cachedecor.cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    user = session.get(User, user_id)
    for hook in after_read:
        hook()
    return user


@cachedecor.cached_by_pk(User, many=True)
def get_users(session: Session, user_ids: list[int]) -> list[User]:
    users = list(session.scalars(select(User).where(User.id.in_(user_ids)).order_by(User.id.desc())))
    for hook in after_read:
        hook()
    return users


class Repository:
    def __init__(self, session: Session) -> None:
        self.session = session

    @cachedecor.cached_by_pk(User)
    def user(self, user_id: int) -> User | None:
        return self.session.get(User, user_id)


@pytest.fixture(autouse=True)
def _no_hooks() -> Iterator[None]:
    yield
    after_read.clear()


@pytest.fixture
def rows(sqlite_engine: Engine, cache: Any) -> Engine:
    with Session(sqlite_engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in range(1, 4)])
        s.commit()
    return sqlite_engine


@pytest.fixture
def sql(rows: Engine) -> Iterator[SQLCounter]:
    counter = SQLCounter(rows)
    yield counter
    counter.close()


def committed_write(engine: Engine, user_id: int, name: str) -> Callable[[], None]:
    """A write committed by another process's @invalidates while a reader holds its row."""

    def write() -> None:
        rename_behind_the_cache(engine, user_id, name)
        cachedecor.invalidate(User, user_id)

    return write


def counters() -> dict[str, int]:
    return cachedecor.stats("default")["default"]


class TestRefresh:
    def test_calls_through_and_refills_the_entry(self, rows: Engine, sql: SQLCounter) -> None:
        once(rows, get_user, 1)
        rename_behind_the_cache(rows, 1, "renamed")
        assert once(rows, get_user, 1).name == "user1"
        assert once(rows, get_user.refresh, 1).name == "renamed"
        sql.reset()
        assert once(rows, get_user, 1).name == "renamed"
        assert sql.count == 0

    def test_never_stores_a_row_older_than_a_write_committed_meanwhile(self, rows: Engine) -> None:
        once(rows, get_user, 1)
        after_read.append(committed_write(rows, 1, "written meanwhile"))
        assert once(rows, get_user.refresh, 1).name == "user1"  # what it read
        after_read.clear()
        assert once(rows, get_user, 1).name == "written meanwhile"
        assert counters()["lease_losses"] == 1

    def test_stores_nothing_inside_a_transaction_that_wrote_the_row(
        self, rows: Engine, sql: SQLCounter
    ) -> None:
        once(rows, get_user, 1)

        @cachedecor.invalidates(User)
        def rename(session: Session, user_id: int, name: str) -> None:
            session.get(User, user_id).name = name  # type: ignore[union-attr]
            session.flush()

        with Session(rows) as session:
            rename(session, 1, "uncommitted")
            assert get_user.refresh(session, 1).name == "uncommitted"
            session.rollback()
        assert once(rows, get_user, 1).name == "user1"

    def test_many_refreshes_every_requested_row(self, rows: Engine, sql: SQLCounter) -> None:
        assert [u.name for u in once(rows, get_users, [1, 2])] == ["user1", "user2"]
        rename_behind_the_cache(rows, 1, "renamed1")
        rename_behind_the_cache(rows, 3, "renamed3")
        sql.reset()
        refreshed = once(rows, get_users.refresh, [3, 1, 3, 2])
        assert [u.name for u in refreshed] == ["renamed3", "renamed1", "user2"]
        assert sql.selects() == 1
        sql.reset()
        assert [u.name for u in once(rows, get_users, [1, 2, 3])] == ["renamed1", "user2", "renamed3"]
        assert sql.count == 0

    def test_many_never_stores_rows_older_than_a_write_committed_meanwhile(self, rows: Engine) -> None:
        once(rows, get_users, [1, 2])
        after_read.append(committed_write(rows, 2, "written meanwhile"))
        assert [u.name for u in once(rows, get_users.refresh, [1, 2])] == ["user1", "user2"]
        after_read.clear()
        assert [u.name for u in once(rows, get_users, [1, 2])] == ["user1", "written meanwhile"]

    def test_works_on_a_decorated_method(self, rows: Engine, sql: SQLCounter) -> None:
        with Session(rows) as session:
            Repository(session).user(1)
        rename_behind_the_cache(rows, 1, "renamed")
        with Session(rows) as session:
            assert Repository(session).user.refresh(1).name == "renamed"  # type: ignore[union-attr]
        sql.reset()
        with Session(rows) as session:
            assert Repository(session).user(1).name == "renamed"  # type: ignore[union-attr]
        assert sql.count == 0


class TestUncached:
    def test_reads_the_database_and_leaves_the_cache_as_it_was(self, rows: Engine, sql: SQLCounter) -> None:
        once(rows, get_user, 1)
        rename_behind_the_cache(rows, 1, "renamed")
        before = counters()
        sql.reset()
        assert once(rows, get_user.uncached, 1).name == "renamed"
        assert once(rows, get_user.uncached, 2).name == "user2"
        assert sql.selects() == 2
        assert counters() == before  # nothing read, filled or counted
        assert once(rows, get_user, 1).name == "user1"  # the entry is untouched
        sql.reset()
        once(rows, get_user, 2)
        assert sql.selects() == 1  # and nothing was filled for 2

    def test_many_returns_what_a_call_returns_without_the_cache(self, rows: Engine, sql: SQLCounter) -> None:
        once(rows, get_users, [1])
        rename_behind_the_cache(rows, 1, "renamed")
        calls: list[list[int]] = []

        @cachedecor.cached_by_pk(User, many=True)
        def load(session: Session, user_ids: list[int]) -> list[User]:
            calls.append(list(user_ids))
            return get_users.__wrapped__(session, user_ids)

        before = counters()
        assert [u.name for u in once(rows, load.uncached, [3, 1, 99, 3])] == ["user3", "renamed"]
        assert calls == [[3, 1, 99]]
        assert counters() == before
        sql.reset()
        assert [u.name for u in once(rows, get_users, [1, 3])] == ["user1", "user3"]  # 1 cached, 3 not
        assert sql.selects() == 1

    def test_works_on_a_decorated_method(self, rows: Engine) -> None:
        with Session(rows) as session:
            Repository(session).user(1)
        rename_behind_the_cache(rows, 1, "renamed")
        with Session(rows) as session:
            user = Repository(session).user.uncached(1)
            assert user is not None and user.name == "renamed"
            assert Repository(session).user(1) is user  # the session's own instance wins
        with Session(rows) as session:
            assert Repository(session).user(1).name == "user1"  # type: ignore[union-attr]
