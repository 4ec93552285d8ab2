"""Sessions that are not arguments: repositories, scoped sessions, callables, paths.

A repository keeps its session on ``self``; an application keeps a module-level
``scoped_session``. Reads attach their hits to that session (lazy relationships
load), the key comes from the primary-key argument (never from ``self``), and
writes made through it while an ``@invalidates`` function runs are invalidated
after its transaction commits, never on rollback.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import inspect, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import cachedecor
from cachedecor import cached_by_pk, invalidates
from tests.conftest import SQLCounter, once
from tests.models import Membership, Post, User
from tests.servers import Memcached


class UserRepository:
    """The repository shape: the session lives on ``self``."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.asked: list[list[int]] = []

    @cached_by_pk(User)
    def get(self, user_id: int) -> User | None:
        return self.session.get(User, user_id)

    @cached_by_pk(User, many=True)
    def get_many(self, user_ids: list[int]) -> list[User]:
        self.asked.append(list(user_ids))
        return list(self.session.scalars(select(User).where(User.id.in_(user_ids))))

    @cached_by_pk(User)
    def load(self, session: Session, user_id: int) -> User | None:
        return session.get(User, user_id)

    @cached_by_pk(Membership)
    def membership(self, key: tuple[str, int]) -> Membership | None:
        return self.session.get(Membership, key)

    @cached_by_pk(Membership, pk=("tenant", "member_id"))
    def member(self, tenant: str, member_id: int) -> Membership | None:
        return self.session.get(Membership, (tenant, member_id))

    @invalidates(User)
    def rename(self, user_id: int, name: str) -> None:
        user = self.session.get(User, user_id)
        assert user is not None
        user.name = name
        self.session.commit()

    @invalidates(User)
    def rename_for_caller_to_commit(self, user_id: int, name: str) -> None:
        user = self.session.get(User, user_id)
        assert user is not None
        user.name = name

    @invalidates(User)
    def rename_flushed(self, user_id: int, name: str) -> None:
        user = self.session.get(User, user_id)
        assert user is not None
        user.name = name
        self.session.flush()

    @invalidates(User)
    def rename_then_roll_back(self, user_id: int, name: str) -> None:
        user = self.session.get(User, user_id)
        assert user is not None
        user.name = name
        self.session.flush()
        self.session.rollback()

    @invalidates(User)
    def rename_a_cached_read(self, user_id: int, name: str) -> None:
        user = self.get(user_id)
        assert user is not None
        user.name = name
        self.session.commit()

    @invalidates(User)
    def rename_in_bulk(self, below: int, name: str) -> None:
        self.session.execute(update(User).where(User.id < below).values(name=name))
        self.session.commit()

    @invalidates(User)
    def create(self, user_id: int, name: str) -> None:
        self.session.add(User(id=user_id, name=name))
        self.session.commit()

    @cached_by_pk(User, cache_none=True)
    def find(self, user_id: int) -> User | None:
        return self.session.get(User, user_id)

    @invalidates(User, pk="user_id")
    def touch_raw_and_read_back(self, user_id: int) -> User | None:
        # a write cachedecor cannot see (on the driver's own cursor), covered by pk=
        cursor = self.session.connection().connection.cursor()
        cursor.execute("UPDATE cd_users SET name = 'raw' WHERE id = %d" % int(user_id))  # noqa: UP031
        cursor.close()
        self.session.commit()
        return self.session.get(User, user_id)  # reading the row back begins a new transaction

    @invalidates(Membership)
    def change_role(self, key: tuple[str, int], role: str) -> None:
        membership = self.session.get(Membership, key)
        assert membership is not None
        membership.role = role
        self.session.commit()


class UserService:
    """A service reaching its session through a repository: ``session="self.repo.session"``."""

    def __init__(self, repo: UserRepository) -> None:
        self.repo = repo

    @cached_by_pk(User, session="self.repo.session")
    def find(self, user_id: int) -> User | None:
        return self.repo.session.get(User, user_id)


