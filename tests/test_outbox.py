"""Durable invalidation: the outbox delivers what a writer could not, whatever became of it.

The fault tests start real interpreters (``python -m tests.apps.<role>``), configured
from an INI file that sets ``outbox_url``, as web workers, background workers and
scripts are started; the cache node is a real memcached that the tests pause
(SIGSTOP) and resume. A writer first touches the paused node (``probe``), so that
its circuit breaker marks the node down and its deletes are never sent: a delete
written into a paused server's socket would still be carried out when it resumes.

For each fault the stale window is measured: from the end of the fault (the node
reachable again, the writer dead, the database reachable again) to the last read
that returned the old row. The documented bound is 1 s with the
default settings; the assertions allow one more second for a loaded machine, and
``make faults`` reports the measured windows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import outbox
from cachedecor.keys import decode_plan
from cachedecor.outbox import outbox_table
from tests.apps import accounts_v2
from tests.conftest import memcached_config
from tests.models import User
from tests.servers import Memcached
from tests.test_deploy import App

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "cachedecor")
BOUND = 1.0  # seconds, documented
_TERMINATE = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
SLACK = 1.0  # for a loaded machine


@pytest.fixture
def database(pg_engine: Engine) -> Iterator[Engine]:
    """The accounts table and the outbox table, in the test schema."""
    accounts_v2.Base.metadata.create_all(pg_engine)
    table = outbox_table()
    table.create(pg_engine, checkfirst=True)
    with pg_engine.begin() as conn:
        conn.execute(accounts_v2.Account.__table__.delete())
        conn.execute(table.delete())
        conn.execute(
            accounts_v2.Account.__table__.insert(),
            [{"id": i, "owner": f"owner{i}", "balance": 0} for i in range(1, 6)],
        )
    yield pg_engine
    table.drop(pg_engine)
    accounts_v2.Base.metadata.drop_all(pg_engine)


def _url(engine: Engine, user: str | None = None) -> str:
    schema = engine.info["schema"]  # type: ignore[attr-defined]
    url = engine.url.set(query={"options": f"-csearch_path={schema}"})
    if user is not None:
        url = url.set(username=user)
    return url.render_as_string(hide_password=False)


def _ini(path: Path, memcached: Memcached, outbox_url: str | None) -> Path:
    text = (
        "[cachedecor]\nregions = default\n"
        + (f"outbox_url = {outbox_url}\n" if outbox_url else "")
        + "\n[cachedecor.default]\nbackend = cachedecor.pymemcache\n"
        f"arguments.url = {memcached.url}\nexpiration_time = 300\n"
    )
    path.write_text(text)
    return path


class Deployment:
    """Processes of one application: web readers, writers, the command line."""

    def __init__(self, database: Engine, memcached: Memcached, tmp_path: Path, durable: bool) -> None:
        self.database = database
        self.memcached = memcached
        self.url = _url(database)
        self.ini = _ini(tmp_path / "cache.ini", memcached, self.url if durable else None)
        self.env = {"CACHEDECOR_CONFIG": str(self.ini), "APP_DATABASE": self.url, "PYTHONPATH": str(ROOT)}
        self.started: list[App] = []

    def start(self, role: str, **env: str) -> App:
        app = App(role, "tests.apps.accounts_v2", {**self.env, **env})
        self.started.append(app)
        return app

    def die(self, app: App, op: str, **kwargs: Any) -> int:
        """Send ``op`` to a process that dies doing it; its exit status."""
        assert app.proc.stdin is not None
        app.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        app.proc.stdin.flush()
        return app.proc.wait(20)

    def pending(self) -> int:
        with self.database.connect() as conn:
            return int(conn.execute(select(sqlalchemy.func.count()).select_from(outbox_table())).scalar_one())

    def close(self) -> None:
        for app in self.started:
            if app.proc.poll() is None:
                app.stop()


@pytest.fixture
def deployment(
    database: Engine, memcached_factory: Any, tmp_path: Path
) -> Iterator[Callable[..., Deployment]]:
    made: list[Deployment] = []

    def make(durable: bool = True) -> Deployment:
        node = memcached_factory()
        d = Deployment(database, node, tmp_path, durable)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


class Window:
    """Stale reads seen by a reader from ``since`` on: how many, and the last one's time."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.stale = 0
        self.last_stale: float | None = None
        self.reads = 0
        self.stats: dict[str, int] = {}  # the reader's counters at the end

    @property
    def seconds(self) -> float:
        return 0.0 if self.last_stale is None else max(0.0, self.last_stale - self.since)


