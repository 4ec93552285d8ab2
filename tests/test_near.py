"""The near cache: decoded rows kept in each process, kept coherent by a broadcast.

Every behaviour that involves the broadcast runs on both of its transports
(PostgreSQL ``LISTEN``/``NOTIFY`` and Redis pub/sub), with memcached as the remote
cache and the rows in PostgreSQL. Each test speaks on a channel of its own, so that
concurrent runs never hear each other.

A process that must miss invalidations is made deaf by the servers themselves: it
listens under a login of its own, whose connection the test kills
(``pg_terminate_backend``, ``CLIENT KILL``) and whose new connections the server
refuses (``ALTER ROLE ... NOLOGIN``, ``ACL SETUSER ... off``) until the test lets it
back in. Processes are real: ``python -m tests.apps.near_reader`` configured from an
INI file, and children made with ``os.fork()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from pymemcache.client.base import Client
from sqlalchemy import select as sql_select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import ConfigError, broadcast, cached_by_pk, invalidates
from cachedecor import near as near_module
from cachedecor._runtime import near_state
from cachedecor.config import region_settings
from cachedecor.near import NearCache
from cachedecor.rows import Row
from tests.conftest import memcached_config, wait_until
from tests.models import Color, Everything, Post, User
from tests.servers import PG_URL, REDIS_URL, Memcached, free_port, unavailable, wait_for_port
from tests.test_deploy import App

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "cachedecor")
ROWS = 10

calls: list[list[int]] = []


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(User, many=True)
def get_users(session: Session, user_ids: list[int]) -> list[User]:
    calls.append(sorted(user_ids))
    return list(session.scalars(sql_select(User).where(User.id.in_(user_ids))))


@invalidates(User)
def rename_user(session: Session, user_id: int, name: str) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.name = name
    session.commit()


@cached_by_pk(User)
async def aget_user(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


@invalidates(User)
async def arename_user(session: AsyncSession, user_id: int, name: str) -> None:
    user = await session.get(User, user_id)
    assert user is not None
    user.name = name
    await session.commit()


# -- the transports --------------------------------------------------------------------


class Transport:
    """A broadcast transport, with a login of its own that the test can cut off."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.kinds: tuple[str, ...] = (kind,)
        tag = f"{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.channel = f"cd_near_{tag}"
        self.login = f"cdnear_{tag}"
        if kind == "postgresql":
            base = sqlalchemy.make_url(PG_URL).set(drivername="postgresql")
            self._admin_url = base.render_as_string(hide_password=False)
            try:
                self._pg(f'CREATE ROLE "{self.login}" LOGIN')
            except Exception as exc:
                unavailable(f"PostgreSQL is not reachable at {PG_URL}: {exc}")
            private = base.set(username=self.login)
        else:
            base = sqlalchemy.make_url(REDIS_URL)
            try:
                self._redis("ACL", "SETUSER", self.login, "on", ">near", "~*", "&*", "+@all")
            except Exception as exc:
                unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
            private = base.set(username=self.login, password="near")
        #: the URL the application's processes use
        self.url = base.render_as_string(hide_password=False)
        #: the same server under the login of its own: see :meth:`deafen`
        self.private_url = private.render_as_string(hide_password=False)

    def _pg(self, sql: str, *params: Any) -> list[Any]:
        import psycopg

        with psycopg.connect(self._admin_url, autocommit=True, connect_timeout=2) as conn:
            cur = conn.execute(sql, params or None)
            return cur.fetchall() if cur.description else []

    def _redis(self, *command: Any) -> Any:
        import redis

        client: Any = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    def refuse_logins(self) -> None:
        """New connections of the private login are refused; those open stay open."""
        if self.kind == "postgresql":
            self._pg(f'ALTER ROLE "{self.login}" NOLOGIN')
        else:
            self._redis("ACL", "SETUSER", self.login, "off")

    def allow_logins(self) -> None:
        if self.kind == "postgresql":
            self._pg(f'ALTER ROLE "{self.login}" LOGIN')
        else:
            self._redis("ACL", "SETUSER", self.login, "on")

    def kill_listeners(self) -> int:
        """Kill the listening connections of the private login; how many were killed."""
        if self.kind == "postgresql":
            # the listener's last statement is its LISTEN or its keep-alive SELECT 1;
            # the publisher's is a pg_notify
            rows = self._pg(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE usename = %s AND query NOT LIKE %s",
                self.login,
                "%pg_notify%",
            )
            return sum(1 for (done,) in rows if done)
        return int(self._redis("CLIENT", "KILL", "USER", self.login, "TYPE", "pubsub"))

    def deafen(self) -> None:
        """Cut the private login's listeners off, and keep them off until :meth:`allow_logins`."""
        self.refuse_logins()
        assert self.kill_listeners() >= 1, "no listener of the private login was connected"

    def close(self) -> None:
        if self.kind == "postgresql":
            self._pg("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", self.login)
            self._pg(f'DROP ROLE IF EXISTS "{self.login}"')
        else:
            self._redis("ACL", "DELUSER", self.login)


class Both(Transport):
    """Both transports at once (``broadcast_url`` names one of each, on one channel
    name), each with its login; what the test does to the logins it does to both."""

    def __init__(self) -> None:
        self.parts = [Transport("postgresql"), Transport("redis")]
        self.kind = "both"
        self.kinds = ("postgresql", "redis")
        self.channel = self.parts[1].channel = self.parts[0].channel
        self.login = self.parts[0].login
        self.url = ", ".join(part.url for part in self.parts)
        self.private_url = ", ".join(part.private_url for part in self.parts)

    def refuse_logins(self) -> None:
        for part in self.parts:
            part.refuse_logins()

    def allow_logins(self) -> None:
        for part in self.parts:
            part.allow_logins()

    def kill_listeners(self) -> int:
        return sum(part.kill_listeners() for part in self.parts)

    def close(self) -> None:
        for part in self.parts:
            part.close()


@pytest.fixture(params=["postgresql", "redis", "both"])
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    """Each test that takes ``transport`` runs on PostgreSQL LISTEN/NOTIFY, on Redis pub/sub,
    and on both at once."""
    made = Both() if request.param == "both" else Transport(request.param)
    yield made
    cachedecor.reset()  # this process's listener and publisher leave before their login does
    made.close()


def near_config(
    memcached: Memcached, transport: Transport, *, private: bool = False, **options: Any
) -> dict[str, Any]:
    """Region ``default`` on ``memcached`` with a near cache, broadcast over ``transport``."""
    config = memcached_config(memcached.url, **{"local_entries": 100, **options})
    config["broadcast_url"] = transport.private_url if private else transport.url
    config["broadcast_channel"] = transport.channel
    return config


def configure_near(
    memcached: Memcached, transport: Transport, *, private: bool = False, **options: Any
) -> None:
    """Configure ``default`` with a near cache, and wait until this process listens."""
    cachedecor.configure_regions(near_config(memcached, transport, private=private, **options))
    assert listener().connected.wait(10), "the broadcast listener did not connect"


def listener() -> broadcast.Broadcast:
    sender = broadcast.current()
    assert sender is not None
    return sender


def near() -> NearCache:
    cache = region_settings("default").near
    assert cache is not None
    return cache


# -- rows, reads and counters ----------------------------------------------------------


def seed(engine: Engine, names: dict[int, str] | None = None) -> None:
    with Session(engine) as s:
        s.add_all([User(id=i, name=(names or {}).get(i, f"user-{i}")) for i in range(1, ROWS + 1)])
        s.add(Post(id=1, user_id=1, title="first"))
        s.commit()


@pytest.fixture
def users(pg_engine: Engine) -> Engine:
    seed(pg_engine)
    return pg_engine


def read(engine: Engine, user_id: int) -> str | None:
    with Session(engine) as s:
        user = get_user(s, user_id)
        return None if user is None else user.name


def rename(engine: Engine, user_id: int, name: str) -> None:
    with Session(engine) as s:
        rename_user(s, user_id, name)


def counter(name: str) -> int:
    return cachedecor.stats("default")["default"][name]


def looked_up(memcached: Memcached) -> int:
    """How many keys memcached was asked for, by anyone (its own ``cmd_get`` counter)."""
    client = Client(("127.0.0.1", memcached.port), connect_timeout=1, timeout=1)
    try:
        return int(client.stats()[b"cmd_get"])
    finally:
        client.close()


