"""Horizontal sharding: the identity token of a row is part of its key.

Two SQLite files are the shards ``east`` and ``west`` of one
:class:`~sqlalchemy.ext.horizontal_shard.ShardedSession`; each holds an account
with primary key 1 and a name of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import Integer, String, insert, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import cachedecor
from cachedecor import cached_by_pk, invalidates, key_for
from cachedecor.config import region_settings
from tests.conftest import SQLCounter
from tests.servers import Memcached

SHARDS = ("east", "west")


class ShardBase(DeclarativeBase):
    pass


class Account(ShardBase):
    __tablename__ = "cd_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    shard: Mapped[str] = mapped_column(String(10))
    name: Mapped[str] = mapped_column(String(50))


class Ticket(ShardBase):
    """A primary key each shard's database assigns: both shards have a ticket 1."""

    __tablename__ = "cd_tickets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    shard: Mapped[str] = mapped_column(String(10))


@cached_by_pk(Ticket, identity_token="shard", cache_none=True)
def get_ticket(session: Session, ticket_id: int, shard: str) -> Ticket | None:
    return session.get(Ticket, ticket_id, identity_token=shard)


@cached_by_pk(Account, identity_token="shard")
def get_account(session: Session, account_id: int, shard: str) -> Account | None:
    return session.get(Account, account_id, identity_token=shard)


@cached_by_pk(Account, identity_token="shard", cache_none=True)
def get_account_or_none(session: Session, account_id: int, shard: str) -> Account | None:
    return session.get(Account, account_id, identity_token=shard)


@invalidates(Account)
def rename_account(session: Session, account_id: int, shard: str, name: str) -> None:
    account = session.get(Account, account_id, identity_token=shard)
    assert account is not None
    account.name = name
    session.commit()


@dataclass
class Shards:
    engines: dict[str, Engine]

    def session(self) -> ShardedSession:
        return ShardedSession(
            shards=dict(self.engines),
            shard_chooser=lambda mapper, instance, **kw: instance.shard,
            identity_chooser=lambda mapper, primary_key, **kw: list(SHARDS),
            execute_chooser=lambda context: list(SHARDS),
        )

    def name_in_db(self, shard: str, account_id: int) -> str | None:
        with Session(self.engines[shard]) as s:
            return s.scalar(sqlalchemy.select(Account.name).where(Account.id == account_id))


@pytest.fixture
def shards(tmp_path: Path, cache: Memcached) -> Iterator[Shards]:
    """Account 1 in both shards, named ``east-1`` and ``west-1``; nothing cached yet."""
    engines = {name: sqlalchemy.create_engine(f"sqlite:///{tmp_path / name}.sqlite") for name in SHARDS}
    for name, engine in engines.items():
        ShardBase.metadata.create_all(engine)
        with Session(engine) as s:
            s.add(Account(id=1, shard=name, name=f"{name}-1"))
            s.commit()
    yield Shards(engines)
    for engine in engines.values():
        engine.dispose()


def read_name(shards: Shards, account_id: int, shard: str) -> str | None:
    with shards.session() as s:
        account = get_account(s, account_id, shard)
        return None if account is None else account.name


def key(account_id: int, shard: str) -> str:
    return key_for(Account, account_id, identity_token=shard)


def stored(cache_key: str) -> bool:
    return region_settings("default").store.get(cache_key) is not None


def counters() -> dict[str, int]:
    return cachedecor.stats("default")["default"]


@pytest.fixture
def cached(shards: Shards) -> Shards:
    """``shards`` with account 1 of both shards cached."""
    for shard in SHARDS:
        read_name(shards, 1, shard)
    assert stored(key(1, "east")) and stored(key(1, "west"))
    cachedecor.reset_stats()
    return shards


