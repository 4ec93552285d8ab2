"""The FastAPI example application (docs/examples/fastapi_app.py), through FastAPI's TestClient.

The application runs on an ``AsyncSession`` per request, on aiosqlite and on
PostgreSQL (asyncpg, and psycopg's async connections), with memcached and with
Redis. The TestClient runs it in an event loop of its own, in another thread:
the cache's asyncio connections belong to that loop.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy
from fastapi import HTTPException
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import invalidates
from tests.conftest import memcached_config, redis_available, redis_config
from tests.servers import PG_URL, unavailable

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "fastapi_app.py"


def _load_example() -> ModuleType:
    name = "cachedecor_docs_fastapi_app"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pydantic resolves the models' annotations there
        spec.loader.exec_module(module)
    return module


example = _load_example()
User = example.User
Post = example.Post


# -- databases -------------------------------------------------------------------------


class Database:
    """Where the application's tables are: its async URL and engine options, and a sync
    engine on the same database for the test to set up and inspect rows."""

    def __init__(self, url: str, engine_options: dict[str, Any], sync: Engine) -> None:
        self.url = url
        self.engine_options = engine_options
        self.sync = sync

    def seed(self) -> None:
        with self.sync.begin() as conn:
            for table in reversed(example.Base.metadata.sorted_tables):
                conn.execute(table.delete())
        with Session(self.sync) as session:
            session.add_all(
                [
                    User(id=1, name="ada", email="ada@example.org"),
                    User(id=2, name="bob", email="bob@example.org"),
                    User(id=3, name="cyd", email="cyd@example.org"),
                ]
            )
            session.flush()
            session.add_all(
                [
                    Post(id=1, author_id=1, title="Notes on the engine"),
                    Post(id=2, author_id=1, title="Sketch of a program"),
                ]
            )
            session.commit()

    def name_of(self, user_id: int) -> str | None:
        with Session(self.sync) as session:
            return session.scalar(select(User.name).where(User.id == user_id))


@pytest.fixture(scope="module")
def pg_schema() -> Iterator[str]:
    """A schema of this module's own holding the example's tables."""
    schema = f"fa_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sqlalchemy.create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except Exception as exc:
        admin.dispose()
        unavailable(f"PostgreSQL is not reachable at {PG_URL}: {exc}")
    sync = sqlalchemy.create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    example.Base.metadata.create_all(sync)
    sync.dispose()
    yield schema
    with admin.begin() as conn:
        conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    admin.dispose()


@pytest.fixture(
    params=[
        "aiosqlite",
        pytest.param("asyncpg", marks=pytest.mark.postgres),
        pytest.param("psycopg-async", marks=pytest.mark.postgres),
    ]
)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The example's tables holding three users (ada with two posts, bob, cyd)."""
    if request.param == "aiosqlite":
        path = tmp_path / "app.sqlite"
        sync = sqlalchemy.create_engine(f"sqlite:///{path}")
        example.Base.metadata.create_all(sync)
        db = Database(f"sqlite+aiosqlite:///{path}", {}, sync)
    else:
        schema = request.getfixturevalue("pg_schema")
        sync = sqlalchemy.create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
        url = sqlalchemy.make_url(PG_URL)
        if request.param == "asyncpg":
            url = url.set(drivername="postgresql+asyncpg")
            options: dict[str, Any] = {"connect_args": {"server_settings": {"search_path": schema}}}
        else:
            url = url.set(drivername="postgresql+psycopg")
            options = {"connect_args": {"options": f"-csearch_path={schema}"}}
        db = Database(url.render_as_string(hide_password=False), options, sync)
    db.seed()
    yield db
    sync.dispose()


