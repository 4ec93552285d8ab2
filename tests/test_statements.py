"""Every form of write inside ``@invalidates``: ORM and Core statements, bulk methods,
upserts, inserts of new keys, textual and driver-level SQL.

Each write form runs on SQLite and PostgreSQL (PostgreSQL-only forms on PostgreSQL only)
against a real memcached. A form that resolves its rows invalidates them; one that
cannot (textual SQL) invalidates every cached row of the model, with a WARNING.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import delete, insert, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import cached_by_pk, invalidates, key_for
from cachedecor.backends.memcached.transport import metadump
from cachedecor.config import region_settings
from tests.conftest import memcached_config, once, redis_config
from tests.models import Note, Post, User
from tests.servers import Memcached, fake_server


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(User, cache_none=True)
def get_user_or_none(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(Post)
def get_post(session: Session, post_id: int) -> Post | None:
    return session.get(Post, post_id)


@cached_by_pk(Note, cache_none=True)
def get_note(session: Session, note_id: int) -> Note | None:
    return session.get(Note, note_id)


def store() -> Any:
    return region_settings("default").store


def stored(key: str) -> bool:
    return store().get(key) is not None


def counters() -> dict[str, int]:
    return cachedecor.stats("default")["default"]


def user_key(user_id: int) -> str:
    return key_for(User, user_id, namespace=region_settings("default").namespace)


def post_key(post_id: int) -> str:
    return key_for(Post, post_id, namespace=region_settings("default").namespace)


def read_name(engine: Engine, user_id: int) -> str | None:
    user = once(engine, get_user, user_id)
    return None if user is None else user.name


# --------------------------------------------------------------------------------------
# writes of the existing row 1 (its name becomes "changed", or it is deleted)


@dataclass(frozen=True)
class Write:
    """A write form: ``run(session)`` changes user 1 without committing."""

    run: Callable[[Session], Any]
    #: the name of user 1 once the write is visible (None: deleted)
    after: str | None = "changed"
    postgresql_only: bool = False


@invalidates(User)
def core_update_through_the_session(session: Session) -> None:
    users = User.__table__
    session.execute(users.update().where(users.c.id == 1).values(name="changed"))


@invalidates(User)
def orm_update_through_the_connection(session: Session) -> None:
    session.connection().execute(update(User).where(User.id == 1).values(name="changed"))


@invalidates(User)
def bulk_update_mappings(session: Session) -> None:
    session.bulk_update_mappings(User, [{"id": 1, "name": "changed"}])  # type: ignore[arg-type]


@invalidates(User)
def orm_bulk_update_by_primary_key(session: Session) -> None:
    session.execute(update(User), [{"id": 1, "name": "changed"}])


@invalidates(User)
def update_where_another_column(session: Session) -> None:
    session.execute(update(User).where(User.name == "user1").values(name="changed"))


@invalidates(User)
def core_delete_through_the_connection(session: Session) -> None:
    session.connection().execute(User.__table__.delete().where(User.__table__.c.id == 1))


@invalidates(User)
def orm_delete(session: Session) -> None:
    session.execute(delete(User).where(User.id == 1))


@invalidates(User)
def upsert_of_an_existing_row(session: Session) -> None:
    statement = pg_insert(User).values(id=1, name="changed", version=0, bio="")
    session.execute(statement.on_conflict_do_update(index_elements=[User.id], set_={"name": "changed"}))


@invalidates(User)
def textual_update(session: Session) -> None:
    session.execute(text("UPDATE cd_users SET name = 'changed' WHERE id = 1"))


@invalidates(User)
def driver_sql_update(session: Session) -> None:
    session.connection().exec_driver_sql("UPDATE cd_users SET name = 'changed' WHERE id = 1")


WRITES = {
    "core update through the session": Write(core_update_through_the_session),
    "orm update through the connection": Write(orm_update_through_the_connection),
    "bulk_update_mappings": Write(bulk_update_mappings),
    "orm bulk update by primary key": Write(orm_bulk_update_by_primary_key),
    "update where another column": Write(update_where_another_column),
    "core delete through the connection": Write(core_delete_through_the_connection, after=None),
    "orm delete": Write(orm_delete, after=None),
    "upsert of an existing row": Write(upsert_of_an_existing_row, postgresql_only=True),
    "textual update": Write(textual_update),
    "driver sql update": Write(driver_sql_update),
}


@pytest.fixture
def users(engine: Engine, cache: Memcached) -> Engine:
    """Users 1-3 and post 10, all cached."""
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in (1, 2, 3)])
        s.add(Post(id=10, user_id=2, title="t"))
        s.commit()
    for i in (1, 2, 3):
        once(engine, get_user, i)
    once(engine, get_post, 10)
    assert all(stored(user_key(i)) for i in (1, 2, 3))
    cachedecor.reset_stats()
    return engine


@pytest.fixture
def write(request: pytest.FixtureRequest, users: Engine) -> Write:
    return WRITES[request.param]


def on_each_database(name: str, forms: dict[str, Any], postgresql_only: Callable[[str], bool]) -> Any:
    """Run a class once per form in ``forms`` and database that has it (upserts: PostgreSQL)."""
    combos = [
        pytest.param(db, key, id=f"{db}-{key}")
        for key in forms
        for db in ("sqlite", "postgresql")
        if db == "postgresql" or not postgresql_only(key)
    ]
    return pytest.mark.parametrize(("engine", name), combos, indirect=True)


@on_each_database("write", WRITES, lambda key: WRITES[key].postgresql_only)
class TestWrites:
    def test_the_row_is_invalidated_after_commit(self, users: Engine, write: Write) -> None:
        with Session(users) as s:
            write.run(s)
            s.commit()
        assert not stored(user_key(1))
        assert read_name(users, 1) == write.after

    def test_the_entry_stays_until_commit(self, users: Engine, write: Write) -> None:
        with Session(users) as s:
            write.run(s)
            assert stored(user_key(1))
            assert counters()["invalidations"] == 0
            s.rollback()

    def test_a_rollback_invalidates_nothing(self, users: Engine, write: Write) -> None:
        with Session(users) as s:
            write.run(s)
            s.rollback()
        assert stored(user_key(1))
        assert counters()["invalidations"] == 0
        assert counters()["model_invalidations"] == 0
        assert read_name(users, 1) == "user1"

    def test_reads_in_the_writing_transaction_bypass_the_cache(self, users: Engine, write: Write) -> None:
        with Session(users) as s:
            write.run(s)
            user = get_user(s, 1)
            assert (None if user is None else user.name) == write.after
            assert counters()["bypasses"] == 1
            assert counters()["hits"] == 0
            s.rollback()


# --------------------------------------------------------------------------------------
# inserts of user 42, whose absence is cached (cache_none=True)


@invalidates(User)
def orm_insert_with_values(session: Session) -> None:
    session.execute(insert(User).values(id=42, name="new", version=0, bio=""))


@invalidates(User)
def core_insert_through_the_connection(session: Session) -> None:
    session.connection().execute(User.__table__.insert().values(id=42, name="new", version=0, bio=""))


@invalidates(User)
def core_executemany_insert(session: Session) -> None:
    rows = [{"id": i, "name": "new", "version": 0, "bio": ""} for i in (42, 43)]
    session.connection().execute(User.__table__.insert(), rows)


@invalidates(User)
def orm_bulk_insert(session: Session) -> None:
    session.execute(insert(User), [{"id": i, "name": "new"} for i in (42, 43)])


@invalidates(User)
def bulk_insert_mappings(session: Session) -> None:
    session.bulk_insert_mappings(User, [{"id": 42, "name": "new"}])  # type: ignore[arg-type]


@invalidates(User)
def orm_insert_returning(session: Session) -> None:
    session.scalars(insert(User).values(id=42, name="new", version=0, bio="").returning(User)).all()


@invalidates(User)
def orm_bulk_insert_returning(session: Session) -> None:
    session.scalars(insert(User).returning(User), [{"id": i, "name": "new"} for i in (42, 43)]).all()


@invalidates(User)
def upsert_of_a_new_row(session: Session) -> None:
    statement = pg_insert(User).values(id=42, name="new", version=0, bio="")
    session.execute(statement.on_conflict_do_update(index_elements=[User.id], set_={"name": "new"}))


@invalidates(User)
def textual_insert(session: Session) -> None:
    session.execute(text("INSERT INTO cd_users (id, name, version, bio) VALUES (42, 'new', 0, '')"))


INSERTS = {
    "orm insert with values": orm_insert_with_values,
    "core insert through the connection": core_insert_through_the_connection,
    "core executemany insert": core_executemany_insert,
    "orm bulk insert": orm_bulk_insert,
    "bulk_insert_mappings": bulk_insert_mappings,
    "orm insert returning": orm_insert_returning,
    "orm bulk insert returning": orm_bulk_insert_returning,
    "upsert of a new row": upsert_of_a_new_row,
    "textual insert": textual_insert,
}


@invalidates(User)
def rename_by_name(session: Session, old: str, new: str) -> int:
    """A Core UPDATE by another column than the primary key: its rows are not named."""
    users = User.__table__
    result = session.execute(users.update().where(users.c.name == old).values(name=new))
    return int(result.rowcount)


@invalidates(User)
def remove_by_names(session: Session, names: list[str]) -> int:
    users = User.__table__
    return int(session.execute(delete(users).where(users.c.name.in_(names))).rowcount)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
class TestUpdatesByOtherColumns:
    """On PostgreSQL an UPDATE or DELETE by any WHERE clause returns the primary keys of
    the rows it wrote (RETURNING): no SELECT before it, and no row missed."""

    def test_a_row_that_comes_to_match_while_the_statement_starts_is_invalidated(self, users: Engine) -> None:
        """Another transaction renames user 2 to the name the UPDATE looks for, and commits,
        just before the UPDATE reaches the database (after any SELECT of the rows would
        have run), and a reader caches user 2 as that transaction left it. The UPDATE
        (READ COMMITTED) writes user 2 too: its entry must go at commit."""
        done = []

        def just_before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if done or not statement.lstrip().upper().startswith("UPDATE"):
                return
            done.append(statement)
            with Session(users) as other:
                other.get_one(User, 2).name = "user1"
                other.commit()
            assert read_name(users, 2) == "user1"  # cached as the other transaction left it
            assert stored(user_key(2))

        with Session(users) as s:
            s.connection()  # the transaction's connection, watched below
            sqlalchemy.event.listen(s.connection(), "before_cursor_execute", just_before)
            selects = []
            sqlalchemy.event.listen(
                s.connection(), "before_cursor_execute", lambda c, cu, st, *a: selects.append(st)
            )
            assert rename_by_name(s, "user1", "renamed") == 2
            s.commit()
        assert done, "the UPDATE did not run"
        assert not any(st.lstrip().upper().startswith("SELECT") for st in selects), selects
        assert not stored(user_key(1)) and not stored(user_key(2))
        assert read_name(users, 1) == "renamed"
        assert read_name(users, 2) == "renamed"  # never the cached "user1"

    def test_the_caller_sees_the_rowcount_it_would_have_had(self, users: Engine) -> None:
        with Session(users) as s:
            assert remove_by_names(s, ["user1", "user3"]) == 2
            s.commit()
        assert not stored(user_key(1)) and not stored(user_key(3))
        assert stored(user_key(2))
        assert read_name(users, 1) is None


@pytest.fixture
def insert_42(request: pytest.FixtureRequest, users: Engine) -> Callable[[Session], None]:
    """An insert form of user 42 (not committed), with user 42's absence cached."""
    assert once(users, get_user_or_none, 42) is None
    assert stored(user_key(42))
    return INSERTS[request.param]


