"""Shared fixtures: real memcached processes, SQLite and PostgreSQL engines, Redis."""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy
from hypothesis import settings as hypothesis_settings
from sqlalchemy import event, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from tests.models import Base, User
from tests.servers import IN_CI, PG_URL, REDIS_URL, Memcached, Nutcracker, unavailable

# The application run by the deployment tests in processes of its own, and the suite
# of a bare install (run by ``make bare`` in environments of its own): not collected.
collect_ignore = ["apps", "bare"]

# CI explores the same examples on every run; local runs explore new ones.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if IN_CI:
    hypothesis_settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _clean_cachedecor(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CACHEDECOR_CONFIG", raising=False)
    cachedecor.reset()
    yield
    cachedecor.reset()


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[Memcached]:
    """One memcached shared by the session; tests that need a clean one flush it."""
    server = Memcached()
    yield server
    server.stop()


@pytest.fixture
def memcached(memcached_server: Memcached) -> Memcached:
    """The shared memcached, running and empty."""
    if memcached_server.proc is None or memcached_server.proc.poll() is not None:
        memcached_server.start()
    from pymemcache.client.base import Client

    client = Client(("127.0.0.1", memcached_server.port), connect_timeout=1, timeout=1)
    client.flush_all(noreply=False)
    client.close()
    return memcached_server


@pytest.fixture
def memcached_factory() -> Iterator[Any]:
    """Start private memcached processes (to kill, pause or restart)."""
    started: list[Memcached] = []

    def start(**kwargs: Any) -> Memcached:
        server = Memcached(**kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def nutcracker_pool() -> Iterator[Nutcracker]:
    """twemproxy in front of two memcached processes of its own, shared by the session."""
    backends = [Memcached(), Memcached()]
    try:
        proxy = Nutcracker(backends)
    except BaseException:
        for backend in backends:
            backend.stop()
        raise
    yield proxy
    proxy.stop()
    for backend in backends:
        backend.stop()


@pytest.fixture
def nutcracker(nutcracker_pool: Nutcracker) -> Nutcracker:
    """The shared twemproxy, running, with both its memcached backends running and empty."""
    if nutcracker_pool.proc is None or nutcracker_pool.proc.poll() is not None:
        nutcracker_pool.start()
    nutcracker_pool.flush_backends()
    return nutcracker_pool


def _pg_engine() -> Engine:
    schema = f"cd_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sqlalchemy.create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except Exception as exc:
        admin.dispose()
        unavailable(f"PostgreSQL is not reachable at {PG_URL}: {exc}")
    admin.dispose()
    engine = sqlalchemy.create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    engine.info = {"schema": schema}  # type: ignore[attr-defined]
    return engine


def _drop_pg(engine: Engine) -> None:
    schema = engine.info["schema"]  # type: ignore[attr-defined]
    engine.dispose()
    admin = sqlalchemy.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    admin.dispose()


@pytest.fixture(scope="session")
def pg_engine_session() -> Iterator[Engine]:
    engine = _pg_engine()
    Base.metadata.create_all(engine)
    yield engine
    _drop_pg(engine)


@pytest.fixture
def pg_engine(pg_engine_session: Engine) -> Iterator[Engine]:
    with pg_engine_session.begin() as conn:
        conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    yield pg_engine_session
    gc.collect()  # sessions a test left open return their connections


@pytest.fixture
def sqlite_engine(tmp_path: Any) -> Iterator[Engine]:
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'test.sqlite'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each test that takes ``engine`` runs on SQLite and on PostgreSQL."""
    name = "sqlite_engine" if request.param == "sqlite" else "pg_engine"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


class SQLCounter:
    """Counts the SQL statements an engine executes."""

    def __init__(self, engine: Engine) -> None:
        self.statements: list[str] = []
        event.listen(engine, "before_cursor_execute", self._on_execute)
        self.engine = engine

    def _on_execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    @property
    def count(self) -> int:
        return len(self.statements)

    def selects(self) -> int:
        return sum(1 for s in self.statements if s.lstrip().upper().startswith("SELECT"))

    def reset(self) -> None:
        self.statements.clear()

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on_execute)


@pytest.fixture
def sql(engine: Engine) -> Iterator[SQLCounter]:
    counter = SQLCounter(engine)
    yield counter
    counter.close()


def memcached_config(*urls: str, arguments: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Region ``default`` on memcached ``urls``; ``arguments`` override the backend's."""
    return {
        "regions": {
            "default": {
                "backend": "cachedecor.pymemcache",
                "expiration_time": 300,
                "arguments": {"url": list(urls), "connect_timeout": 0.5, "timeout": 0.5, **(arguments or {})},
                **options,
            }
        }
    }


def redis_config(**options: Any) -> dict[str, Any]:
    return {
        "regions": {"default": {"backend": "dogpile.cache.redis", "arguments": {"url": REDIS_URL}, **options}}
    }


def redis_available() -> None:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        client.flushdb()
        client.close()
    except Exception as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")


def backend_config(name: str, memcached_url: str | None = None, **options: Any) -> dict[str, Any]:
    """The configuration of region ``default`` on backend ``name`` (see :func:`backend`),
    with region ``options`` (``lease_wait``, ...)."""
    if name.startswith("memcached"):
        assert memcached_url is not None
        config = memcached_config(memcached_url, **options)
        config["regions"]["default"]["arguments"]["meta_protocol"] = name == "memcached"
        return config
    if name == "memory":
        return {"regions": {"default": {"backend": "dogpile.cache.memory", **options}}}
    return redis_config(**options)


@pytest.fixture(params=["memcached", "memcached-classic", "memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """Configure region ``default`` on each backend cachedecor supports.

    ``memcached-classic`` is memcached without the meta protocol (the add/gets/cas
    leases used with servers older than 1.6). :func:`reconfigure` changes its options.
    """
    url = None
    if request.param.startswith("memcached"):
        url = request.getfixturevalue("memcached").url
    elif request.param == "redis":
        redis_available()
    cachedecor.configure_regions(backend_config(request.param, url))
    return str(request.param)


def reconfigure(backend: str, **options: Any) -> None:
    """Configure region ``default`` on ``backend`` again, with region ``options``."""
    from cachedecor.config import region_settings

    url = None
    if backend.startswith("memcached"):
        url = region_settings("default").arguments["url"][0]
    cachedecor.configure_regions(backend_config(backend, url, **options))


@pytest.fixture
def cache(memcached: Memcached) -> Memcached:
    """Region ``default`` on the shared memcached."""
    cachedecor.configure_regions(memcached_config(memcached.url))
    return memcached


def new_session(engine: Engine) -> Session:
    return Session(engine)


def once(engine: Engine, fn: Any, *args: Any) -> Any:
    """Call ``fn(session, *args)`` in a session of its own, closed afterwards."""
    with Session(engine) as session:
        return fn(session, *args)


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    """Poll an observable condition until it holds (synchronisation, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        time.sleep(0.002)


def rename_behind_the_cache(engine: Engine, user_id: int, name: str) -> None:
    """A write the cache is not told about (no @invalidates): a stale entry on purpose."""
    with Session(engine) as s:
        s.execute(update(User).where(User.id == user_id).values(name=name))
        s.commit()