class TestReads:
    def test_each_shard_reads_its_own_row_on_a_miss(self, shards: Shards) -> None:
        assert read_name(shards, 1, "east") == "east-1"
        assert read_name(shards, 1, "west") == "west-1"

    def test_the_key_names_the_shard(self) -> None:
        assert key(1, "west") == "cachedecor:cd_accounts@west:1"
        assert len({key(1, "east"), key(1, "west"), key_for(Account, 1)}) == 3

    def test_rows_of_each_shard_are_stored_under_their_shards_key(self, shards: Shards) -> None:
        read_name(shards, 1, "east")
        read_name(shards, 1, "west")
        assert stored(key(1, "east")) and stored(key(1, "west"))
        assert not stored(key_for(Account, 1))

    def test_hits_serve_each_shard_its_own_row(self, cached: Shards) -> None:
        counters_ = [SQLCounter(engine) for engine in cached.engines.values()]
        try:
            assert read_name(cached, 1, "west") == "west-1"
            assert read_name(cached, 1, "east") == "east-1"
        finally:
            for counter in counters_:
                counter.close()
        assert counters()["hits"] == 2
        assert sum(c.count for c in counters_) == 0

    def test_a_hit_carries_the_identity_token_of_its_shard(self, cached: Shards) -> None:
        with cached.session() as s:
            account = get_account(s, 1, "west")
            assert counters()["hits"] == 1
            assert sqlalchemy.inspect(account).key == (Account, (1,), "west")

    def test_a_reader_returning_another_shards_row_does_not_fill(self, shards: Shards) -> None:
        @cached_by_pk(Account, identity_token="shard")
        def get_from_east(session: Session, account_id: int, shard: str) -> Account | None:
            return session.get(Account, account_id, identity_token="east")

        with shards.session() as s:
            assert get_from_east(s, 1, "west").name == "east-1"  # type: ignore[union-attr]
        assert counters()["uncacheable"] == 1
        assert not stored(key(1, "west"))


