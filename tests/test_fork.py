"""A process forked after using the cache gets connections and pending work of its own.

Each test forks with ``os.fork()`` (as gunicorn ``--preload``, Celery prefork and
multiprocessing's ``fork`` do); the child reports through a pipe and leaves with
``os._exit``, never returning into pytest.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import random
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from sqlalchemy import select as sql_select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import _runtime
from cachedecor.backends import MemcachedStore, MemoryStore, NodeHealth, RedisStore
from cachedecor.config import region_settings
from tests.conftest import memcached_config, redis_available, redis_config, wait_until
from tests.models import User
from tests.servers import Memcached

ROWS = 200
stats_module = importlib.import_module("cachedecor.stats")  # the package exports a function of that name


@cachedecor.cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cachedecor.cached_by_pk(User, many=True)
def get_users(session: Session, user_ids: list[int]) -> list[User]:
    return list(session.scalars(sql_select(User).where(User.id.in_(user_ids))))


@cachedecor.cached_by_pk(User, region="local")
def get_user_locally(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cachedecor.invalidates(User)
def rename_user(session: Session, user_id: int, name: str) -> None:
    session.get(User, user_id).name = name  # type: ignore[union-attr]
    session.commit()


# -- forking ---------------------------------------------------------------------------


@dataclass
class Child:
    pid: int
    fd: int


def fork(work: Callable[[], Any]) -> Child:
    """Run ``work()`` in a forked child; :func:`result` returns what it returned."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            try:
                report = {"result": work()}
            except BaseException:
                report = {"error": traceback.format_exc()}
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(write_fd, data) :]
        finally:
            os._exit(0)
    os.close(write_fd)
    return Child(pid, read_fd)


def result(child: Child, timeout: float = 60.0) -> Any:
    """The child's report; fails if it raised, or did not finish within ``timeout``."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([child.fd], [], [], max(left, 0))
            if not ready:
                os.kill(child.pid, signal.SIGKILL)
                os.waitpid(child.pid, 0)
                pytest.fail(f"the forked child did not report within {timeout}s (deadlocked?)")
            chunk = os.read(child.fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(child.fd)
    _, status = os.waitpid(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    report = json.loads(b"".join(chunks))
    if "error" in report:
        pytest.fail(f"the forked child raised:\n{report['error']}")
    return report["result"]


def in_child(engine: Engine) -> None:
    """What a forked worker does first: leave the parent's database connections alone."""
    engine.dispose(close=False)


# -- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
def users(pg_engine: Engine) -> Engine:
    with Session(pg_engine) as s:
        s.add_all([User(id=i, name=f"user-{i}") for i in range(1, ROWS + 1)])
        s.commit()
    return pg_engine


def memcached_store() -> MemcachedStore:
    return cast(MemcachedStore, region_settings("default").store)


def local_port(server: Memcached) -> int:
    sock = memcached_store().client.clients[server.url].sock
    assert sock is not None
    port: int = sock.getsockname()[1]
    return port


def counters() -> dict[str, int]:
    return cachedecor.stats("default")["default"]


def right(user: User | None, want: int) -> bool:
    return user is not None and user.id == want and user.name == f"user-{want}"


def read_one(engine: Engine, user_id: int) -> User | None:
    with Session(engine) as s:
        return get_user(s, user_id)


# -- connections -----------------------------------------------------------------------


class TestConnections:
    def test_a_forked_child_talks_to_memcached_on_a_connection_of_its_own(
        self, memcached: Memcached, users: Engine
    ) -> None:
        cachedecor.configure_regions(memcached_config(memcached.url))
        read_one(users, 1)
        assert right(read_one(users, 1), 1)
        parent_port = local_port(memcached)

        def child() -> dict[str, Any]:
            in_child(users)
            before = dict(counters())
            row = read_one(users, 1)
            return {
                "port": local_port(memcached),
                "right": right(row, 1),
                "before": before,
                "after": counters(),
            }

        report = result(fork(child))
        assert report["port"] != parent_port
        assert report["right"]
        assert not any(report["before"].values()), "a child's counters start at zero"
        assert report["after"]["hits"] == 1
        # the child closed its copy only: the parent's connection still serves it
        hits = counters()["hits"]
        assert right(read_one(users, 1), 1)
        assert local_port(memcached) == parent_port
        assert counters()["hits"] == hits + 1

    def test_no_row_reaches_the_wrong_process_in_a_storm_of_forked_workers(
        self, memcached: Memcached, users: Engine
    ) -> None:
        cachedecor.configure_regions(memcached_config(memcached.url, arguments={"timeout": 2.0}))
        with Session(users) as s:
            assert [u.id for u in get_users(s, list(range(1, ROWS + 1)))] == list(range(1, ROWS + 1))

        def storm(seed: int, calls: int) -> dict[str, int]:
            rng = random.Random(seed)
            wrong = 0
            for n in range(calls):
                with Session(users) as s:
                    if n % 4 == 0:
                        ids = rng.sample(range(1, ROWS + 1), rng.randint(2, 8))
                        got = get_users(s, ids)
                        wrong += len(ids) - sum(right(u, i) for u, i in zip(got, ids, strict=False))
                    else:
                        want = rng.randint(1, ROWS)
                        wrong += not right(get_user(s, want), want)
                if n % 50 == 25:
                    get_user.invalidate(rng.randint(1, ROWS))  # keeps leases and fills in the mix
            return {"wrong": wrong, **counters()}

        def worker(seed: int) -> dict[str, int]:
            in_child(users)
            return storm(seed, 2000)

        children = [fork(functools.partial(worker, seed)) for seed in range(3)]
        mine = storm(99, 1000)
        reports = [result(c) for c in children]
        for report in [*reports, mine]:
            assert report["wrong"] == 0, report
            assert report["errors"] == 0, report
            assert report.get("mismatches", 0) == 0, report
            assert report["bad_entries"] == 0, report
        for report in reports:
            assert report["hits"] > 1000, report


