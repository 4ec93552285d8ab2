"""Race harness: do concurrent readers and writers leave stale rows in the cache?

Starts reader and writer processes against PostgreSQL and a cache server, once per
variant (all of them unless --variants names some):

* ``naive``: the common cache-aside pattern (get; on a miss read the database and
  set; writers commit then delete), the baseline;
* ``cachedecor``: cachedecor's decorators, each process configuring its own regions;
* ``forked``: cachedecor's decorators in processes forked from the harness after it
  has read every row through the cache, keeping the regions (and the connections)
  it had, as gunicorn ``--preload`` and Celery prefork workers do;
* ``mixed``: a rolling deploy. Half the readers and writers map the table with
  version 1 of the model, half with version 2 (one more column, another module);
  entries of one version are misses for the other. Its ``hit%`` against the
  ``cachedecor`` run is what a mixed-version window costs;
* ``naive-async`` and ``cachedecor-async``: the same two patterns in asyncio
  programs. Each of --async-processes processes runs one event loop with
  --tasks READERS,WRITERS concurrent tasks, on ``AsyncSession`` and asyncpg: the
  baseline with an asyncio cache client, cachedecor with its decorators wrapping
  ``async def`` functions.

Readers pause a random 0..--max-pause-ms between their database read and their
cache write, as a busy application server does. cachedecor's readers also check
that each row they get has the primary key they asked for (``wrong``).

Two checks of staleness. Each writer publishes, in memory shared by every process
of the run, the version it committed, once its write has returned (committed, and
its key deleted). Before each read, a reader notes the newest version published
for its row; a read that returns an older one is a *stale read*: the database had
committed a newer row, and its writer had returned, before the read started. And
when all processes have stopped, every cached entry is compared with the database
(*stale* entries). Writers lock the row they bump (``SELECT ... FOR UPDATE``), so
a row's committed versions only ever grow.

    python benchmarks/race.py --backend memcached --seconds 20
    python benchmarks/race.py --backend redis --variants naive-async,cachedecor-async
    python benchmarks/race.py --backend memcached --proxy twemproxy

With ``--proxy twemproxy`` the memcached runs go through twemproxy (``nutcracker``):
the harness starts one in front of two memcached servers, or, with ``--memcached``,
takes that address to be a running twemproxy. Those rows are labelled ``twemproxy``.
twemproxy passes no meta command, and the asyncio baseline stores with one
(``ms``), so ``naive-async`` does not run through it; by default only the sync
variants do.

The baselines should show stale entries or stale reads (proof that the harness can
see them); cachedecor must show no stale entry, no stale read and no wrong row,
forked, mixed, async or not; the exit status says whether it did. ``errors`` counts
the cache operations of cachedecor's processes that failed and fell through to the
database: a write whose deletes failed can leave stale reads behind it.
"""

from __future__ import annotations

import argparse
import asyncio
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
from multiprocessing.sharedctypes import RawArray
from typing import Any

import sqlalchemy
from sqlalchemy import Integer, String
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
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
#: naive cache-aside; cachedecor in fresh processes; cachedecor in processes forked after
#: use; two versions of the model side by side; the first two again, in asyncio programs.
VARIANTS = ("naive", "cachedecor", "forked", "mixed", "naive-async", "cachedecor-async")
ASYNC_VARIANTS = ("naive-async", "cachedecor-async")
#: the baselines: their stale entries and reads are expected, and not checked for wrong rows
BASELINES = ("naive", "naive-async")


@cachedecor.cached_by_pk(RaceRow, region="race")
def read_row(session: Session, row_id: int) -> RaceRow | None:
    row = session.get(RaceRow, row_id)
    if row is not None:
        row.version  # noqa: B018 - loaded
        time.sleep(random.uniform(0, MAX_PAUSE))  # between the database read and the fill
    return row


@cachedecor.invalidates(RaceRow)
def bump_row(session: Session, row_id: int) -> int:
    row = session.get(RaceRow, row_id, with_for_update=True)
    assert row is not None
    row.version += 1
    version = row.version
    session.commit()
    return version


@cachedecor.cached_by_pk(RaceRowV2, region="race")
def read_row_v2(session: Session, row_id: int) -> RaceRowV2 | None:
    row = session.get(RaceRowV2, row_id)
    if row is not None:
        row.version  # noqa: B018 - loaded
        time.sleep(random.uniform(0, MAX_PAUSE))
    return row


