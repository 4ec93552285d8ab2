"""One schema per tenant: the schema a ``schema_translate_map`` selects is part of the key.

Two PostgreSQL schemas hold the same table with rows of the same primary key and
different names; one engine per tenant translates the mapped table to its schema.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy
from sqlalchemy import insert, update
from sqlalchemy.engine import Engine
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import cached_by_pk, invalidates, key_for
from cachedecor.config import region_settings
from tests.conftest import SQLCounter
from tests.models import Note, User
from tests.servers import PG_URL, Memcached, unavailable


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(User, identity_token="shard")
def get_by_shard(session: Session, user_id: int, shard: str) -> User | None:
    return session.get(User, user_id, identity_token=shard)


@invalidates(User)
def rename_user(session: Session, user_id: int, name: str) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.name = name
    session.commit()


@dataclass
class Tenants:
    """The server's engine (no map), and one translated engine and schema per tenant."""

    admin: Engine
    t1: Engine
    t2: Engine
    s1: str
    s2: str


@pytest.fixture(scope="module")
def schemas() -> Iterator[tuple[Engine, str, str]]:
    admin = sqlalchemy.create_engine(PG_URL)
    tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    names = (f"cd_tenant1_{tag}", f"cd_tenant2_{tag}")
    try:
        with admin.begin() as conn:
            for name in names:
                conn.exec_driver_sql(f"CREATE SCHEMA {name}")
    except Exception as exc:
        admin.dispose()
        unavailable(f"PostgreSQL is not reachable at {PG_URL}: {exc}")
    for name in names:
        User.metadata.create_all(
            admin.execution_options(schema_translate_map={None: name}),
            tables=[User.__table__, Note.__table__],
        )
    yield admin, names[0], names[1]
    admin.dispose()
    with admin.begin() as conn:
        conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
        for name in names:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    admin.dispose()


@pytest.fixture
def tenants(schemas: tuple[Engine, str, str], cache: Memcached) -> Tenants:
    """Users 1 and 2 in both schemas, named after their tenant; nothing cached yet."""
    admin, s1, s2 = schemas
    t1 = admin.execution_options(schema_translate_map={None: s1})
    t2 = admin.execution_options(schema_translate_map={None: s2})
    for engine, tenant in ((t1, "t1"), (t2, "t2")):
        with Session(engine) as s:
            s.execute(User.__table__.delete())
            s.execute(Note.__table__.delete())
            s.add_all([User(id=i, name=f"{tenant}-user{i}") for i in (1, 2)])
            s.commit()
    return Tenants(admin, t1, t2, s1, s2)


def read_name(engine: Engine, user_id: int) -> str | None:
    with Session(engine) as s:
        user = get_user(s, user_id)
        return None if user is None else user.name


def stored(key: str) -> bool:
    return region_settings("default").store.get(key) is not None


def counters() -> dict[str, int]:
    return cachedecor.stats("default")["default"]


class TestReads:
    def test_a_tenant_never_receives_another_tenants_row_on_a_miss(self, tenants: Tenants) -> None:
        assert read_name(tenants.t1, 1) == "t1-user1"
        assert read_name(tenants.t2, 1) == "t2-user1"

    def test_hits_serve_each_tenant_its_own_row(self, tenants: Tenants) -> None:
        read_name(tenants.t1, 1)
        read_name(tenants.t2, 1)
        cachedecor.reset_stats()
        sql = SQLCounter(tenants.admin)
        try:
            assert read_name(tenants.t2, 1) == "t2-user1"
            assert read_name(tenants.t1, 1) == "t1-user1"
        finally:
            sql.close()
        assert counters()["hits"] == 2
        assert sql.selects() == 0

    def test_each_tenants_row_is_stored_under_a_key_naming_its_schema(self, tenants: Tenants) -> None:
        read_name(tenants.t1, 1)
        read_name(tenants.t2, 1)
        k1 = key_for(User, 1, schema=tenants.s1)
        k2 = key_for(User, 1, schema=tenants.s2)
        assert k1 == f"cachedecor:{tenants.s1}.cd_users:1"
        assert len({k1, k2, get_user.cache_key(1)}) == 3
        assert stored(k1) and stored(k2)
        assert not stored(get_user.cache_key(1))  # the untranslated table's key stays unused

    def test_a_map_given_to_the_sessions_connection_selects_the_tenant(self, tenants: Tenants) -> None:
        with Session(tenants.admin) as s:
            s.connection(execution_options={"schema_translate_map": {None: tenants.s2}})
            user = get_user(s, 1)
            assert user is not None and user.name == "t2-user1"
        assert stored(key_for(User, 1, schema=tenants.s2))
        assert not stored(key_for(User, 1, schema=tenants.s1))