# -- pending invalidations, breaker, locks ---------------------------------------------


class TestPerProcessState:
    def test_pending_invalidations_stay_with_the_parent_which_delivers_them(
        self, memcached_factory: Any, users: Engine
    ) -> None:
        server = memcached_factory()
        cachedecor.configure_regions(
            memcached_config(
                server.url,
                arguments={
                    "timeout": 0.3,
                    "dead_timeout": 0.1,
                    "invalidation_retry_interval": 60.0,  # the parent's reads deliver, not the thread
                },
            )
        )
        health = memcached_store().client.health
        assert right(read_one(users, 1), 1)
        server.pause()
        try:
            with Session(users) as s:
                rename_user(s, 1, "renamed")
            assert health.pending_count() == 1

            def child() -> dict[str, Any]:
                in_child(users)
                return {
                    "pending": health.pending_count(),
                    "owes": health.owes(server.url),
                    "retrier": health._retrier is not None,
                }

            report = result(fork(child))
        finally:
            server.resume()
        assert report == {"pending": 0, "owes": False, "retrier": False}
        assert health.pending_count() == 1

        def delivered() -> bool:
            user = read_one(users, 1)
            assert user is not None and user.name == "renamed"
            return health.pending_count() == 0

        wait_until(delivered)
        assert counters()["hits"] == 0, "the stale entry was deleted before any read"
        assert read_one(users, 1).name == "renamed"  # type: ignore[union-attr]
        assert counters()["hits"] == 1

    def test_locks_held_by_another_thread_at_fork_do_not_block_the_child(
        self, memcached: Memcached, users: Engine
    ) -> None:
        config = memcached_config(memcached.url)
        config["regions"]["local"] = {"backend": "dogpile.cache.memory"}
        cachedecor.configure_regions(config)
        health = memcached_store().client.health
        memory = cast(MemoryStore, region_settings("local").store)
        with Session(users) as s:
            get_user_locally(s, 1)
        holding = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with health._lock, memory.lock, _runtime.log_lock:
                holding.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert holding.wait(10)

            def child() -> dict[str, Any]:
                in_child(users)
                health.queue(memcached.url, ["some-key"])
                queued = health.pending_count()
                stats_module.log_failure("default", "a test", "child")
                with Session(users) as s:
                    local = get_user_locally(s, 2)
                    shared = get_user(s, 2)  # delivers the queued delete first
                return {
                    "pending": [queued, health.pending_count()],
                    "rows": [right(local, 2), right(shared, 2)],
                }

            report = result(fork(child), timeout=20)
        finally:
            release.set()
            holder.join()
        assert report == {"pending": [1, 0], "rows": [True, True]}
        assert health.pending_count() == 0


class TestNodeHealthAlone:
    def test_a_child_starts_with_every_node_up_and_nothing_queued(self) -> None:
        health = NodeHealth(dead_timeout=60)
        health.failed("a:1")
        health.queue("a:1", ["k1", "k2"])

        def child() -> dict[str, Any]:
            return {"down": health.down_nodes(), "pending": health.pending_count()}

        assert result(fork(child)) == {"down": [], "pending": 0}
        assert health.down_nodes() == ["a:1"] and health.pending_count() == 2


# -- Redis -----------------------------------------------------------------------------


@pytest.fixture
def redis_region() -> Iterator[RedisStore]:
    redis_available()
    # Redis is shared with other test runs: keys of their own keep their rows out
    cachedecor.configure_regions(redis_config(namespace=f"fork-test-{os.getpid()}"))
    yield cast(RedisStore, region_settings("default").store)


class TestRedis:
    def test_a_forked_child_reads_the_right_rows_on_a_connection_of_its_own(
        self, redis_region: RedisStore, users: Engine
    ) -> None:
        with Session(users) as s:
            get_users(s, list(range(1, 51)))
        parent_id = redis_region.reader.client_id()

        def child() -> dict[str, Any]:
            in_child(users)
            wrong = 0
            rng = random.Random(7)
            for n in range(300):
                with Session(users) as s:
                    if n % 3 == 0:
                        ids = rng.sample(range(1, 51), 5)
                        got = get_users(s, ids)
                        wrong += len(ids) - sum(right(u, i) for u, i in zip(got, ids, strict=False))
                    else:
                        want = rng.randint(1, 50)
                        wrong += not right(get_user(s, want), want)
            return {"wrong": wrong, "id": redis_region.reader.client_id(), **counters()}

        report = result(fork(child))
        assert report["wrong"] == 0
        assert report["errors"] == 0
        assert report["hits"] >= 300
        assert report["id"] != parent_id
        assert right(read_one(users, 3), 3)
        assert redis_region.reader.client_id() == parent_id
