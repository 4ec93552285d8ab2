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
import gc
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import broadcast, near
from tests.conftest import memcached_config, wait_until
from tests.servers import Memcached, unavailable, wait_for_port
from tests.test_async_faults import RedisServer, Ticker
from tests.test_near import arename_user, get_user, rename_user, seed

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


# -- the near cache after the broadcast server is back ---------------------------------


class BusyReader:
    """A thread reading one row about every millisecond, as a busy process's threads do."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.reads = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with Session(self.engine) as s:
                    get_user(s, 1)
                self.reads += 1
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
                return
            time.sleep(0.001)

    def __enter__(self) -> BusyReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self.errors, self.errors


def near_hits() -> int:
    return int(cachedecor.stats("default")["default"]["local_hits"])


def near_again_within(seconds: float) -> bool:
    """Whether this process serves near hits again within ``seconds`` (polled)."""
    before = near_hits()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if near_hits() >= before + 10:
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("fault", ["restart", "pause"])
def test_a_busy_reader_uses_its_near_cache_again_once_the_broadcast_server_is_back(
    memcached: Memcached, users: Engine, redis_broadcast: RestartableRedis, fault: str
) -> None:
    """Deaf while the server is away (killed, or paused until the listener noticed);
    near hits again within a second of it being back (measured here: 0.02-0.25 s after
    a restart or a pause, with redis-py 5.0 to 8.2), while a thread keeps reading."""
    sender = configure(memcached, redis_broadcast)
    with BusyReader(users) as reader:
        assert near_again_within(5.0), "the busy reader never served a near hit"
        if fault == "restart":
            redis_broadcast.kill()
            wait_until(lambda: not sender.connected.is_set())
            assert not near_again_within(0.5)  # deaf (every read remote) while it is away
            redis_broadcast.restart()
        else:
            redis_broadcast.pause()
            wait_until(lambda: not sender.connected.is_set())  # noticed: deaf
            assert not near_again_within(0.3)
            redis_broadcast.resume()
        back = time.monotonic()
        assert near_again_within(1.0), (
            f"no near hit {time.monotonic() - back:.1f}s after the server came back "
            f"(lost {sender.lost}, connected {sender.connected.is_set()}, reads {reader.reads})"
        )


def test_a_listener_whose_client_moved_its_subscription_to_another_socket_reconnects(
    memcached: Memcached, users: Engine, redis_broadcast: RestartableRedis
) -> None:
    """redis-py reconnects a subscription by itself (``can_read()`` connects a connection
    whose socket is gone; its retry reconnects after a failed read or ping, e.g. the
    ``LOADING`` answer of a server restarting with a dataset), on a new socket the
    listener's Ear, its cutter and the reads' epoll set know nothing of. The listener
    must notice and reconnect through its own path: with the old number closed, every
    wait returned at once and every look found it "unread" (POLLNVAL), so a busy process
    read everything remotely for good, while it counted as connected.

    Fault injection (a real server cannot choose which socket the client reconnects
    on): the test disconnects the listener's connection itself, as redis-py's retry does,
    and holds the freed number with a socket of its own until the client has
    reconnected on another one, then closes it."""
    sender = configure(memcached, redis_broadcast)
    with BusyReader(users):
        assert near_again_within(5.0), "the busy reader never served a near hit"
        (pubsub,) = [
            o for o in gc.get_objects() if isinstance(o, redis.client.PubSub) and o.connection is not None
        ]
        old = pubsub.connection._sock
        number = old.fileno()
        lost = sender.lost
        pubsub.connection.disconnect()  # as redis-py's retry does before reconnecting
        holder = socket.socket()  # takes the freed number
        try:
            assert holder.fileno() == number
            wait_until(lambda: sender.lost > lost or pubsub.connection._sock not in (None, old), timeout=5)
        finally:
            holder.close()  # the number is now no file at all
        back = time.monotonic()
        assert near_again_within(1.0), (
            f"no near hit {time.monotonic() - back:.1f}s after the client moved the subscription "
            f"(lost {sender.lost}, connected {sender.connected.is_set()})"
        )
        assert sender.lost == lost + 1  # reconnected through the listener's own path


def test_a_listener_cut_never_shuts_down_another_socket_given_its_number() -> None:
    """The cut of a listener whose socket was closed meanwhile (and its number given to
    another socket of the process: a connection of the application's) does nothing."""
    mine, peer = socket.socketpair()
    cut = broadcast._cutter(mine.fileno())
    number = mine.fileno()
    mine.close()
    other, other_peer = socket.socketpair()
    try:
        assert other.fileno() == number
        cut()
        other.sendall(b"x")
        assert other_peer.recv(1) == b"x"
    finally:
        for s in (peer, other, other_peer):
            s.close()


def test_a_listener_waiting_on_a_closed_socket_raises_instead_of_spinning() -> None:
    """A number that is no file any more polls as POLLNVAL at once: the wait raises (the
    listener reconnects) instead of reporting an arrival on every call."""
    ear = near.Ear()
    sock = socket.socket()
    ear.fd = sock.fileno()
    sock.close()
    with pytest.raises(ConnectionError):
        ear.wait(0.05)