@on_each_database("insert_42", INSERTS, lambda key: key.startswith("upsert"))
class TestInserts:
    def test_a_cached_none_is_invalidated_after_commit(
        self, users: Engine, insert_42: Callable[[Session], None]
    ) -> None:
        with Session(users) as s:
            insert_42(s)
            assert stored(user_key(42))
            s.commit()
        assert once(users, get_user_or_none, 42).name == "new"  # type: ignore[union-attr]

    def test_a_cached_none_stays_on_rollback(
        self, users: Engine, insert_42: Callable[[Session], None]
    ) -> None:
        with Session(users) as s:
            insert_42(s)
            s.rollback()
        assert once(users, get_user_or_none, 42) is None
        assert counters()["hits"] == 1


class TestKeysTheDatabaseAssigns:
    @staticmethod
    def next_note_id(engine: Engine) -> int:
        """The key the database will assign next (one more than a note just written)."""
        with Session(engine) as s:
            s.add(note := Note(text="first"))
            s.commit()
            return note.id + 1

    def test_an_insert_invalidates_the_cached_none_of_its_new_key(self, users: Engine) -> None:
        @invalidates(Note)
        def write_note(session: Session) -> int:
            new_id = session.execute(insert(Note).values(text="new")).inserted_primary_key[0]
            session.commit()
            return int(new_id)

        expected = self.next_note_id(users)
        assert once(users, get_note, expected) is None
        assert once(users, write_note) == expected
        assert once(users, get_note, expected).text == "new"  # type: ignore[union-attr]

    def test_an_insert_returning_reads_its_new_key_from_the_returned_row(self, users: Engine) -> None:
        @invalidates(Note)
        def write_note(session: Session) -> int:
            note = session.scalars(insert(Note).values(text="new").returning(Note)).one()
            session.commit()
            return note.id

        expected = self.next_note_id(users)
        assert once(users, get_note, expected) is None
        assert once(users, write_note) == expected
        assert once(users, get_note, expected).text == "new"  # type: ignore[union-attr]

    def test_an_executemany_insert_invalidates_the_cached_nones_of_its_new_keys(self, users: Engine) -> None:
        @invalidates(Note)
        def write_notes(session: Session) -> None:
            session.connection().execute(Note.__table__.insert(), [{"text": "a"}, {"text": "b"}])
            session.commit()

        first = self.next_note_id(users)
        assert [once(users, get_note, i) for i in (first, first + 1)] == [None, None]
        once(users, write_notes)
        assert [once(users, get_note, i).text for i in (first, first + 1)] == ["a", "b"]  # type: ignore[union-attr]

    def test_an_insert_that_does_not_show_its_new_keys_logs_a_warning_naming_the_model(
        self, users: Engine, caplog: pytest.LogCaptureFixture
    ) -> None:
        @invalidates(Note)
        def write_notes(session: Session) -> None:
            session.connection().execute(Note.__table__.insert(), [{"text": "a"}, {"text": "b"}])

        caplog.set_level(logging.WARNING, logger="cachedecor")
        with Session(users) as s:
            write_notes(s)
            s.rollback()
        assert any(r.levelno == logging.WARNING and "Note" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------
# writes that cannot be resolved to rows: textual and driver-level SQL


@invalidates(User)
def textual_update_of_user_2(session: Session) -> None:
    session.execute(text("UPDATE cd_users SET name = 'raw' WHERE id = 2"))


@invalidates(User)
def driver_sql_update_of_user_2(session: Session) -> None:
    session.connection().exec_driver_sql("UPDATE cd_users SET name = 'raw' WHERE id = 2")


@invalidates(User)
def textual_select(session: Session) -> None:
    session.execute(text("SELECT name FROM cd_users WHERE id = 2")).all()


@invalidates(User)
def driver_sql_select(session: Session) -> None:
    session.connection().exec_driver_sql("SELECT name FROM cd_users WHERE id = 2").all()


UNRESOLVED = {"textual sql": textual_update_of_user_2, "driver-level sql": driver_sql_update_of_user_2}
READS = {"textual sql": textual_select, "driver-level sql": driver_sql_select}


@pytest.fixture(params=list(UNRESOLVED))
def unresolved(request: pytest.FixtureRequest) -> Callable[[Session], None]:
    return UNRESOLVED[request.param]


@pytest.fixture(params=list(READS))
def reading_sql(request: pytest.FixtureRequest) -> Callable[[Session], None]:
    return READS[request.param]


class TestUnresolvedWrites:
    def test_a_warning_names_the_model(
        self, users: Engine, unresolved: Callable[[Session], None], caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="cachedecor")
        with Session(users) as s:
            unresolved(s)
            s.rollback()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("every cached row of User" in m for m in warnings), warnings

    def test_every_cached_row_of_the_model_is_invalidated_at_commit(
        self, users: Engine, unresolved: Callable[[Session], None]
    ) -> None:
        with Session(users) as s:
            unresolved(s)
            assert all(stored(user_key(i)) for i in (1, 2, 3))
            s.commit()
        assert not any(stored(user_key(i)) for i in (1, 2, 3))
        assert counters()["model_invalidations"] == 1
        assert read_name(users, 2) == "raw"

    def test_other_tables_keep_their_entries(
        self, users: Engine, unresolved: Callable[[Session], None]
    ) -> None:
        with Session(users) as s:
            unresolved(s)
            s.commit()
        assert stored(post_key(10))

    def test_reads_of_any_row_of_the_model_in_the_writing_transaction_bypass_the_cache(
        self, users: Engine, unresolved: Callable[[Session], None]
    ) -> None:
        with Session(users) as s:
            unresolved(s)
            assert get_user(s, 2).name == "raw"  # type: ignore[union-attr]
            assert get_user(s, 3).name == "user3"  # type: ignore[union-attr]
            assert counters()["bypasses"] == 2
            s.rollback()

    def test_sql_that_only_reads_is_not_a_write(
        self, users: Engine, reading_sql: Callable[[Session], None], caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="cachedecor")
        with Session(users) as s:
            reading_sql(s)
            s.commit()
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert counters()["model_invalidations"] == 0
        assert stored(user_key(2))

    @pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
    def test_a_sqlite_pragma_is_not_a_write(self, users: Engine, caplog: pytest.LogCaptureFixture) -> None:
        @invalidates(User)
        def inspect_table(session: Session) -> None:
            session.connection().exec_driver_sql("PRAGMA table_info(cd_users)").all()

        caplog.set_level(logging.WARNING, logger="cachedecor")
        with Session(users) as s:
            inspect_table(s)
            s.commit()
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert counters()["model_invalidations"] == 0

    def test_driver_sql_outside_invalidates_stops_fills_until_the_transaction_ends(
        self, users: Engine
    ) -> None:
        cachedecor.invalidate(User, 3)
        with Session(users) as s:
            s.connection().exec_driver_sql("UPDATE cd_users SET name = 'uncommitted' WHERE id = 3")
            assert get_user(s, 3).name == "uncommitted"  # type: ignore[union-attr]
            s.rollback()
        assert not stored(user_key(3))
        assert read_name(users, 3) == "user3"


# --------------------------------------------------------------------------------------
# cachedecor.invalidate_model on every backend


@pytest.fixture
def cached_rows(sqlite_engine: Engine, backend: str) -> Engine:
    """Users 1-3 and post 10 cached on ``backend``.

    Redis is a server that other test processes may share: keys of a namespace of
    our own keep their rows apart from ours.
    """
    if backend == "redis":
        cachedecor.configure_regions(redis_config(namespace=f"cd-{os.getpid()}-{uuid.uuid4().hex[:8]}"))
    with Session(sqlite_engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in (1, 2, 3)])
        s.add(Post(id=10, user_id=1, title="t"))
        s.commit()
    for i in (1, 2, 3):
        once(sqlite_engine, get_user, i)
    once(sqlite_engine, get_post, 10)
    assert all(stored(user_key(i)) for i in (1, 2, 3)) and stored(post_key(10))
    cachedecor.reset_stats()
    return sqlite_engine