class TestWrites:
    def test_a_write_in_one_tenant_invalidates_only_its_entry(self, tenants: Tenants) -> None:
        read_name(tenants.t1, 1)
        read_name(tenants.t2, 1)
        with Session(tenants.t1) as s:
            rename_user(s, 1, "t1-renamed")
        assert not stored(key_for(User, 1, schema=tenants.s1))
        assert stored(key_for(User, 1, schema=tenants.s2))
        assert read_name(tenants.t1, 1) == "t1-renamed"
        assert read_name(tenants.t2, 1) == "t2-user1"

    def test_a_bulk_update_in_one_tenant_invalidates_only_its_entry(self, tenants: Tenants) -> None:
        @invalidates(User)
        def rename_all(session: Session) -> None:
            session.execute(update(User).where(User.id == 1).values(name="bulk"))
            session.commit()

        read_name(tenants.t1, 1)
        read_name(tenants.t2, 1)
        with Session(tenants.t2) as s:
            rename_all(s)
        assert stored(key_for(User, 1, schema=tenants.s1))
        assert read_name(tenants.t2, 1) == "bulk"

    def test_a_write_through_a_connection_with_a_map_invalidates_that_tenants_entry(
        self, tenants: Tenants
    ) -> None:
        read_name(tenants.t1, 1)
        read_name(tenants.t2, 1)
        with Session(tenants.admin) as s:
            s.connection(execution_options={"schema_translate_map": {None: tenants.s2}})
            rename_user(s, 1, "t2-renamed")
        assert stored(key_for(User, 1, schema=tenants.s1))
        assert read_name(tenants.t2, 1) == "t2-renamed"

    def test_an_insert_returning_in_one_tenant_invalidates_its_cached_none(self, tenants: Tenants) -> None:
        @cached_by_pk(User, cache_none=True)
        def get_or_none(session: Session, user_id: int) -> User | None:
            return session.get(User, user_id)

        @invalidates(User)
        def create(session: Session, user_id: int) -> None:
            session.scalars(insert(User).values(id=user_id, name="created").returning(User)).all()
            session.commit()

        for engine in (tenants.t1, tenants.t2):
            with Session(engine) as s:
                assert get_or_none(s, 3) is None
        with Session(tenants.t1) as s:
            create(s, 3)
        assert not stored(key_for(User, 3, schema=tenants.s1))
        assert stored(key_for(User, 3, schema=tenants.s2))

    def test_an_insert_returning_a_key_the_database_assigns_invalidates_that_tenants_cached_none(
        self, tenants: Tenants
    ) -> None:
        @cached_by_pk(Note, cache_none=True)
        def get_note(session: Session, note_id: int) -> Note | None:
            return session.get(Note, note_id)

        @invalidates(Note)
        def write_note(session: Session) -> int:
            note_id = session.scalars(insert(Note).values(text="new").returning(Note.id)).one()
            session.commit()
            return note_id

        with Session(tenants.t1) as s:
            s.add(note := Note(text="first"))
            s.commit()
            expected = note.id + 1
        for engine in (tenants.t1, tenants.t2):
            with Session(engine) as s:
                assert get_note(s, expected) is None
        with Session(tenants.t1) as s:
            assert write_note(s) == expected
        assert not stored(key_for(Note, expected, schema=tenants.s1))
        assert stored(key_for(Note, expected, schema=tenants.s2))

    def test_invalidate_with_a_session_uses_the_sessions_schema(self, tenants: Tenants) -> None:
        read_name(tenants.t1, 1)
        read_name(tenants.t2, 1)
        with Session(tenants.t2) as s:
            cachedecor.invalidate(User, 1, session=s)
        assert not stored(key_for(User, 1, schema=tenants.s2))
        assert stored(key_for(User, 1, schema=tenants.s1))

    def test_invalidate_with_a_session_in_a_transaction_uses_its_schema_at_commit(
        self, tenants: Tenants
    ) -> None:
        read_name(tenants.t1, 1)
        read_name(tenants.t2, 1)
        with Session(tenants.t2) as s:
            s.get(User, 2)  # begins the transaction
            cachedecor.invalidate(User, 1, session=s)
            assert stored(key_for(User, 1, schema=tenants.s2))
            s.commit()
        assert not stored(key_for(User, 1, schema=tenants.s2))
        assert stored(key_for(User, 1, schema=tenants.s1))

    def test_invalidate_model_with_a_schema_clears_only_that_tenant(self, tenants: Tenants) -> None:
        for engine in (tenants.t1, tenants.t2):
            for i in (1, 2):
                read_name(engine, i)
        cachedecor.invalidate_model(User, schema=tenants.s1)
        assert [stored(key_for(User, i, schema=tenants.s1)) for i in (1, 2)] == [False, False]
        assert [stored(key_for(User, i, schema=tenants.s2)) for i in (1, 2)] == [True, True]
        assert counters()["model_invalidations"] == 1

    def test_invalidate_model_without_a_schema_clears_every_tenant(self, tenants: Tenants) -> None:
        for engine in (tenants.t1, tenants.t2):
            for i in (1, 2):
                read_name(engine, i)
        cachedecor.invalidate_model(User)
        for schema in (tenants.s1, tenants.s2):
            assert [stored(key_for(User, i, schema=schema)) for i in (1, 2)] == [False, False]