@cachedecor.invalidates(RaceRowV2)
def bump_row_v2(session: Session, row_id: int) -> int:
    row = session.get(RaceRowV2, row_id, with_for_update=True)
    assert row is not None
    row.version += 1
    version: int = row.version
    session.commit()
    return version


@cachedecor.cached_by_pk(RaceRow, region="race")
async def read_row_async(session: AsyncSession, row_id: int) -> RaceRow | None:
    row = await session.get(RaceRow, row_id)
    if row is not None:
        row.version  # noqa: B018 - loaded
        await asyncio.sleep(random.uniform(0, MAX_PAUSE))  # between the database read and the fill
    return row


@cachedecor.invalidates(RaceRow)
async def bump_row_async(session: AsyncSession, row_id: int) -> int:
    row = await session.get(RaceRow, row_id, with_for_update=True)
    assert row is not None
    row.version += 1
    version = row.version
    await session.commit()
    return version


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


class AsyncNaiveCache:
    """:class:`NaiveCache` for asyncio: cachedecor's asyncio memcached transport, or redis.asyncio.

    memcached's store is the meta command ``ms <key> <size> T0`` (a plain set; the
    transport has no classic ``set``).
    """

    def __init__(self, backend: str, url: str, connections: int) -> None:
        self.memcached = backend == "memcached"
        if self.memcached:
            from cachedecor.backends.memcached.aio import AsyncMemcachedCluster

            self.client: Any = AsyncMemcachedCluster([url], max_connections=connections, timeout=10)
        else:
            import redis.asyncio

            self.client = redis.asyncio.Redis.from_url(url, max_connections=connections)

    async def get(self, key: str) -> int | None:
        value = await self.client.get(key)
        if self.memcached:
            value = None if value is None else value.value
        return None if value is None else int(value)

    async def set(self, key: str, version: int) -> None:
        value = str(version).encode()
        if self.memcached:
            command = b"ms %b %d T0\r\n%b\r\n" % (key.encode(), len(value), value)
            code, _, _ = await self.client.meta(key, command)
            if code != b"HD":
                raise RuntimeError(f"memcached did not store {key}: {code!r}")
        else:
            await self.client.set(key, value)

    async def delete(self, key: str) -> None:
        await self.client.delete(key)

    async def close(self) -> None:
        await self.client.aclose()


def naive_key(opts: Options, row_id: int) -> str:
    return f"{opts.tag}-naive:{row_id}"


class Floors:
    """The newest version of each row whose writer has returned, shared by the processes.

    One slot per writing thread of control (a sync writer process, or the event loop of
    an async process), so that each slot has one writer and only grows. A writer
    publishes a version after its write returned (committed, key deleted); a reader
    takes the floor of its row before its read starts. A read that returns a version
    below that floor is stale: the database had committed a newer row, and its writer
    had returned, before the read began. Made before the processes are forked, whose
    copies share it.
    """

    def __init__(self, slots: int, rows: int) -> None:
        self.slots = slots
        self.rows = rows
        self.values: Any = RawArray("q", slots * rows)

    def publish(self, slot: int, row_id: int, version: int) -> None:
        at = slot * self.rows + row_id
        if version > self.values[at]:
            self.values[at] = version

    def floor(self, row_id: int) -> int:
        values, rows = self.values, self.rows
        return max(int(values[slot * rows + row_id]) for slot in range(self.slots))


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
    async_processes: int = 4
    async_readers: int = 16
    """Reader tasks per async process."""
    async_writers: int = 4
    """Writer tasks per async process."""
    async_database: str = ""
    """The database for asyncio (``postgresql+asyncpg://``, no schema option: see :func:`async_engine`)."""


def region_config(opts: Options) -> dict[str, Any]:
    if opts.backend == "memcached":
        region = {"backend": "cachedecor.pymemcache", "arguments": {"url": [opts.cache_url]}}
    else:
        region = {"backend": "dogpile.cache.redis", "arguments": {"url": opts.cache_url}}
    options = {**region, "expiration_time": 3600, "lease_wait": 0.05, "namespace": opts.tag}
    return {"regions": {"race": options}}


def cachedecor_counters() -> dict[str, int]:
    counters = cachedecor.stats("race")["race"]
    return {name: counters[name] for name in ("hits", "mismatches", "errors")}