class TestInvalidateModel:
    def test_every_cached_row_of_the_model_is_removed(self, cached_rows: Engine) -> None:
        cachedecor.invalidate_model(User)
        assert [stored(user_key(i)) for i in (1, 2, 3)] == [False, False, False]

    def test_rows_that_are_being_read_are_removed_too(self, cached_rows: Engine) -> None:
        for _ in range(3):  # memcached moves an entry read again between its LRUs
            for i in (1, 2, 3):
                once(cached_rows, get_user, i)
        assert counters()["hits"] == 9
        cachedecor.invalidate_model(User)
        assert [stored(user_key(i)) for i in (1, 2, 3)] == [False, False, False]

    def test_a_memcached_without_the_hash_table_walk_is_listed_by_its_lrus(self) -> None:
        def answer(request: bytes) -> bytes:
            if request.startswith(b"lru_crawler metadump hash"):
                return b"CLIENT_ERROR bad command line format\r\n"
            if request.startswith(b"lru_crawler metadump all"):
                return b"key=cachedecor%3Acd_users%3A1 exp=-1 la=1 cas=1 fetch=no cls=1 size=61\nEND\r\n"
            return b"ERROR\r\n"

        with fake_server(answer) as url:
            cachedecor.configure_regions(memcached_config(url))
            cluster = region_settings("default").store.client
            assert metadump(cluster, cluster.servers[0]) == ["cachedecor:cd_users:1"]

    def test_leases_of_the_model_are_removed(self, cached_rows: Engine) -> None:
        data, lease = store().lookup(user_key(9), 30)
        assert data is None and lease is not None
        cachedecor.invalidate_model(User)
        assert store().peek(user_key(9)) is None
        assert store().fill(user_key(9), b"a fill that started before", lease, 300) is False

    def test_other_tables_keep_their_entries(self, cached_rows: Engine) -> None:
        cachedecor.invalidate_model(User)
        assert stored(post_key(10))

    def test_it_is_counted(self, cached_rows: Engine) -> None:
        cachedecor.invalidate_model(User)
        assert counters()["model_invalidations"] == 1
        assert counters()["invalidations"] == 3

    def test_with_a_session_it_waits_for_the_commit(self, cached_rows: Engine) -> None:
        with Session(cached_rows) as s:
            s.get(User, 1)  # begins the transaction
            cachedecor.invalidate_model(User, session=s)
            assert stored(user_key(1))
            s.commit()
        assert not stored(user_key(1))
