"""What a caller sees when the cache fails: latency, result and counters, per fault.

Starts its own memcached processes and a SQLite database, configures a region
with ``timeout`` and ``connect_timeout`` of 0.2 s, and for each fault makes a
series of decorated reads, printing the median and slowest call, whether every
call returned the right row, and what the region's counters said.

    python benchmarks/faults.py
"""

from __future__ import annotations

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
from sqlalchemy.orm import Session

import cachedecor
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


def run(
    engine: sqlalchemy.engine.Engine, name: str, prepare: Callable[[], Any], cleanup: Callable[[], Any]
) -> None:
    prepare()
    cachedecor.reset_stats()
    times = []
    right = 0
    for i in range(CALLS):
        start = time.perf_counter()
        with Session(engine) as s:
            user = get_user(s, 1 + i % 5)
        times.append(time.perf_counter() - start)
        right += user is not None and user.id == 1 + i % 5
    cleanup()
    c = cachedecor.stats("default")["default"]
    counters = ", ".join(f"{k}={v}" for k, v in c.items() if v)
    print(
        f"{name:<38} {right:>3}/{CALLS} right  median {statistics.median(times) * 1000:7.2f} ms"
        f"  slowest {max(times) * 1000:7.1f} ms  | {counters}"
    )


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="cachedecor-faults-")
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}/faults.sqlite")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all(User(id=i, name=f"user{i}") for i in range(1, 6))
        s.commit()
    server = Memcached()

    def fill() -> None:
        configure(server.url)
        for i in range(1, 6):
            with Session(engine) as s:
                get_user(s, i)

    print(f"{CALLS} reads of 5 rows per fault; timeout = connect_timeout = {TIMEOUT}s, dead_timeout = 5s\n")
    try:
        run(engine, "healthy server", fill, lambda: None)
        run(engine, "server killed (SIGKILL)", lambda: (fill(), server.kill()), server.start)
        run(engine, "server paused (SIGSTOP)", lambda: (fill(), server.pause()), server.resume)
        run(engine, "server restarted on the same port", lambda: (fill(), server.restart()), lambda: None)
        port = free_port()
        run(engine, "nothing listening on the port", lambda: configure(f"127.0.0.1:{port}"), lambda: None)
        with fake_server() as url:
            run(engine, "accepts connections, never answers", lambda: configure(url), lambda: None)

        def garbage() -> None:
            fill()
            raw = Client(("127.0.0.1", server.port))
            for i in range(1, 6):
                raw.set(get_user.cache_key(i), b"\x01\x00garbage", noreply=False)

        run(engine, "garbage entries", garbage, lambda: None)

        def oversized() -> None:
            configure(server.url, region_options={"max_entry_size": 8})
            for i in range(1, 6):
                get_user.invalidate(i)

        run(engine, "entries over max_entry_size", oversized, lambda: None)

        def paused_write() -> None:
            fill()
            server.pause()
            with Session(engine) as s:
                get_user(s, 2)  # times out: node marked down
            server.resume()
            with Session(engine) as s:
                rename(s, 1, "renamed while down")

        run(engine, "invalidation queued while down", paused_write, lambda: None)
        with Session(engine) as s:
            print(f"\nafter the queued invalidation, row 1 reads back as {get_user(s, 1).name!r}")  # type: ignore[union-attr]
    finally:
        server.stop()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