def watch(reader: App, want: str, since: float, *, quiet: float = 0.5, deadline: float = 8.0) -> Window:
    """Read row 1 until it has been ``want`` for ``quiet`` seconds in a row."""
    window = Window(since)
    fresh_since: float | None = None
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        answer = reader("read", id=1)
        owner = answer["row"]["owner"]
        window.stats = answer["stats"]
        now = time.monotonic()
        window.reads += 1
        if owner == want:
            fresh_since = fresh_since or now
            if now - fresh_since >= quiet:
                return window
        else:
            window.stale += 1
            window.last_stale = now
            fresh_since = None
    raise AssertionError(f"still stale after {deadline}s: {window.stale} stale reads")


# -- the faults -------------------------------------------------------------------------------


class TestFaults:
    def test_node_paused_writer_exits_fresh_reader_reads_the_new_row(self, deployment: Any) -> None:
        """(a) The node is paused, the writer commits and exits; the node comes back."""
        d = deployment()
        web = d.start("reader")
        assert web("read", id=1)["row"]["owner"] == "owner1"  # cached
        d.memcached.pause()
        writer = d.start("writer")
        writer("probe")
        writer("write", id=1, owner="new")
        writer.stop()  # exits with its delete undelivered
        assert d.pending() == 1
        d.memcached.resume()
        resumed = time.monotonic()
        seen_by_web = watch(web, "new", resumed)
        fresh = d.start("reader")
        seen_by_fresh = watch(fresh, "new", time.monotonic())
        assert seen_by_web.seconds <= BOUND + SLACK
        assert seen_by_fresh.stale == 0
        assert d.pending() == 0
        # the web process's deliverer sent the delete the writer could not
        assert seen_by_web.stats["invalidations"] >= 1

    def test_without_the_outbox_the_same_fault_leaves_the_row_stale(self, deployment: Any) -> None:
        """The same fault without ``outbox_url``: the entry stays stale (until it expires)."""
        d = deployment(durable=False)
        web = d.start("reader")
        web("read", id=1)
        d.memcached.pause()
        writer = d.start("writer")
        writer("probe")
        writer("write", id=1, owner="new")
        writer.stop()
        d.memcached.resume()
        fresh = d.start("reader")
        owners = {fresh("read", id=1)["row"]["owner"] for _ in range(50)}
        assert owners == {"owner1"}

    def test_writer_dies_inside_its_commit(self, deployment: Any) -> None:
        """(b) The writer ends inside its commit, after the database committed, before any delete."""
        d = deployment()
        web = d.start("reader")
        web("read", id=1)
        writer = d.start("writer")
        assert d.die(writer, "write_and_die", id=1, owner="new", how="inside-commit") == 0
        died = time.monotonic()
        window = watch(web, "new", died)
        assert window.seconds <= BOUND + SLACK
        assert d.pending() == 0
        assert window.stats["invalidations"] >= 1  # delivered by the web process

    def test_writer_killed_right_after_commit_with_a_paused_node(self, deployment: Any) -> None:
        """(c) SIGKILL right after the commit returns, its delete still owed to a paused node."""
        d = deployment()
        web = d.start("reader")
        web("read", id=1)
        d.memcached.pause()
        writer = d.start("writer")
        writer("probe")
        assert d.die(writer, "write_and_die", id=1, owner="new", how="sigkill") == -9
        d.memcached.resume()
        resumed = time.monotonic()
        window = watch(web, "new", resumed)
        assert window.seconds <= BOUND + SLACK
        assert d.pending() == 0
        assert window.stats["invalidations"] >= 1

    def test_outbox_database_unreachable_for_the_deliverer(self, deployment: Any, database: Engine) -> None:
        """(d) The deliverer cannot reach the database for a while (its role may not log in)."""
        role = f"cd_deliverer_{os.getpid()}"
        schema = database.info["schema"]  # type: ignore[attr-defined]
        with database.begin() as conn:
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
            conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
            conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
            conn.exec_driver_sql(f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}")
        try:
            d = deployment()
            # the web process reaches its outbox as a role of its own
            web_ini = d.ini.with_name("web.ini")
            web_ini.write_text(d.ini.read_text().replace(d.url, _url(database, role)))
            web = d.start("reader", CACHEDECOR_CONFIG=str(web_ini))
            web("read", id=1)
            with database.begin() as conn:  # the database turns the deliverer away
                conn.exec_driver_sql(f"ALTER ROLE {role} NOLOGIN")
                conn.exec_driver_sql(_TERMINATE.format(role=role))
            d.memcached.pause()
            writer = d.start("writer")
            writer("probe")
            writer("write", id=1, owner="new")
            writer.stop()
            d.memcached.resume()
            # nobody can deliver: reads are served from the cache, stale
            assert {web("read", id=1)["row"]["owner"] for _ in range(20)} == {"owner1"}
            assert d.pending() == 1
            with database.begin() as conn:
                conn.exec_driver_sql(f"ALTER ROLE {role} LOGIN")
            back = time.monotonic()
            window = watch(web, "new", back)
            assert window.seconds <= BOUND + SLACK
            assert d.pending() == 0
            assert window.stats["invalidations"] >= 1
        finally:
            with database.begin() as conn:
                conn.exec_driver_sql(
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
                )
                conn.exec_driver_sql(f"DROP OWNED BY {role}")
                conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")