class EngineRepository:
    """A method whose object holds no session: hits come back detached."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @cached_by_pk(User)
    def get(self, user_id: int) -> User | None:
        with Session(self.engine) as s:
            return s.get(User, user_id)


#: the application's session registry, bound to the test's engine by the ``registry`` fixture
DBSession = scoped_session(sessionmaker())


class RegistryRepository:
    """A repository whose class holds the registry; its readers are classmethods."""

    session = DBSession

    @classmethod
    @cached_by_pk(User)
    def get(cls, user_id: int) -> User | None:
        return cls.session.get(User, user_id)


@cached_by_pk(User, session=DBSession)
def get_user_from_registry(user_id: int) -> User | None:
    return DBSession.get(User, user_id)


@cached_by_pk(User)
def get_user_from_untold_registry(user_id: int) -> User | None:
    """Not told where the session is: the module-level registry its code names is found."""
    return DBSession.get(User, user_id)


_current_session: contextvars.ContextVar[Session] = contextvars.ContextVar("current_session")


@cached_by_pk(User, session=_current_session.get)
def get_user_from_callable(user_id: int) -> User | None:
    return _current_session.get().get(User, user_id)


@invalidates(User)
def rename_in_registry(user_id: int, name: str) -> None:
    user = DBSession.get(User, user_id)
    assert user is not None
    user.name = name
    DBSession.commit()


@invalidates(User)
def rename_in_registry_for_caller_to_commit(user_id: int, name: str) -> None:
    user = DBSession.get(User, user_id)
    assert user is not None
    user.name = name


@invalidates(User)
def rename_in_a_session_of_its_own(user_id: int, name: str) -> None:
    with DBSession.session_factory() as session:
        user = session.get(User, user_id)
        assert user is not None
        user.name = name
        session.commit()


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@pytest.fixture
def store(cache: Memcached) -> str:
    """The cache: memcached; readers' classes take every backend (see ``EveryBackend``)."""
    return "memcached"


class EveryBackend:
    """Tests of a subclass run on every backend: each has its own lookup and multi-get."""

    @pytest.fixture
    def store(self, backend: str) -> str:
        return backend


@pytest.fixture
def users(engine: Engine, store: str) -> Engine:
    """Users 1-5 with one post each and two memberships, none cached yet."""
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in range(1, 6)])
        s.add_all([Post(id=10 * i, user_id=i, title=f"post of {i}") for i in range(1, 6)])
        s.add_all(
            [Membership(tenant="acme", id=1, role="admin"), Membership(tenant="zeta", id=1, role="user")]
        )
        s.commit()
    return engine


@pytest.fixture
def repo(users: Engine) -> Iterator[UserRepository]:
    with Session(users) as s:
        yield UserRepository(s)


@pytest.fixture
def registry(users: Engine) -> Iterator[scoped_session[Session]]:
    DBSession.configure(bind=users)
    try:
        yield DBSession
    finally:
        DBSession.remove()


def cached(engine: Engine, user_id: int) -> None:
    """Fill the entry of ``user_id`` from a session of its own."""
    assert once(engine, get_user, user_id) is not None


def read_name(engine: Engine, user_id: int) -> str:
    """The name another session reads through the cache."""
    user: User | None = once(engine, get_user, user_id)
    assert user is not None
    return user.name


def counter(name: str) -> int:
    return cachedecor.stats()["default"][name]