class TestShardsInSchemas:
    """Horizontal sharding whose shards are the tenants' schemas (one engine per shard)."""

    @staticmethod
    def session(tenants: Tenants) -> ShardedSession:
        return ShardedSession(
            shards={"t1": tenants.t1, "t2": tenants.t2},
            shard_chooser=lambda mapper, instance, **kw: instance.name.split("-")[0],
            identity_chooser=lambda mapper, primary_key, **kw: ["t1", "t2"],
            execute_chooser=lambda context: ["t1", "t2"],
        )

    def test_a_row_is_keyed_by_its_shards_schema_and_token(self, tenants: Tenants) -> None:
        with self.session(tenants) as s:
            assert get_by_shard(s, 1, "t2").name == "t2-user1"  # type: ignore[union-attr]
        assert stored(key_for(User, 1, schema=tenants.s2, identity_token="t2"))

    def test_a_change_flushed_on_a_shard_invalidates_the_key_its_readers_use(self, tenants: Tenants) -> None:
        @invalidates(User)
        def rename_on(session: Session, shard: str) -> None:
            user = session.get(User, 1, identity_token=shard)
            assert user is not None
            user.name = "flushed"
            session.commit()

        key = key_for(User, 1, schema=tenants.s2, identity_token="t2")
        with self.session(tenants) as s:
            get_by_shard(s, 1, "t2")
        assert stored(key)
        with self.session(tenants) as s:
            rename_on(s, "t2")
        assert not stored(key)

    def test_a_bulk_update_on_a_shard_invalidates_the_key_its_readers_use(self, tenants: Tenants) -> None:
        @invalidates(User)
        def rename_on(session: Session, shard: str) -> None:
            statement = update(User).where(User.id == 1).values(name="bulk")
            session.execute(statement, bind_arguments={"shard_id": shard})
            session.commit()

        for shard in ("t1", "t2"):
            with self.session(tenants) as s:
                get_by_shard(s, 1, shard)
        with self.session(tenants) as s:
            rename_on(s, "t2")
        with self.session(tenants) as s:
            assert get_by_shard(s, 1, "t2").name == "bulk"  # type: ignore[union-attr]
            assert get_by_shard(s, 1, "t1").name == "t1-user1"  # type: ignore[union-attr]