def reader(opts: Options, variant: str, deadline: float, floors: Floors, version: int = 1) -> dict[str, int]:
    global MAX_PAUSE
    MAX_PAUSE = opts.max_pause_ms / 1000
    rng = random.Random(os.getpid())
    engine = sqlalchemy.create_engine(opts.database)
    reads = wrong = stale_reads = 0
    if variant != "naive":
        if variant != "forked":
            cachedecor.configure_regions(region_config(opts))
        read = read_row_v2 if version == 2 else read_row
        while time.monotonic() < deadline:
            row_id = rng.randrange(opts.rows)
            floor = floors.floor(row_id)
            with Session(engine) as s:
                row = read(s, row_id)
                if row is None or row.id != row_id:
                    wrong += 1
                elif row.version < floor:
                    stale_reads += 1
            reads += 1
        return {"reads": reads, "wrong": wrong, "stale_reads": stale_reads, **cachedecor_counters()}
    cache = NaiveCache(opts.backend, opts.cache_url)
    while time.monotonic() < deadline:
        row_id = rng.randrange(opts.rows)
        floor = floors.floor(row_id)
        version_read = cache.get(naive_key(opts, row_id))
        if version_read is None:
            with Session(engine) as s:
                version_read = s.get(RaceRow, row_id).version  # type: ignore[union-attr]
            time.sleep(rng.uniform(0, MAX_PAUSE))
            cache.set(naive_key(opts, row_id), version_read)
        stale_reads += version_read < floor
        reads += 1
    return {"reads": reads, "wrong": wrong, "stale_reads": stale_reads}


def writer(
    opts: Options, variant: str, deadline: float, floors: Floors, slot: int, version: int = 1
) -> dict[str, int]:
    rng = random.Random(os.getpid() * 7)
    engine = sqlalchemy.create_engine(opts.database)
    writes = 0
    if variant != "naive":
        if variant != "forked":
            cachedecor.configure_regions(region_config(opts))
        bump = bump_row_v2 if version == 2 else bump_row
        while time.monotonic() < deadline:
            row_id = rng.randrange(opts.rows)
            with Session(engine) as s:
                committed = bump(s, row_id)
            floors.publish(slot, row_id, committed)
            writes += 1
    else:
        cache = NaiveCache(opts.backend, opts.cache_url)
        while time.monotonic() < deadline:
            row_id = rng.randrange(opts.rows)
            with Session(engine) as s:
                row = s.get(RaceRow, row_id, with_for_update=True)
                assert row is not None
                row.version += 1
                committed = row.version
                s.commit()
            cache.delete(naive_key(opts, row_id))
            floors.publish(slot, row_id, committed)
            writes += 1
    return {"writes": writes}


# -- asyncio processes ------------------------------------------------------------------


def async_engine(opts: Options) -> AsyncEngine:
    """An asyncpg engine on this run's schema, with a connection for every task of the process."""
    return create_async_engine(
        opts.async_database,
        pool_size=opts.async_readers + opts.async_writers,
        max_overflow=0,
        connect_args={"server_settings": {"search_path": opts.tag}},
    )


async def read_once(
    opts: Options,
    floors: Floors,
    engine: AsyncEngine,
    cache: AsyncNaiveCache | None,
    row_id: int,
    pause: float,
) -> str:
    """One read of an async variant (the baseline when ``cache`` is given, else cachedecor):
    ``"fresh"``, ``"stale_reads"`` (older than the row's floor when the read started) or
    ``"wrong"`` (another row, or none)."""
    floor = floors.floor(row_id)
    if cache is None:
        async with AsyncSession(engine) as s:
            row = await read_row_async(s, row_id)
            if row is None or row.id != row_id:
                return "wrong"
            version_read = row.version
    else:
        cached = await cache.get(naive_key(opts, row_id))
        if cached is None:
            async with AsyncSession(engine) as s:
                row = await s.get(RaceRow, row_id)
                assert row is not None
                version_read = row.version
            await asyncio.sleep(pause)  # between the database read and the cache write
            await cache.set(naive_key(opts, row_id), version_read)
        else:
            version_read = cached
    return "stale_reads" if version_read < floor else "fresh"


