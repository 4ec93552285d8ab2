"""The guarantees of both decorators, for sync and async callers: one suite, run for both.

Every test here runs for each kind of caller (``def`` functions with a ``Session``,
``async def`` functions with an ``AsyncSession``), on every backend (memcached with
meta commands and with classic leases, Redis, memory) and on SQLite and
PostgreSQL. The decorated functions exist in pairs with the same body, one per
kind (see :mod:`tests.kinds`); the tests themselves are written once.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import cachedecor
from cachedecor import UsageError, cached_by_pk, invalidates
from cachedecor.config import region_settings
from tests.conftest import reconfigure
from tests.kinds import KINDS, Flag, Kind
from tests.models import Employee, Engineer, Manager, Membership, Post, User

# -- the decorated functions, one per kind --------------------------------------------


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    """Load one user."""
    return session.get(User, user_id)


@cached_by_pk(User)
async def aget_user(session: AsyncSession, user_id: int) -> User | None:
    """Load one user."""
    return await session.get(User, user_id)


GET_USER = (get_user, aget_user)


@cached_by_pk(User)
def get_post_as_user(session: Session, user_id: int) -> Any:
    """A mistake: declared to return users, it returns a post."""
    return session.get(Post, 10 * user_id)


@cached_by_pk(User)
async def aget_post_as_user(session: AsyncSession, user_id: int) -> Any:
    """A mistake: declared to return users, it returns a post."""
    return await session.get(Post, 10 * user_id)


GET_POST_AS_USER = (get_post_as_user, aget_post_as_user)


@cached_by_pk(User, many=True)
def get_users(session: Session, user_ids: list[int]) -> list[User]:
    CALLS.append(list(user_ids))
    return list(session.scalars(select(User).where(User.id.in_(user_ids))))


@cached_by_pk(User, many=True)
async def aget_users(session: AsyncSession, user_ids: list[int]) -> list[User]:
    CALLS.append(list(user_ids))
    return list(await session.scalars(select(User).where(User.id.in_(user_ids))))


GET_USERS = (get_users, aget_users)
CALLS: list[Any] = []


@cached_by_pk(User, cache_none=True)
def get_user_or_none(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(User, cache_none=True)
async def aget_user_or_none(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


GET_USER_OR_NONE = (get_user_or_none, aget_user_or_none)


@cached_by_pk(User)
def get_user_detached(user_id: int) -> User | None:
    with Session(ENGINES["sync"]) as s:
        user = s.get(User, user_id)
        s.expunge_all()
        return user


@cached_by_pk(User)
async def aget_user_detached(user_id: int) -> User | None:
    async with AsyncSession(ENGINES["async"]) as s:
        user = await s.get(User, user_id)
        s.expunge_all()
        return user


GET_USER_DETACHED = (get_user_detached, aget_user_detached)
#: the engines of the running test, for the functions that make their own session
ENGINES: dict[str, Any] = {}


@cached_by_pk(Employee)
def get_employee(session: Session, employee_id: int) -> Employee | None:
    return session.get(Employee, employee_id)


@cached_by_pk(Employee)
async def aget_employee(session: AsyncSession, employee_id: int) -> Employee | None:
    return await session.get(Employee, employee_id)


GET_EMPLOYEE = (get_employee, aget_employee)


@cached_by_pk(Membership, pk=("tenant", "member_id"))
def get_membership(session: Session, tenant: str, member_id: int) -> Membership | None:
    return session.get(Membership, (tenant, member_id))


@cached_by_pk(Membership, pk=("tenant", "member_id"))
async def aget_membership(session: AsyncSession, tenant: str, member_id: int) -> Membership | None:
    return await session.get(Membership, (tenant, member_id))


GET_MEMBERSHIP = (get_membership, aget_membership)


#: what the paused readers below do: set ``read`` after reading the database, then wait for ``go``
PAUSE: dict[str, Flag] = {}
READS: list[int] = []


@cached_by_pk(User)
def get_user_paused(session: Session, user_id: int) -> User | None:
    READS.append(user_id)
    user = session.get(User, user_id)
    PAUSE["read"].set()
    PAUSE["go"].wait()
    return user


@cached_by_pk(User)
async def aget_user_paused(session: AsyncSession, user_id: int) -> User | None:
    READS.append(user_id)
    user = await session.get(User, user_id)
    PAUSE["read"].set()
    await PAUSE["go"].await_()
    return user


GET_USER_PAUSED = (get_user_paused, aget_user_paused)


@invalidates(User)
def rename(session: Session, user_id: int, name: str) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.name = name
    session.commit()


@invalidates(User)
async def arename(session: AsyncSession, user_id: int, name: str) -> None:
    user = await session.get(User, user_id)
    assert user is not None
    user.name = name
    await session.commit()


RENAME = (rename, arename)


@invalidates(User)
def rename_no_commit(session: Session, user_id: int, name: str) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.name = name
    session.flush()


@invalidates(User)
async def arename_no_commit(session: AsyncSession, user_id: int, name: str) -> None:
    user = await session.get(User, user_id)
    assert user is not None
    user.name = name
    await session.flush()


RENAME_NO_COMMIT = (rename_no_commit, arename_no_commit)


@invalidates(User)
def rename_all(session: Session, name: str) -> None:
    session.execute(update(User).where(User.id <= 2).values(name=name))
    session.commit()


@invalidates(User)
async def arename_all(session: AsyncSession, name: str) -> None:
    await session.execute(update(User).where(User.id <= 2).values(name=name))
    await session.commit()


RENAME_ALL = (rename_all, arename_all)


@invalidates(User)
def remove(session: Session, user_id: int) -> None:
    session.execute(delete(Post).where(Post.user_id == user_id))
    user = session.get(User, user_id)
    session.delete(user)
    session.commit()


@invalidates(User)
async def aremove(session: AsyncSession, user_id: int) -> None:
    await session.execute(delete(Post).where(Post.user_id == user_id))
    user = await session.get(User, user_id)
    await session.delete(user)
    await session.commit()


REMOVE = (remove, aremove)


@invalidates(User, pk="user_id")
def touch(session: Session, user_id: int) -> None:
    session.execute(update(User).where(User.id == user_id).values(name="touched"))
    session.commit()


@invalidates(User, pk="user_id")
async def atouch(session: AsyncSession, user_id: int) -> None:
    await session.execute(update(User).where(User.id == user_id).values(name="touched"))
    await session.commit()


TOUCH = (touch, atouch)

#: scoped sessions, the way Flask-SQLAlchemy's ``db.session`` and FastAPI apps hold them
SCOPED: dict[str, Any] = {}


@invalidates(User)
def rename_scoped(user_id: int, name: str) -> None:
    session = SCOPED["sync"]
    session.get(User, user_id).name = name
    session.commit()


@invalidates(User)
async def arename_scoped(user_id: int, name: str) -> None:
    session = SCOPED["async"]
    (await session.get(User, user_id)).name = name
    await session.commit()


RENAME_SCOPED = (rename_scoped, arename_scoped)


@cached_by_pk(User, session=lambda: SCOPED["sync"])
def get_user_scoped(user_id: int) -> User | None:
    return SCOPED["sync"].get(User, user_id)  # type: ignore[no-any-return]


@cached_by_pk(User, session=lambda: SCOPED["async"])
async def aget_user_scoped(user_id: int) -> User | None:
    return await SCOPED["async"].get(User, user_id)  # type: ignore[no-any-return]


GET_USER_SCOPED = (get_user_scoped, aget_user_scoped)


@invalidates(User)
def rename_unflushed(session: Session, user_id: int, name: str) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.name = name  # neither flushed nor committed: the caller does both


@invalidates(User)
async def arename_unflushed(session: AsyncSession, user_id: int, name: str) -> None:
    user = await session.get(User, user_id)
    assert user is not None
    user.name = name


RENAME_UNFLUSHED = (rename_unflushed, arename_unflushed)


class Users:
    """A repository whose methods use ``self.session``."""

    def __init__(self, session: Any) -> None:
        self.session = session

    @cached_by_pk(User)
    def get(self, user_id: int) -> User | None:
        return self.session.get(User, user_id)  # type: ignore[no-any-return]

    @invalidates(User)
    def rename(self, user_id: int, name: str) -> None:
        self.session.get(User, user_id).name = name
        self.session.commit()


class AsyncUsers:
    def __init__(self, session: Any) -> None:
        self.session = session

    @cached_by_pk(User)
    async def get(self, user_id: int) -> User | None:
        return await self.session.get(User, user_id)  # type: ignore[no-any-return]

    @invalidates(User)
    async def rename(self, user_id: int, name: str) -> None:
        (await self.session.get(User, user_id)).name = name
        await self.session.commit()


# -- fixtures -----------------------------------------------------------------------------


def add_users(engine: Engine, n: int = 3) -> None:
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user{i}", bio=f"bio of {i}") for i in range(1, n + 1)])
        s.add_all([Post(id=10 * i, user_id=i, title=f"post of {i}") for i in range(1, n + 1)])
        s.add_all([Manager(id=1, name="Grace", budget=10), Engineer(id=2, name="Linus", language="c")])
        s.add(Membership(tenant="acme", id=7, role="admin"))
        s.commit()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, engine: Engine, backend: str) -> Iterator[Kind]:
    """Each test runs for sync and async callers, on every backend and database."""
    add_users(engine)
    CALLS.clear()
    READS.clear()
    made = Kind(request.param, engine)
    ENGINES.update({"sync": engine, "async": made.async_engine})
    SCOPED["sync"] = scoped_session(sessionmaker(engine))
    if made.is_async:
        # one session per test (a web application scopes by request; the calls of a
        # test run in tasks of their own)
        SCOPED["async"] = async_scoped_session(
            async_sessionmaker(made.async_engine), scopefunc=lambda: "test"
        )
    yield made
    SCOPED["sync"].remove()
    if made.is_async:
        made.run(SCOPED["async"].remove())
    made.close()


def stat(name: str) -> int:
    return cachedecor.stats("default")["default"][name]


# -- reads --------------------------------------------------------------------------------


class TestReads:
    def test_a_second_read_is_served_from_the_cache(self, kind: Kind) -> None:
        assert kind.once(GET_USER, 1).name == "user1"
        assert kind.sql.selects() == 1
        assert kind.once(GET_USER, 1).name == "user1"
        assert kind.sql.selects() == 1
        assert (stat("hits"), stat("misses"), stat("fills")) == (1, 1, 1)

    def test_a_hit_is_attached_to_the_callers_session_and_reads_without_io(self, kind: Kind) -> None:
        kind.once(GET_USER, 1)
        with kind.session() as s:
            user = kind.call(GET_USER, s, 1)
            assert user in s.sync
            kind.sql.reset()
            assert (user.id, user.name, user.version) == (1, "user1", 0)
            assert kind.sql.count == 0
            assert s.get(User, 1) is user
            assert not s.sync.dirty and not s.sync.new

    def test_an_instance_already_in_the_session_wins(self, kind: Kind) -> None:
        kind.once(GET_USER, 1)
        with kind.session() as s:
            mine = s.get(User, 1)
            mine.name = "pending"
            assert kind.call(GET_USER, s, 1) is mine
            assert mine.name == "pending"
            assert mine in s.sync.dirty

    def test_without_a_session_the_hit_is_detached(self, kind: Kind) -> None:
        first = kind.call(GET_USER_DETACHED, 1)
        second = kind.call(GET_USER_DETACHED, 1)
        assert first.name == second.name == "user1"
        assert stat("hits") == 1
        from sqlalchemy import inspect as sa_inspect

        assert sa_inspect(second).detached

    def test_none_is_not_cached_unless_asked(self, kind: Kind) -> None:
        assert kind.once(GET_USER, 99) is None
        assert kind.once(GET_USER, 99) is None
        assert kind.sql.selects() == 2
        kind.sql.reset()
        assert kind.once(GET_USER_OR_NONE, 99) is None
        assert kind.once(GET_USER_OR_NONE, 99) is None
        assert kind.sql.selects() == 1

    def test_a_reader_returning_another_model_is_a_usage_error_and_caches_nothing(self, kind: Kind) -> None:
        for _ in range(2):  # the same on the second call: nothing was cached
            with pytest.raises(UsageError) as raised:
                kind.once(GET_POST_AS_USER, 1)
            message = str(raised.value)
            assert "get_post_as_user" in message
            assert "@cached_by_pk(User)" in message and "tests.models.Post" in message
        assert (stat("fills"), stat("hits")) == (0, 0)
        # the lease was given back: the right reader fills at once, without waiting for it
        assert kind.once(GET_USER, 1).name == "user1"
        assert (stat("fills"), stat("lease_waits")) == (1, 0)

    def test_a_reader_returning_another_model_is_refused_also_where_it_bypasses(self, kind: Kind) -> None:
        with kind.session() as s:
            kind.call(RENAME_NO_COMMIT, s, 1, "Ada")  # reads of user 1 in this transaction bypass
            with pytest.raises(UsageError, match="get_post_as_user"):
                kind.call(GET_POST_AS_USER, s, 1)
            assert stat("bypasses") == 1
            s.rollback()

    def test_many_calls_the_function_with_the_missing_keys_only(self, kind: Kind) -> None:
        kind.once(GET_USER, 2)
        with kind.session() as s:
            rows = kind.call(GET_USERS, s, [3, 2, 99, 1, 3])
        assert [u.id for u in rows] == [3, 2, 1]
        assert CALLS == [[3, 99, 1]]
        with kind.session() as s:
            assert [u.name for u in kind.call(GET_USERS, s, [1, 2, 3])] == ["user1", "user2", "user3"]
        assert CALLS == [[3, 99, 1]]

    def test_a_hierarchy_returns_the_right_subclass(self, kind: Kind) -> None:
        kind.once(GET_EMPLOYEE, 1)
        kind.once(GET_EMPLOYEE, 2)
        with kind.session() as s:
            grace = kind.call(GET_EMPLOYEE, s, 1)
            linus = kind.call(GET_EMPLOYEE, s, 2)
            # subclass columns load on access, as for an uncached instance (under asyncio:
            # only if the loader options loaded them)
            assert type(grace) is Manager and grace.name == "Grace"
            assert type(linus) is Engineer and linus.name == "Linus"
        assert stat("hits") == 2

    def test_a_composite_key(self, kind: Kind) -> None:
        kind.once(GET_MEMBERSHIP, "acme", 7)
        with kind.session() as s:
            member = kind.call(GET_MEMBERSHIP, s, "acme", 7)
            assert member.role == "admin"
        assert stat("hits") == 1

    def test_concurrent_misses_of_one_key_make_one_database_call(self, kind: Kind, backend: str) -> None:
        reconfigure(backend, lease_wait=10)
        PAUSE["read"], PAUSE["go"] = kind.flag(), kind.flag()

        def reader() -> Any:
            with kind.session() as s:
                return kind.fn(*GET_USER_PAUSED)(s.arg, 1)

        async def areader() -> Any:
            async with AsyncSession(kind.async_engine) as s:
                return await aget_user_paused(s, 1)

        first = kind.start(areader if kind.is_async else reader)
        kind.until(PAUSE["read"])  # the first reader holds the fill lease
        others = [kind.start(areader if kind.is_async else reader) for _ in range(4)]
        # the others wait for that fill: they are counted as they start waiting
        _poll(kind, lambda: stat("lease_waits") == 4)
        PAUSE["go"].set()
        names = [first().name] + [o().name for o in others]
        assert names == ["user1"] * 5
        assert READS == [1]
        assert stat("fills") == 1

    def test_garbage_in_the_cache_is_a_miss_deleted_and_counted(self, kind: Kind) -> None:
        key = get_user.cache_key(1)
        region_settings("default").store.delete_many([key])
        _put(key, b"\x99 not an entry")
        assert kind.once(GET_USER, 1).name == "user1"
        assert stat("bad_entries") == 1
        assert kind.once(GET_USER, 1).name == "user1"
        assert stat("hits") == 1


# -- writes -------------------------------------------------------------------------------


class TestWrites:
    def test_a_committed_write_is_invalidated_before_the_call_returns(self, kind: Kind) -> None:
        kind.once(GET_USER, 1)
        with kind.session() as s:
            kind.call(RENAME, s, 1, "Ada")
        assert stat("invalidations") == 1
        assert kind.once(GET_USER, 1).name == "Ada"

    def test_the_callers_commit_invalidates_not_the_flush(self, kind: Kind) -> None:
        kind.once(GET_USER, 1)
        with kind.session() as s:
            kind.call(RENAME_NO_COMMIT, s, 1, "Ada")
            assert stat("invalidations") == 0
            assert kind.once(GET_USER, 1).name == "user1"  # others do not see it early
            s.commit()
        assert stat("invalidations") == 1
        assert kind.once(GET_USER, 1).name == "Ada"

    def test_a_rollback_invalidates_nothing(self, kind: Kind) -> None:
        kind.once(GET_USER, 1)
        with kind.session() as s:
            kind.call(RENAME_NO_COMMIT, s, 1, "Ada")
            s.rollback()
        assert stat("invalidations") == 0
        assert kind.once(GET_USER, 1).name == "user1"
        assert stat("hits") >= 1

    def test_the_writing_transaction_reads_its_own_writes_and_fills_nothing(self, kind: Kind) -> None:
        kind.once(GET_USER, 1)
        with kind.session() as s:
            kind.call(RENAME_NO_COMMIT, s, 1, "Ada")
            kind.call(GET_USER, s, 3)  # a miss in a transaction that wrote: not filled
            assert kind.call(GET_USER, s, 1).name == "Ada"
            assert stat("bypasses") == 1
            s.rollback()
        assert kind.once(GET_USER, 1).name == "user1"
        kind.sql.reset()
        kind.once(GET_USER, 3)
        assert kind.sql.selects() == 1  # row 3 was not cached by the writing transaction

    def test_a_bulk_update_invalidates_every_affected_row(self, kind: Kind) -> None:
        for pk in (1, 2, 3):
            kind.once(GET_USER, pk)
        with kind.session() as s:
            kind.call(RENAME_ALL, s, "bulk")
        assert [kind.once(GET_USER, pk).name for pk in (1, 2, 3)] == ["bulk", "bulk", "user3"]

    def test_a_delete_is_invalidated(self, kind: Kind) -> None:
        kind.once(GET_USER, 3)
        with kind.session() as s:
            kind.call(REMOVE, s, 3)
        assert kind.once(GET_USER, 3) is None

    def test_pk_names_a_key_to_invalidate_after_commit(self, kind: Kind) -> None:
        kind.once(GET_USER, 2)
        with kind.session() as s:
            kind.call(TOUCH, s, 2)
        assert kind.once(GET_USER, 2).name == "touched"

    def test_writes_through_a_scoped_session_that_is_not_an_argument(self, kind: Kind) -> None:
        kind.once(GET_USER, 1)
        kind.call(RENAME_SCOPED, 1, "scoped")
        assert kind.once(GET_USER, 1).name == "scoped"

    def test_a_change_left_unflushed_is_invalidated_when_the_caller_commits(self, kind: Kind) -> None:
        kind.once(GET_USER, 1)
        with kind.session() as s:
            kind.call(RENAME_UNFLUSHED, s, 1, "later")
            assert stat("invalidations") == 0
            s.commit()
        assert kind.once(GET_USER, 1).name == "later"

    def test_a_scoped_session_found_by_the_reader(self, kind: Kind) -> None:
        assert kind.call(GET_USER_SCOPED, 1).name == "user1"
        user = kind.call(GET_USER_SCOPED, 1)
        assert stat("hits") == 1
        from sqlalchemy import inspect as sa_inspect

        assert sa_inspect(user).session is not None  # attached to the scoped session it found

    def test_methods_use_self_session(self, kind: Kind) -> None:
        repo_class = AsyncUsers if kind.is_async else Users
        with kind.session() as s:
            repo = repo_class(s.arg)
            assert kind.run(repo.get(1)).name == "user1"
        with kind.session() as s:
            repo = repo_class(s.arg)
            assert kind.run(repo.get(1)) in s.sync
            assert stat("hits") == 1
            kind.run(repo.rename(1, "method"))
        with kind.session() as s:
            assert kind.run(repo_class(s.arg).get(1)).name == "method"

    def test_no_stale_fill_from_a_reader_that_read_before_the_commit(self, kind: Kind) -> None:
        PAUSE["read"], PAUSE["go"] = kind.flag(), kind.flag()

        def reader() -> Any:
            with kind.session() as s:
                return kind.fn(*GET_USER_PAUSED)(s.arg, 1)

        async def areader() -> Any:
            async with AsyncSession(kind.async_engine) as s:
                return await aget_user_paused(s, 1)

        slow = kind.start(areader if kind.is_async else reader)
        kind.until(PAUSE["read"])  # it read "user1" and holds the fill lease
        with kind.session() as s:
            kind.call(RENAME, s, 1, "new")
        PAUSE["go"].set()
        assert slow().name == "user1"  # what it read, returned to its own caller
        assert kind.once(GET_USER, 1).name == "new"  # but never left in the cache
        assert stat("fills") == 1  # the new row's; the paused reader's fill was refused

    def test_direct_invalidation(self, kind: Kind) -> None:
        kind.once(GET_USER, 1)
        kind.once(GET_USER, 2)
        with kind.session() as s:
            s.execute(update(User).values(name="behind"))
            s.commit()
        kind.run(kind.fn(get_user, aget_user).invalidate(1))
        if kind.is_async:
            kind.run(cachedecor.ainvalidate_many(User, [2]))
        else:
            cachedecor.invalidate_many(User, [2])
        assert [kind.once(GET_USER, pk).name for pk in (1, 2)] == ["behind", "behind"]

    def test_refresh_refills_whatever_the_cache_holds(self, kind: Kind) -> None:
        kind.once(GET_USER, 1)
        with kind.session() as s:
            s.execute(update(User).values(name="behind"))
            s.commit()
        with kind.session() as s:
            assert kind.run(kind.fn(get_user, aget_user).refresh(s.arg, 1)).name == "behind"
        kind.sql.reset()
        assert kind.once(GET_USER, 1).name == "behind"
        assert kind.sql.selects() == 0


class TestWrappers:
    def test_the_wrapper_keeps_the_functions_identity(self, kind: Kind) -> None:
        fn = kind.fn(get_user, aget_user)
        assert fn.__name__ == ("aget_user" if kind.is_async else "get_user")
        assert fn.__doc__ == "Load one user."
        assert list(inspect.signature(fn).parameters) == ["session", "user_id"]
        assert inspect.iscoroutinefunction(fn.__call__) is kind.is_async
        # what frameworks (FastAPI, Starlette) ask of the wrapper itself, before awaiting it
        if sys.version_info >= (3, 12):
            assert inspect.iscoroutinefunction(fn) is kind.is_async
        else:
            assert asyncio.iscoroutinefunction(fn) is kind.is_async
        assert fn.cache_key(1) == get_user.cache_key(1)
        assert fn.region is cachedecor.get_region()

    def test_the_invalidating_wrapper_is_a_coroutine_function_for_async_def(self, kind: Kind) -> None:
        fn = kind.fn(rename, arename)
        assert inspect.iscoroutinefunction(fn) is kind.is_async
        assert list(inspect.signature(fn).parameters) == ["session", "user_id", "name"]


class TestNoBlockingIO:
    def test_each_kind_of_caller_uses_its_own_kind_of_store(self, kind: Kind) -> None:
        """Async callers never touch the blocking store (no socket I/O on the loop's
        thread), sync callers never the asyncio one: both are wrapped to record calls.

        (The memory backend's asyncio store runs the in-process store's operations on
        the loop: those calls are counted as the asyncio store's.)"""
        settings = region_settings("default")
        used: list[str] = []
        for label, store in (("sync", settings.store), ("async", settings.astore)):
            for name in ("lookup", "lookup_many", "peek", "fill", "fill_many", "release", "delete_many"):
                _record(store, name, label, used)
        kind.once(GET_USER, 1)  # miss, lease, fill
        kind.once(GET_USER, 1)  # hit
        with kind.session() as s:
            kind.call(GET_USERS, s, [1, 2])
            kind.call(RENAME, s, 1, "Ada")  # after-commit delete
        kind.run(kind.fn(get_user, aget_user).invalidate(2))
        assert used and set(used) == {kind.name}


# -- every async driver ----------------------------------------------------------------------


@pytest.fixture(params=["asyncpg", "psycopg"])
def driver(request: pytest.FixtureRequest, pg_engine: Engine, cache: Any) -> Iterator[Kind]:
    """Async callers on PostgreSQL through each async driver, on memcached."""
    add_users(pg_engine)
    made = Kind("async", pg_engine, request.param)
    yield made
    made.close()


class TestAsyncDrivers:
    def test_hits_attach_and_commits_invalidate(self, driver: Kind) -> None:
        driver.once(GET_USER, 1)
        with driver.session() as s:
            assert driver.call(GET_USER, s, 1) in s.sync
            driver.call(RENAME, s, 1, "Ada")
        assert driver.once(GET_USER, 1).name == "Ada"

    def test_own_writes_and_rollback(self, driver: Kind) -> None:
        driver.once(GET_USER, 1)
        with driver.session() as s:
            driver.call(RENAME_NO_COMMIT, s, 1, "Ada")
            assert driver.call(GET_USER, s, 1).name == "Ada"
            s.rollback()
        assert stat("invalidations") == 0
        assert driver.once(GET_USER, 1).name == "user1"


# -- helpers --------------------------------------------------------------------------------


_INSIDE_ASYNC: list[int] = []


def _record(store: Any, name: str, label: str, used: list[str]) -> None:
    """Wrap ``store.name`` (on the instance) to note ``label`` each time it is called
    (not when the asyncio store calls it)."""
    method = getattr(store, name)
    if inspect.iscoroutinefunction(method):

        async def arecorded(*args: Any, **kwargs: Any) -> Any:
            used.append(label)
            _INSIDE_ASYNC.append(1)
            try:
                return await method(*args, **kwargs)
            finally:
                _INSIDE_ASYNC.pop()

        setattr(store, name, arecorded)
    else:

        def recorded(*args: Any, **kwargs: Any) -> Any:
            if not _INSIDE_ASYNC:
                used.append(label)
            return method(*args, **kwargs)

        setattr(store, name, recorded)


def _put(key: str, value: bytes) -> None:
    """Write raw bytes under ``key`` in region ``default``'s store, behind cachedecor."""
    store = region_settings("default").store
    lease = store.lease(key, 60)
    assert lease is not None
    assert store.fill(key, value, lease, 60)


def _poll(kind: Kind, condition: Any, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, driving the event loop for async callers."""
    if kind.is_async:
        import asyncio

        async def wait() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not condition():
                if loop.time() > deadline:
                    raise AssertionError("condition not reached")
                await asyncio.sleep(0.001)

        kind.run(wait())
    else:
        from tests.conftest import wait_until

        wait_until(condition, timeout)