class Reads:
    """What this process's reads cost since this object was made: near hits, hits in
    memcached, and keys memcached was asked for (a lease-taking miss counts in memcached's
    ``get_hits`` too, so hits are this process's counters)."""

    def __init__(self, memcached: Memcached) -> None:
        self.memcached = memcached
        self._local = counter("local_hits")
        self._hits = counter("hits")
        self._looked_up = looked_up(memcached)

    @property
    def local(self) -> int:
        return counter("local_hits") - self._local

    @property
    def remote_hits(self) -> int:
        return counter("hits") - self._hits - self.local

    @property
    def looked_up(self) -> int:
        return looked_up(self.memcached) - self._looked_up


# -- 1. a near hit ---------------------------------------------------------------------


def test_a_near_hit_makes_no_round_trip(transport: Transport, memcached: Memcached, users: Engine) -> None:
    configure_near(memcached, transport)
    assert read(users, 1) == "user-1"  # a miss: filled remotely, and near (the stored fill)
    reads = Reads(memcached)
    for _ in range(5):
        assert read(users, 1) == "user-1"
    assert reads.local == 5
    assert reads.looked_up == 0
    stats = cachedecor.stats("default")["default"]
    assert stats["hits"] >= stats["local_hits"] == 5


def test_a_near_hit_is_attached_to_the_session(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    configure_near(memcached, transport)
    read(users, 1)
    reads = Reads(memcached)
    with Session(users) as s:
        user = get_user(s, 1)
        assert reads.local == 1
        assert user is not None and user in s
        assert sqlalchemy.inspect(user).persistent
        assert [p.title for p in user.posts] == ["first"]  # lazy-loads through the session
        assert get_user(s, 1) is user  # the identity map's instance wins
        user.name = "changed in this session only"
    with Session(users) as s:
        other = get_user(s, 1)
        assert other is not None and other.name == "user-1"  # each hit is a copy of its own
    assert reads.local == 3


def test_a_remote_hit_fills_the_near_cache(transport: Transport, memcached: Memcached, users: Engine) -> None:
    configure_near(memcached, transport)
    read(users, 1)
    near().flush()  # the row is in memcached only
    reads = Reads(memcached)
    assert read(users, 1) == "user-1"
    assert (reads.local, reads.remote_hits) == (0, 1)
    assert read(users, 1) == "user-1"
    assert (reads.local, reads.remote_hits) == (1, 1)


def test_local_ttl_caps_the_life_of_an_entry(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    configure_near(memcached, transport, local_ttl=0.2)
    read(users, 1)
    reads = Reads(memcached)
    assert read(users, 1) == "user-1"
    assert reads.local == 1 and reads.remote_hits == 0

    def remote_again() -> bool:
        assert read(users, 1) == "user-1"
        return reads.remote_hits > 0

    wait_until(remote_again)  # expired from the near cache: memcached still holds it
    assert reads.remote_hits == 1
    served_near = reads.local
    assert read(users, 1) == "user-1"  # the remote hit filled the near cache again
    assert reads.local == served_near + 1


# -- 2. other processes evict what the broadcast tells them ----------------------------


@pytest.fixture
def launch(users: Engine, memcached: Memcached, transport: Transport, tmp_path: Path) -> Iterator[Any]:
    """Start ``tests.apps.near_reader`` processes configured from an INI file."""
    ini = tmp_path / "near.ini"
    ini.write_text(
        "[cachedecor]\nregions = default\n"
        f"broadcast_url = {transport.url}\nbroadcast_channel = {transport.channel}\n\n"
        "[cachedecor.default]\nbackend = dogpile.cache.pymemcache\n"
        f"arguments.url = {memcached.url}\nexpiration_time = 300\n"
        "local_entries = 1000\nlocal_ttl = 300\n"
    )
    schema = users.info["schema"]  # type: ignore[attr-defined]
    env = {
        "CACHEDECOR_CONFIG": str(ini),
        "APP_DATABASE": users.url.set(query={"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        ),
        "PYTHONPATH": str(ROOT),
    }
    started: list[App] = []

    def start() -> App:
        app = App("near_reader", "tests.models", env)
        started.append(app)
        assert app("wait_connected")["connected"], "the process's broadcast listener did not connect"
        return app

    start.ini = ini  # type: ignore[attr-defined]
    start.env = env  # type: ignore[attr-defined]
    yield start
    for app in started:
        app.stop()


def warm(app: App, user_id: int, name: str) -> None:
    """Have ``app`` hold the row in its near cache (and show that it serves it from there)."""
    assert app("read", id=user_id)["row"] == name
    before = app("status")["stats"]["local_hits"]
    answer = app("read", id=user_id)
    assert answer["row"] == name
    assert answer["stats"]["local_hits"] == before + 1


def fresh_from_now_on(app: App, user_id: int, name: str, reads: int = 50) -> None:
    """Poll ``app`` until it reads ``name``; from then on it never reads anything else."""
    seen: list[Any] = []

    def fresh() -> bool:
        seen.append(app("read", id=user_id)["row"])
        return bool(seen[-1] == name)

    wait_until(fresh)
    after = [app("read", id=user_id)["row"] for _ in range(reads)]
    assert after == [name] * reads


def test_another_process_evicts_a_committed_write(
    transport: Transport, memcached: Memcached, users: Engine, launch: Any
) -> None:
    configure_near(memcached, transport)
    other = launch()
    warm(other, 1, "user-1")
    heard = other("status")["received"]
    rename(users, 1, "renamed")
    fresh_from_now_on(other, 1, "renamed")
    assert other("status")["received"] > heard
    assert other("status")["stats"]["local_hits"] > 0  # the new row is served near again


def test_every_process_evicts_a_write_of_another_process(
    transport: Transport, memcached: Memcached, users: Engine, launch: Any
) -> None:
    configure_near(memcached, transport)
    writer, reader = launch(), launch()
    warm(reader, 2, "user-2")
    warm(writer, 2, "user-2")
    read(users, 2)
    assert read(users, 2) == "user-2"  # this process holds it near too
    writer("rename", id=2, name="renamed")
    assert writer("read", id=2)["row"] == "renamed"  # the writer's own next read: no polling
    fresh_from_now_on(reader, 2, "renamed")

    def fresh_here() -> bool:
        return read(users, 2) == "renamed"

    wait_until(fresh_here)
    assert [read(users, 2) for _ in range(20)] == ["renamed"] * 20


def test_a_refill_between_the_commit_and_the_remote_delete_is_evicted(
    transport: Transport, memcached: Memcached, users: Engine, launch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process that reads the old row from the remote cache after the commit (after
    the NOTIFY of the transaction, on PostgreSQL) and before the delete keeps it near: the
    broadcast sent after the delete evicts it. The writer's delete is held (wrapped) until
    that read has happened."""
    configure_near(memcached, transport)
    other = launch()
    warm(other, 3, "user-3")
    heard = other("status")["received"]
    store = region_settings("default").store
    real_delete_many = store.delete_many
    window: list[Any] = []

    def delete_many(keys: Any) -> None:
        if not window:
            if "postgresql" in transport.kinds:  # the transaction's NOTIFY arrives with the commit
                wait_until(lambda: other("status")["received"] > heard)
            window.append(other("read", id=3)["row"])  # the old entry, still in memcached
            window.append(other("read", id=3)["stats"]["local_hits"])
        real_delete_many(keys)

    monkeypatch.setattr(store, "delete_many", delete_many)
    before = other("status")["stats"]["local_hits"]
    rename(users, 3, "renamed")
    assert window[0] == "user-3"  # the window was real: the other process read the old row
    assert window[1] > before  # ... and kept it near
    fresh_from_now_on(other, 3, "renamed")


@pytest.mark.parametrize("transport", ["postgresql"], indirect=True)
def test_the_notify_of_the_transaction_alone_evicts(
    memcached: Memcached, users: Engine, launch: Any, transport: Transport
) -> None:
    """On PostgreSQL the NOTIFY sent in the writing transaction reaches the other processes
    even when the writer's publisher (the second broadcast) cannot connect."""
    configure_near(memcached, transport, private=True)  # the publisher connects on first use
    other = launch()
    warm(other, 4, "user-4")
    transport.refuse_logins()  # the publisher's connection will be refused
    heard = other("status")["received"]
    rename(users, 4, "renamed")
    wait_until(lambda: other("status")["received"] > heard)
    assert other("read", id=4)["row"] == "renamed"
    assert listener().sent == 0  # nothing went through the publisher
    transport.allow_logins()


def test_a_model_wide_invalidation_evicts_in_every_process(
    transport: Transport, memcached: Memcached, users: Engine, launch: Any
) -> None:
    configure_near(memcached, transport)
    other = launch()
    for user_id in (1, 2):
        warm(other, user_id, f"user-{user_id}")
    with Session(users) as s:  # a write the cache cannot resolve to rows
        s.execute(sqlalchemy.text("UPDATE cd_users SET name = 'everyone' WHERE id IN (1, 2)"))
        s.commit()
    cachedecor.invalidate_model(User)
    for user_id in (1, 2):
        fresh_from_now_on(other, user_id, "everyone", reads=10)


def test_an_invalidation_too_large_to_name_its_keys_flushes_every_process(
    transport: Transport, memcached: Memcached, users: Engine, launch: Any
) -> None:
    """A broadcast of more keys than a PostgreSQL NOTIFY holds (8000 bytes) says "flush"."""
    configure_near(memcached, transport)
    other = launch()
    warm(other, 1, "user-1")
    with Session(users) as s:
        s.execute(sqlalchemy.text("UPDATE cd_users SET name = 'many' WHERE id = 1"))
        s.commit()
    heard = other("status")["received"]
    cachedecor.invalidate_many(User, list(range(1, 1001)))
    fresh_from_now_on(other, 1, "many", reads=10)
    assert other("status")["received"] > heard


def test_an_invalidation_from_the_command_line_evicts_in_every_process(
    transport: Transport, memcached: Memcached, users: Engine, launch: Any
) -> None:
    """``cachedecor invalidate`` runs, invalidates and exits: its broadcast must be out first."""
    other = launch()
    warm(other, 1, "user-1")
    with Session(users) as s:  # a write the cache is not told about
        s.execute(sqlalchemy.text("UPDATE cd_users SET name = 'from a script' WHERE id = 1"))
        s.commit()
    done = subprocess.run(
        [CLI, "invalidate", "--config", str(launch.ini), "tests.models:User", "1"],
        cwd=ROOT,
        env={**os.environ, **launch.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    fresh_from_now_on(other, 1, "from a script", reads=10)


# -- 2b. a listener that has not taken an invalidation yet ---------------------------
#
# While the process's threads keep the interpreter busy, the listener thread can be
# kept from its socket for the interpreter's switch interval and more. A near read
# therefore looks at the listener first. Neither state below can be produced on
# demand with a real server and a real thread (which one runs is the interpreter's
# choice), so each test makes it: a socket pair stands for the listener's socket
# with a message on it, and a handler that waits stands for a listener that is
# still handling one.


@contextlib.contextmanager
def stand_in_listener(
    answer_due: bool = False,
) -> Iterator[tuple[near_module.Ear, socket.socket, socket.socket]]:
    """A stand-in listener whose socket is one end of a socket pair (never waiting for
    it, so reads look at it): yields it, its end, and the other end, to send it
    something."""
    mine, other = socket.socketpair()
    stand_in = near_module.Ear()
    stand_in.fd = mine.fileno()
    stand_in.answer_due = answer_due
    stand_in.attach()
    try:
        yield stand_in, mine, other
    finally:
        stand_in.detach()
        mine.close()
        other.close()


def test_a_near_read_goes_remote_while_the_listeners_socket_holds_something_unread(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    configure_near(memcached, transport)
    read(users, 1)
    reads = Reads(memcached)
    assert read(users, 1) == "user-1"
    assert reads.local == 1
    with stand_in_listener() as (_, mine, other):
        near_state.next_check = 0.0  # look at once, not after CHECK_EVERY
        other.send(b"an invalidation the listener has not read")
        assert read(users, 1) == "user-1"
        assert read(users, 1) == "user-1"
        assert (reads.local, reads.remote_hits) == (1, 2)  # both went to memcached
        mine.recv(100)  # taken
        assert read(users, 1) == "user-1"
        assert (reads.local, reads.remote_hits) == (2, 2)


def test_a_near_read_does_not_wait_for_a_keep_alives_answer(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    """What arrives on a listener's socket while the answer to its keep-alive is due is
    most likely that answer: reads do not go remote for it (a stand-in listener, as in
    the test above, whose socket holds something while its answer is due)."""
    configure_near(memcached, transport)
    read(users, 1)
    reads = Reads(memcached)
    with stand_in_listener(answer_due=True) as (stand_in, _, other):
        other.send(b"the answer")
        near_state.next_check = 0.0  # look at once
        assert read(users, 1) == "user-1"
        assert (reads.local, reads.remote_hits) == (1, 0)
        stand_in.answer_due = False  # answered: now it would be a message
        near_state.next_check = 0.0
        assert read(users, 1) == "user-1"
        assert (reads.local, reads.remote_hits) == (1, 1)


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll sets exist on Linux only")
def test_a_socket_that_lives_on_elsewhere_does_not_keep_reads_remote(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    """Reads look at the listeners' sockets through an epoll set. A socket whose file is
    still open elsewhere (in a forked child, say) stays in the set after this process
    closed it, and its number may by then belong to a listener's new socket: what
    arrives on the old one must not send reads remote for good (the set is made
    again). A stand-in listener's socket number is made to point at another socket
    behind the set's back, while a duplicate keeps the old one open."""
    configure_near(memcached, transport)
    read(users, 1)
    old_mine, old_other = socket.socketpair()
    new_mine, new_other = socket.socketpair()
    stand_in = near_module.Ear()
    number = old_mine.fileno()
    stand_in.fd = number
    stand_in.attach()
    watching = near_state.watching
    assert watching is not None
    elsewhere = os.dup(number)  # the old socket's file lives on
    try:
        os.dup2(new_mine.fileno(), number)  # the number is now the new socket's
        old_other.send(b"for the old socket")
        reads = Reads(memcached)
        for _ in range(3):
            near_state.next_check = 0.0  # look at once
            assert read(users, 1) == "user-1"
        assert near_state.watching is not watching  # made again
        assert reads.local >= 2  # near again at once, not remote for good
    finally:
        stand_in.detach()
        os.close(elsewhere)
        for sock in (old_mine, old_other, new_mine, new_other):
            sock.close()


@pytest.mark.parametrize("transport", ["postgresql", "redis"], indirect=True)
def test_a_gevent_process_listens_without_blocking_its_loop(
    transport: Transport, memcached: Memcached
) -> None:
    """Where gevent has patched the standard library (gunicorn's gevent workers), the
    listener is a green thread: it must wait in the patched ``select.poll``, never in a
    call into the C library that would block every green thread for its keep-alive
    period (half a second). A real gevent process ticks every 5 ms while an
    invalidation reaches it; the longest gap between two ticks stays far below that."""
    pytest.importorskip("gevent")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.green_listener", memcached.url, transport.url, transport.channel],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert json.loads(proc.stdout.readline()) == {"connected": True}
        proc.stdin.write("tick 1.5\n")
        proc.stdin.flush()
        text = broadcast._message({"default": (["a-key"], [])})
        if transport.kind == "redis":
            transport._redis("PUBLISH", transport.channel, text)
        else:
            transport._pg("SELECT pg_notify(%s, %s)", transport.channel, text)
        report = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(10)
    assert report["received"] == 1
    assert report["hearing"]
    assert report["longest_gap"] < 0.25, report  # 0.5 s and more if the wait blocked


def test_a_near_read_goes_remote_while_a_listeners_socket_holds_what_it_has_not_taken(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    """Reads look at the listeners' sockets themselves: what waits there unread sends
    them to the remote cache, however long the listener's thread goes without running
    (no CPU, or no interpreter). The listener that has not run here is an ear on a real
    socket pair that no thread reads: nothing it does, or fails to do, can help. Once
    what the socket held is taken, reads are near again."""
    configure_near(memcached, transport)
    read(users, 1)
    listener()
    idle = near_module.Ear()
    ours, theirs = socket.socketpair()
    try:
        idle.attach()
        idle.up(ours.fileno())
        reads = Reads(memcached)
        assert read(users, 1) == "user-1"
        assert reads.local == 1  # near: nothing unread
        theirs.sendall(b"an invalidation nobody has taken")
        looked = near_state.next_check
        wait_until(lambda: time.monotonic() >= looked)  # the next read looks at the sockets
        for _ in range(3):  # and so does every read after it, until the message is taken
            assert read(users, 1) == "user-1"
        assert (reads.local, reads.remote_hits) == (1, 3)
        assert ours.recv(100) == b"an invalidation nobody has taken"
        assert read(users, 1) == "user-1"
        assert (reads.local, reads.remote_hits) == (2, 3)
    finally:
        idle.detach()
        ours.close()
        theirs.close()


def test_a_listener_counts_as_taking_from_its_wait_to_the_end_of_its_handling(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    """The listener's wait marks it as taking as soon as its socket has something, before
    its client reads the socket (out of the reads' sight); once it has handled what it
    read, it no longer is, and reads are near again."""
    configure_near(memcached, transport)
    read(users, 1)
    sender = listener()
    received = sender.received
    get_user.invalidate(2)
    wait_until(lambda: sender.received > received and not any(ear.taking for ear in near_state.ears))
    reads = Reads(memcached)
    assert read(users, 1) == "user-1"
    assert reads.local == 1
    idle = near_module.Ear()
    ours, theirs = socket.socketpair()
    try:
        idle.fd = ours.fileno()
        assert not idle.wait(0.01)
        assert not idle.taking
        theirs.sendall(b"x")
        assert idle.wait(5)
        assert idle.taking  # from the moment the wait found something
    finally:
        ours.close()
        theirs.close()


def held_listener_sends_reads_remote(
    users: Engine,
    memcached: Memcached,
    held: threading.Event,
    release: threading.Event,
    what: str,
    start: Any = None,
) -> None:
    """While the listener is held (``held`` set, waiting for ``release``), a read of row 1,
    which is near, goes to the remote cache; once it is let go and done, it is near again
    (at once, unless a keep-alive's answer happens to arrive at that moment: reads are
    then repeated until one is near)."""
    reads = Reads(memcached)
    try:
        if start is not None:
            start()
        assert held.wait(10), what
        assert read(users, 1) == "user-1"  # row 1 is near, but the listener has not done
        assert (reads.local, reads.remote_hits) == (0, 1)
    finally:
        release.set()
    wait_until(lambda: not any(ear.taking for ear in near_state.ears))

    def near_again() -> bool:
        assert read(users, 1) == "user-1"
        return reads.local == 1

    wait_until(near_again, timeout=5)


def test_near_reads_go_remote_while_the_listener_handles_a_message(
    transport: Transport, memcached: Memcached, users: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_near(memcached, transport)
    for user_id in (1, 2):
        read(users, user_id)
    handling = threading.Event()
    release = threading.Event()
    receive = broadcast._receive

    def slow_receive(text: str) -> None:
        handling.set()
        release.wait(10)
        receive(text)

    monkeypatch.setattr(broadcast, "_receive", slow_receive)
    # get_user.invalidate(2) broadcasts: this process's listener receives it too
    held_listener_sends_reads_remote(
        users,
        memcached,
        handling,
        release,
        "the listener did not receive the invalidation",
        lambda: get_user.invalidate(2),
    )


@pytest.mark.parametrize("transport", ["redis"], indirect=True)
def test_threads_look_at_the_listeners_socket_at_the_same_time(
    transport: Transport, memcached: Memcached, users: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading threads look at a listener's socket concurrently (here on every read:
    ``CHECK_EVERY`` is 0), and a look never fails a read. Reads look at the socket of a
    listener that is not waiting for it: a stand-in listener, whose socket is one end
    of a socket pair, is never waiting."""
    configure_near(memcached, transport)
    read(users, 1)
    monkeypatch.setattr(near_module, "CHECK_EVERY", 0.0)
    looks = 0
    look = near_module._look

    def counted_look(now: float) -> bool:
        nonlocal looks
        looks += 1
        return look(now)

    monkeypatch.setattr(near_module, "_look", counted_look)
    failures: list[str] = []
    names: list[str | None] = []
    start = threading.Barrier(6)

    def reader() -> None:
        with Session(users) as s:
            start.wait()
            try:
                for _ in range(3000):
                    user = get_user(s, 1)
                    names.append(None if user is None else user.name)
            except Exception:
                failures.append(traceback.format_exc())

    threads = [threading.Thread(target=reader) for _ in range(6)]
    with stand_in_listener():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert names == ["user-1"] * 18000
    assert counter("local_hits") > 0
    assert looks >= counter("local_hits")  # every near hit looked


@pytest.mark.parametrize("transport", ["redis"], indirect=True)
def test_near_reads_go_remote_once_the_redis_client_has_read_a_message_off_the_socket(
    transport: Transport, memcached: Memcached, users: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's ``can_read()`` moves what the socket holds into the client's buffer,
    where reads cannot see it; from then until the message is handled the listener
    counts as taking. The listener is held right after that call (the wrapper waits),
    which stands for the interpreter running a reading thread at that moment."""
    import redis.connection

    configure_near(memcached, transport)
    for user_id in (1, 2):
        read(users, user_id)
    real_can_read = redis.connection.AbstractConnection.can_read
    holding = threading.Event()
    release = threading.Event()

    def can_read(self: Any, timeout: float = 0) -> bool:
        found = bool(real_can_read(self, timeout))
        if (
            found
            and threading.current_thread().name == "cachedecor-broadcast-listener"
            and not release.is_set()
        ):
            holding.set()
            release.wait(10)
        return found

    monkeypatch.setattr(redis.connection.AbstractConnection, "can_read", can_read)
    held_listener_sends_reads_remote(
        users,
        memcached,
        holding,
        release,
        "the listener did not read the invalidation",
        lambda: get_user.invalidate(2),
    )


@pytest.mark.parametrize("transport", ["postgresql"], indirect=True)
def test_near_reads_go_remote_once_the_postgresql_keep_alive_is_answered(
    transport: Transport, memcached: Memcached, users: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg keeps aside the notifications that arrive while the listener's keep-alive
    query runs, where reads cannot see them: from the answer until the listener has
    taken them, reads go to the remote cache. The listener is held as it notes the
    answer (the wrapper waits), which stands for the interpreter running a reading
    thread at that moment."""
    configure_near(memcached, transport)
    read(users, 1)
    real_heard = near_module.Ear.heard
    holding = threading.Event()
    release = threading.Event()

    def heard(self: Any) -> None:
        if threading.current_thread().name == "cachedecor-broadcast-listener" and not release.is_set():
            holding.set()
            release.wait(10)
        real_heard(self)

    monkeypatch.setattr(near_module.Ear, "heard", heard)
    held_listener_sends_reads_remote(users, memcached, holding, release, "the listener sent no keep-alive")


# -- 3. the writer reads its own writes ------------------------------------------------


def test_the_writers_next_read_returns_its_write(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    configure_near(memcached, transport)
    for user_id in (5, 6, 7):
        read(users, user_id)
        reads = Reads(memcached)
        read(users, user_id)
        assert reads.local == 1  # held near before the write
        rename(users, user_id, "renamed")
        assert read(users, user_id) == "renamed"  # the very next read: no polling


def test_the_writers_next_read_returns_its_write_when_another_thread_refilled_it(
    transport: Transport, memcached: Memcached, users: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread of the writing process reads the row between the commit's local
    eviction and its remote delete (the delete is wrapped to let it), from the remote cache,
    where the old entry still is. The writer's publisher cannot connect, so the only
    eviction after the delete would be the commit's own."""
    configure_near(memcached, transport, private=True)
    read(users, 5)
    assert read(users, 5) == "user-5"
    transport.refuse_logins()  # the publisher (not connected yet) will not be let in
    store = region_settings("default").store
    real_delete_many = store.delete_many
    heard = listener().received
    seen: list[str | None] = []

    def delete_many(keys: Any) -> None:
        if not seen:
            if transport.kind == "postgresql":  # the transaction's NOTIFY comes back first
                wait_until(lambda: listener().received > heard)
            reader = threading.Thread(target=lambda: seen.append(read(users, 5)))
            reader.start()
            reader.join(10)
        real_delete_many(keys)

    monkeypatch.setattr(store, "delete_many", delete_many)
    rename(users, 5, "renamed")
    assert seen == ["user-5"]  # the other thread read the old entry from memcached
    assert read(users, 5) == "renamed"  # the writer's very next read


def test_the_writers_next_read_returns_its_write_when_the_caller_commits(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    @invalidates(User)
    def rename_without_commit(session: Session, user_id: int, name: str) -> None:
        user = session.get(User, user_id)
        assert user is not None
        user.name = name

    configure_near(memcached, transport)
    read(users, 5)
    assert read(users, 5) == "user-5"
    with Session(users) as s:
        rename_without_commit(s, 5, "renamed")
        assert get_user(s, 5).name == "renamed"  # type: ignore[union-attr]  # its own write
        s.commit()
    assert read(users, 5) == "renamed"


def test_a_read_in_a_transaction_that_wrote_neither_uses_nor_fills_the_near_cache(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    @invalidates(User)
    def rename_without_commit(session: Session, user_id: int, name: str) -> None:
        user = session.get(User, user_id)
        assert user is not None
        user.name = name
        session.flush()

    configure_near(memcached, transport)
    read(users, 6)
    read(users, 6)
    with Session(users) as s:
        rename_without_commit(s, 6, "uncommitted")
        reads = Reads(memcached)
        assert get_user(s, 6).name == "uncommitted"  # type: ignore[union-attr]
        assert reads.local == 0
        s.rollback()
    assert read(users, 6) == "user-6"


# -- 4. a lost broadcast connection ----------------------------------------------------


def test_a_deaf_process_does_not_use_its_near_cache(
    transport: Transport, memcached: Memcached, users: Engine, launch: Any
) -> None:
    configure_near(memcached, transport, private=True)
    writer = launch()
    for user_id in (1, 2):
        read(users, user_id)
        assert read(users, user_id) == f"user-{user_id}"
    assert len(near()) == 2
    lost = listener().lost

    transport.deafen()
    # flushed: what it held may have been invalidated unheard
    wait_until(lambda: not listener().connected.is_set() and len(near()) == 0)
    assert listener().lost > lost
    reads = Reads(memcached)
    for _ in range(5):
        assert read(users, 1) == "user-1"
    assert reads.local == 0
    assert (reads.remote_hits, reads.looked_up) == (5, 5)  # every read went to memcached
    assert len(near()) == 0  # and none was kept
    sent = writer("status")["sent"]
    writer("rename", id=2, name="renamed while deaf")  # broadcasts this process misses
    writer("rename", id=1, name="renamed while deaf")
    wait_until(lambda: writer("status")["sent"] >= sent + 2)  # gone before it listens again
    assert read(users, 1) == "renamed while deaf"
    assert reads.local == 0

    transport.allow_logins()
    assert listener().connected.wait(10), "the listener did not reconnect"
    assert read(users, 2) == "renamed while deaf"  # nothing from before the loss is served
    reads = Reads(memcached)
    for user_id in (1, 2):
        assert read(users, user_id) == "renamed while deaf"
        assert read(users, user_id) == "renamed while deaf"
    assert reads.local == 3  # used again: row 2 came near on the read above, row 1 on its first read


@pytest.fixture
def stalled_listener(request: pytest.FixtureRequest, memcached: Memcached) -> Iterator[str]:
    """A process whose broadcast listener is connected to a server process the test then
    stops (SIGSTOP, as a host that stops answering would be): no notification and no
    error reaches it. On PostgreSQL the listener's own backend is stopped; on Redis a
    server of the test's own (the shared one serves other tests)."""
    if request.param == "postgresql":
        transport = Transport("postgresql")
        try:
            configure_near(memcached, transport, private=True, local_ttl=60)
            pids = transport._pg("SELECT pid FROM pg_stat_activity WHERE usename = %s", transport.login)
            assert len(pids) == 1
            pid = pids[0][0]
            os.kill(pid, signal.SIGSTOP)
            try:
                yield "postgresql"
            finally:
                os.kill(pid, signal.SIGCONT)
                cachedecor.reset()
        finally:
            transport.close()
        return
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed")
    port = free_port()
    server = subprocess.Popen(
        [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        config = memcached_config(memcached.url, local_entries=100, local_ttl=60)
        config["broadcast_url"] = f"redis://127.0.0.1:{port}/0"
        cachedecor.configure_regions(config)
        assert listener().connected.wait(10)
        server.send_signal(signal.SIGSTOP)
        try:
            yield "redis"
        finally:
            server.send_signal(signal.SIGCONT)
            cachedecor.reset()
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("transport", ["redis"], indirect=True)
def test_the_redis_listener_asks_its_server_only_after_a_silence(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    """While messages keep coming they show the server is there: no keep-alive ``PING``
    then (reads do not look for what arrives while its answer is due). After half a
    second of silence, one. Redis's ``CLIENT LIST`` names each connection's last
    command. A stream whose pace this machine did not keep (a gap of 0.4 s or more
    between two messages heard) proves nothing: the listener is then reconnected
    and the stream sent again."""
    configure_near(memcached, transport, private=True)

    def listed() -> list[str]:
        listing = transport._redis("CLIENT", "LIST", "TYPE", "pubsub")
        text = listing.decode() if isinstance(listing, bytes) else str(listing)
        return [line for line in text.splitlines() if f"user={transport.login}" in line]

    def last_command() -> str:
        mine = listed()
        assert len(mine) == 1, mine
        return next(f.split("=", 1)[1] for f in mine[0].split() if f.startswith("cmd="))

    for _ in range(3):
        if last_command() != "subscribe":  # asked already: start again on a new connection
            lost = listener().lost
            transport.kill_listeners()
            wait_until(lambda lost=lost: listener().lost > lost and listener().connected.is_set())
            wait_until(lambda: len(listed()) == 1)
            continue
        ear = listener().links[0].ear
        heard_at = [ear.heard_until - near_module.HEARD_FOR]  # when the listener last heard
        stream_until = time.monotonic() + 2.0
        while time.monotonic() < stream_until:  # a message every 0.1 s, for four keep-alive periods
            heard = listener().received
            get_user.invalidate(1)
            wait_until(lambda heard=heard: listener().received > heard)
            heard_at.append(time.monotonic())
            time.sleep(0.1)  # paces the stream (each message was waited for above)
        command = last_command()
        if max(b - a for a, b in itertools.pairwise(heard_at)) < 0.4:
            break
    else:
        pytest.fail("three streams in a row did not keep their pace on this machine")
    assert command == "subscribe"  # no command since
    wait_until(lambda: last_command() == "ping")  # silent: asked


@pytest.mark.parametrize("stalled_listener", ["postgresql", "redis"], indirect=True)
def test_a_stalled_broadcast_connection_is_noticed(stalled_listener: str) -> None:
    """The process must notice, and stop using its near cache, well within ``local_ttl``."""
    wait_until(lambda: not listener().connected.is_set(), timeout=10)


def test_an_entry_is_not_served_while_deaf_whatever_the_cache_holds(
    transport: Transport, memcached: Memcached, users: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry put by a fill that raced the flush of a lost connection is still not
    served: a deaf process reads nothing from its near cache (here the flag the listener
    keeps is cleared without the flush, to hold such an entry)."""
    configure_near(memcached, transport)
    read(users, 1)
    assert len(near()) == 1
    monkeypatch.setattr(near_state, "listening", False)
    reads = Reads(memcached)
    assert read(users, 1) == "user-1"
    assert (reads.local, reads.remote_hits) == (0, 1)


def test_a_reconnected_process_hears_invalidations_again(
    transport: Transport, memcached: Memcached, users: Engine, launch: Any
) -> None:
    configure_near(memcached, transport, private=True)
    writer = launch()
    transport.deafen()
    wait_until(lambda: not listener().connected.is_set())
    transport.allow_logins()
    assert listener().connected.wait(10), "the listener did not reconnect"
    read(users, 7)
    assert read(users, 7) == "user-7"
    heard = listener().received
    writer("rename", id=7, name="renamed")
    wait_until(lambda: read(users, 7) == "renamed")
    assert listener().received > heard


@pytest.mark.parametrize("transport", ["both"], indirect=True)
@pytest.mark.parametrize("lost", ["postgresql", "redis"])
def test_with_both_transports_losing_one_keeps_the_process_hearing(
    transport: Transport, memcached: Memcached, users: Engine, launch: Any, lost: str
) -> None:
    """Every invalidation goes out on both transports: while one listener is cut off the
    near cache stays in use, and what the other processes commit still evicts."""
    assert isinstance(transport, Both)
    configure_near(memcached, transport, private=True)
    writer = launch()
    cut, kept = (0, 1) if lost == "postgresql" else (1, 0)
    sender = listener()
    assert sender.kinds == ("postgresql", "redis")
    for user_id in (1, 2):
        read(users, user_id)
    assert len(near()) == 2
    transport.parts[cut].deafen()
    wait_until(lambda: not sender.links[cut].connected.is_set())
    assert sender.connected.is_set() and sender.links[kept].connected.is_set()
    assert len(near()) == 2  # not flushed: nothing can have been missed
    reads = Reads(memcached)
    assert read(users, 1) == "user-1"
    assert reads.local == 1
    heard = sender.links[kept].received
    writer("rename", id=2, name="renamed")
    wait_until(lambda: sender.links[kept].received > heard)
    assert read(users, 2) == "renamed"
    transport.parts[cut].allow_logins()
    assert sender.links[cut].connected.wait(10), "the cut listener did not reconnect"
    assert len(near()) == 2  # the process never went deaf: nothing was flushed


# -- 5. a forked child -----------------------------------------------------------------


class Conversation:
    """A forked child that runs ``body(talk)``; ``talk(message)`` sends ``message`` to the
    parent and returns the parent's answer. The child leaves with ``os._exit``."""

    def __init__(self, body: Callable[[Callable[[str], str]], Any]) -> None:
        up_read, up_write = os.pipe()
        down_read, down_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(up_read)
                os.close(down_write)

                def talk(message: str) -> str:
                    os.write(up_write, (json.dumps({"say": message}) + "\n").encode())
                    return _read_line(down_read, 60)

                try:
                    report = {"result": body(talk)}
                except BaseException:
                    report = {"error": traceback.format_exc()}
                os.write(up_write, (json.dumps(report) + "\n").encode())
            finally:
                os._exit(0)
        os.close(up_write)
        os.close(down_read)
        self._from_child = up_read
        self._to_child = down_write

    def hear(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            message: dict[str, Any] = json.loads(_read_line(self._from_child, timeout))
        except TimeoutError:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            pytest.fail(f"the forked child said nothing within {timeout}s")
        if "error" in message:
            os.waitpid(self.pid, 0)
            pytest.fail(f"the forked child raised:\n{message['error']}")
        return message

    def answer(self, text: str) -> None:
        os.write(self._to_child, (text + "\n").encode())

    def result(self) -> Any:
        report = self.hear()
        _, status = os.waitpid(self.pid, 0)
        os.close(self._from_child)
        os.close(self._to_child)
        assert os.waitstatus_to_exitcode(status) == 0
        return report["result"]


def _read_line(fd: int, timeout: float) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, 1)
        if not chunk:
            raise EOFError("the other end closed the pipe")
        data += chunk
    return data.decode().rstrip("\n")


def test_a_forked_child_is_deaf_until_its_own_listener_connects(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    configure_near(memcached, transport, private=True)
    read(users, 8)
    assert read(users, 8) == "user-8"
    assert len(near()) == 1  # the parent holds the row near
    transport.refuse_logins()  # the child's listener cannot connect until the child says so

    def child(talk: Callable[[str], str]) -> dict[str, Any]:
        users.dispose(close=False)  # the parent's database connections stay the parent's
        sender = listener()
        out: dict[str, Any] = {"connected_at_start": sender.connected.is_set(), "held": len(near())}
        out["deaf_reads"] = [read(users, 8) for _ in range(3)]
        out["deaf_local_hits"] = counter("local_hits")
        out["held_while_deaf"] = len(near())
        transport.allow_logins()
        out["connected"] = sender.connected.wait(10)
        read(users, 8)
        out["read_near"] = read(users, 8)
        out["local_hits"] = counter("local_hits")
        heard = sender.received
        talk("holding row 8")  # the parent renames it
        deadline = time.monotonic() + 10
        seen = []
        while time.monotonic() < deadline:
            seen.append(read(users, 8))
            if seen[-1] == "renamed by the parent":
                break
        out["last"] = seen[-1]
        out["after"] = [read(users, 8) for _ in range(20)]
        out["heard"] = sender.received - heard
        return out

    forked = Conversation(child)
    assert forked.hear()["say"] == "holding row 8"
    rename(users, 8, "renamed by the parent")
    forked.answer("renamed")
    got = forked.result()
    assert got["connected_at_start"] is False
    assert got["held"] == 0  # the parent's entries are not the child's
    assert got["deaf_reads"] == ["user-8"] * 3
    assert got["deaf_local_hits"] == 0
    assert got["held_while_deaf"] == 0
    assert got["connected"] is True
    assert got["read_near"] == "user-8"
    assert got["local_hits"] == 1  # once its own listener is connected, it uses its near cache
    assert got["last"] == "renamed by the parent"
    assert got["after"] == ["renamed by the parent"] * 20
    assert got["heard"] >= 1


# -- 6. an eviction that arrives between a remote read and its near fill ---------------


def test_a_fill_that_started_before_an_eviction_is_refused(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    configure_near(memcached, transport)
    cache = near()
    payload = Row(None, None, {}, (), 0.0).share()  # the row of an absent key (cache_none)
    since = cache.mark()
    cache.evict(["k"])
    assert cache.put("k", payload, since) is False
    assert len(cache) == 0
    assert cache.refused == 1
    assert cache.put("k", payload, cache.mark()) is True  # a read started after it
    assert len(cache) == 1
    since = cache.mark()
    cache.evict(["other"])
    assert cache.put("k", payload, since) is True  # another key's eviction
    since = cache.mark()
    cache.flush()
    assert cache.put("k", payload, since) is False  # a flush refuses every fill


def test_a_broadcast_between_the_remote_hit_and_the_near_fill_wins(
    transport: Transport,
    memcached: Memcached,
    users: Engine,
    launch: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The remote lookup is wrapped: after it has returned the old entry, another process
    commits a rename, and the broadcast reaches this process before the entry is decoded
    and offered to the near cache."""
    configure_near(memcached, transport)
    writer = launch()
    read(users, 9)
    near().flush()  # row 9 is in memcached only
    store = region_settings("default").store
    real_lookup = store.lookup
    state = {"once": True}

    def lookup(key: str, ttl: int) -> Any:
        found = real_lookup(key, ttl)
        if state.pop("once", False):
            assert found[0] is not None  # the old entry
            heard = listener().received
            writer("rename", id=9, name="renamed")
            wait_until(lambda: listener().received > heard)
        return found

    monkeypatch.setattr(store, "lookup", lookup)
    refused = near().refused
    assert read(users, 9) == "user-9"  # it read before the write: the old row is its answer
    assert near().refused == refused + 1  # ... but not the near cache's
    reads = Reads(memcached)
    assert read(users, 9) == "renamed"
    assert reads.local == 0


def test_a_broadcast_between_the_remote_fill_and_the_near_fill_wins(
    transport: Transport,
    memcached: Memcached,
    users: Engine,
    launch: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The remote fill is wrapped: after memcached has stored the row read from the
    database, another process commits a rename (deleting that entry), and the broadcast
    reaches this process before the row is offered to the near cache."""
    configure_near(memcached, transport)
    writer = launch()
    store = region_settings("default").store
    real_fill = store.fill
    state = {"once": True}

    def fill(key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        stored = real_fill(key, value, token, ttl)
        if state.pop("once", False):
            assert stored is True
            heard = listener().received
            writer("rename", id=10, name="renamed")
            wait_until(lambda: listener().received > heard)
        return stored

    monkeypatch.setattr(store, "fill", fill)
    refused = near().refused
    assert read(users, 10) == "user-10"
    assert near().refused == refused + 1
    assert read(users, 10) == "renamed"


# -- 7. bounds, and many=True ----------------------------------------------------------


def test_local_entries_bounds_the_near_cache_in_lru_order(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    configure_near(memcached, transport, local_entries=3)
    for user_id in (1, 2, 3):
        read(users, user_id)
    assert len(near()) == 3
    reads = Reads(memcached)
    read(users, 1)  # now the most recently used
    read(users, 4)  # a miss: its fill pushes out the least recently used, row 2
    assert len(near()) == 3
    assert reads.local == 1
    reads = Reads(memcached)
    for user_id in (1, 3, 4):
        read(users, user_id)
    assert (reads.local, reads.remote_hits) == (3, 0)
    read(users, 2)
    assert (reads.local, reads.remote_hits) == (3, 1)


@cached_by_pk(Everything)
def get_thing(session: Session, thing_id: uuid.UUID) -> Everything | None:
    return session.get(Everything, thing_id)


def things(engine: Engine, texts: dict[int, str]) -> None:
    with Session(engine) as s:
        s.add_all([Everything(id=uuid.UUID(int=i), text=text) for i, text in texts.items()])
        s.commit()


def read_thing(engine: Engine, i: int) -> str | None:
    with Session(engine) as s:
        thing = get_thing(s, uuid.UUID(int=i))
        return None if thing is None else thing.text


def test_local_max_bytes_bounds_the_near_cache_in_lru_order(
    transport: Transport, memcached: Memcached, pg_engine: Engine
) -> None:
    things(pg_engine, {i: str(i) * 1000 for i in range(1, 5)})
    configure_near(memcached, transport, compress_threshold=1_000_000)
    read_thing(pg_engine, 1)
    size = near().bytes
    assert size > 1000  # the row's 1000 characters of text, and the rest of it
    bound = 3 * size + size // 2  # three such rows fit, four do not
    configure_near(memcached, transport, local_max_bytes=bound, compress_threshold=1_000_000)
    read_thing(pg_engine, 1)
    assert near().bytes == size
    for i in (2, 3):
        read_thing(pg_engine, i)
    assert len(near()) == 3
    read_thing(pg_engine, 1)  # the most recently used
    read_thing(pg_engine, 4)  # pushes out row 2
    assert len(near()) == 3 and near().bytes <= bound
    reads = Reads(memcached)
    for i in (1, 3, 4):
        assert read_thing(pg_engine, i) == str(i) * 1000
    assert (reads.local, reads.remote_hits) == (3, 0)
    read_thing(pg_engine, 2)
    assert (reads.local, reads.remote_hits) == (3, 1)


def test_an_entry_larger_than_local_max_bytes_is_not_kept(
    transport: Transport, memcached: Memcached, pg_engine: Engine
) -> None:
    things(pg_engine, {1: "x" * 2000, 2: "small"})
    configure_near(memcached, transport, compress_threshold=1_000_000)
    read_thing(pg_engine, 2)
    small = near().bytes
    # room for row 2 and 1,000 bytes more: not for row 1's 2,000 characters
    bound = max(1024, small + 1000)
    configure_near(memcached, transport, local_max_bytes=bound, compress_threshold=1_000_000)
    read_thing(pg_engine, 2)
    read_thing(pg_engine, 1)
    assert len(near()) == 1  # row 2 only: row 1 did not push it out
    reads = Reads(memcached)
    assert read_thing(pg_engine, 1) == "x" * 2000
    assert read_thing(pg_engine, 2) == "small"
    assert (reads.local, reads.remote_hits) == (1, 1)


def test_near_hits_give_each_instance_its_own_documents_and_every_value_exactly(
    transport: Transport, memcached: Memcached, pg_engine: Engine
) -> None:
    """The near cache keeps decoded rows: a JSON document must still be each
    instance's own, and every column type must come back as the database gave it."""
    doc = {"tags": ["a", "b"], "nested": {"n": [1, 2, {"deep": True}]}}
    row = Everything(
        id=uuid.UUID(int=7),
        at_naive=datetime.datetime(2026, 1, 2, 3, 4, 5, 6),
        at_aware=datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
        day=datetime.date(2026, 1, 2),
        clock=datetime.time(3, 4, 5, 6),
        span=datetime.timedelta(days=1, seconds=2, microseconds=3),
        amount=decimal.Decimal("12.345600"),
        blob=b"\x00\xff",
        color=Color.RED,
        doc=doc,
        ratio=0.25,
        flag=True,
        text="text",
    )
    with Session(pg_engine) as s:
        s.add(row)
        s.commit()
        stored = s.get(Everything, uuid.UUID(int=7))
        expected = {c.key: getattr(stored, c.key) for c in Everything.__table__.c}
    configure_near(memcached, transport)
    with Session(pg_engine) as s:
        first = get_thing(s, uuid.UUID(int=7))  # a miss: the fill is kept near
        assert first is not None
        first.doc["tags"].append("changed in place")
        first.doc["nested"]["n"][2]["deep"] = False
    reads = Reads(memcached)
    with Session(pg_engine) as s:
        second = get_thing(s, uuid.UUID(int=7))
        assert second is not None
        assert {c: getattr(second, c) for c in expected} == expected
        assert second.doc == doc
        second.doc["tags"].clear()
    with Session(pg_engine) as s:
        third = get_thing(s, uuid.UUID(int=7))
        assert third is not None and third.doc == doc
        assert third.doc is not second.doc and third.doc["nested"] is not second.doc["nested"]
    assert (reads.local, reads.remote_hits) == (2, 0)
    # a flat document (a list of plain values) is copied too
    with Session(pg_engine) as s:
        s.add(Everything(id=uuid.UUID(int=8), doc=["a", "b", 3]))
        s.commit()
    with Session(pg_engine) as s:
        flat = get_thing(s, uuid.UUID(int=8))
        assert flat is not None
        flat.doc.append("changed in place")
    with Session(pg_engine) as s:
        again = get_thing(s, uuid.UUID(int=8))
        assert again is not None and again.doc == ["a", "b", 3]
    assert reads.local == 3


def test_many_reads_use_the_near_cache_for_the_keys_it_holds(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    configure_near(memcached, transport)
    for user_id in (1, 2, 3, 4):
        read(users, user_id)
    near().flush()
    read(users, 1)
    read(users, 2)  # remote hits: rows 1 and 2 are near, 3 and 4 in memcached only
    calls.clear()
    reads = Reads(memcached)
    with Session(users) as s:
        got = get_users(s, [4, 1, 5, 2, 3, 1])
        assert [u.id for u in got] == [4, 1, 5, 2, 3]
        assert all(u in s for u in got)
    assert calls == [[5]]  # row 5 only was in neither
    assert reads.local == 2
    assert reads.looked_up == 3  # 4, 5 and 3 went to memcached
    assert reads.remote_hits == 2
    reads = Reads(memcached)
    with Session(users) as s:
        assert [u.name for u in get_users(s, [1, 2, 3, 4, 5])] == [f"user-{i}" for i in range(1, 6)]
    assert (reads.local, reads.looked_up) == (5, 0)  # remote hits and fills were kept near
    assert calls == [[5]]


def test_a_many_read_after_a_write_returns_it(
    transport: Transport, memcached: Memcached, users: Engine
) -> None:
    configure_near(memcached, transport)
    with Session(users) as s:
        get_users(s, [1, 2])
    rename(users, 2, "renamed")
    with Session(users) as s:
        assert [u.name for u in get_users(s, [1, 2])] == ["user-1", "renamed"]


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_a_many_read_after_the_region_is_invalidated_serves_nothing_near(
    transport: Transport, memcached: Memcached, users: Engine, hard: bool
) -> None:
    """dogpile's ``region.invalidate()`` reaches the near entries of a batch as it does a
    single read's: every row written before it is refused, and read again."""
    configure_near(memcached, transport)
    with Session(users) as s:
        get_users(s, [1, 2, 3])
    reads = Reads(memcached)
    with Session(users) as s:
        get_users(s, [1, 2, 3])
    assert reads.local == 3
    get_users.region.invalidate(hard=hard)
    calls.clear()
    reads = Reads(memcached)
    with Session(users) as s:
        assert [u.name for u in get_users(s, [1, 2, 3])] == ["user-1", "user-2", "user-3"]
    assert reads.local == 0
    assert calls == [[1, 2, 3]]


# -- 8. asyncio callers ----------------------------------------------------------------


@pytest.fixture(params=["asyncpg", "aiosqlite"])
def async_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """Rows in PostgreSQL read with asyncpg, then in SQLite read with aiosqlite."""
    if request.param == "asyncpg":
        engine = request.getfixturevalue("pg_engine")
        seed(engine)
        schema = engine.info["schema"]
        url = engine.url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        return url, {"connect_args": {"server_settings": {"search_path": schema}}}
    engine = request.getfixturevalue("sqlite_engine")
    seed(engine)
    return engine.url.set(drivername="sqlite+aiosqlite").render_as_string(), {}


def test_async_callers_get_near_hits_and_read_their_writes(
    transport: Transport, memcached: Memcached, async_url: tuple[str, dict[str, Any]]
) -> None:
    configure_near(memcached, transport)
    url, options = async_url

    async def main() -> None:
        engine = create_async_engine(url, **options)
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        try:
            async with sessions() as s:
                await aget_user(s, 1)
            reads = Reads(memcached)
            async with sessions() as s:
                user = await aget_user(s, 1)
                assert user is not None and user in s
                assert user.name == "user-1"  # loaded: no I/O
            assert (reads.local, reads.looked_up) == (1, 0)
            for name in ("first", "second"):
                async with sessions() as s:
                    await arename_user(s, 1, name)
                async with sessions() as s:  # the very next read: evicted before commit returned
                    user = await aget_user(s, 1)
                    assert user is not None and user.name == name
                async with sessions() as s:
                    user = await aget_user(s, 1)
                    assert user is not None and user.name == name
        finally:
            await cachedecor.aclose()
            await engine.dispose()

    asyncio.run(main())


def test_an_async_process_evicts_another_process_s_write(
    transport: Transport, memcached: Memcached, users: Engine, launch: Any
) -> None:
    configure_near(memcached, transport)
    writer = launch()
    schema = users.info["schema"]  # type: ignore[attr-defined]
    url = users.url.set(drivername="postgresql+asyncpg")

    async def main() -> list[str]:
        engine = create_async_engine(url, connect_args={"server_settings": {"search_path": schema}})
        sessions = async_sessionmaker(engine, expire_on_commit=False)

        async def name() -> str:
            async with sessions() as s:
                user = await aget_user(s, 3)
                assert user is not None
                return user.name

        try:
            await name()
            assert await name() == "user-3"
            local = counter("local_hits")
            assert local >= 1
            heard = listener().received
            await asyncio.to_thread(writer, "rename", id=3, name="renamed")
            deadline = time.monotonic() + 10
            while listener().received == heard and time.monotonic() < deadline:
                await asyncio.sleep(0.002)  # polling the listener's counter, not a fixed wait
            return [await name() for _ in range(10)]
        finally:
            await cachedecor.aclose()
            await engine.dispose()

    assert asyncio.run(main()) == ["renamed"] * 10


# -- 9. configuration ------------------------------------------------------------------


def test_a_near_cache_needs_a_broadcast(memcached: Memcached) -> None:
    with pytest.raises(ConfigError, match=r"default\.local_entries.*broadcast_url"):
        cachedecor.configure_regions(memcached_config(memcached.url, local_entries=100))
    assert broadcast.current() is None
    with pytest.raises(cachedecor.RegionNotConfigured):  # nothing was configured
        region_settings("default")


def test_the_flat_form_names_the_missing_broadcast(memcached: Memcached) -> None:
    settings = {
        "cachedecor.regions": "default",
        "cachedecor.default.backend": "cachedecor.pymemcache",
        "cachedecor.default.arguments.url": memcached.url,
        "cachedecor.default.local_entries": "10",
    }
    with pytest.raises(ConfigError, match=r"cachedecor\.default\.local_entries.*cachedecor\.broadcast_url"):
        cachedecor.configure_regions(settings)


@pytest.mark.parametrize(
    "url",
    ["memcached://127.0.0.1:11211", "sqlite:///near.db", "mysql://u@h/db", "not a url", "127.0.0.1:6379"],
)
def test_a_broadcast_url_is_postgresql_or_redis(memcached: Memcached, url: str) -> None:
    config = memcached_config(memcached.url, local_entries=100)
    config["broadcast_url"] = url
    with pytest.raises(
        ConfigError, match=r"broadcast_url: expected a postgresql:// URL .* or a redis:// URL"
    ):
        cachedecor.configure_regions(config)
    assert broadcast.current() is None


@pytest.mark.parametrize(
    "urls",
    [
        "redis://127.0.0.1:6379/6, redis://127.0.0.1:6379/7",
        ["postgresql://postgres@127.0.0.1/test", "postgresql+psycopg://postgres@127.0.0.1/other"],
    ],
)
def test_a_broadcast_names_one_url_per_transport(memcached: Memcached, urls: Any) -> None:
    config = memcached_config(memcached.url, local_entries=100)
    config["broadcast_url"] = urls
    with pytest.raises(ConfigError, match=r"broadcast_url: at most one URL per transport"):
        cachedecor.configure_regions(config)
    assert broadcast.current() is None


@pytest.mark.parametrize("urls", [",", [], [42], 42])
def test_a_broadcast_url_list_holds_urls(memcached: Memcached, urls: Any) -> None:
    config = memcached_config(memcached.url, local_entries=100)
    config["broadcast_url"] = urls
    with pytest.raises(ConfigError, match=r"broadcast_url: expected a"):
        cachedecor.configure_regions(config)
    assert broadcast.current() is None


@pytest.mark.parametrize("channel", ["", "with space", "dash-ed", "1starts_with_a_digit", "x" * 64, 'q"uote'])
def test_a_bad_channel_name_is_refused(memcached: Memcached, channel: str) -> None:
    config = memcached_config(memcached.url, local_entries=100)
    config["broadcast_url"] = "redis://127.0.0.1:6379/6"
    config["broadcast_channel"] = channel
    with pytest.raises(ConfigError, match="broadcast_channel: expected letters, digits and '_'"):
        cachedecor.configure_regions(config)
    assert broadcast.current() is None


def test_a_channel_without_a_url_is_refused(memcached: Memcached) -> None:
    config = memcached_config(memcached.url)
    config["broadcast_channel"] = "mine"
    with pytest.raises(ConfigError, match=r"broadcast_channel: set .*broadcast_url too"):
        cachedecor.configure_regions(config)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("local_entries", -1),
        ("local_entries", "many"),
        ("local_ttl", 0),
        ("local_ttl", -1),
        ("local_max_bytes", 1023),
    ],
)
def test_near_cache_options_are_checked(memcached: Memcached, option: str, value: Any) -> None:
    config = memcached_config(memcached.url, **{"local_entries": 100, option: value})
    config["broadcast_url"] = "redis://127.0.0.1:6379/6"
    with pytest.raises(ConfigError, match=rf"default\.{option}"):
        cachedecor.configure_regions(config)
    assert broadcast.current() is None


def test_options_from_an_ini_file(memcached: Memcached, transport: Transport, tmp_path: Path) -> None:
    ini = tmp_path / "near.ini"
    ini.write_text(
        f"[cachedecor]\nregions = default\nbroadcast_url = {transport.url}\n"
        f"broadcast_channel = {transport.channel}\n\n"
        f"[cachedecor.default]\nbackend = dogpile.cache.pymemcache\narguments.url = {memcached.url}\n"
        "local_entries = 7\nlocal_ttl = 1.5\nlocal_max_bytes = 4096\n"
    )
    cachedecor.configure_regions(ini)
    cache = near()
    assert (cache.max_entries, cache.ttl, cache.max_bytes) == (7, 1.5, 4096)
    assert listener().channel == transport.channel
    assert listener().kinds == transport.kinds
    assert listener().connected.wait(10)


def test_a_region_without_local_entries_has_no_near_cache(memcached: Memcached, transport: Transport) -> None:
    config = memcached_config(memcached.url)
    config["broadcast_url"] = transport.url
    config["broadcast_channel"] = transport.channel
    cachedecor.configure_regions(config)
    assert region_settings("default").near is None