async def write_once(
    opts: Options, floors: Floors, slot: int, engine: AsyncEngine, cache: AsyncNaiveCache | None, row_id: int
) -> None:
    """Bump a row's version (through ``@invalidates``, or commit then delete for the
    baseline), then publish the version committed."""
    async with AsyncSession(engine) as s:
        if cache is None:
            committed = await bump_row_async(s, row_id)
        else:
            row = await s.get(RaceRow, row_id, with_for_update=True)
            assert row is not None
            row.version += 1
            committed = row.version
            await s.commit()
    if cache is not None:
        await cache.delete(naive_key(opts, row_id))
    floors.publish(slot, row_id, committed)  # one event loop per slot, no await in between


async def async_reader(
    opts: Options,
    deadline: float,
    floors: Floors,
    engine: AsyncEngine,
    cache: AsyncNaiveCache | None,
    seed: str,
) -> Counter[str]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    while time.monotonic() < deadline:
        row_id = rng.randrange(opts.rows)
        counts[await read_once(opts, floors, engine, cache, row_id, rng.uniform(0, MAX_PAUSE))] += 1
        counts["reads"] += 1
    return counts


async def async_writer(
    opts: Options,
    deadline: float,
    floors: Floors,
    slot: int,
    engine: AsyncEngine,
    cache: AsyncNaiveCache | None,
    seed: str,
) -> Counter[str]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    while time.monotonic() < deadline:
        await write_once(opts, floors, slot, engine, cache, rng.randrange(opts.rows))
        counts["writes"] += 1
    return counts


async def async_storm(
    opts: Options, variant: str, deadline: float, floors: Floors, slot: int
) -> dict[str, int]:
    """One process's event loop: --tasks readers and writers, concurrently, until ``deadline``."""
    engine = async_engine(opts)
    cache = None
    if variant == "naive-async":
        cache = AsyncNaiveCache(opts.backend, opts.cache_url, opts.async_readers + opts.async_writers)
    else:
        cachedecor.configure_regions(region_config(opts))
    pid = os.getpid()
    try:
        tasks = [
            async_reader(opts, deadline, floors, engine, cache, f"r{pid}-{i}")
            for i in range(opts.async_readers)
        ]
        tasks += [
            async_writer(opts, deadline, floors, slot, engine, cache, f"w{pid}-{i}")
            for i in range(opts.async_writers)
        ]
        totals: Counter[str] = Counter()
        for counts in await asyncio.gather(*tasks):
            totals.update(counts)
    finally:
        if cache is not None:
            await cache.close()
        await engine.dispose()
    out = dict(totals)
    if cache is None:
        out.update(cachedecor_counters())
    return out


def async_process(opts: Options, variant: str, deadline: float, floors: Floors, slot: int) -> dict[str, int]:
    global MAX_PAUSE
    MAX_PAUSE = opts.max_pause_ms / 1000
    return asyncio.run(async_storm(opts, variant, deadline, floors, slot))


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
    if variant in BASELINES:
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
    if variant in BASELINES:
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
    """Cached entries that differ from the database once every process has stopped."""
    wrong: int | None
    """Rows returned for another primary key than the one asked for (None: not checked)."""
    hit_rate: float | None = None
    """Percentage of cachedecor's reads served from the cache (None: not measured)."""
    stale_reads: int = 0
    """Reads that returned a version older than one whose writer had returned before the
    read started (see :class:`Floors`)."""
    errors: int | None = None
    """Cache operations that failed and fell through to the database (None: not counted)."""


