"""A broadcast server that falls silent or goes away costs commits at most one timeout,
never blocks an event loop, and the near cache is used again once it is back.

Every test runs a ``redis-server`` of its own on a free port, which it pauses
(SIGSTOP: a host that stops answering without closing its connections), resumes
(SIGCONT), kills and restarts on the same port. The remote cache is memcached and the
rows are in PostgreSQL (read by psycopg, or by asyncpg for the async commits). No fake
stands in for a server.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import broadcast
from tests.conftest import memcached_config, wait_until
from tests.servers import Memcached, unavailable, wait_for_port
from tests.test_async_faults import RedisServer, Ticker
from tests.test_near import arename_user, rename_user, seed

#: the socket timeout of the broadcast's Redis connections (``cachedecor.broadcast``)
BROADCAST_TIMEOUT = 2.0


class RestartableRedis(RedisServer):
    """:class:`~tests.test_async_faults.RedisServer` that can also be killed and started
    again on the same port."""

    def kill(self) -> None:
        self.stop()

    def restart(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)


@pytest.fixture
def redis_broadcast() -> Iterator[RestartableRedis]:
    """A Redis of the test's own, carrying the broadcast only."""
    server = RestartableRedis()
    yield server
    cachedecor.reset()  # the listener and publisher leave before the server does
    server.stop()


@pytest.fixture
def users(pg_engine: Engine) -> Engine:
    seed(pg_engine)
    return pg_engine


def configure(memcached: Memcached, server: RedisServer) -> broadcast.Broadcast:
    """Region ``default`` on ``memcached`` with a near cache, broadcast on ``server`` alone;
    returns once the listener is connected."""
    config = memcached_config(memcached.url, local_entries=100, local_ttl=60)
    config["broadcast_url"] = server.url
    cachedecor.configure_regions(config)
    sender = broadcast.current()
    assert sender is not None
    assert sender.connected.wait(10), "the broadcast listener did not connect"
    return sender


def rename(engine: Engine, user_id: int, name: str) -> float:
    """Commit a rename of an ``@invalidates`` function; how long the call took."""
    start = time.monotonic()
    with Session(engine) as s:
        rename_user(s, user_id, name)
    return time.monotonic() - start


# -- commits while the broadcast server is silent --------------------------------------


def test_sync_commits_pay_at_most_one_timeout_while_the_broadcast_server_is_silent(
    memcached: Memcached, users: Engine, redis_broadcast: RestartableRedis
) -> None:
    """The first commit may wait for one socket timeout; later ones hand the message to
    the publisher thread at once, until it has sent one again. Once the server is back,
    what was handed over is sent."""
    sender = configure(memcached, redis_broadcast)
    rename(users, 1, "warm")  # the committing threads' connection is open
    sent = sender.sent
    redis_broadcast.pause()
    try:
        took = [rename(users, 1, f"paused-{i}") for i in range(5)]
    finally:
        redis_broadcast.resume()
    assert sum(took) < BROADCAST_TIMEOUT + 1.0, took  # one timeout at most, in all
    assert sorted(took)[-2] < 0.5, took  # every commit but one returned at once
    wait_until(lambda: sender.sent >= sent + 4, timeout=20)  # the publisher thread sent them
    assert rename(users, 1, "back") < 0.5


def test_async_commits_never_block_the_loop_on_a_silent_broadcast_server(
    memcached: Memcached, users: Engine, redis_broadcast: RestartableRedis
) -> None:
    """An ``AsyncSession``'s commit hands its message to the publisher thread: not one
    commit waits for the paused server, and the loop keeps ticking."""
    sender = configure(memcached, redis_broadcast)
    schema = users.info["schema"]  # type: ignore[attr-defined]
    url = users.url.set(drivername="postgresql+asyncpg")
    sent = sender.sent

    async def main() -> tuple[list[float], float]:
        engine = create_async_engine(url, connect_args={"server_settings": {"search_path": schema}})
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        took: list[float] = []
        try:
            async with sessions() as s:
                await arename_user(s, 1, "warm")  # connections open
            redis_broadcast.pause()
            try:
                async with Ticker() as ticker:
                    for i in range(3):
                        start = time.monotonic()
                        async with sessions() as s:
                            await arename_user(s, 1, f"paused-{i}")
                        took.append(time.monotonic() - start)
            finally:
                redis_broadcast.resume()
            return took, ticker.longest
        finally:
            await cachedecor.aclose()
            await engine.dispose()

    took, longest = asyncio.run(main())
    assert max(took) < 0.5, took
    assert longest < 0.5, longest  # a publish on the loop's thread would stall it 2 s
    wait_until(lambda: sender.sent >= sent + 4, timeout=20)