# -- in one process ---------------------------------------------------------------------------


@pytest.fixture
def durable(pg_engine: Engine, memcached: Memcached) -> Iterator[Engine]:
    """Region ``default`` on memcached, the outbox in the test schema of PostgreSQL."""
    table = outbox_table()
    table.create(pg_engine, checkfirst=True)
    with pg_engine.begin() as conn:
        conn.execute(table.delete())
        conn.execute(
            User.__table__.insert(), [{"id": i, "name": f"user{i}", "version": 0, "bio": ""} for i in (1, 2)]
        )
    config = memcached_config(memcached.url)
    config["outbox_url"] = _url(pg_engine)
    cachedecor.configure_regions(config)
    yield pg_engine
    cachedecor.reset()
    table.drop(pg_engine)


@cachedecor.cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cachedecor.invalidates(User)
def rename(session: Session, user_id: int, name: str, *, fail: bool = False) -> None:
    session.get(User, user_id).name = name  # type: ignore[union-attr]
    session.flush()
    if fail:
        raise RuntimeError("the write fails after its flush")
    session.commit()


def _rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(outbox_table())))


class TestWritePath:
    def test_a_commit_writes_one_row_in_its_transaction_and_removes_it_once_delivered(
        self, durable: Engine
    ) -> None:
        statements: list[str] = []
        sqlalchemy.event.listen(durable, "before_cursor_execute", lambda *a: statements.append(a[2]))
        with Session(durable) as s:
            rename(s, 1, "Ada")
        inserts = [q for q in statements if q.lstrip().upper().startswith("INSERT INTO CACHEDECOR_OUTBOX")]
        assert len(inserts) == 1
        assert outbox.current() is not None and outbox.current().written == 1
        _wait(lambda: not _rows(durable))

    def test_a_rollback_leaves_no_row(self, durable: Engine) -> None:
        with Session(durable) as s, pytest.raises(RuntimeError):
            rename(s, 1, "Ada", fail=True)
        assert _rows(durable) == []

    def test_the_row_holds_the_keys_of_every_region(self, durable: Engine, memcached: Memcached) -> None:
        box = outbox.current()
        assert box is not None
        box.stop()  # nothing removes the row: read what was written
        with Session(durable) as s:
            rename(s, 2, "Grace")
        (row,) = _rows(durable)
        assert decode_plan(row.payload)["default"][0] == [get_user.cache_key(2)]

    def test_a_missing_table_is_a_configuration_error(self, pg_engine: Engine, memcached: Memcached) -> None:
        config = memcached_config(memcached.url)
        config["outbox_url"] = _url(pg_engine)
        with pytest.raises(cachedecor.ConfigError, match="cachedecor outbox create"):
            cachedecor.configure_regions(config)
        assert outbox.current() is None

    def test_a_missing_table_found_at_the_first_write_keeps_the_commit(
        self, pg_engine: Engine, memcached: Memcached, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The database could not be reached at configuration time (the outbox's role may
        not log in): the missing table is found at the first write, logged, and the
        commit goes through with the in-process way."""
        role = f"cd_nologin_{os.getpid()}"
        with pg_engine.begin() as conn:
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
            conn.exec_driver_sql(f"CREATE ROLE {role} NOLOGIN")
            conn.execute(User.__table__.insert(), [{"id": 1, "name": "user1", "version": 0, "bio": ""}])
        try:
            config = memcached_config(memcached.url)
            config["outbox_url"] = _url(pg_engine, role)
            cachedecor.configure_regions(config)  # cannot check: a warning, no error
            with Session(pg_engine) as s:
                assert get_user(s, 1).name == "user1"  # type: ignore[union-attr]
            with caplog.at_level("ERROR", logger="cachedecor"), Session(pg_engine) as s:
                rename(s, 1, "Ada")
            assert any("cachedecor outbox create" in r.getMessage() for r in caplog.records)
            with Session(pg_engine) as s:
                assert get_user(s, 1).name == "Ada"  # type: ignore[union-attr]
            assert outbox.current().written == 0  # type: ignore[union-attr]
        finally:
            cachedecor.reset()
            with pg_engine.begin() as conn:
                conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")

    def test_a_session_on_another_database_keeps_the_in_process_queue(
        self, durable: Engine, sqlite_engine: Engine
    ) -> None:
        with Session(sqlite_engine) as s:
            s.add(User(id=1, name="user1", version=0, bio=""))
            s.commit()
        with Session(sqlite_engine) as s:
            assert get_user(s, 1).name == "user1"
            rename(s, 1, "Ada")
            assert get_user(s, 1).name == "Ada"
        assert _rows(durable) == []
        assert outbox.current().written == 0  # type: ignore[union-attr]

    def test_the_command_line_shows_and_delivers_what_is_pending(
        self, durable: Engine, memcached: Memcached, tmp_path: Path
    ) -> None:
        box = outbox.current()
        assert box is not None
        box.stop()
        memcached.pause()
        try:
            with Session(durable) as s:
                rename(s, 1, "Ada")  # its delete cannot be sent: the row stays
        finally:
            memcached.resume()
        ini = _ini(tmp_path / "cli.ini", memcached, _url(durable))
        status = subprocess.run(
            [CLI, "outbox", "status", "--config", str(ini)], capture_output=True, text=True
        )
        assert status.returncode == 0 and status.stdout.startswith("pending 1"), status.stderr
        done = subprocess.run(
            [CLI, "outbox", "deliver", "--config", str(ini)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "delivered 1" in done.stdout
        assert _rows(durable) == []


def test_the_command_line_creates_the_table(pg_engine: Engine, memcached: Memcached, tmp_path: Path) -> None:
    ini = _ini(tmp_path / "create.ini", memcached, _url(pg_engine))
    done = subprocess.run([CLI, "outbox", "create", "--config", str(ini)], capture_output=True, text=True)
    try:
        assert done.returncode == 0, done.stderr
        assert sqlalchemy.inspect(pg_engine).has_table("cachedecor_outbox")
    finally:
        outbox_table().drop(pg_engine, checkfirst=True)


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    from tests.conftest import wait_until

    wait_until(condition, timeout)


class TestOtherSessions:
    def test_an_async_session_writes_to_the_same_outbox(self, durable: Engine) -> None:
        import asyncio

        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        schema = durable.info["schema"]  # type: ignore[attr-defined]
        engine = create_async_engine(
            durable.url.set(drivername="postgresql+asyncpg"),
            connect_args={"server_settings": {"search_path": schema}},
        )

        @cachedecor.invalidates(User)
        async def arename(session: AsyncSession, user_id: int, name: str) -> None:
            (await session.get(User, user_id)).name = name  # type: ignore[union-attr]
            await session.commit()

        box = outbox.current()
        assert box is not None
        box.stop()  # keep the row, to read it

        async def write() -> None:
            async with AsyncSession(engine) as s:
                await arename(s, 1, "Ada")
            await cachedecor.aclose()
            await engine.dispose()

        asyncio.run(write())
        (row,) = _rows(durable)
        assert decode_plan(row.payload)["default"][0] == [get_user.cache_key(1)]

    def test_sqlite_with_one_writer(self, memcached: Memcached, tmp_path: Path) -> None:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'app.sqlite'}")
        User.__table__.create(engine)
        outbox_table().create(engine)
        with Session(engine) as s:
            s.add(User(id=1, name="user1", version=0, bio=""))
            s.commit()
        config = memcached_config(memcached.url)
        config["outbox_url"] = str(engine.url)
        cachedecor.configure_regions(config)
        try:
            with Session(engine) as s:
                assert get_user(s, 1).name == "user1"  # type: ignore[union-attr]
            memcached.pause()
            try:
                with Session(engine) as s:
                    rename(s, 1, "Ada")  # the delete times out: the row stays
            finally:
                memcached.resume()
            _wait(lambda: not _rows(engine))  # delivered by this process's deliverer
            with Session(engine) as s:
                assert get_user(s, 1).name == "Ada"  # type: ignore[union-attr]
            assert outbox.current().written == 1  # type: ignore[union-attr]
        finally:
            cachedecor.reset()
            engine.dispose()


# -- a role that may write the application's tables, not the outbox ----------------------------


@pytest.fixture
def app_role(durable: Engine) -> Iterator[str]:
    """A login role with every privilege on the application's tables and none on the outbox."""
    role = f"cd_app_{os.getpid()}"
    schema = durable.info["schema"]  # type: ignore[attr-defined]
    with durable.begin() as conn:
        conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        conn.exec_driver_sql(f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}")
        conn.exec_driver_sql(f"REVOKE ALL ON {outbox_table().name} FROM {role}")
    try:
        yield role
    finally:
        with durable.begin() as conn:
            conn.exec_driver_sql(_TERMINATE.format(role=role))
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")


class TestOutboxPrivileges:
    def test_an_outbox_url_role_that_may_not_insert_is_a_configuration_error(
        self, durable: Engine, app_role: str, memcached: Memcached
    ) -> None:
        config = memcached_config(memcached.url)
        config["outbox_url"] = _url(durable, app_role)
        with pytest.raises(cachedecor.ConfigError) as caught:
            cachedecor.configure_regions(config)
        message = str(caught.value)
        assert "outbox_url" in message and "cachedecor_outbox" in message and "INSERT" in message, message

    def test_a_session_whose_role_may_not_insert_commits_and_invalidates_directly(
        self, durable: Engine, app_role: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        # outbox_url's role (the fixture's) may write the outbox; the application's may not
        app = sqlalchemy.create_engine(_url(durable, app_role))
        try:
            with Session(app) as s:
                assert get_user(s, 1).name == "user1"  # type: ignore[union-attr]  # cached
            with caplog.at_level("ERROR", logger="cachedecor"):
                for name in ("Ada", "Grace"):  # the second commit: the answer is remembered
                    with Session(app) as s:
                        rename(s, 1, name)  # raised InsufficientPrivilege
                    with Session(app) as s:
                        assert get_user(s, 1).name == name  # type: ignore[union-attr]
        finally:
            app.dispose()
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1, errors  # once per (database, role)
        assert app_role in errors[0] and "INSERT" in errors[0] and "cachedecor_outbox" in errors[0]
        assert _rows(durable) == []
        assert outbox.current().written == 0  # type: ignore[union-attr]