def run_variant(opts: Options, variant: str) -> Result:
    reset_rows(opts)
    clear_cache(opts, variant)
    if variant == "forked":
        warm_up(opts)
    if variant in ASYNC_VARIANTS:
        floors = Floors(opts.async_processes, opts.rows)
        deadline = time.monotonic() + opts.seconds
        procs = [
            start(async_process, opts, variant, deadline, floors, i) for i in range(opts.async_processes)
        ]
    else:
        floors = Floors(opts.writers, opts.rows)
        deadline = time.monotonic() + opts.seconds
        mixed = variant == "mixed"
        procs = [
            start(reader, opts, variant, deadline, floors, 1 + (mixed and i % 2)) for i in range(opts.readers)
        ]
        procs += [
            start(writer, opts, variant, deadline, floors, i, 1 + (mixed and i % 2))
            for i in range(opts.writers)
        ]
    totals: Counter[str] = Counter()
    for pid, fd in procs:
        totals.update(finish(pid, fd, deadline + 60))
    truth = db_versions(opts)
    published = [floors.floor(i) for i in range(opts.rows)]
    if any(truth[i] < published[i] for i in range(opts.rows)):  # pragma: no cover - a harness bug
        raise RuntimeError(f"{variant}: a published version is newer than the database's")
    cached = cached_versions(opts, variant)
    stale = sum(1 for i, v in cached.items() if v != truth[i])
    baseline = variant in BASELINES
    return Result(
        opts.label or opts.backend,
        variant,
        totals["reads"],
        totals["writes"],
        len(cached),
        stale,
        None if baseline else totals["wrong"],
        None if baseline else 100.0 * totals["hits"] / max(totals["reads"], 1),
        totals["stale_reads"],
        None if baseline else totals["errors"],
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


def tasks_option(value: str) -> tuple[int, int]:
    try:
        readers, writers = (int(n) for n in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected READERS,WRITERS (such as 16,4), got {value!r}") from None
    if readers < 1 or writers < 1:
        raise argparse.ArgumentTypeError(
            f"each async process needs a reader and a writer task, got {value!r}"
        )
    return readers, writers


def variants_option(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant {', '.join(unknown)!r}: choose from {', '.join(VARIANTS)}"
        )
    return [name for name in VARIANTS if name in names]


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
    parser.add_argument(
        "--database",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="the async variants use the same database through asyncpg",
    )
    parser.add_argument("--readers", type=int, default=4, help="reader processes of the sync variants")
    parser.add_argument("--writers", type=int, default=2, help="writer processes of the sync variants")
    parser.add_argument("--async-processes", type=int, default=4, help="processes of the async variants")
    parser.add_argument(
        "--tasks",
        type=tasks_option,
        default=(16, 4),
        metavar="READERS,WRITERS",
        help="reader and writer tasks in each async process (default: 16,4)",
    )
    parser.add_argument(
        "--variants",
        type=variants_option,
        default=None,
        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all; through twemproxy, the sync ones)",
    )
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-pause-ms", type=float, default=2.0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    variants = args.variants
    if args.proxy == "twemproxy":
        if variants is None:
            variants = [v for v in VARIANTS if v not in ASYNC_VARIANTS]
        elif "naive-async" in variants:
            parser.error("naive-async stores with a meta command, which twemproxy does not pass")
    elif variants is None:
        variants = list(VARIANTS)

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
    async_database = (
        sqlalchemy.make_url(args.database)
        .set(drivername="postgresql+asyncpg", query={})
        .render_as_string(hide_password=False)
    )
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
                async_processes=args.async_processes,
                async_readers=args.tasks[0],
                async_writers=args.tasks[1],
                async_database=async_database,
            )
            for variant in variants:
                results.append(run_variant(opts, variant))
                r = results[-1]
                wrong = "" if r.wrong is None else f", {r.wrong} wrong rows"
                print(
                    f"  {r.backend:<10} {r.variant:<16} done: {r.stale} stale of {r.cached} cached,"
                    f" {r.stale_reads} stale reads{wrong}",
                    flush=True,
                )
    finally:
        drop_schema(args.database, tag)
        for server in reversed(servers):
            server.stop()
    print()
    print(
        f"{'backend':<10} {'pattern':<16} {'reads':>8} {'writes':>7} {'cached':>7} {'stale':>6}"
        f" {'stale reads':>11} {'wrong':>6} {'hit%':>5} {'errors':>6}"
    )
    for r in results:
        wrong = "-" if r.wrong is None else str(r.wrong)
        hits = "-" if r.hit_rate is None else f"{r.hit_rate:.0f}"
        errors = "-" if r.errors is None else str(r.errors)
        counts = (
            f"{r.reads:>8} {r.writes:>7} {r.cached:>7} {r.stale:>6} {r.stale_reads:>11} {wrong:>6}"
            f" {hits:>5} {errors:>6}"
        )
        print(f"{r.backend:<10} {r.variant:<16} {counts}")
    print(
        f"({args.rows} rows, {args.seconds:g}s per pattern, pause 0-{args.max_pause_ms:g} ms;"
        f" sync: {args.readers} reader and {args.writers} writer processes;"
        f" async: {args.async_processes} processes of {args.tasks[0]} reader"
        f" and {args.tasks[1]} writer tasks)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=2)
    bad = [r for r in results if r.variant not in BASELINES and (r.stale or r.stale_reads or r.wrong)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
