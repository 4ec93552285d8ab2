"""A Flask application on Flask-SQLAlchemy: ``db.session`` is never an argument.

The views read through ``@cached_by_pk(Account, session=db.session)`` and write
through ``@invalidates(Account)`` functions that use ``db.session``; the test client
drives real requests against SQLite and PostgreSQL with memcached.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy
from flask import Flask, abort, request
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey, Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import cachedecor
from cachedecor import cached_by_pk, invalidates
from tests.conftest import SQLCounter, memcached_config
from tests.servers import PG_URL, Memcached, unavailable


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Team(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "fl_teams"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Account(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "fl_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    team_id: Mapped[int] = mapped_column(ForeignKey("fl_teams.id"))
    team: Mapped[Team] = relationship()


@cached_by_pk(Account, session=db.session)
def get_account(account_id: int) -> Account | None:
    return db.session.get(Account, account_id)


@cached_by_pk(Account)
def get_account_untold(account_id: int) -> Account | None:
    """Not told where the session is: cachedecor finds ``db.session`` in the code."""
    return db.session.get(Account, account_id)


def _current_session() -> Any:
    return db.session()


class AccountRepository:
    """A repository holding Flask-SQLAlchemy's ``db.session`` on ``self``."""

    def __init__(self) -> None:
        self.session = db.session

    @cached_by_pk(Account)
    def get(self, account_id: int) -> Account | None:
        return self.session.get(Account, account_id)


@invalidates(Account)
def rename_account(account_id: int, name: str) -> None:
    account = db.session.get(Account, account_id)
    if account is None:
        abort(404)
    account.name = name
    db.session.commit()


@invalidates(Account)
def rename_account_for_the_view_to_commit(account_id: int, name: str) -> None:
    account = db.session.get(Account, account_id)
    if account is None:
        abort(404)
    account.name = name


@invalidates(Account)
def rename_cached_account(account_id: int, name: str) -> None:
    account = get_account(account_id)
    if account is None:
        abort(404)
    account.name = name
    db.session.commit()


@invalidates(Account)
def move_account(account_id: int, team_id: int) -> None:
    account = get_account(account_id)
    if account is None:
        abort(404)
    team = db.session.get(Team, team_id)
    if team is None:
        abort(404)
    account.team = team
    db.session.commit()


def as_json(account: Account | None) -> dict[str, Any]:
    if account is None:
        abort(404)
    return {"id": account.id, "name": account.name, "team": account.team.name}


def create_app(uri: str, engine_options: dict[str, Any]) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=uri,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options,
        # a failing view answers 500 as in production, instead of raising into the test
        PROPAGATE_EXCEPTIONS=False,
    )
    db.init_app(app)

    @app.get("/accounts/<int:account_id>")
    def show(account_id: int) -> dict[str, Any]:
        return as_json(get_account(account_id))

    @app.get("/untold/accounts/<int:account_id>")
    def show_untold(account_id: int) -> dict[str, Any]:
        return as_json(get_account_untold(account_id))

    @app.get("/repository/accounts/<int:account_id>")
    def show_from_repository(account_id: int) -> dict[str, Any]:
        return as_json(AccountRepository().get(account_id))

    @app.post("/accounts/<int:account_id>/rename")
    def rename(account_id: int) -> dict[str, Any]:
        rename_account(account_id, request.get_json()["name"])
        return {"ok": True}

    @app.post("/accounts/<int:account_id>/rename-cached")
    def rename_cached(account_id: int) -> dict[str, Any]:
        rename_cached_account(account_id, request.get_json()["name"])
        return {"ok": True}

    @app.post("/accounts/<int:account_id>/move")
    def move(account_id: int) -> dict[str, Any]:
        move_account(account_id, request.get_json()["team_id"])
        return {"ok": True}

    @app.post("/accounts/<int:account_id>/rename-and-commit-in-the-view")
    def rename_and_commit_in_the_view(account_id: int) -> dict[str, Any]:
        rename_account_for_the_view_to_commit(account_id, request.get_json()["name"])
        db.session.commit()
        return {"ok": True}

    @app.post("/accounts/<int:account_id>/rename-then-fail")
    def rename_then_fail(account_id: int) -> dict[str, Any]:
        rename_account_for_the_view_to_commit(account_id, request.get_json()["name"])
        db.session.flush()  # the UPDATE has run in the request's transaction
        raise RuntimeError("the request fails after the change")

    return app


