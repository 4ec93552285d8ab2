"""Race harness: do concurrent readers and writers leave stale rows in the cache?

Starts N reader and M writer processes against PostgreSQL and a cache server, three
times in one run:

* ``naive``: the common cache-aside pattern (get; on a miss read the database and
  set; writers commit then delete), the baseline;
* ``cachedecor``: cachedecor's decorators, each process configuring its own regions;
* ``forked``: cachedecor's decorators in processes forked from the harness after it
  has read every row through the cache, keeping the regions (and the connections)
  it had, as gunicorn ``--preload`` and Celery prefork workers do.

Readers pause a random 0..--max-pause-ms between their database read and their
cache write, as a busy application server does. cachedecor's readers also check
that each row they get has the primary key they asked for (``wrong``). When all
processes have stopped, every cached entry is compared with the database.

    python benchmarks/race.py --backend memcached --seconds 20

The baseline should show stale entries (proof that the harness can see them);
cachedecor must show no stale entry and no wrong row, forked or not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cachedecor
from cachedecor.config import region_settings


class Base(DeclarativeBase):
    pass


class RaceRow(Base):
    __tablename__ = "cachedecor_race_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(Integer, default=0)
    payload: Mapped[str] = mapped_column(String(200), default="")


MAX_PAUSE = 0.002
#: naive cache-aside; cachedecor in fresh processes; cachedecor in processes forked after use.
VARIANTS = ("naive", "cachedecor", "forked")


@cachedecor.cached_by_pk(RaceRow, region="race")
def read_row(session: Session, row_id: int) -> RaceRow | None:
    row = session.get(RaceRow, row_id)
    if row is not None:
        row.version  # noqa: B018 - loaded
        time.sleep(random.uniform(0, MAX_PAUSE))  # between the database read and the fill
    return row


@cachedecor.invalidates(RaceRow)
def bump_row(session: Session, row_id: int) -> None:
    row = session.get(RaceRow, row_id)
    assert row is not None
    row.version += 1
    session.commit()


# -- the cache the baseline talks to, directly -----------------------------------------


class NaiveCache:
    def __init__(self, backend: str, url: str) -> None:
        if backend == "memcached":
            from pymemcache.client.base import Client

            host, port = url.rsplit(":", 1)
            self.client: Any = Client((host, int(port)), no_delay=True, default_noreply=False)
        else:
            import redis

            self.client = redis.Redis.from_url(url)

    def get(self, key: str) -> int | None:
        value = self.client.get(key)
        return None if value is None else int(value)

    def set(self, key: str, version: int) -> None:
        self.client.set(key, str(version).encode())

    def delete(self, key: str) -> None:
        self.client.delete(key)


def naive_key(row_id: int) -> str:
    return f"race-naive:{row_id}"


# -- processes ------------------------------------------------------------------------


@dataclass
class Options:
    backend: str
    cache_url: str
    database: str
    readers: int
    writers: int
    rows: int
    seconds: float
    max_pause_ms: float


def region_config(opts: Options) -> dict[str, Any]:
    if opts.backend == "memcached":
        region = {"backend": "cachedecor.pymemcache", "arguments": {"url": [opts.cache_url]}}
    else:
        region = {"backend": "dogpile.cache.redis", "arguments": {"url": opts.cache_url}}
    return {"regions": {"race": {**region, "expiration_time": 3600, "lease_wait": 0.05}}}


def reader(opts: Options, variant: str, deadline: float) -> dict[str, int]:
    global MAX_PAUSE
    MAX_PAUSE = opts.max_pause_ms / 1000
    rng = random.Random(os.getpid())
    engine = sqlalchemy.create_engine(opts.database)
    reads = wrong = 0
    if variant != "naive":
        if variant == "cachedecor":
            cachedecor.configure_regions(region_config(opts))
        while time.monotonic() < deadline:
            row_id = rng.randrange(opts.rows)
            with Session(engine) as s:
                row = read_row(s, row_id)
                wrong += row is None or row.id != row_id
            reads += 1
    else:
        cache = NaiveCache(opts.backend, opts.cache_url)
        while time.monotonic() < deadline:
            row_id = rng.randrange(opts.rows)
            if cache.get(naive_key(row_id)) is None:
                with Session(engine) as s:
                    version = s.get(RaceRow, row_id).version  # type: ignore[union-attr]
                time.sleep(rng.uniform(0, MAX_PAUSE))
                cache.set(naive_key(row_id), version)
            reads += 1
    return {"reads": reads, "wrong": wrong}


def writer(opts: Options, variant: str, deadline: float) -> dict[str, int]:
    rng = random.Random(os.getpid() * 7)
    engine = sqlalchemy.create_engine(opts.database)
    writes = 0
    if variant != "naive":
        if variant == "cachedecor":
            cachedecor.configure_regions(region_config(opts))
        while time.monotonic() < deadline:
            with Session(engine) as s:
                bump_row(s, rng.randrange(opts.rows))
            writes += 1
    else:
        cache = NaiveCache(opts.backend, opts.cache_url)
        while time.monotonic() < deadline:
            row_id = rng.randrange(opts.rows)
            with Session(engine) as s:
                row = s.get(RaceRow, row_id)
                assert row is not None
                row.version += 1
                s.commit()
            cache.delete(naive_key(row_id))
            writes += 1
    return {"writes": writes}


def start(target: Callable[..., dict[str, int]], *args: Any) -> tuple[int, int]:
    """Fork a process that runs ``target(*args)``; returns its pid and the pipe of its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_fd)
            data = json.dumps(target(*args)).encode()
            while data:
                data = data[os.write(write_fd, data) :]
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write_fd)
    return pid, read_fd


