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
* ``near-pg``, ``near-redis`` and ``near-both``: ``cachedecor`` with a near cache in
  every process (``local_entries``, ``local_ttl`` from --local-ttl), its invalidations
  broadcast by PostgreSQL ``NOTIFY`` (on --database), by Redis pub/sub (on --redis),
  or by both at once, on a channel of the run's own (the idle listener of
  ``near-both`` listens on Redis). Readers start reading once their listener is connected;
* ``naive-async`` and ``cachedecor-async``: the same two patterns in asyncio
  programs. Each of --async-processes processes runs one event loop with
  --tasks READERS,WRITERS concurrent tasks, on ``AsyncSession`` and asyncpg: the
  baseline with an asyncio cache client, cachedecor with its decorators wrapping
  ``async def`` functions.

Readers pause a random 0..--max-pause-ms between their database read and their
cache write, as a busy application server does. cachedecor's readers also check
that each row they get has the primary key they asked for (``wrong``).

Three checks of staleness. Each writer publishes, in memory shared by every process
of the run, the version it committed and when, once its write has returned
(committed, and its key deleted). Before each read, a reader notes the newest
version published for its row; a read that returns an older one is a *stale read*:
the database had committed a newer row, and its writer had returned, before the
read started. For each stale read the harness records how long after the return of
the first write that made it stale the read returned (the *delay*; p50, p99 and
max are reported). When all processes have stopped, every cached entry is compared
with the database (*stale* entries). And once the writers have stopped, every
reader process of cachedecor's sync variants reads every row through the cache and
compares it with the database (the *quiet* check: ``quiet stale``). In the near
variants this happens after a last write of a marker row that each reader holds in
its near cache has been evicted there, so after every earlier broadcast has been
received; writers wait for their broadcasts to be sent before they stop.
Writers lock the row they bump (``SELECT ... FOR UPDATE``), so a row's committed
versions only ever grow.