def _pg_schema() -> str:
    schema = f"fl_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sqlalchemy.create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except Exception as exc:
        unavailable(f"PostgreSQL is not reachable at {PG_URL}: {exc}")
    finally:
        admin.dispose()
    return schema


def _drop_pg_schema(schema: str) -> None:
    admin = sqlalchemy.create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def app(request: pytest.FixtureRequest, tmp_path: Any, cache: Memcached) -> Iterator[Flask]:
    """The application on a fresh database holding two teams and two accounts, memcached empty."""
    schema = None
    if request.param == "sqlite":
        application = create_app(f"sqlite:///{tmp_path / 'app.sqlite'}", {})
    else:
        schema = _pg_schema()
        application = create_app(PG_URL, {"connect_args": {"options": f"-csearch_path={schema}"}})
    cachedecor.configure_regions(memcached_config(cache.url))
    try:
        with application.app_context():
            db.create_all()
            db.session.add_all([Team(id=1, name="red"), Team(id=2, name="blue")])
            db.session.add_all([Account(id=1, name="alice", team_id=1), Account(id=2, name="bob", team_id=2)])
            db.session.commit()
        yield application
    finally:
        with application.app_context():
            db.session.remove()
            for engine in db.engines.values():
                engine.dispose()
        if schema is not None:
            _drop_pg_schema(schema)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def queries(app: Flask) -> Iterator[SQLCounter]:
    with app.app_context():
        counter = SQLCounter(db.engine)
    yield counter
    counter.close()


def counter(name: str) -> int:
    return cachedecor.stats()["default"][name]


def name_in_db(app: Flask, account_id: int) -> str | None:
    with app.app_context():
        return db.session.scalar(select(Account.name).where(Account.id == account_id))


class TestCachedView:
    def test_the_first_get_fills_the_cache(self, client: FlaskClient) -> None:
        response = client.get("/accounts/1")
        assert response.status_code == 200
        assert response.get_json() == {"id": 1, "name": "alice", "team": "red"}
        assert counter("misses") == 1
        assert counter("fills") == 1

    def test_the_second_get_is_a_hit_that_loads_the_lazy_team(self, client: FlaskClient) -> None:
        client.get("/accounts/1")
        response = client.get("/accounts/1")
        assert counter("hits") == 1
        assert response.status_code == 200
        assert response.get_json() == {"id": 1, "name": "alice", "team": "red"}

    def test_a_hit_is_attached_to_the_app_context_s_db_session(self, app: Flask) -> None:
        with app.app_context():
            get_account(1)
        with app.app_context():
            account = get_account(1)
            assert counter("hits") == 1
            assert account in db.session()

    def test_a_hit_queries_only_the_team(self, client: FlaskClient, queries: SQLCounter) -> None:
        client.get("/accounts/1")
        queries.reset()
        client.get("/accounts/1")
        assert queries.selects() == 1
        assert "fl_teams" in queries.statements[0]
        assert "fl_accounts" not in queries.statements[0]

    def test_a_repository_holding_db_session_serves_attached_hits(self, client: FlaskClient) -> None:
        client.get("/repository/accounts/2")
        response = client.get("/repository/accounts/2")
        assert counter("hits") == 1
        assert response.status_code == 200
        assert response.get_json() == {"id": 2, "name": "bob", "team": "blue"}

    def test_rows_are_shared_between_the_function_and_the_repository(self, client: FlaskClient) -> None:
        client.get("/accounts/2")
        response = client.get("/repository/accounts/2")
        assert counter("hits") == 1
        assert response.get_json() == {"id": 2, "name": "bob", "team": "blue"}


