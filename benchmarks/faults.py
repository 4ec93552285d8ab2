"""What a caller sees when the cache fails: latency, result and counters, per fault.

Starts its own memcached processes and a SQLite database, configures a region
with ``timeout`` and ``connect_timeout`` of 0.2 s, and for each fault makes a
series of decorated reads, printing the median and slowest call, whether every
call returned the right row, and what the region's counters said.

Then the same faults for async callers: ``async def`` functions on an
``AsyncSession`` (aiosqlite), the same number of reads made by concurrent tasks of
one event loop, beside a ticker task that sleeps 5 ms in a loop. Its longest gap
between two wake-ups ("loop stall") is how long the loop was kept from running
anything else; a call that blocked the loop on a socket would show there whole.

    python benchmarks/faults.py
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sqlalchemy
from pymemcache.client.base import Client
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor.config import configured_regions
from tests.models import Base, User
from tests.servers import Memcached, fake_server, free_port

TIMEOUT = 0.2
CALLS = 40


@cachedecor.cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cachedecor.invalidates(User)
def rename(session: Session, user_id: int, name: str) -> None:
    session.get(User, user_id).name = name  # type: ignore[union-attr]
    session.commit()


def configure(url: str, region_options: dict[str, Any] | None = None) -> None:
    cachedecor.configure_regions(
        {
            "regions": {
                "default": {
                    "backend": "cachedecor.pymemcache",
                    "arguments": {"url": [url], "timeout": TIMEOUT, "connect_timeout": TIMEOUT},
                    **(region_options or {}),
                }
            }
        }
    )


#: async callers: this many tasks share the CALLS reads
TASKS = 4


@cachedecor.cached_by_pk(User)
async def aget_user(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


@cachedecor.invalidates(User)
async def arename(session: AsyncSession, user_id: int, name: str) -> None:
    (await session.get(User, user_id)).name = name  # type: ignore[union-attr]
    await session.commit()


class Fault:
    """One kind of failure: how to configure the region, and what to do to the cache
    after filling it (``None``: do not fill). ``write_while_down``: make the node
    time out once (so it is marked down), then commit a rename of row 1 while it is
    down, before the reads. ``uncached``: the reads do not use the cache (the
    database's own cost, for comparison)."""

    def __init__(
        self,
        name: str,
        configure: Callable[[], Any],
        then: Callable[[], Any] | None = None,
        cleanup: Callable[[], Any] = lambda: None,
        *,
        write_while_down: bool = False,
        uncached: bool = False,
    ) -> None:
        self.name = name
        self.configure = configure
        self.then = then
        self.cleanup = cleanup
        self.write_while_down = write_while_down
        self.uncached = uncached


def report(name: str, right: int, times: list[float], stall: float | None) -> None:
    c = cachedecor.stats("default")["default"]
    counters = ", ".join(f"{k}={v}" for k, v in c.items() if v)
    loop = f"  stall {stall * 1000:6.1f} ms" if stall is not None else ""
    print(
        f"{name:<38} {right:>3}/{CALLS} right  median {statistics.median(times) * 1000:7.2f} ms"
        f"  slowest {max(times) * 1000:7.1f} ms{loop}  | {counters}"
    )


def run(engine: sqlalchemy.engine.Engine, fault: Fault, server: Memcached) -> None:
    fault.configure()
    if fault.then is not None:
        for i in range(1, 6):
            with Session(engine) as s:
                get_user(s, i)
        fault.then()
    if fault.write_while_down:
        server.pause()
        with Session(engine) as s:
            get_user(s, 2)  # times out: node marked down
        server.resume()
        with Session(engine) as s:
            rename(s, 1, "renamed while down")
    cachedecor.reset_stats()
    times = []
    right = 0
    call = get_user.uncached if fault.uncached else get_user
    for i in range(CALLS):
        start = time.perf_counter()
        with Session(engine) as s:
            user = call(s, 1 + i % 5)
        times.append(time.perf_counter() - start)
        right += user is not None and user.id == 1 + i % 5
    fault.cleanup()
    report(fault.name, right, times, None)


async def arun(url: str, fault: Fault, server: Memcached) -> None:
    engine = create_async_engine(url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    fault.configure()
    gaps: list[float] = []
    times: list[float] = []
    right = 0

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.005)
            gaps.append(loop.time() - start)

    call = aget_user.uncached if fault.uncached else aget_user

    async def reader(task: int) -> None:
        nonlocal right
        for i in range(task, CALLS, TASKS):
            start = time.perf_counter()
            async with sessions() as s:
                user = await call(s, 1 + i % 5)
            times.append(time.perf_counter() - start)
            right += user is not None and user.id == 1 + i % 5

    try:
        if fault.then is not None:
            for i in range(1, 6):
                async with sessions() as s:
                    await aget_user(s, i)
            fault.then()
        ticker = asyncio.create_task(tick())
        if fault.write_while_down:
            server.pause()
            async with sessions() as s:
                await aget_user(s, 2)  # times out: node marked down
            server.resume()
            async with sessions() as s:
                await arename(s, 1, "renamed while down")
        cachedecor.reset_stats()
        await asyncio.gather(*(reader(t) for t in range(TASKS)))
        ticker.cancel()
        fault.cleanup()
        report(fault.name, right, times, max(gaps))
    finally:
        for settings in configured_regions().values():
            astore: Any = settings.astore
            if hasattr(astore, "cluster"):
                await astore.cluster.aclose()
        await engine.dispose()


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="cachedecor-faults-")
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}/faults.sqlite")
    Base.metadata.create_all(engine)

    def reset_rows() -> None:
        with Session(engine) as s:
            s.execute(sqlalchemy.delete(User))
            s.add_all(User(id=i, name=f"user{i}") for i in range(1, 6))
            s.commit()

    server = Memcached()
    port = free_port()

    def on_server(**options: Any) -> Callable[[], None]:
        return lambda: configure(server.url, region_options=options or None)

    def garbage() -> None:
        raw = Client(("127.0.0.1", server.port))
        for i in range(1, 6):
            raw.set(get_user.cache_key(i), b"\x01\x00garbage", noreply=False)
        raw.close()

    def invalidate_all() -> None:
        for i in range(1, 6):
            get_user.invalidate(i)

    try:
        with fake_server() as silent:
            faults = [
                Fault("no cache call (database only)", on_server(), uncached=True),
                Fault("healthy server", on_server(), lambda: None),
                Fault("server killed (SIGKILL)", on_server(), server.kill, server.start),
                Fault("server paused (SIGSTOP)", on_server(), server.pause, server.resume),
                Fault("server restarted on the same port", on_server(), server.restart),
                Fault("nothing listening on the port", lambda: configure(f"127.0.0.1:{port}")),
                Fault("accepts connections, never answers", lambda: configure(silent)),
                Fault("garbage entries", on_server(), garbage),
                Fault("entries over max_entry_size", on_server(max_entry_size=8), invalidate_all),
                Fault("invalidation queued while down", on_server(), lambda: None, write_while_down=True),
            ]
            print(
                f"{CALLS} reads of 5 rows per fault; timeout = connect_timeout = {TIMEOUT}s, "
                "dead_timeout = 5s\n\nsync callers, one after the other:"
            )
            for fault in faults:
                reset_rows()
                run(engine, fault, server)
            with Session(engine) as s:
                print(f"after the queued invalidation, row 1 reads back as {get_user(s, 1).name!r}")  # type: ignore[union-attr]
            cachedecor.reset()
            print(f"\nasync callers, {TASKS} concurrent tasks of one event loop beside a 5 ms ticker:")
            url = f"sqlite+aiosqlite:///{tmp}/faults.sqlite"
            for fault in faults:
                reset_rows()
                asyncio.run(arun(url, fault, server))

            async def read_back() -> str:
                engine = create_async_engine(url)
                try:
                    async with AsyncSession(engine) as s:
                        return (await aget_user(s, 1)).name  # type: ignore[union-attr]
                finally:
                    await engine.dispose()

            print(f"after the queued invalidation, row 1 reads back as {asyncio.run(read_back())!r}")
    finally:
        server.stop()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