In the near variants a process of the harness that does nothing else also listens
to the broadcast, to tell the transport's delay from the readers' own: ``bcast`` is
how long after a write returned that idle listener had received the last message
about its row, and ``behind`` counts the stale reads that returned after it had (the
reader's listener thread was late, not the message).

    python benchmarks/race.py --backend memcached --seconds 20
    python benchmarks/race.py --backend redis --variants naive-async,cachedecor-async
    python benchmarks/race.py --backend memcached --variants near-pg,near-redis,near-both
    python benchmarks/race.py --backend memcached --proxy twemproxy

With ``--proxy twemproxy`` the memcached runs go through twemproxy (``nutcracker``):
the harness starts one in front of two memcached servers, or, with ``--memcached``,
takes that address to be a running twemproxy. Those rows are labelled ``twemproxy``.
twemproxy passes no meta command, and the asyncio baseline stores with one
(``ms``), so ``naive-async`` does not run through it; by default only the sync
variants do.

The baselines should show stale entries or stale reads (proof that the harness can
see them); cachedecor must show no stale entry, no stale read, no stale read once
quiet and no wrong row, forked, mixed, async or not. A near cache relaxes the
guarantee on reads: other processes evict within the broadcast delay, and never
serve a row older than ``local_ttl``; so the near variants may have stale reads,
all of them less than ``local_ttl`` after the write that made them stale, and none
once quiet. The exit status says whether every variant kept its guarantee.
``errors`` counts the cache operations of cachedecor's processes that failed and
fell through to the database: a write whose deletes failed can leave stale reads
behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import multiprocessing
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
from cachedecor import broadcast
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
#: use; two versions of the model side by side; cachedecor with a near cache, broadcast
#: by PostgreSQL and by Redis; the first two again, in asyncio programs.
VARIANTS = (
    "naive",
    "cachedecor",
    "forked",
    "mixed",
    "near-pg",
    "near-redis",
    "near-both",
    "naive-async",
    "cachedecor-async",
)
ASYNC_VARIANTS = ("naive-async", "cachedecor-async")
#: the baselines: their stale entries and reads are expected, and not checked for wrong rows
BASELINES = ("naive", "naive-async")
#: near cache, by broadcast transport
NEAR_VARIANTS = ("near-pg", "near-redis", "near-both")
#: a row outside the storm's: its last write tells the near variants' readers that every
#: broadcast sent before it has been received (see :func:`quiet_check`)
MARKER = -1
#: seconds any process waits for the others at the end of a run before it gives up
SETTLE_TIMEOUT = 60.0
#: seconds a writer waits for its broadcasts to be sent before it stops
SEND_TIMEOUT = 10.0


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
    """The newest version of each row whose writer has returned, and when each version's
    writer returned, shared by the processes.

    One slot per writing thread of control (a sync writer process, or the event loop of
    an async process), so that each slot has one writer and only grows. A writer
    publishes a version after its write returned (committed, key deleted); a reader
    takes the floor of its row before its read starts. A read that returns a version
    below that floor is stale: the database had committed a newer row, and its writer
    had returned, before the read began. Made before the processes are forked, whose
    copies share it.

    When each version's write started and returned is kept too, in a ring of the last
    :attr:`HISTORY` versions of each row (the clock is ``time.monotonic()``, one for
    every process of the machine), so that a stale read can say how long it came after
    the write that made it stale.
    """

    #: versions of a row whose times are kept
    HISTORY = 4096

    def __init__(self, slots: int, rows: int) -> None:
        self.slots = slots
        self.rows = rows
        self.values: Any = RawArray("q", slots * rows)
        self.started: Any = RawArray("d", rows * self.HISTORY)
        self.returned: Any = RawArray("d", rows * self.HISTORY)
        self.versions: Any = RawArray("q", rows * self.HISTORY)

    def publish(
        self, slot: int, row_id: int, version: int, returned: float | None = None, started: float = 0.0
    ) -> None:
        """``version`` of ``row_id`` committed by a write that started at ``started`` and
        returned at ``returned`` (default: now)."""
        ring = row_id * self.HISTORY + version % self.HISTORY
        # the times before the version that vouches for them, and all before the floor
        self.started[ring] = started
        self.returned[ring] = time.monotonic() if returned is None else returned
        self.versions[ring] = version
        at = slot * self.rows + row_id
        if version > self.values[at]:
            self.values[at] = version

    def floor(self, row_id: int) -> int:
        values, rows = self.values, self.rows
        return max(int(values[slot * rows + row_id]) for slot in range(self.slots))

    def published(self, row_id: int, version: int) -> bool:
        return bool(self.versions[row_id * self.HISTORY + version % self.HISTORY] == version)

    def returned_at(self, row_id: int, version: int) -> float:
        return float(self.returned[row_id * self.HISTORY + version % self.HISTORY])

    def started_at(self, row_id: int, version: int) -> float:
        return float(self.started[row_id * self.HISTORY + version % self.HISTORY])

    def first_newer(self, row_id: int, version_read: int, floor: int) -> int:
        """Of the published versions of ``row_id`` newer than ``version_read`` (``floor``
        is one), the one whose write returned first: the write that made it stale."""
        newer = [
            v
            for v in range(max(version_read + 1, floor - self.HISTORY + 1), floor + 1)
            if self.published(row_id, v)
        ]
        if not newer:  # pragma: no cover - a harness bug: the floor is published
            raise RuntimeError(f"row {row_id}: version {floor} is the floor but was never published")
        return min(newer, key=lambda v: self.returned_at(row_id, v))

    def check(self, row_id: int, floor: int, version_read: int, returned: float) -> tuple[int, float] | None:
        """``None`` for a fresh read (``version_read`` not older than ``floor``, the floor
        when the read started); for a stale one, the version whose write made it stale
        and the seconds between that write's return and ``returned``, when the read
        returned."""
        if version_read >= floor:
            return None
        version = self.first_newer(row_id, version_read, floor)
        return version, returned - self.returned_at(row_id, version)


def delay_summary(delays: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``delays`` (seconds) in milliseconds; 0 for none."""
    if not delays:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(delays)

    def rank(q: float) -> float:  # nearest rank
        return 1000 * ordered[min(len(ordered) - 1, max(math.ceil(q * len(ordered)) - 1, 0))]

    return {"p50": rank(0.50), "p99": rank(0.99), "max": 1000 * ordered[-1]}


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
    broadcast_pg: str = ""
    """``broadcast_url`` of ``near-pg`` (``postgresql://``, the database of --database)."""
    broadcast_redis: str = ""
    """``broadcast_url`` of ``near-redis`` (``redis://``)."""
    local_ttl: float = 10.0
    """``local_ttl`` of the near variants: no stale read may come later than this after a write."""


def region_config(opts: Options, variant: str = "") -> dict[str, Any]:
    """The region ``race`` of ``variant``'s processes (with a near cache and its broadcast
    for the near variants; the harness's own process never has one)."""
    if opts.backend == "memcached":
        region = {"backend": "cachedecor.pymemcache", "arguments": {"url": [opts.cache_url]}}
    else:
        region = {"backend": "dogpile.cache.redis", "arguments": {"url": opts.cache_url}}
    options = {**region, "expiration_time": 3600, "lease_wait": 0.05, "namespace": opts.tag}
    config: dict[str, Any] = {"regions": {"race": options}}
    if variant in NEAR_VARIANTS:
        options["local_entries"] = opts.rows + 1  # every row and the marker
        options["local_ttl"] = opts.local_ttl
        config["broadcast_url"] = {
            "near-pg": opts.broadcast_pg,
            "near-redis": opts.broadcast_redis,
            "near-both": [opts.broadcast_pg, opts.broadcast_redis],
        }[variant]
        config["broadcast_channel"] = f"{opts.tag}_near"
    return config


def listening() -> broadcast.Broadcast:
    """This process's broadcast, once its listener is connected (the near cache is
    bypassed until then)."""
    sender = broadcast.current()
    if sender is None or not sender.connected.wait(SETTLE_TIMEOUT):
        raise RuntimeError("the broadcast listener did not connect")
    return sender


def cachedecor_counters() -> dict[str, int]:
    counters = cachedecor.stats("race")["race"]
    return {name: counters[name] for name in ("hits", "local_hits", "mismatches", "errors")}


def local_hits() -> int:
    return cachedecor.stats("race")["race"]["local_hits"]


def reader(
    opts: Options,
    variant: str,
    deadline: float,
    floors: Floors,
    version: int = 1,
    settle: Any = None,
) -> dict[str, Any]:
    """Read random rows until ``deadline``; with ``settle`` (a barrier of every reader and
    writer), then the :func:`quiet_check`."""
    global MAX_PAUSE
    MAX_PAUSE = opts.max_pause_ms / 1000
    rng = random.Random(os.getpid())
    engine = sqlalchemy.create_engine(opts.database)
    reads = wrong = stale_reads = 0
    stale: list[tuple[int, int, float]] = []  # (row, version that made it stale, when it returned)
    if variant != "naive":
        try:
            if variant != "forked":
                cachedecor.configure_regions(region_config(opts, variant))
            sender = listening() if variant in NEAR_VARIANTS else None
            read = read_row_v2 if version == 2 else read_row
            while time.monotonic() < deadline:
                row_id = rng.randrange(opts.rows)
                floor = floors.floor(row_id)
                with Session(engine) as s:
                    row = read(s, row_id)
                    returned = time.monotonic()
                    if row is None or row.id != row_id:
                        wrong += 1
                    elif (late := floors.check(row_id, floor, row.version, returned)) is not None:
                        stale_reads += 1
                        stale.append((row_id, late[0], returned))
                reads += 1
            out: dict[str, Any] = {
                "reads": reads,
                "wrong": wrong,
                "stale_reads": stale_reads,
                "stale": stale,
                **cachedecor_counters(),
            }
            if sender is not None:
                out["listener_lost"] = sender.lost
            if settle is not None:
                out.update(quiet_check(opts, variant, engine, read, settle))
        except BaseException:
            if settle is not None:
                settle.abort()  # the others stop waiting for this process
            raise
        return out
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
        returned = time.monotonic()
        late = floors.check(row_id, floor, version_read, returned)
        if late is not None:
            stale_reads += 1
            stale.append((row_id, late[0], returned))
        reads += 1
    return {"reads": reads, "wrong": wrong, "stale_reads": stale_reads, "stale": stale}


def quiet_check(
    opts: Options, variant: str, engine: sqlalchemy.Engine, read: Any, settle: Any
) -> dict[str, Any]:
    """Once every writer has stopped, every row read through this process's cache and
    compared with the database.

    With a near cache, the check waits until every broadcast the writers sent has
    been received here, and no longer: each reader holds the marker row in its near
    cache before the barrier; after it, once every writer has sent its broadcasts,
    the first writer writes the marker through ``@invalidates``, and a broadcast is
    received in the order it was sent, so when a read of the marker returns the new
    version, every earlier broadcast has been received too.
    """
    near = variant in NEAR_VARIANTS
    held = hold_marker(engine) if near else 0
    settle.wait(SETTLE_TIMEOUT)  # every writer has returned, and sent its broadcasts
    started = time.monotonic()
    if near:
        await_marker(engine, held, opts.local_ttl + SETTLE_TIMEOUT)
    waited = time.monotonic() - started
    with Session(engine) as s:
        truth = {row.id: row.version for row in s.query(RaceRow)}
    return {**quiet_reads(opts, engine, read, truth), "quiet_wait": waited}


def quiet_reads(opts: Options, engine: sqlalchemy.Engine, read: Any, truth: dict[int, int]) -> dict[str, int]:
    """Every row of the storm read once through ``read``: how many differ from ``truth``
    (the database's versions), and how many came from this process's near cache."""
    before = local_hits()
    stale = 0
    for row_id in range(opts.rows):
        with Session(engine) as s:
            row = read(s, row_id)
            stale += row is None or row.version != truth[row_id]
    return {"quiet_reads": opts.rows, "quiet_stale": stale, "quiet_local_hits": local_hits() - before}


def hold_marker(engine: sqlalchemy.Engine) -> int:
    """Read the marker row until this process's near cache serves it; the version held."""
    give_up = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < give_up:
        before = local_hits()
        with Session(engine) as s:
            row = read_row(s, MARKER)
            assert row is not None
            version = row.version
        if local_hits() > before:
            return version
    raise RuntimeError("the near cache never kept the marker row")


def await_marker(engine: sqlalchemy.Engine, held: int, timeout: float) -> None:
    """Read the marker row until it is newer than ``held``: its eviction was received
    (or its near entry's ``local_ttl`` ran out, which the wait time would show)."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        with Session(engine) as s:
            row = read_row(s, MARKER)
            if row is not None and row.version > held:
                return
    raise RuntimeError(f"the marker row still read version {held} after {timeout:g}s")


def sent_all(sender: broadcast.Broadcast, expected: int) -> int:
    """Wait until this process's broadcast has sent ``expected`` messages (its publisher
    thread sends one per write, after the write returned); how many it had not sent when
    it gave up."""
    give_up = time.monotonic() + SEND_TIMEOUT
    while sender.sent < expected and time.monotonic() < give_up:
        time.sleep(0.001)  # the publisher announces nothing: its counter is polled
    return max(expected - sender.sent, 0)


def writer(
    opts: Options,
    variant: str,
    deadline: float,
    floors: Floors,
    slot: int,
    version: int = 1,
    settle: Any = None,
) -> dict[str, Any]:
    """Bump random rows until ``deadline``, publishing each version once its write has
    returned; with ``settle``, then wait for the readers' :func:`quiet_check`."""
    rng = random.Random(os.getpid() * 7)
    engine = sqlalchemy.create_engine(opts.database)
    writes = 0
    out: dict[str, Any] = {}
    if variant != "naive":
        try:
            if variant != "forked":
                cachedecor.configure_regions(region_config(opts, variant))
            sender = broadcast.current() if variant in NEAR_VARIANTS else None
            bump = bump_row_v2 if version == 2 else bump_row
            while time.monotonic() < deadline:
                row_id = rng.randrange(opts.rows)
                with Session(engine) as s:
                    started = time.monotonic()
                    committed = bump(s, row_id)
                    returned = time.monotonic()
                floors.publish(slot, row_id, committed, returned, started)
                writes += 1
            if settle is not None:
                unsent = 0 if sender is None else sent_all(sender, writes)
                settle.wait(SETTLE_TIMEOUT)  # the readers hold the marker in their near caches
                if sender is not None:
                    if slot == 0:
                        with Session(engine) as s:
                            bump_row(s, MARKER)
                        unsent = sent_all(sender, writes + 1)
                    out["unsent"] = unsent
        except BaseException:
            if settle is not None:
                settle.abort()
            raise
    else:
        cache = NaiveCache(opts.backend, opts.cache_url)
        while time.monotonic() < deadline:
            row_id = rng.randrange(opts.rows)
            started = time.monotonic()
            with Session(engine) as s:
                row = s.get(RaceRow, row_id, with_for_update=True)
                assert row is not None
                row.version += 1
                committed = row.version
                s.commit()
            cache.delete(naive_key(opts, row_id))
            floors.publish(slot, row_id, committed, time.monotonic(), started)
            writes += 1
    return {"writes": writes, **out}


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
    stale: list[tuple[int, int, float]] | None = None,
) -> str:
    """One read of an async variant (the baseline when ``cache`` is given, else cachedecor):
    ``"fresh"``, ``"stale_reads"`` (older than the row's floor when the read started; the
    row, the version that made it stale and when it returned are appended to ``stale``)
    or ``"wrong"`` (another row, or none)."""
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
    returned = time.monotonic()
    late = floors.check(row_id, floor, version_read, returned)
    if late is None:
        return "fresh"
    if stale is not None:
        stale.append((row_id, late[0], returned))
    return "stale_reads"


async def write_once(
    opts: Options, floors: Floors, slot: int, engine: AsyncEngine, cache: AsyncNaiveCache | None, row_id: int
) -> None:
    """Bump a row's version (through ``@invalidates``, or commit then delete for the
    baseline), then publish the version committed."""
    started = time.monotonic()
    async with AsyncSession(engine) as s:
        if cache is None:
            committed = await bump_row_async(s, row_id)
            returned = time.monotonic()
        else:
            row = await s.get(RaceRow, row_id, with_for_update=True)
            assert row is not None
            row.version += 1
            committed = row.version
            await s.commit()
    if cache is not None:
        await cache.delete(naive_key(opts, row_id))
        returned = time.monotonic()
    floors.publish(slot, row_id, committed, returned, started)  # one event loop per slot, no await between


async def async_reader(
    opts: Options,
    deadline: float,
    floors: Floors,
    engine: AsyncEngine,
    cache: AsyncNaiveCache | None,
    seed: str,
    stale: list[tuple[int, int, float]],
) -> Counter[str]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    while time.monotonic() < deadline:
        row_id = rng.randrange(opts.rows)
        pause = rng.uniform(0, MAX_PAUSE)
        counts[await read_once(opts, floors, engine, cache, row_id, pause, stale)] += 1
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
) -> dict[str, Any]:
    """One process's event loop: --tasks readers and writers, concurrently, until ``deadline``."""
    engine = async_engine(opts)
    cache = None
    if variant == "naive-async":
        cache = AsyncNaiveCache(opts.backend, opts.cache_url, opts.async_readers + opts.async_writers)
    else:
        cachedecor.configure_regions(region_config(opts))
    pid = os.getpid()
    stale: list[tuple[int, int, float]] = []
    try:
        tasks = [
            async_reader(opts, deadline, floors, engine, cache, f"r{pid}-{i}", stale)
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
    out: dict[str, Any] = {**totals, "stale": stale}
    if cache is None:
        out.update(cachedecor_counters())
    return out


def async_process(opts: Options, variant: str, deadline: float, floors: Floors, slot: int) -> dict[str, Any]:
    global MAX_PAUSE
    MAX_PAUSE = opts.max_pause_ms / 1000
    return asyncio.run(async_storm(opts, variant, deadline, floors, slot))


def start(target: Callable[..., dict[str, Any]], *args: Any) -> tuple[int, int]:
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


def finish(pid: int, fd: int, deadline: float) -> dict[str, Any]:
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
    result: dict[str, Any] = json.loads(data)
    return result


# -- the broadcast, seen by an idle listener ----------------------------------------------


def probe(
    opts: Options, variant: str, rows_by_key: dict[str, int], ready: Any, give_up: float
) -> dict[str, Any]:
    """Listen to the run's broadcast channel, in a process that does nothing else, and
    note when each message naming a row arrived: how quickly the transport itself
    delivers, apart from how quickly a busy reader process gets to it. Stops at the
    first message naming the marker row, which is sent after every other."""
    arrivals: dict[int, list[float]] = {}
    marker = next(key for key, row_id in rows_by_key.items() if row_id == MARKER)

    def heard(text: str) -> bool:
        at = time.monotonic()
        data = json.loads(text)
        if "*" in data:  # too many keys for one message: it evicts every row
            named: list[Any] = list(rows_by_key)
        else:
            named = [key for entry in data.values() for key in entry.get("k", [])]
        for key in named:
            row_id = rows_by_key.get(key)
            if row_id is not None and row_id != MARKER:
                arrivals.setdefault(row_id, []).append(at)
        return marker in named

    channel = region_config(opts, variant)["broadcast_channel"]
    complete = False
    if variant == "near-pg":
        import psycopg

        with psycopg.connect(opts.broadcast_pg, autocommit=True) as conn:
            conn.execute(f'LISTEN "{channel}"')
            ready.set()
            while not complete and time.monotonic() < give_up:
                complete = any(heard(n.payload) for n in conn.notifies(timeout=0.5, stop_after=1))
    else:
        import redis

        client = redis.Redis.from_url(opts.broadcast_redis)
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        pubsub.subscribe(channel)
        while (message := pubsub.get_message(timeout=5)) is None or message["type"] != "subscribe":
            pass
        ready.set()
        while not complete and time.monotonic() < give_up:
            message = pubsub.get_message(timeout=0.5)
            if message is not None and message["type"] == "message":
                complete = heard(message["data"].decode())
        client.close()
    return {
        "arrivals": {str(row_id): times for row_id, times in arrivals.items()},
        "probe_complete": complete,
    }


def start_probe(opts: Options, variant: str, give_up: float) -> tuple[int, int]:
    """Fork :func:`probe`, and return once it listens."""
    rows_by_key = {read_row.cache_key(row_id): row_id for row_id in [*range(opts.rows), MARKER]}
    ready = multiprocessing.get_context("fork").Event()
    proc = start(probe, opts, variant, rows_by_key, ready, give_up)
    if not ready.wait(SETTLE_TIMEOUT):
        raise RuntimeError(f"{variant}: the probe did not start listening")
    return proc


def broadcast_delays(
    floors: Floors, truth: dict[int, int], arrivals: dict[int, list[float]], rows: int
) -> tuple[list[float], dict[tuple[int, int], float]]:
    """What the probe saw, write by write: how long after each write returned the last
    message about its row arrived (0 when before), and when that was, by (row, version).

    A write's messages are those naming its row that arrived after it started and
    before the next write of the row started (writes of a row are serialised by its
    lock; one arriving later is counted with the next write)."""
    delays: list[float] = []
    last: dict[tuple[int, int], float] = {}
    for row_id in range(rows):
        times = sorted(arrivals.get(row_id, []))
        versions = [v for v in range(1, truth[row_id] + 1) if floors.published(row_id, v)]
        for i, version in enumerate(versions):
            begin = floors.started_at(row_id, version)
            end = floors.started_at(row_id, versions[i + 1]) if i + 1 < len(versions) else math.inf
            first, after = bisect.bisect_left(times, begin), bisect.bisect_left(times, end)
            if after > first:
                last[(row_id, version)] = times[after - 1]
                delays.append(max(times[after - 1] - floors.returned_at(row_id, version), 0.0))
    return delays, last


# -- one variant ----------------------------------------------------------------------


def reset_rows(opts: Options) -> None:
    engine = sqlalchemy.create_engine(opts.database)
    BaseV2.metadata.drop_all(engine)
    BaseV2.metadata.create_all(engine)  # the newer version's columns
    with Session(engine) as s:
        s.add_all(RaceRow(id=i, version=0, payload="x" * 50) for i in [*range(opts.rows), MARKER])
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
        cachedecor.invalidate_many(RaceRow, [*range(opts.rows), MARKER])


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
    local_hit_rate: float | None = None
    """Percentage of the reads served from the process's near cache (None: no near cache)."""
    stale_read_p50_ms: float = 0.0
    """Median delay of the stale reads: how long after the return of the write that made
    it stale each returned, in milliseconds (0: no stale read)."""
    stale_read_p99_ms: float = 0.0
    stale_read_max_ms: float = 0.0
    quiet_reads: int | None = None
    """Reads of the quiet check: every row, by every reader process, once the writers
    had stopped (None: not made)."""
    quiet_stale: int | None = None
    """Reads of the quiet check that differed from the database."""
    quiet_local_hits: int | None = None
    """Reads of the quiet check served from a near cache."""
    quiet_wait_ms: float | None = None
    """The longest wait of a reader, after the writers had stopped, until it had
    received every broadcast (near variants)."""
    unsent: int | None = None
    """Broadcasts the writers had not sent when they stopped (near variants)."""
    listener_lost: int | None = None
    """Times a reader's broadcast listener lost its connection (near variants)."""
    local_ttl: float | None = None
    """The near cache's ``local_ttl`` (near variants)."""
    broadcast_p50_ms: float | None = None
    """How long after a write returned an idle listener of the broadcast (a process of
    the harness that does nothing else) had received the last message about its row
    (0 when before; near variants)."""
    broadcast_p99_ms: float | None = None
    broadcast_max_ms: float | None = None
    writes_heard: int | None = None
    """Writes whose messages the idle listener received (near variants)."""
    probe_complete: bool | None = None
    """Whether the idle listener received the marker row's message, sent after all others."""
    behind_probe: int | None = None
    """Stale reads that returned after the idle listener had received the last message
    about their write: the reader's own listener was behind the transport (near variants)."""
    behind_probe_max_ms: float | None = None
    """How far behind, at most."""

    def kept_guarantee(self) -> bool:
        """Whether cachedecor kept its guarantee (the baselines have none to keep).

        No stale entry, no wrong row and no stale read once quiet, for every variant;
        during the storm no stale read at all, or with a near cache none later than
        ``local_ttl`` after the write that made it stale.
        """
        if self.variant in BASELINES:
            return True
        if self.stale or self.wrong or self.quiet_stale:
            return False
        if self.variant in NEAR_VARIANTS:
            assert self.local_ttl is not None
            return self.stale_read_max_ms < 1000 * self.local_ttl
        return self.stale_reads == 0


def run_variant(opts: Options, variant: str) -> Result:
    reset_rows(opts)
    clear_cache(opts, variant)
    baseline = variant in BASELINES
    near = variant in NEAR_VARIANTS
    quiet = not baseline and variant not in ASYNC_VARIANTS
    watcher = None  # the near variants' idle listener (start_probe)
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
        # every reader and writer meets there once the writers have stopped (quiet_check)
        settle = (
            None if baseline else multiprocessing.get_context("fork").Barrier(opts.readers + opts.writers)
        )
        give_up = time.monotonic() + opts.seconds + 2 * SETTLE_TIMEOUT + opts.local_ttl
        watcher = start_probe(opts, variant, give_up) if near else None
        deadline = time.monotonic() + opts.seconds
        mixed = variant == "mixed"
        procs = [
            start(reader, opts, variant, deadline, floors, 1 + (mixed and i % 2), settle)
            for i in range(opts.readers)
        ]
        procs += [
            start(writer, opts, variant, deadline, floors, i, 1 + (mixed and i % 2), settle)
            for i in range(opts.writers)
        ]
    totals: Counter[str] = Counter()
    stale_reads: list[tuple[int, int, float]] = []
    quiet_wait = 0.0
    for pid, fd in procs:
        result = finish(pid, fd, deadline + 2 * SETTLE_TIMEOUT + opts.local_ttl)
        stale_reads += [(row_id, version, at) for row_id, version, at in result.pop("stale", [])]
        quiet_wait = max(quiet_wait, result.pop("quiet_wait", 0.0))
        totals.update(result)
    heard: dict[str, Any] = {}
    if watcher is not None:
        heard = finish(*watcher, deadline + 2 * SETTLE_TIMEOUT + opts.local_ttl)
    truth = db_versions(opts)
    published = [floors.floor(i) for i in range(opts.rows)]
    if any(truth[i] < published[i] for i in range(opts.rows)):  # pragma: no cover - a harness bug
        raise RuntimeError(f"{variant}: a published version is newer than the database's")
    cached = cached_versions(opts, variant)
    stale = sum(1 for i, v in cached.items() if v != truth[i])
    reads = max(totals["reads"], 1)
    summary = delay_summary([at - floors.returned_at(row_id, version) for row_id, version, at in stale_reads])
    transport: dict[str, Any] = {}
    if near:
        arrivals = {int(row_id): times for row_id, times in heard["arrivals"].items()}
        delays, last = broadcast_delays(floors, truth, arrivals, opts.rows)
        sent = delay_summary(delays)
        # stale reads that returned after the idle probe had every message of their write
        behind = [
            at - last[(row_id, v)] for row_id, v, at in stale_reads if at > last.get((row_id, v), math.inf)
        ]
        transport = {
            "broadcast_p50_ms": sent["p50"],
            "broadcast_p99_ms": sent["p99"],
            "broadcast_max_ms": sent["max"],
            "writes_heard": len(delays),
            "probe_complete": heard["probe_complete"],
            "behind_probe": len(behind),
            "behind_probe_max_ms": 1000 * max(behind, default=0.0),
        }
    return Result(
        opts.label or opts.backend,
        variant,
        totals["reads"],
        totals["writes"],
        len(cached),
        stale,
        None if baseline else totals["wrong"],
        None if baseline else 100.0 * totals["hits"] / reads,
        totals["stale_reads"],
        None if baseline else totals["errors"],
        local_hit_rate=100.0 * totals["local_hits"] / reads if near else None,
        stale_read_p50_ms=summary["p50"],
        stale_read_p99_ms=summary["p99"],
        stale_read_max_ms=summary["max"],
        quiet_reads=totals["quiet_reads"] if quiet else None,
        quiet_stale=totals["quiet_stale"] if quiet else None,
        quiet_local_hits=totals["quiet_local_hits"] if quiet else None,
        quiet_wait_ms=1000 * quiet_wait if near else None,
        unsent=totals["unsent"] if near else None,
        listener_lost=totals["listener_lost"] if near else None,
        local_ttl=opts.local_ttl if near else None,
        **transport,
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
    parser.add_argument(
        "--local-ttl",
        type=float,
        default=10.0,
        help="local_ttl of the near variants, in seconds (default: 10)",
    )
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
    broadcast_pg = (
        sqlalchemy.make_url(args.database)
        .set(drivername="postgresql", query={})
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
                broadcast_pg=broadcast_pg,
                broadcast_redis=args.redis,
                local_ttl=args.local_ttl,
            )
            for variant in variants:
                results.append(run_variant(opts, variant))
                r = results[-1]
                wrong = "" if r.wrong is None else f", {r.wrong} wrong rows"
                quiet = "" if r.quiet_stale is None else f", {r.quiet_stale} stale reads once quiet"
                print(
                    f"  {r.backend:<10} {r.variant:<16} done: {r.stale} stale of {r.cached} cached,"
                    f" {r.stale_reads} stale reads{wrong}{quiet}",
                    flush=True,
                )
    finally:
        drop_schema(args.database, tag)
        for server in reversed(servers):
            server.stop()
    print()
    print_results(results, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=2)
    return 0 if all(r.kept_guarantee() for r in results) else 1


def print_results(results: list[Result], args: argparse.Namespace) -> None:
    def show(value: float | None, form: str = ".0f") -> str:
        return "-" if value is None else format(value, form)

    print(
        f"{'backend':<10} {'pattern':<16} {'reads':>8} {'writes':>7} {'cached':>7} {'stale':>6}"
        f" {'stale reads':>11} {'wrong':>6} {'hit%':>5} {'local%':>6} {'errors':>6} {'quiet stale':>11}"
    )
    for r in results:
        counts = (
            f"{r.reads:>8} {r.writes:>7} {r.cached:>7} {r.stale:>6} {r.stale_reads:>11}"
            f" {show(r.wrong, 'd'):>6} {show(r.hit_rate):>5} {show(r.local_hit_rate):>6}"
            f" {show(r.errors, 'd'):>6} {show(r.quiet_stale, 'd'):>11}"
        )
        print(f"{r.backend:<10} {r.variant:<16} {counts}")
    print(
        f"({args.rows} rows, {args.seconds:g}s per pattern, pause 0-{args.max_pause_ms:g} ms;"
        f" sync: {args.readers} reader and {args.writers} writer processes;"
        f" async: {args.async_processes} processes of {args.tasks[0]} reader"
        f" and {args.tasks[1]} writer tasks; near: local_ttl {args.local_ttl:g}s)"
    )
    print()
    print(
        "stale reads: how long after the write that made them stale they returned (ms);"
        " bcast: how long after a write returned an idle listener had its last message (ms);"
        " behind: stale reads returned after that, and the largest gap (ms)"
    )
    print(
        f"{'backend':<10} {'pattern':<16} {'stale reads':>11} {'p50':>6} {'p99':>6} {'max':>6}"
        f" {'bcast p50':>9} {'p99':>6} {'max':>6} {'behind':>6} {'max':>6}"
        f" {'quiet reads':>11} {'quiet local':>11} {'unsent':>6} {'lost':>4}"
    )
    for r in results:
        print(
            f"{r.backend:<10} {r.variant:<16} {r.stale_reads:>11} {r.stale_read_p50_ms:>6.1f}"
            f" {r.stale_read_p99_ms:>6.1f} {r.stale_read_max_ms:>6.1f} {show(r.broadcast_p50_ms, '.1f'):>9}"
            f" {show(r.broadcast_p99_ms, '.1f'):>6} {show(r.broadcast_max_ms, '.1f'):>6}"
            f" {show(r.behind_probe, 'd'):>6} {show(r.behind_probe_max_ms, '.1f'):>6}"
            f" {show(r.quiet_reads, 'd'):>11} {show(r.quiet_local_hits, 'd'):>11}"
            f" {show(r.unsent, 'd'):>6} {show(r.listener_lost, 'd'):>4}"
        )


if __name__ == "__main__":
    sys.exit(main())
