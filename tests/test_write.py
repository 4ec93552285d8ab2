"""@invalidates and direct invalidation: which entries go, and when."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import cached_by_pk, invalidates
from cachedecor.tracking.session import session_tracker
from tests.conftest import SQLCounter, once
from tests.models import Employee, Manager, Membership, Post, User


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(User, region="second")
def get_user_elsewhere(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(Employee)
def get_employee(session: Session, employee_id: int) -> Employee | None:
    return session.get(Employee, employee_id)


@cached_by_pk(Membership)
def get_membership(session: Session, key: tuple[str, int]) -> Membership | None:
    return session.get(Membership, key)


@invalidates(User)
def rename_user(session: Session, user_id: int, name: str) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.name = name
    session.commit()


@invalidates(User)
def rename_without_commit(session: Session, user_id: int, name: str) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.name = name
    session.flush()


@invalidates(User)
def rename_without_flush(session: Session, user_id: int, name: str) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.name = name


@invalidates(User)
def delete_user(session: Session, user_id: int) -> None:
    session.execute(delete(Post).where(Post.user_id == user_id))
    user = session.get(User, user_id)
    session.delete(user)
    session.commit()


@invalidates(User)
def create_user(session: Session, user_id: int) -> None:
    session.add(User(id=user_id, name=f"new{user_id}"))
    session.commit()


@invalidates(User)
def bulk_rename(session: Session, below: int, name: str) -> None:
    session.execute(update(User).where(User.id < below).values(name=name))


@invalidates(User)
def bulk_delete(session: Session, user_id: int) -> None:
    session.execute(delete(Post).where(Post.user_id == user_id))
    session.execute(delete(User).where(User.id == user_id))


@invalidates(User)
def rename_by_pk_executemany(session: Session, names: dict[int, str]) -> None:
    session.execute(update(User), [{"id": k, "name": v} for k, v in names.items()])


@invalidates(User, pk="user_id")
def touch_user_raw(session: Session, user_id: int) -> None:
    # a write cachedecor cannot see (plain SQL), covered by pk=
    session.connection().exec_driver_sql(
        "UPDATE cd_users SET name = 'raw' WHERE id = %d" % int(user_id)  # noqa: UP031
    )


@invalidates(Post)
def rename_post(session: Session, post_id: int) -> None:
    post = session.get(Post, post_id)
    assert post is not None
    post.title = "changed"
    post.user.name = "changed through a post"
    session.commit()


#: the session of the functions below, reached neither as an argument nor through a
#: registry: the scope learns of it from what they do with it (see the ``held`` fixture)
HELD: dict[str, Session] = {}


@invalidates(User)
def add_unflushed(user_id: int) -> None:
    HELD["session"].add(User(id=user_id, name=f"new{user_id}"))  # after_attach


@invalidates(User)
def rename_loaded_unflushed(user_id: int, name: str) -> None:
    user = HELD["session"].get(User, user_id)  # read by SQL: do_orm_execute
    assert user is not None
    user.name = name


@invalidates(User)
def rename_cached_unflushed(user_id: int, name: str) -> None:
    user = get_user(HELD["session"], user_id)  # a cache hit: no SQL, no session event
    assert user is not None
    user.name = name


@invalidates(User)
def delete_loaded_unflushed(user_id: int) -> None:
    user = HELD["session"].scalars(select(User).where(User.id == user_id)).one()  # do_orm_execute
    HELD["session"].delete(user)


@invalidates(User)
def rename_given(user: User, name: str) -> None:
    user.name = name  # the argument's session


@invalidates(User)
def load_for_the_caller(user_id: int) -> User | None:
    return HELD["session"].get(User, user_id)


@invalidates(User)
def rename_what_an_inner_function_loaded(user_id: int, name: str) -> None:
    user = load_for_the_caller(user_id)  # the inner scope saw the session, and tells this one
    assert user is not None
    user.name = name


@invalidates(User)
def rename_found_without_sql(user_id: int, name: str, flush: bool) -> None:
    user = HELD["session"].get(User, user_id)  # already in the identity map: no SQL, no event
    assert user is not None
    user.name = name
    if flush:
        HELD["session"].flush()


def name_in_db(engine: Engine, user_id: int) -> str | None:
    with Session(engine) as s:
        return s.scalar(select(User.name).where(User.id == user_id))


@pytest.fixture
def users(engine: Engine, backend: str) -> Engine:
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in range(1, 6)])
        s.add_all([Post(id=10 * i, user_id=i, title="t") for i in range(1, 6)])
        s.commit()
    for i in range(1, 6):
        once(engine, get_user, i)
    return engine


@pytest.fixture
def held(users: Engine) -> Iterator[Session]:
    """The session in ``HELD``; the test commits it (or not) itself."""
    with Session(users) as s:
        HELD["session"] = s
        try:
            yield s
        finally:
            del HELD["session"]


def cached_name(engine: Engine, user_id: int) -> str:
    user = once(engine, get_user, user_id)
    assert user is not None
    return user.name


class TestAfterCommit:
    def test_a_committed_change_is_read_back_new(self, users: Engine) -> None:
        once(users, rename_user, 1, "renamed")
        assert cached_name(users, 1) == "renamed"
        assert cachedecor.stats()["default"]["invalidations"] >= 1

    def test_other_rows_stay_cached(self, users: Engine, sql: SQLCounter) -> None:
        once(users, rename_user, 1, "renamed")
        sql.reset()
        assert cached_name(users, 2) == "user2"
        assert sql.count == 0

    def test_invalidation_waits_for_the_callers_commit(self, users: Engine) -> None:
        with Session(users) as writer:
            rename_without_commit(writer, 1, "pending")
            # not committed yet: others still read the committed (cached) row
            assert cached_name(users, 1) == "user1"
            writer.commit()
        assert cached_name(users, 1) == "pending"

    def test_changes_flushed_by_the_caller_after_the_function_returned(self, users: Engine) -> None:
        with Session(users) as writer:
            rename_without_flush(writer, 1, "late flush")
            writer.commit()
        assert cached_name(users, 1) == "late flush"

    def test_rollback_invalidates_nothing(self, users: Engine, sql: SQLCounter) -> None:
        with Session(users) as writer:
            rename_without_commit(writer, 1, "rolled back")
            writer.rollback()
        sql.reset()
        assert cached_name(users, 1) == "user1"
        assert sql.count == 0
        assert cachedecor.stats()["default"]["invalidations"] == 0

    def test_a_later_commit_in_the_same_session_does_not_replay_a_rolled_back_change(
        self, users: Engine, sql: SQLCounter
    ) -> None:
        with Session(users) as s:
            rename_without_commit(s, 1, "rolled back")
            s.rollback()
            s.get(Post, 10).title = "unrelated"  # type: ignore[union-attr]
            s.commit()
        assert cachedecor.stats()["default"]["invalidations"] == 0
        sql.reset()
        assert cached_name(users, 1) == "user1"
        assert sql.count == 0

    def test_an_exception_in_the_function_then_rollback_invalidates_nothing(self, users: Engine) -> None:
        @invalidates(User)
        def fails(session: Session) -> None:
            session.get(User, 1).name = "never"  # type: ignore[union-attr]
            session.flush()
            raise RuntimeError("boom")

        with Session(users) as writer, pytest.raises(RuntimeError):
            fails(writer)
        assert cachedecor.stats()["default"]["invalidations"] == 0
        assert cached_name(users, 1) == "user1"

    def test_delete_invalidates(self, users: Engine) -> None:
        once(users, delete_user, 2)
        assert once(users, get_user, 2) is None

    def test_insert_invalidates_a_cached_none(self, engine: Engine, backend: str) -> None:
        @cached_by_pk(User, cache_none=True)
        def get_or_none(session: Session, user_id: int) -> User | None:
            return session.get(User, user_id)

        assert once(engine, get_or_none, 42) is None
        once(engine, create_user, 42)
        assert once(engine, get_or_none, 42).name == "new42"

    def test_only_the_named_models_are_tracked(self, users: Engine) -> None:
        once(users, rename_post, 10)
        # the user row changed too, but the function only invalidates Post
        assert cached_name(users, 1) == "user1"
        assert name_in_db(users, 1) == "changed through a post"

    def test_every_region_caching_the_model_is_invalidated(self, users: Engine) -> None:
        cachedecor.configure_regions({"regions": {"second": {"backend": "dogpile.cache.memory"}}})
        assert once(users, get_user_elsewhere, 1).name == "user1"
        once(users, rename_user, 1, "everywhere")
        assert once(users, get_user_elsewhere, 1).name == "everywhere"
        assert cached_name(users, 1) == "everywhere"

    def test_subclass_rows_invalidate_entries_of_the_base_model(self, engine: Engine, backend: str) -> None:
        with Session(engine) as s:
            s.add(Manager(id=1, name="boss", budget=1))
            s.commit()
        assert once(engine, get_employee, 1).budget == 1

        @invalidates(Manager)
        def raise_budget(session: Session) -> None:
            session.get(Manager, 1).budget = 2  # type: ignore[union-attr]
            session.commit()

        once(engine, raise_budget)
        assert once(engine, get_employee, 1).budget == 2

    def test_composite_keys_are_invalidated(self, engine: Engine, backend: str) -> None:
        with Session(engine) as s:
            s.add(Membership(tenant="acme", id=1, role="user"))
            s.commit()
        assert once(engine, get_membership, ("acme", 1)).role == "user"

        @invalidates(Membership)
        def promote(session: Session) -> None:
            session.get(Membership, ("acme", 1)).role = "admin"  # type: ignore[union-attr]
            session.commit()

        once(engine, promote)
        assert once(engine, get_membership, ("acme", 1)).role == "admin"


class TestChangesLeftUnflushed:
    """Changes an ``@invalidates`` function leaves for its caller to flush and commit, in
    a session it is not given: found in the sessions the function used, and only there."""

    def test_an_object_added_is_invalidated_when_the_caller_commits(
        self, engine: Engine, backend: str
    ) -> None:
        @cached_by_pk(User, cache_none=True)
        def get_or_none(session: Session, user_id: int) -> User | None:
            return session.get(User, user_id)

        assert once(engine, get_or_none, 42) is None
        with Session(engine) as s:
            HELD["session"] = s
            try:
                add_unflushed(42)
            finally:
                del HELD["session"]
            assert once(engine, get_or_none, 42) is None  # not committed yet
            s.commit()
        assert once(engine, get_or_none, 42).name == "new42"

    def test_an_object_loaded_then_changed_is_invalidated_when_the_caller_commits(
        self, users: Engine, held: Session
    ) -> None:
        rename_loaded_unflushed(1, "later")
        assert cached_name(users, 1) == "user1"
        held.commit()
        assert cached_name(users, 1) == "later"

    def test_an_object_loaded_then_deleted_is_invalidated_when_the_caller_commits(
        self, users: Engine, held: Session
    ) -> None:
        with Session(users) as s:
            s.execute(delete(Post).where(Post.user_id == 5))
            s.commit()
        delete_loaded_unflushed(5)
        held.commit()
        assert once(users, get_user, 5) is None

    def test_an_object_a_cached_read_returned_is_invalidated_when_the_caller_commits(
        self, users: Engine, held: Session
    ) -> None:
        hits = cachedecor.stats()["default"]["hits"]
        rename_cached_unflushed(2, "from a hit")
        assert cachedecor.stats()["default"]["hits"] == hits + 1  # the row came from the cache
        held.commit()
        assert cached_name(users, 2) == "from a hit"

    def test_an_object_passed_as_an_argument_is_invalidated_when_the_caller_commits(
        self, users: Engine, held: Session
    ) -> None:
        user = held.get(User, 2)  # loaded before the function, which gets no session
        assert user is not None
        rename_given(user, "given")
        held.commit()
        assert cached_name(users, 2) == "given"

    def test_an_object_an_inner_function_loaded_is_invalidated_when_the_caller_commits(
        self, users: Engine, held: Session
    ) -> None:
        rename_what_an_inner_function_loaded(3, "outer")
        held.commit()
        assert cached_name(users, 3) == "outer"

    def test_an_object_reached_without_sql_in_a_session_the_function_was_not_given_is_not_looked_for(
        self, users: Engine, held: Session
    ) -> None:
        user = held.get(User, 4)  # loaded before the function, and kept in the identity map
        assert user is not None
        rename_found_without_sql(4, "missed", False)
        tracker = session_tracker(held)
        assert tracker is None or not tracker.watched  # the scope never knew the session
        held.commit()
        assert name_in_db(users, 4) == "missed"
        assert cached_name(users, 4) == "user4"  # the documented gap: pass the object or the session

    def test_an_object_reached_without_sql_is_invalidated_when_the_function_flushes(
        self, users: Engine, held: Session
    ) -> None:
        user = held.get(User, 4)
        assert user is not None
        rename_found_without_sql(4, "flushed", True)
        held.commit()
        assert cached_name(users, 4) == "flushed"

    def test_a_session_of_another_thread_with_pending_changes_is_not_looked_at(self, users: Engine) -> None:
        changed, checked = threading.Event(), threading.Event()
        other: dict[str, Session] = {}

        def change_and_wait() -> None:
            with Session(users) as s:
                user = s.get(User, 2)
                assert user is not None
                user.name = "other thread"  # unflushed, outside any @invalidates function
                other["session"] = s
                changed.set()
                checked.wait(10)
                s.rollback()

        thread = threading.Thread(target=change_and_wait)
        thread.start()
        try:
            assert changed.wait(10)
            with Session(users) as s:
                rename_without_flush(s, 1, "mine")
                s.commit()
            tracker = session_tracker(other["session"])
            assert tracker is None or not tracker.watched
        finally:
            checked.set()
            thread.join(10)
        assert cached_name(users, 1) == "mine"


class TestBulkStatements:
    def test_bulk_update_invalidates_every_affected_row(self, users: Engine, sql: SQLCounter) -> None:
        with Session(users) as s:
            bulk_rename(s, 4, "bulk")
            s.commit()
        assert [cached_name(users, i) for i in range(1, 6)] == ["bulk"] * 3 + ["user4", "user5"]

    def test_bulk_delete_invalidates(self, users: Engine) -> None:
        with Session(users) as s:
            bulk_delete(s, 3)
            s.commit()
        assert once(users, get_user, 3) is None

    def test_bulk_update_by_primary_key_invalidates_those_rows(self, users: Engine) -> None:
        with Session(users) as s:
            rename_by_pk_executemany(s, {1: "a", 5: "e"})
            s.commit()
        assert [cached_name(users, i) for i in (1, 2, 5)] == ["a", "user2", "e"]

    def test_bulk_update_rolled_back_invalidates_nothing(self, users: Engine) -> None:
        with Session(users) as s:
            bulk_rename(s, 4, "bulk")
            s.rollback()
        assert cachedecor.stats()["default"]["invalidations"] == 0


class TestReadYourWrites:
    def test_reads_in_the_writing_transaction_see_its_own_writes(self, users: Engine) -> None:
        with Session(users) as s:
            rename_without_commit(s, 1, "mine")
            assert get_user(s, 1).name == "mine"
            s.rollback()

    def test_reads_in_the_writing_transaction_fill_nothing(self, users: Engine) -> None:
        get_user.invalidate(1)
        with Session(users) as s:
            rename_without_commit(s, 1, "uncommitted")
            assert get_user(s, 1).name == "uncommitted"
            # other sessions never see the uncommitted value, from the cache or not
            assert cached_name(users, 1) == "user1"
            s.rollback()
        assert cached_name(users, 1) == "user1"
        assert cachedecor.stats()["default"]["bypasses"] == 1

    def test_bulk_statement_bypasses_every_row_of_the_model_until_the_end(self, users: Engine) -> None:
        with Session(users) as s:
            bulk_rename(s, 3, "bulk")
            assert get_user(s, 1).name == "bulk"
            assert get_user(s, 4).name == "user4"
            assert cachedecor.stats()["default"]["bypasses"] == 2
            s.commit()
        cachedecor.reset_stats()
        assert cached_name(users, 4) == "user4"
        assert cachedecor.stats()["default"]["bypasses"] == 0
        assert cachedecor.stats()["default"]["hits"] == 1

    def test_after_commit_and_return_the_same_process_reads_the_new_row(self, users: Engine) -> None:
        with Session(users) as s:
            rename_user(s, 2, "fresh")
            assert get_user(s, 2).name == "fresh"
        assert cached_name(users, 2) == "fresh"


class TestWritesOutsideInvalidates:
    def test_a_transaction_that_wrote_never_fills_the_cache(self, users: Engine) -> None:
        get_user.invalidate(1)
        cachedecor.reset_stats()
        with Session(users) as s:
            s.execute(update(User).where(User.id == 1).values(name="uncommitted"))  # not tracked
            assert get_user(s, 1).name == "uncommitted"
            s.rollback()
        assert cached_name(users, 1) == "user1"
        assert cachedecor.stats()["default"]["fills"] == 1  # only the committed row, read afterwards

    def test_a_textual_write_also_stops_fills(self, users: Engine) -> None:
        get_user.invalidate(2)
        with Session(users) as s:
            s.execute(text("UPDATE cd_users SET name = 'raw' WHERE id = 2"))
            assert get_user(s, 2).name == "raw"
            s.rollback()
        assert cached_name(users, 2) == "user2"

    def test_a_flush_outside_invalidates_stops_fills_until_the_transaction_ends(self, users: Engine) -> None:
        get_user.invalidate(3)
        cachedecor.reset_stats()
        with Session(users) as s:
            s.add(Post(id=999, user_id=1, title="new"))
            s.flush()
            get_user(s, 3)
            assert cachedecor.stats()["default"]["fills"] == 0
            s.commit()
            get_user(s, 3)
        assert cachedecor.stats()["default"]["fills"] == 1


class TestExplicitKeys:
    def test_pk_argument_is_invalidated_after_commit(self, users: Engine) -> None:
        with Session(users) as s:
            touch_user_raw(s, 3)
            assert cached_name(users, 3) == "user3"  # not committed: entry kept
            s.commit()
        assert cached_name(users, 3) == "raw"

    def test_pk_argument_is_dropped_on_rollback(self, users: Engine) -> None:
        with Session(users) as s:
            touch_user_raw(s, 3)
            s.rollback()
        assert cachedecor.stats()["default"]["invalidations"] == 0

    def test_invalidate_deletes_now(self, users: Engine, sql: SQLCounter) -> None:
        cachedecor.invalidate(User, 4)
        sql.reset()
        assert cached_name(users, 4) == "user4"
        assert sql.selects() == 1

    def test_invalidate_many_deletes_each_key(self, users: Engine, sql: SQLCounter) -> None:
        cachedecor.invalidate_many(User, [1, 2])
        sql.reset()
        for i in (1, 2, 3):
            cached_name(users, i)
        assert sql.selects() == 2
        assert cachedecor.stats()["default"]["invalidations"] == 2

    def test_invalidate_with_a_session_waits_for_its_commit(self, users: Engine, sql: SQLCounter) -> None:
        with Session(users) as s:
            s.get(User, 1)  # begins the transaction
            cachedecor.invalidate(User, 1, session=s)
            assert cachedecor.stats()["default"]["invalidations"] == 0
            s.commit()
        assert cachedecor.stats()["default"]["invalidations"] == 1

    def test_pk_given_outside_a_transaction_is_invalidated_again_at_the_next_commit(
        self, users: Engine
    ) -> None:
        @invalidates(User, pk="user_id")
        def announce(session: Session, user_id: int) -> None:
            """Declares the change; the caller writes it."""

        with Session(users) as s:
            announce(s, 4)  # no transaction yet: deleted now, and kept for the next commit
            assert cached_name(users, 4) == "user4"  # a reader refills the old row meanwhile
            s.execute(update(User).where(User.id == 4).values(name="written later"))
            s.commit()
        assert cached_name(users, 4) == "written later"

    def test_pk_needs_a_model(self) -> None:
        with pytest.raises(TypeError, match="model"):
            invalidates(pk="user_id")
