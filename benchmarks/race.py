"""Race harness: do concurrent readers and writers leave stale rows in the cache?

Starts N reader and M writer processes against PostgreSQL and a cache server, three
times in one run:

* ``naive``: the common cache-aside pattern (get; on a miss read the database and
  set; writers commit then delete), the baseline;
* ``cachedecor``: cachedecor's decorators, each process configuring its own regions;
* ``forked``: cachedecor's decorators in processes forked from the harness after it
  has read every row through the cache, keeping the regions (and the connections)
  it had, as gunicorn ``--preload`` and Celery prefork workers do;
* ``mixed``: a rolling deploy. Half the readers and writers map the table with
  version 1 of the model, half with version 2 (one more column, another module);
  entries of one version are misses for the other. Its ``hit%`` against the
  ``cachedecor`` run is what a mixed-version window costs.

Readers pause a random 0..--max-pause-ms between their database read and their
cache write, as a busy application server does. cachedecor's readers also check
that each row they get has the primary key they asked for (``wrong``). When all
processes have stopped, every cached entry is compared with the database.

    python benchmarks/race.py --backend memcached --seconds 20
    python benchmarks/race.py --backend memcached --proxy twemproxy

With ``--proxy twemproxy`` the memcached runs go through twemproxy (``nutcracker``):
the harness starts one in front of two memcached servers, or, with ``--memcached``,
takes that address to be a running twemproxy. Those rows are labelled ``twemproxy``.

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


class BaseV2(DeclarativeBase):
    pass


class RaceRowV2(BaseV2):
    """The next version of the model: one more column, defined elsewhere."""

    __tablename__ = "cachedecor_race_rows"
    __module__ = "app_v2.models"
    id = mapped_column(Integer, primary_key=True, autoincrement=False)
    version = mapped_column(Integer, default=0)
    payload = mapped_column(String(200), default="")
    note = mapped_column(String(50), nullable=True)


MAX_PAUSE = 0.002
#: naive cache-aside; cachedecor in fresh processes; cachedecor in processes forked after use.
VARIANTS = ("naive", "cachedecor", "forked", "mixed")


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


@cachedecor.cached_by_pk(RaceRowV2, region="race")
def read_row_v2(session: Session, row_id: int) -> RaceRowV2 | None:
    row = session.get(RaceRowV2, row_id)
    if row is not None:
        row.version  # noqa: B018 - loaded
        time.sleep(random.uniform(0, MAX_PAUSE))
    return row


@cachedecor.invalidates(RaceRowV2)
def bump_row_v2(session: Session, row_id: int) -> None:
    row = session.get(RaceRowV2, row_id)
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


def naive_key(opts: Options, row_id: int) -> str:
    return f"{opts.tag}-naive:{row_id}"


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
    tag: str = "race"
    """Names this run's schema and key namespace, so that runs side by side never meet."""
    label: str = ""
    """How the results name the cache (default: ``backend``)."""


def region_config(opts: Options) -> dict[str, Any]:
    if opts.backend == "memcached":
        region = {"backend": "cachedecor.pymemcache", "arguments": {"url": [opts.cache_url]}}
    else:
        region = {"backend": "dogpile.cache.redis", "arguments": {"url": opts.cache_url}}
    options = {**region, "expiration_time": 3600, "lease_wait": 0.05, "namespace": opts.tag}
    return {"regions": {"race": options}}


def reader(opts: Options, variant: str, deadline: float, version: int = 1) -> dict[str, int]:
    global MAX_PAUSE
    MAX_PAUSE = opts.max_pause_ms / 1000
    rng = random.Random(os.getpid())
    engine = sqlalchemy.create_engine(opts.database)
    reads = wrong = 0
    if variant != "naive":
        if variant != "forked":
            cachedecor.configure_regions(region_config(opts))
        read = read_row_v2 if version == 2 else read_row
        while time.monotonic() < deadline:
            row_id = rng.randrange(opts.rows)
            with Session(engine) as s:
                row = read(s, row_id)
                wrong += row is None or row.id != row_id
            reads += 1
        counters = cachedecor.stats("race")["race"]
        return {
            "reads": reads,
            "wrong": wrong,
            "hits": counters["hits"],
            "mismatches": counters["mismatches"],
        }
    cache = NaiveCache(opts.backend, opts.cache_url)
    while time.monotonic() < deadline:
        row_id = rng.randrange(opts.rows)
        if cache.get(naive_key(opts, row_id)) is None:
            with Session(engine) as s:
                version_read = s.get(RaceRow, row_id).version  # type: ignore[union-attr]
            time.sleep(rng.uniform(0, MAX_PAUSE))
            cache.set(naive_key(opts, row_id), version_read)
        reads += 1
    return {"reads": reads, "wrong": wrong}