class TestReaderNotToldWhereTheSessionIs:
    def test_hits_attach_to_the_db_session_the_code_names(self, client: FlaskClient) -> None:
        client.get("/untold/accounts/1")
        response = client.get("/untold/accounts/1")  # a hit: its lazy team loads
        assert counter("hits") == 1
        assert response.status_code == 200
        assert response.get_json() == {"id": 1, "name": "alice", "team": "red"}

    def test_a_hit_is_the_current_db_session_s(self, app: Flask) -> None:
        with app.app_context():
            get_account_untold(1)
        with app.app_context():
            account = get_account_untold(1)
            assert counter("hits") == 1
            assert account in db.session()

    def test_a_reader_whose_session_cannot_be_found_warns_once_naming_session(self, app: Flask) -> None:
        @cached_by_pk(Account)
        def get_account_hidden(account_id: int) -> Account | None:
            """Not told, and nothing in the code names a registry: the session comes from a call."""
            return _current_session().get(Account, account_id)  # type: ignore[no-any-return]

        with app.app_context(), pytest.warns(cachedecor.SessionWarning, match=r"session=") as warned:
            get_account_hidden(1)
            get_account_hidden(2)
        assert len(warned) == 1
        assert "get_account_hidden" in str(warned[0].message)
        assert "db.session" in str(warned[0].message)

    def test_a_reader_told_where_the_session_is_does_not_warn(self, app: Flask) -> None:
        with app.app_context(), warnings.catch_warnings():
            warnings.simplefilter("error", cachedecor.SessionWarning)
            get_account(1)
            get_account_untold(2)


class TestRenameView:
    def test_the_next_get_after_a_rename_returns_the_new_name(self, client: FlaskClient) -> None:
        client.get("/accounts/1")
        assert client.post("/accounts/1/rename", json={"name": "alicia"}).status_code == 200
        response = client.get("/accounts/1")
        assert response.status_code == 200
        assert response.get_json() == {"id": 1, "name": "alicia", "team": "red"}

    def test_a_rename_invalidates_the_cached_row(self, client: FlaskClient) -> None:
        client.get("/accounts/1")
        client.post("/accounts/1/rename", json={"name": "alicia"})
        assert counter("invalidations") >= 1
        client.get("/accounts/1")
        assert counter("hits") == 0

    def test_a_rename_leaves_other_rows_cached(self, client: FlaskClient) -> None:
        client.get("/accounts/1")
        client.get("/accounts/2")
        client.post("/accounts/1/rename", json={"name": "alicia"})
        assert client.get("/accounts/2").get_json()["name"] == "bob"
        assert counter("hits") == 1

    def test_renaming_the_instance_a_cached_read_returned_is_read_back(self, client: FlaskClient) -> None:
        client.get("/accounts/1")
        assert client.post("/accounts/1/rename-cached", json={"name": "alicia"}).status_code == 200
        assert counter("hits") == 1  # the rename changed the cached instance
        assert client.get("/accounts/1").get_json()["name"] == "alicia"

    def test_moving_a_cached_account_to_another_team_is_read_back(self, client: FlaskClient) -> None:
        client.get("/accounts/1")
        assert client.post("/accounts/1/move", json={"team_id": 2}).status_code == 200
        assert client.get("/accounts/1").get_json() == {"id": 1, "name": "alice", "team": "blue"}

    def test_a_rename_committed_by_the_view_after_the_function_returned(self, client: FlaskClient) -> None:
        client.get("/accounts/1")
        response = client.post("/accounts/1/rename-and-commit-in-the-view", json={"name": "alicia"})
        assert response.status_code == 200
        assert client.get("/accounts/1").get_json()["name"] == "alicia"


class TestFailedRequest:
    def test_a_request_failing_after_the_change_leaves_the_database_unchanged(
        self, app: Flask, client: FlaskClient
    ) -> None:
        response = client.post("/accounts/1/rename-then-fail", json={"name": "never"})
        assert response.status_code == 500
        assert name_in_db(app, 1) == "alice"

    def test_a_request_failing_after_the_change_invalidates_nothing(self, client: FlaskClient) -> None:
        client.get("/accounts/1")
        assert client.post("/accounts/1/rename-then-fail", json={"name": "never"}).status_code == 500
        assert counter("invalidations") == 0
        response = client.get("/accounts/1")
        assert counter("hits") == 1
        assert response.get_json() == {"id": 1, "name": "alice", "team": "red"}

    def test_a_later_rename_after_a_failed_request_is_read_back(self, client: FlaskClient) -> None:
        client.get("/accounts/1")
        client.post("/accounts/1/rename-then-fail", json={"name": "never"})
        client.post("/accounts/1/rename", json={"name": "alicia"})
        assert client.get("/accounts/1").get_json()["name"] == "alicia"