class TestRepositoryReads(EveryBackend):
    def test_a_repeated_call_of_a_method_is_a_hit_without_sql(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        assert repo.get(1).name == "user1"
        with Session(users) as other:
            sql.reset()
            assert UserRepository(other).get(1).name == "user1"
        assert sql.count == 0
        assert counter("hits") == 1

    def test_a_hit_is_attached_to_self_session(self, users: Engine, repo: UserRepository) -> None:
        cached(users, 1)
        user = repo.get(1)
        assert counter("hits") == 1
        assert user in repo.session
        assert user is repo.session.get(User, 1)

    def test_a_lazy_relationship_of_a_hit_loads_through_self_session(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        cached(users, 1)
        sql.reset()
        user = repo.get(1)
        assert user is not None
        assert sql.count == 0
        assert [p.title for p in user.posts] == ["post of 1"]
        assert sql.selects() == 1

    def test_self_is_not_part_of_the_key(self, users: Engine, repo: UserRepository) -> None:
        repo.get(2)
        assert repo.get.cache_key(2) == cachedecor.key_for(User, 2)
        # a plain function reading the same row shares the method's entry
        assert read_name(users, 2) == "user2"
        assert counter("hits") == 1

    def test_a_session_argument_of_a_method_is_used_and_the_key_is_the_next_argument(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        cached(users, 3)
        with Session(users) as other:
            sql.reset()
            user = repo.load(other, 3)
            assert sql.count == 0
            assert user in other
            assert user not in repo.session
            assert [p.title for p in user.posts] == ["post of 3"]

    def test_an_instance_already_in_self_session_is_returned(
        self, users: Engine, repo: UserRepository
    ) -> None:
        cached(users, 1)
        mine = repo.session.get(User, 1)
        assert mine is not None
        mine.name = "changed, not flushed"
        assert repo.get(1) is mine
        assert mine.name == "changed, not flushed"

    def test_a_method_whose_object_has_no_session_returns_hits_detached(
        self, users: Engine, sql: SQLCounter
    ) -> None:
        reader = EngineRepository(users)
        reader.get(4)
        sql.reset()
        user = reader.get(4)
        assert sql.count == 0
        assert user is not None and user.name == "user4"
        assert inspect(user).detached

    def test_a_composite_key_in_one_argument_of_a_method(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        assert repo.membership(("acme", 1)).role == "admin"
        with Session(users) as other:
            sql.reset()
            found = UserRepository(other).membership(("zeta", 1))
            assert found is not None and found.role == "user"
            again = UserRepository(other).membership(("acme", 1))
            assert again is not None and again.role == "admin"
            assert again in other
        assert sql.selects() == 1  # zeta was not cached yet; acme was a hit

    def test_a_composite_key_from_several_parameters_of_a_method(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        repo.member("acme", 1)
        with Session(users) as other:
            sql.reset()
            found = UserRepository(other).member("acme", 1)
            assert found is not None and found.role == "admin"
            assert found in other
        assert sql.count == 0
        assert repo.member.cache_key(("acme", 1)) == cachedecor.key_for(Membership, ("acme", 1))


class TestRepositoryManyReads(EveryBackend):
    def test_a_many_method_is_called_with_the_missing_keys_only(
        self, users: Engine, repo: UserRepository
    ) -> None:
        cached(users, 1)
        cached(users, 3)
        found = repo.get_many([4, 1, 2, 3])
        assert [u.id for u in found] == [4, 1, 2, 3]
        assert repo.asked == [[4, 2]]

    def test_a_many_method_fully_cached_runs_no_sql(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        repo.get_many([1, 2, 3])
        with Session(users) as other:
            again = UserRepository(other)
            sql.reset()
            found = again.get_many([3, 2, 1])
            assert [u.name for u in found] == ["user3", "user2", "user1"]
            assert again.asked == []
        assert sql.count == 0

    def test_many_hits_are_attached_to_self_session(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        cached(users, 1)
        cached(users, 2)
        sql.reset()
        found = repo.get_many([1, 2])
        assert sql.count == 0
        assert all(u in repo.session for u in found)
        assert [p.title for p in found[1].posts] == ["post of 2"]


class TestRepositoryWrites:
    def test_a_method_committing_through_self_session_invalidates(
        self, users: Engine, repo: UserRepository
    ) -> None:
        cached(users, 1)
        repo.rename(1, "renamed")
        assert counter("invalidations") >= 1
        assert read_name(users, 1) == "renamed"

    def test_other_rows_stay_cached_after_a_method_commits(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        cached(users, 1)
        cached(users, 2)
        repo.rename(1, "renamed")
        sql.reset()
        assert read_name(users, 2) == "user2"
        assert sql.count == 0

    def test_a_change_left_for_the_caller_stays_cached_until_the_caller_commits(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        cached(users, 1)
        repo.rename_for_caller_to_commit(1, "later")
        sql.reset()
        assert read_name(users, 1) == "user1"
        assert sql.count == 0
        repo.session.commit()
        assert read_name(users, 1) == "later"

    def test_a_method_that_rolls_back_invalidates_nothing(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        cached(users, 1)
        repo.rename_then_roll_back(1, "rolled back")
        repo.session.commit()
        sql.reset()
        assert read_name(users, 1) == "user1"
        assert sql.count == 0
        assert counter("invalidations") == 0

    def test_a_caller_rolling_back_a_method_s_change_invalidates_nothing(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        cached(users, 1)
        repo.rename_for_caller_to_commit(1, "rolled back")
        repo.session.rollback()
        post = repo.session.get(Post, 10)
        assert post is not None
        post.title = "unrelated"
        repo.session.commit()
        sql.reset()
        assert read_name(users, 1) == "user1"
        assert sql.count == 0
        assert counter("invalidations") == 0

    def test_a_change_flushed_by_a_method_is_invalidated_when_the_caller_commits(
        self, users: Engine, repo: UserRepository
    ) -> None:
        cached(users, 1)
        repo.rename_flushed(1, "flushed")
        assert read_name(users, 1) == "user1"
        repo.session.commit()
        assert read_name(users, 1) == "flushed"

    def test_a_caller_rolling_back_a_flushed_change_invalidates_nothing_at_a_later_commit(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        cached(users, 1)
        repo.rename_flushed(1, "rolled back")
        repo.session.rollback()
        post = repo.session.get(Post, 10)
        assert post is not None
        post.title = "unrelated"
        repo.session.commit()
        sql.reset()
        assert read_name(users, 1) == "user1"
        assert sql.count == 0
        assert counter("invalidations") == 0

    def test_changing_the_instance_a_cached_read_returned_invalidates_it(
        self, users: Engine, repo: UserRepository
    ) -> None:
        cached(users, 1)
        repo.rename_a_cached_read(1, "renamed")
        assert counter("hits") == 1
        assert read_name(users, 1) == "renamed"

    def test_a_bulk_update_through_self_session_invalidates_every_row_it_changed(
        self, users: Engine, repo: UserRepository
    ) -> None:
        for i in (1, 2, 3):
            cached(users, i)
        repo.rename_in_bulk(3, "bulk")
        assert [read_name(users, i) for i in (1, 2, 3)] == ["bulk", "bulk", "user3"]

    def test_an_insert_through_self_session_invalidates_a_cached_none(
        self, users: Engine, repo: UserRepository
    ) -> None:
        with Session(users) as s:
            assert UserRepository(s).find(42) is None
        repo.create(42, "new")
        with Session(users) as s:
            assert UserRepository(s).find(42).name == "new"

    def test_a_pk_key_is_invalidated_when_the_method_commits_then_reads_again(
        self, users: Engine, repo: UserRepository
    ) -> None:
        cached(users, 1)
        assert repo.touch_raw_and_read_back(1).name == "raw"  # type: ignore[union-attr]
        repo.session.close()  # the read-only transaction after the commit ends without a commit
        assert read_name(users, 1) == "raw"

    def test_self_session_reads_its_own_flushed_write(self, users: Engine, repo: UserRepository) -> None:
        cached(users, 1)
        repo.rename_flushed(1, "mine")
        repo.session.expunge_all()  # not the identity map: the read itself must bypass the cache
        assert repo.get(1).name == "mine"
        assert read_name(users, 1) == "user1"

    def test_a_composite_key_written_by_a_method_is_invalidated(
        self, users: Engine, repo: UserRepository
    ) -> None:
        with Session(users) as s:
            UserRepository(s).membership(("acme", 1))
        repo.change_role(("acme", 1), "owner")
        with Session(users) as s:
            assert UserRepository(s).membership(("acme", 1)).role == "owner"


class TestToldWhereTheSessionIs:
    def test_a_scoped_session_given_as_session_gets_the_hits(
        self, users: Engine, registry: scoped_session[Session], sql: SQLCounter
    ) -> None:
        cached(users, 1)
        sql.reset()
        user = get_user_from_registry(1)
        assert sql.count == 0
        assert user in registry()
        assert [p.title for p in user.posts] == ["post of 1"]  # type: ignore[union-attr]

    def test_a_callable_given_as_session_gets_the_hits(self, users: Engine, sql: SQLCounter) -> None:
        cached(users, 2)
        with Session(users) as s:
            token = _current_session.set(s)
            try:
                sql.reset()
                user = get_user_from_callable(2)
                assert sql.count == 0
                assert user in s
                assert [p.title for p in user.posts] == ["post of 2"]  # type: ignore[union-attr]
            finally:
                _current_session.reset(token)

    def test_a_path_through_an_attribute_of_self_gets_the_hits(
        self, users: Engine, repo: UserRepository, sql: SQLCounter
    ) -> None:
        cached(users, 3)
        service = UserService(repo)
        sql.reset()
        user = service.find(3)
        assert sql.count == 0
        assert user in repo.session
        assert [p.title for p in user.posts] == ["post of 3"]

    def test_a_path_session_is_not_taken_for_the_key(self, users: Engine, repo: UserRepository) -> None:
        UserService(repo).find(3)
        assert UserService.find.cache_key(3) == cachedecor.key_for(User, 3)
        assert read_name(users, 3) == "user3"
        assert counter("hits") == 1

    def test_a_classmethod_is_keyed_by_its_argument_and_attaches_to_cls_session(
        self, users: Engine, registry: scoped_session[Session], sql: SQLCounter
    ) -> None:
        cached(users, 4)
        sql.reset()
        user = RegistryRepository.get(4)
        assert sql.count == 0
        assert user in registry()
        assert RegistryRepository.get.cache_key(4) == cachedecor.key_for(User, 4)

    def test_the_told_session_wins_over_self_session(self, users: Engine, repo: UserRepository) -> None:
        class Both:
            def __init__(self, session: Session, other: Session) -> None:
                self.session = session
                self.other = other

            @cached_by_pk(User, session="self.other")
            def get(self, user_id: int) -> User | None:
                return self.other.get(User, user_id)

        cached(users, 1)
        with Session(users) as other:
            user = Both(repo.session, other).get(1)
            assert user in other
            assert user not in repo.session


class TestNotToldWhereTheSessionIs:
    def test_the_module_level_scoped_session_the_code_names_gets_the_hits(
        self, users: Engine, registry: scoped_session[Session], sql: SQLCounter
    ) -> None:
        cached(users, 1)
        sql.reset()
        user = get_user_from_untold_registry(1)
        assert sql.count == 0 and counter("hits") == 1
        assert user in registry()
        assert [p.title for p in user.posts] == ["post of 1"]  # type: ignore[union-attr]

    def test_a_registry_in_a_closure_is_found(self, users: Engine, sql: SQLCounter) -> None:
        local = scoped_session(sessionmaker(users))

        @cached_by_pk(User)
        def get(user_id: int) -> User | None:
            return local.get(User, user_id)

        try:
            cached(users, 2)
            user = get(2)
            assert counter("hits") == 1
            assert user in local()
        finally:
            local.remove()

    def test_an_async_scoped_session_in_a_closure_gets_the_hits(self, sqlite_engine: Engine) -> None:
        cachedecor.configure_regions({"regions": {"default": {"backend": "dogpile.cache.memory"}}})
        with Session(sqlite_engine) as s:
            s.add_all([User(id=2, name="user2"), Post(id=20, user_id=2, title="post of 2")])
            s.commit()
        engine = create_async_engine(str(sqlite_engine.url).replace("sqlite://", "sqlite+aiosqlite://"))
        local = async_scoped_session(async_sessionmaker(engine), scopefunc=asyncio.current_task)

        @cached_by_pk(User)
        async def get(user_id: int) -> User | None:
            return await local.get(User, user_id)

        async def body() -> tuple[bool, list[str]]:
            try:
                await get(2)  # a miss: fills
                await local.remove()
                user = await get(2)  # a hit, attached to the task's session
                assert user is not None
                await local.refresh(user, ["posts"])  # refused for an instance it does not hold
                return user in local(), [p.title for p in user.posts]
            finally:
                await local.remove()
                await engine.dispose()

        assert asyncio.run(body()) == (True, ["post of 2"])
        assert counter("hits") == 1

    def test_a_function_naming_two_registries_is_not_guessed_and_warns(self, users: Engine) -> None:
        one, two = scoped_session(sessionmaker(users)), scoped_session(sessionmaker(users))

        @cached_by_pk(User)
        def get(user_id: int, other: bool = False) -> User | None:
            return (two if other else one).get(User, user_id)

        try:
            with pytest.warns(cachedecor.SessionWarning, match=r"detached.*session="):
                assert get(3) in one()
            assert inspect(get(3)).detached  # a hit: nothing to attach it to
        finally:
            one.remove()
            two.remove()


class TestWritesThroughARegistry:
    def test_a_commit_through_a_module_level_scoped_session_invalidates(
        self, users: Engine, registry: scoped_session[Session]
    ) -> None:
        cached(users, 1)
        rename_in_registry(1, "renamed")
        assert counter("invalidations") >= 1
        assert read_name(users, 1) == "renamed"

    def test_a_registry_change_committed_by_the_caller_invalidates_at_that_commit(
        self, users: Engine, registry: scoped_session[Session], sql: SQLCounter
    ) -> None:
        cached(users, 1)
        rename_in_registry_for_caller_to_commit(1, "later")
        registry.flush()
        sql.reset()
        assert read_name(users, 1) == "user1"
        assert sql.count == 0
        registry.commit()
        assert read_name(users, 1) == "later"

    def test_a_registry_change_rolled_back_invalidates_nothing(
        self, users: Engine, registry: scoped_session[Session], sql: SQLCounter
    ) -> None:
        cached(users, 1)
        rename_in_registry_for_caller_to_commit(1, "rolled back")
        registry.flush()
        registry.remove()
        sql.reset()
        assert read_name(users, 1) == "user1"
        assert sql.count == 0
        assert counter("invalidations") == 0

    def test_a_registry_object_loaded_before_the_function_and_left_unflushed_is_invalidated_at_commit(
        self, users: Engine, registry: scoped_session[Session], sql: SQLCounter
    ) -> None:
        cached(users, 1)
        user = registry.get(User, 1)  # in the identity map: the function reads it without SQL
        sql.reset()
        rename_in_registry_for_caller_to_commit(1, "later")
        assert sql.count == 0
        assert user.name == "later"  # type: ignore[union-attr]
        registry.commit()
        assert read_name(users, 1) == "later"

    def test_a_function_naming_a_registry_does_not_give_it_a_session(
        self, users: Engine, registry: scoped_session[Session]
    ) -> None:
        cached(users, 2)
        rename_in_a_session_of_its_own(2, "renamed")
        assert not registry.registry.has()  # the registry was asked, not made to create one
        assert read_name(users, 2) == "renamed"

    def test_a_session_opened_inside_the_function_invalidates_at_its_commit(
        self, users: Engine, registry: scoped_session[Session]
    ) -> None:
        cached(users, 2)
        rename_in_a_session_of_its_own(2, "renamed")
        assert read_name(users, 2) == "renamed"

    def test_a_reader_of_the_registry_sees_its_own_uncommitted_write(
        self, users: Engine, registry: scoped_session[Session]
    ) -> None:
        cached(users, 1)
        rename_in_registry_for_caller_to_commit(1, "mine")
        registry.flush()
        registry.expunge_all()
        assert get_user_from_registry(1).name == "mine"  # type: ignore[union-attr]
        assert read_name(users, 1) == "user1"


class TestWrongSessionArgument:
    @pytest.mark.parametrize(
        "value",
        [42, "repo.session", "self..session", "self.session-x", ""],
        ids=["a-number", "no-such-parameter", "empty-attribute", "not-an-identifier", "empty"],
    )
    def test_is_refused_when_decorating(self, value: Any) -> None:
        with pytest.raises(cachedecor.UsageError, match="session="):

            @cached_by_pk(User, session=value)
            def get(self: Any, user_id: int) -> User | None:
                return None

    def test_an_engine_is_refused_when_decorating(self, sqlite_engine: Engine) -> None:
        with pytest.raises(cachedecor.UsageError, match="session="):

            @cached_by_pk(User, session=sqlite_engine)
            def get(user_id: int) -> User | None:
                return None

    @pytest.mark.parametrize(
        "factory", [sessionmaker(), Session], ids=["a-sessionmaker", "the-session-class"]
    )
    def test_a_factory_of_new_sessions_is_refused_when_decorating(self, factory: Any) -> None:
        with pytest.raises(cachedecor.UsageError, match="new session on every call"):

            @cached_by_pk(User, session=factory)
            def get(user_id: int) -> User | None:
                return None


def test_a_decorated_method_keeps_its_name_docstring_and_signature_when_bound() -> None:
    import inspect as pyinspect

    bound = UserRepository(None).get  # type: ignore[arg-type]
    assert bound.__name__ == "get"
    assert list(pyinspect.signature(bound).parameters) == ["user_id"]
    assert list(pyinspect.signature(UserRepository.get).parameters) == ["self", "user_id"]