class TestWrites:
    def test_a_change_invalidates_only_its_shards_key(self, cached: Shards) -> None:
        with cached.session() as s:
            rename_account(s, 1, "west", "west-renamed")
        assert not stored(key(1, "west"))
        assert stored(key(1, "east"))
        assert read_name(cached, 1, "west") == "west-renamed"

    def test_a_change_to_a_cached_instance_is_written_to_its_own_shard(self, cached: Shards) -> None:
        @invalidates(Account)
        def rename_cached(session: Session, account_id: int, shard: str, name: str) -> None:
            account = get_account(session, account_id, shard)
            assert account is not None
            account.name = name
            session.commit()

        with cached.session() as s:
            rename_cached(s, 1, "west", "west-renamed")
        assert counters()["hits"] == 1
        assert cached.name_in_db("west", 1) == "west-renamed"
        assert cached.name_in_db("east", 1) == "east-1"

    def test_a_delete_invalidates_its_shards_key(self, cached: Shards) -> None:
        @invalidates(Account)
        def delete_account(session: Session, account_id: int, shard: str) -> None:
            session.delete(session.get(Account, account_id, identity_token=shard))
            session.commit()

        with cached.session() as s:
            delete_account(s, 1, "east")
        assert read_name(cached, 1, "east") is None
        assert stored(key(1, "west"))

    def test_an_insert_invalidates_a_cached_none_of_its_shard(self, shards: Shards) -> None:
        @invalidates(Account)
        def open_account(session: Session, account_id: int, shard: str) -> None:
            session.add(Account(id=account_id, shard=shard, name=f"{shard}-{account_id}"))
            session.commit()

        for shard in SHARDS:
            with shards.session() as s:
                assert get_account_or_none(s, 2, shard) is None
        with shards.session() as s:
            open_account(s, 2, "west")
        assert stored(key(2, "east"))  # east's cached "no such row" still holds
        with shards.session() as s:
            assert get_account_or_none(s, 2, "west").name == "west-2"  # type: ignore[union-attr]

    def test_an_insert_returning_a_key_the_shard_assigns_invalidates_that_shards_cached_none(
        self, shards: Shards
    ) -> None:
        @invalidates(Ticket)
        def open_ticket(session: Session, shard: str) -> int:
            statement = insert(Ticket).values(shard=shard).returning(Ticket.id)
            ticket_id = session.scalars(statement, bind_arguments={"shard_id": shard}).one()
            session.commit()
            return ticket_id

        for shard in SHARDS:
            with shards.session() as s:
                assert get_ticket(s, 1, shard) is None
        with shards.session() as s:
            assert open_ticket(s, "west") == 1
        assert not stored(key_for(Ticket, 1, identity_token="west"))
        assert stored(key_for(Ticket, 1, identity_token="east"))

    def test_a_core_insert_on_a_shards_connection_invalidates_that_shards_cached_none(
        self, shards: Shards
    ) -> None:
        @invalidates(Ticket)
        def open_ticket(session: Session, shard: str) -> int:
            connection = session.connection(bind_arguments={"shard_id": shard})
            result = connection.execute(Ticket.__table__.insert().values(shard=shard))
            session.commit()
            return int(result.inserted_primary_key[0])

        for shard in SHARDS:
            with shards.session() as s:
                assert get_ticket(s, 1, shard) is None
        with shards.session() as s:
            assert open_ticket(s, "east") == 1
        assert not stored(key_for(Ticket, 1, identity_token="east"))
        assert stored(key_for(Ticket, 1, identity_token="west"))

    def test_a_bulk_update_on_one_shard_invalidates_that_shards_key(self, cached: Shards) -> None:
        @invalidates(Account)
        def rename_on(session: Session, shard: str) -> None:
            statement = update(Account).where(Account.id == 1).values(name="bulk")
            session.execute(statement, bind_arguments={"shard_id": shard})
            session.commit()

        with cached.session() as s:
            rename_on(s, "west")
        assert not stored(key(1, "west"))
        assert stored(key(1, "east"))

    def test_a_bulk_update_on_every_shard_invalidates_each_shards_key(self, cached: Shards) -> None:
        @invalidates(Account)
        def rename_everywhere(session: Session) -> None:
            session.execute(update(Account).where(Account.id == 1).values(name="bulk"))
            session.commit()

        with cached.session() as s:
            rename_everywhere(s)
        assert [read_name(cached, 1, shard) for shard in SHARDS] == ["bulk", "bulk"]

    def test_a_core_update_on_a_shards_connection_invalidates_that_shards_key(self, cached: Shards) -> None:
        @invalidates(Account)
        def rename_on(session: Session, shard: str) -> None:
            connection = session.connection(bind_arguments={"shard_id": shard})
            connection.execute(Account.__table__.update().where(Account.id == 1).values(name="core"))
            session.commit()

        with cached.session() as s:
            rename_on(s, "west")
        assert not stored(key(1, "west"))
        assert stored(key(1, "east"))

    def test_textual_sql_on_a_shard_clears_that_shards_rows(self, cached: Shards) -> None:
        @invalidates(Account)
        def rename_on(session: Session, shard: str) -> None:
            statement = text("UPDATE cd_accounts SET name = 'raw' WHERE id = 1")
            session.execute(statement, bind_arguments={"shard_id": shard})
            session.commit()

        with cached.session() as s:
            rename_on(s, "west")
        assert not stored(key(1, "west"))
        assert read_name(cached, 1, "west") == "raw"

    def test_driver_sql_on_a_shards_connection_clears_that_shards_rows(self, cached: Shards) -> None:
        @invalidates(Account)
        def rename_on(session: Session, shard: str) -> None:
            connection = session.connection(bind_arguments={"shard_id": shard})
            connection.exec_driver_sql("UPDATE cd_accounts SET name = 'raw' WHERE id = 1")
            session.commit()

        with cached.session() as s:
            rename_on(s, "west")
        assert not stored(key(1, "west"))
        assert read_name(cached, 1, "west") == "raw"


class TestModelWide:
    def test_invalidate_model_clears_the_rows_of_every_shard(self, cached: Shards) -> None:
        cachedecor.invalidate_model(Account)
        assert not stored(key(1, "east")) and not stored(key(1, "west"))
        assert counters()["model_invalidations"] == 1

    def test_invalidate_with_an_identity_token_clears_that_shards_row_only(self, cached: Shards) -> None:
        cachedecor.invalidate(Account, 1, identity_token="east")
        assert not stored(key(1, "east")) and stored(key(1, "west"))