@pytest.fixture(
    params=[
        pytest.param("memcached", marks=pytest.mark.memcached),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def cache_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    """What the application configures cachedecor with at start-up: an empty cache."""
    if request.param == "memcached":
        return memcached_config(request.getfixturevalue("memcached").url)
    redis_available()
    return redis_config()


# -- the application -------------------------------------------------------------------


class Statements:
    """The SQL statements the application's engine runs."""

    def __init__(self, engine: Engine) -> None:
        self.seen: list[tuple[str, Any]] = []
        event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        self.seen.append((statement, parameters))

    def reset(self) -> None:
        self.seen.clear()

    def count(self) -> int:
        return len(self.seen)

    def on(self, table: str) -> list[tuple[str, Any]]:
        """The statements that read or write ``table``."""
        return [(s, p) for s, p in self.seen if f" {table}" in s.replace('"', "")]


@invalidates(User)
async def rename_then_refuse(session: AsyncSession, user_id: int, name: str) -> None:
    """A change flushed inside the transaction, then refused: the request's session rolls back."""
    user = await session.get(User, user_id)
    assert user is not None
    user.name = name
    await session.flush()
    raise HTTPException(status_code=422, detail="names are frozen today")


@pytest.fixture
def app(database: Database, cache_config: dict[str, Any]) -> Any:
    application = example.create_app(database.url, cache_config, database.engine_options)

    @application.patch("/frozen/users/{user_id}")
    async def rename_frozen(user_id: int, body: dict[str, str], session: example.SessionDep) -> None:
        await rename_then_refuse(session, user_id, body["name"])

    return application


@pytest.fixture
def statements(app: Any) -> Iterator[Statements]:
    counter = Statements(app.state.engine.sync_engine)
    yield counter
    event.remove(app.state.engine.sync_engine, "before_cursor_execute", counter._on_execute)


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    """The application started (lifespan run: cachedecor configured) in its own event loop."""
    with TestClient(app) as client:
        yield client


def counter(name: str) -> int:
    return cachedecor.stats()["default"][name]


ADA = {"id": 1, "name": "ada", "email": "ada@example.org"}
BOB = {"id": 2, "name": "bob", "email": "bob@example.org"}


# -- reads -----------------------------------------------------------------------------


class TestCachedRead:
    def test_the_first_get_reads_the_database_and_fills_the_cache(
        self, client: TestClient, statements: Statements
    ) -> None:
        response = client.get("/users/1")
        assert response.status_code == 200
        assert response.json() == ADA
        assert len(statements.on("users")) == 1
        assert (counter("misses"), counter("fills")) == (1, 1)

    def test_the_second_get_runs_no_sql(self, client: TestClient, statements: Statements) -> None:
        client.get("/users/1")
        statements.reset()
        response = client.get("/users/1")
        assert response.status_code == 200
        assert response.json() == ADA
        assert statements.count() == 0
        assert counter("hits") == 1

    def test_a_missing_user_is_404_and_is_not_cached(
        self, client: TestClient, statements: Statements
    ) -> None:
        assert client.get("/users/99").status_code == 404
        statements.reset()
        assert client.get("/users/99").status_code == 404
        assert len(statements.on("users")) == 1
        assert counter("hits") == 0

    def test_the_cache_serves_a_later_start_of_the_application(
        self, app: Any, statements: Statements
    ) -> None:
        """Each start runs in a new event loop, which opens cache connections of its own."""
        with TestClient(app) as first:
            assert first.get("/users/1").json() == ADA
        statements.reset()
        with TestClient(app) as second:
            assert second.get("/users/1").json() == ADA
        assert statements.count() == 0
        assert counter("hits") == 1


class TestMany:
    def test_users_come_in_the_order_asked_and_missing_ones_are_left_out(self, client: TestClient) -> None:
        response = client.get("/users", params={"id": [2, 99, 1]})
        assert response.status_code == 200
        assert response.json() == [BOB, ADA]

    def test_a_second_request_for_the_same_users_runs_no_sql(
        self, client: TestClient, statements: Statements
    ) -> None:
        client.get("/users", params={"id": [2, 1]})
        statements.reset()
        assert client.get("/users", params={"id": [1, 2]}).json() == [ADA, BOB]
        assert statements.count() == 0
        assert counter("hits") == 2

    def test_only_the_users_missing_from_the_cache_are_queried(
        self, client: TestClient, statements: Statements
    ) -> None:
        client.get("/users/1")
        statements.reset()
        assert client.get("/users", params={"id": [1, 2]}).json() == [ADA, BOB]
        queried = statements.on("users")
        assert len(queried) == 1
        parameters = queried[0][1]
        assert list(parameters.values() if isinstance(parameters, dict) else parameters) == [2]


class TestRelationship:
    def test_posts_of_a_cached_user_load_with_one_query_of_the_posts(
        self, client: TestClient, statements: Statements
    ) -> None:
        client.get("/users/1")
        statements.reset()
        response = client.get("/users/1/posts")
        assert response.status_code == 200
        assert response.json() == {
            **ADA,
            "posts": [{"id": 1, "title": "Notes on the engine"}, {"id": 2, "title": "Sketch of a program"}],
        }
        assert counter("hits") == 1
        assert len(statements.on("posts")) == 1
        assert statements.on("users") == []

    def test_posts_load_on_a_miss_too(self, client: TestClient) -> None:
        response = client.get("/users/2/posts")
        assert response.status_code == 200
        assert response.json() == {**BOB, "posts": []}
        assert counter("misses") == 1


# -- writes ----------------------------------------------------------------------------


class TestPatch:
    def test_the_get_after_a_patch_returns_the_new_name(self, client: TestClient) -> None:
        client.get("/users/1")
        response = client.patch("/users/1", json={"name": "ada lovelace"})
        assert response.status_code == 200
        assert response.json() == {**ADA, "name": "ada lovelace"}
        assert client.get("/users/1").json() == {**ADA, "name": "ada lovelace"}

    def test_the_entry_is_deleted_before_the_response(self, client: TestClient) -> None:
        client.get("/users/1")
        client.patch("/users/1", json={"name": "ada lovelace"})
        assert counter("invalidations") == 1  # counted once the delete was done
        client.get("/users/1")
        assert counter("hits") == 0

    def test_the_get_after_a_patch_reads_the_database_once_then_hits(
        self, client: TestClient, statements: Statements
    ) -> None:
        client.get("/users/1")
        client.patch("/users/1", json={"name": "ada lovelace"})
        statements.reset()
        client.get("/users/1")
        client.get("/users/1")
        assert len(statements.on("users")) == 1
        assert counter("hits") == 1

    def test_a_patch_leaves_other_users_cached(self, client: TestClient, statements: Statements) -> None:
        client.get("/users/2")
        client.patch("/users/1", json={"name": "ada lovelace"})
        statements.reset()
        assert client.get("/users/2").json() == BOB
        assert statements.count() == 0

    def test_a_patch_of_a_missing_user_is_404(self, client: TestClient) -> None:
        assert client.patch("/users/99", json={"name": "nobody"}).status_code == 404
        assert counter("invalidations") == 0


class TestFailedPatch:
    def test_a_patch_whose_commit_fails_is_409_and_changes_nothing(
        self, client: TestClient, database: Database
    ) -> None:
        response = client.patch("/users/1", json={"name": "ada2", "email": "bob@example.org"})
        assert response.status_code == 409
        assert database.name_of(1) == "ada"

    def test_a_patch_whose_commit_fails_invalidates_nothing(
        self, client: TestClient, statements: Statements
    ) -> None:
        client.get("/users/1")
        assert client.patch("/users/1", json={"name": "ada2", "email": "bob@example.org"}).status_code == 409
        assert counter("invalidations") == 0
        statements.reset()
        assert client.get("/users/1").json() == ADA
        assert counter("hits") == 1
        assert statements.count() == 0

    def test_a_change_flushed_then_rolled_back_invalidates_nothing(
        self, client: TestClient, database: Database, statements: Statements
    ) -> None:
        client.get("/users/1")
        statements.reset()
        response = client.patch("/frozen/users/1", json={"name": "never"})
        assert response.status_code == 422
        assert [s for s, _ in statements.on("users") if s.lstrip().upper().startswith("UPDATE")]
        assert database.name_of(1) == "ada"
        assert counter("invalidations") == 0
        assert client.get("/users/1").json() == ADA
        assert counter("hits") == 1

    def test_a_patch_after_a_failed_one_is_read_back(self, client: TestClient) -> None:
        client.get("/users/1")
        client.patch("/frozen/users/1", json={"name": "never"})
        client.patch("/users/1", json={"name": "ada lovelace"})
        assert client.get("/users/1").json()["name"] == "ada lovelace"