def writer(opts: Options, variant: str, deadline: float, version: int = 1) -> dict[str, int]:
    rng = random.Random(os.getpid() * 7)
    engine = sqlalchemy.create_engine(opts.database)
    writes = 0
    if variant != "naive":
        if variant != "forked":
            cachedecor.configure_regions(region_config(opts))
        bump = bump_row_v2 if version == 2 else bump_row
        while time.monotonic() < deadline:
            with Session(engine) as s:
                bump(s, rng.randrange(opts.rows))
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
            cache.delete(naive_key(opts, row_id))
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
    BaseV2.metadata.drop_all(engine)
    BaseV2.metadata.create_all(engine)  # the newer version's columns
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
        return {i: v for i in range(opts.rows) if (v := cache.get(naive_key(opts, i))) is not None}
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
            cache.delete(naive_key(opts, i))
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
    hit_rate: float | None = None
    """Percentage of cachedecor's reads served from the cache (None: not measured)."""


def run_variant(opts: Options, variant: str) -> Result:
    reset_rows(opts)
    clear_cache(opts, variant)
    if variant == "forked":
        warm_up(opts)
    deadline = time.monotonic() + opts.seconds
    mixed = variant == "mixed"
    procs = [start(reader, opts, variant, deadline, 1 + (mixed and i % 2)) for i in range(opts.readers)]
    procs += [start(writer, opts, variant, deadline, 1 + (mixed and i % 2)) for i in range(opts.writers)]
    totals: Counter[str] = Counter()
    for pid, fd in procs:
        totals.update(finish(pid, fd, deadline + 60))
    truth = db_versions(opts)
    cached = cached_versions(opts, variant)
    stale = sum(1 for i, v in cached.items() if v != truth[i])
    wrong = None if variant == "naive" else totals["wrong"]
    hit_rate = None if variant == "naive" else 100.0 * totals["hits"] / max(totals["reads"], 1)
    return Result(
        opts.label or opts.backend,
        variant,
        totals["reads"],
        totals["writes"],
        len(cached),
        stale,
        wrong,
        hit_rate,
    )


def own_schema(url: str, schema: str) -> str:
    """``url`` reading and writing in a new schema of its own (so that runs never meet)."""
    admin = sqlalchemy.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    admin.dispose()
    return (
        sqlalchemy.make_url(url)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )


def drop_schema(url: str, schema: str) -> None:
    admin = sqlalchemy.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    admin.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["memcached", "redis", "both"], default="both")
    parser.add_argument("--memcached", default=None, help="HOST:PORT (default: start one)")
    parser.add_argument(
        "--proxy",
        choices=["none", "twemproxy"],
        default="none",
        help="memcached through twemproxy (started in front of two memcached, or the --memcached address)",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--database", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-pause-ms", type=float, default=2.0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    servers: list[Any] = []
    memcached_url = args.memcached
    backends = ["memcached", "redis"] if args.backend == "both" else [args.backend]
    if "memcached" in backends and memcached_url is None:
        from tests.servers import Memcached, Nutcracker

        if args.proxy == "twemproxy":
            servers += [Memcached(threads=2), Memcached(threads=2)]
            servers.append(Nutcracker(servers[:]))
        else:
            servers.append(Memcached(threads=4))
        memcached_url = servers[-1].url
    results: list[Result] = []
    tag = f"race{os.getpid()}"
    database = own_schema(args.database, tag)
    try:
        for backend in backends:
            url = memcached_url if backend == "memcached" else args.redis
            opts = Options(
                backend,
                url,
                database,
                args.readers,
                args.writers,
                args.rows,
                args.seconds,
                args.max_pause_ms,
                tag,
                "twemproxy" if backend == "memcached" and args.proxy == "twemproxy" else "",
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
        drop_schema(args.database, tag)
        for server in reversed(servers):
            server.stop()
    print()
    print(
        f"{'backend':<10} {'pattern':<11} {'reads':>8} {'writes':>7} {'cached':>7} {'stale':>6} {'wrong':>6}"
        f" {'hit%':>5}"
        f"   ({args.readers} readers, {args.writers} writers, {args.rows} rows, {args.seconds:g}s,"
        f" pause 0-{args.max_pause_ms:g} ms)"
    )
    for r in results:
        wrong = "-" if r.wrong is None else str(r.wrong)
        hits = "-" if r.hit_rate is None else f"{r.hit_rate:.0f}"
        counts = f"{r.reads:>8} {r.writes:>7} {r.cached:>7} {r.stale:>6} {wrong:>6} {hits:>5}"
        print(f"{r.backend:<10} {r.variant:<11} {counts}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=2)
    bad = [r for r in results if r.variant != "naive" and (r.stale or r.wrong)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