def finish(pid: int, fd: int, deadline: float) -> dict[str, int]:
    """The result of a process :func:`start` forked, once it has exited."""
    data = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise RuntimeError(f"process {pid} did not finish in time")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"process {pid} failed with exit code {os.waitstatus_to_exitcode(status)}")
    result: dict[str, int] = json.loads(data)
    return result


# -- one variant ----------------------------------------------------------------------


def reset_rows(opts: Options) -> None:
    engine = sqlalchemy.create_engine(opts.database)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all(RaceRow(id=i, version=0, payload="x" * 50) for i in range(opts.rows))
        s.commit()
    engine.dispose()


def db_versions(opts: Options) -> dict[int, int]:
    engine = sqlalchemy.create_engine(opts.database)
    with Session(engine) as s:
        versions = {r.id: r.version for r in s.query(RaceRow)}
    engine.dispose()
    return versions


def cached_versions(opts: Options, variant: str) -> dict[int, int]:
    if variant == "naive":
        cache = NaiveCache(opts.backend, opts.cache_url)
        return {i: v for i in range(opts.rows) if (v := cache.get(naive_key(i))) is not None}
    cachedecor.configure_regions(region_config(opts))
    settings = region_settings("race")
    version_at = [p.key for p in RaceRow.__mapper__.column_attrs].index("version")
    out = {}
    for i in range(opts.rows):
        key = read_row.cache_key(i)
        data = settings.store.get(key)
        if not data or data[:2] == b"\x00L":  # absent, a lease marker or a meta placeholder
            continue
        payload = settings.codec.decode(key, data)
        out[i] = payload[3][version_at]
    return out


def clear_cache(opts: Options, variant: str) -> None:
    if variant == "naive":
        cache = NaiveCache(opts.backend, opts.cache_url)
        for i in range(opts.rows):
            cache.delete(naive_key(i))
    else:
        cachedecor.configure_regions(region_config(opts))
        cachedecor.invalidate_many(RaceRow, range(opts.rows))


def warm_up(opts: Options) -> None:
    """Read every row through the cache in this process, as a preloading server does."""
    engine = sqlalchemy.create_engine(opts.database)
    for i in range(opts.rows):
        with Session(engine) as s:
            read_row(s, i)
    engine.dispose()


@dataclass
class Result:
    backend: str
    variant: str
    reads: int
    writes: int
    cached: int
    stale: int
    wrong: int | None
    """Rows returned for another primary key than the one asked for (None: not checked)."""


def run_variant(opts: Options, variant: str) -> Result:
    reset_rows(opts)
    clear_cache(opts, variant)
    if variant == "forked":
        warm_up(opts)
    deadline = time.monotonic() + opts.seconds
    procs = [start(reader, opts, variant, deadline) for _ in range(opts.readers)]
    procs += [start(writer, opts, variant, deadline) for _ in range(opts.writers)]
    totals: Counter[str] = Counter()
    for pid, fd in procs:
        totals.update(finish(pid, fd, deadline + 60))
    truth = db_versions(opts)
    cached = cached_versions(opts, variant)
    stale = sum(1 for i, v in cached.items() if v != truth[i])
    wrong = None if variant == "naive" else totals["wrong"]
    return Result(opts.backend, variant, totals["reads"], totals["writes"], len(cached), stale, wrong)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["memcached", "redis", "both"], default="both")
    parser.add_argument("--memcached", default=None, help="HOST:PORT (default: start one)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--database", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-pause-ms", type=float, default=2.0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    server = None
    memcached_url = args.memcached
    backends = ["memcached", "redis"] if args.backend == "both" else [args.backend]
    if "memcached" in backends and memcached_url is None:
        from tests.servers import Memcached

        server = Memcached(threads=4)
        memcached_url = server.url
    results: list[Result] = []
    try:
        for backend in backends:
            url = memcached_url if backend == "memcached" else args.redis
            opts = Options(
                backend,
                url,
                args.database,
                args.readers,
                args.writers,
                args.rows,
                args.seconds,
                args.max_pause_ms,
            )
            for variant in VARIANTS:
                results.append(run_variant(opts, variant))
                r = results[-1]
                wrong = "" if r.wrong is None else f", {r.wrong} wrong rows"
                print(
                    f"  {r.backend:<10} {r.variant:<11} done: {r.stale} stale of {r.cached} cached{wrong}",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()
    print()
    print(
        f"{'backend':<10} {'pattern':<11} {'reads':>8} {'writes':>7} {'cached':>7} {'stale':>6} {'wrong':>6}"
        f"   ({args.readers} readers, {args.writers} writers, {args.rows} rows, {args.seconds:g}s,"
        f" pause 0-{args.max_pause_ms:g} ms)"
    )
    for r in results:
        wrong = "-" if r.wrong is None else str(r.wrong)
        counts = f"{r.reads:>8} {r.writes:>7} {r.cached:>7} {r.stale:>6} {wrong:>6}"
        print(f"{r.backend:<10} {r.variant:<11} {counts}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=2)
    bad = [r for r in results if r.variant != "naive" and (r.stale or r.wrong)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
