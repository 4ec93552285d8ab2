"""Short runs of the race harness (``make race`` runs the long one), forked workers,
asyncio programs and near caches included, and its staleness checks on reads it can
tell apart."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

import cachedecor
from benchmarks import race
from tests.conftest import redis_available
from tests.servers import PG_URL, REDIS_URL, Nutcracker, unavailable

SYNC_VARIANTS = "naive,cachedecor,forked,mixed"


def postgresql_available() -> None:
    try:
        sqlalchemy.create_engine(PG_URL).connect().close()
    except Exception as exc:
        unavailable(f"PostgreSQL is not reachable: {exc}")


def test_no_stale_or_wrong_rows_after_a_short_storm_on_memcached_and_redis(
    tmp_path: Path, memcached: Any
) -> None:
    postgresql_available()
    redis_available()
    out = tmp_path / "race.json"
    status = race.main(
        [
            "--backend",
            "both",
            "--memcached",
            memcached.url,
            "--redis",
            REDIS_URL,
            "--variants",
            SYNC_VARIANTS,
            "--seconds",
            "2",
            "--rows",
            "50",
            "--json",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    ours = [r for r in results if r["variant"] != "naive"]
    assert status == 0
    assert {(r["backend"], r["variant"]) for r in ours} == {
        (backend, variant)
        for backend in ("memcached", "redis")
        for variant in ("cachedecor", "forked", "mixed")
    }
    for r in ours:
        assert r["stale"] == 0, r
        assert r["stale_reads"] == 0, r
        assert r["wrong"] == 0, r
        assert r["cached"] > 0 and r["writes"] > 0 and r["reads"] > 0, r
        assert r["quiet_stale"] == 0 and r["quiet_reads"] == 4 * 50, r  # 4 readers, every row


def test_no_stale_or_wrong_rows_after_a_short_async_storm_on_memcached_and_redis(
    tmp_path: Path, memcached: Any
) -> None:
    postgresql_available()
    redis_available()
    out = tmp_path / "race.json"
    status = race.main(
        [
            "--backend",
            "both",
            "--memcached",
            memcached.url,
            "--redis",
            REDIS_URL,
            "--variants",
            "naive-async,cachedecor-async",
            "--async-processes",
            "2",
            "--tasks",
            "8,2",
            "--seconds",
            "2",
            "--rows",
            "50",
            "--json",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    assert status == 0
    assert [(r["backend"], r["variant"]) for r in results] == [
        (backend, variant)
        for backend in ("memcached", "redis")
        for variant in ("naive-async", "cachedecor-async")
    ]
    for r in results:
        assert r["cached"] > 0 and r["writes"] > 0 and r["reads"] > 0, r
        if r["variant"] == "cachedecor-async":
            assert r["stale"] == 0, r
            assert r["stale_reads"] == 0, r
            assert r["wrong"] == 0, r
            assert r["hit_rate"] > 0, r


@pytest.mark.parametrize("variant", ["naive-async", "cachedecor-async"])
@pytest.mark.parametrize("backend", ["memcached", "redis"])
def test_an_async_read_older_than_a_returned_write_is_counted_stale(
    backend: str, variant: str, request: pytest.FixtureRequest
) -> None:
    """The check the async storm relies on, one read at a time: a read is stale when it
    returns a version older than one whose writer had returned before it started."""
    postgresql_available()
    if backend == "memcached":
        url = request.getfixturevalue("memcached").url
    else:
        redis_available()
        url = REDIS_URL
    tag = f"racecheck{os.getpid()}"
    opts = race.Options(
        backend,
        url,
        race.own_schema(PG_URL, tag),
        readers=1,
        writers=1,
        rows=2,
        seconds=0,
        max_pause_ms=0,
        tag=tag,
        async_processes=1,
        async_readers=1,
        async_writers=1,
        async_database=sqlalchemy.make_url(PG_URL)
        .set(drivername="postgresql+asyncpg")
        .render_as_string(hide_password=False),
    )
    try:
        race.reset_rows(opts)
        race.clear_cache(opts, variant)
        asyncio.run(_reads_around_a_write_behind_the_cache(opts, variant))
    finally:
        race.drop_schema(PG_URL, tag)


async def _reads_around_a_write_behind_the_cache(opts: race.Options, variant: str) -> None:
    floors = race.Floors(1, opts.rows + 1)  # and a row that the table does not hold
    engine = race.async_engine(opts)
    cache = race.AsyncNaiveCache(opts.backend, opts.cache_url, 2) if variant == "naive-async" else None
    try:

        async def read() -> str:
            return await race.read_once(opts, floors, engine, cache, 0, 0.0)

        assert await read() == "fresh"  # a miss: version 0 read and cached
        # version 1 committed past the cache (nothing deleted), and published
        async with engine.begin() as conn:
            await conn.execute(sqlalchemy.update(race.RaceRow).where(race.RaceRow.id == 0).values(version=1))
        floors.publish(0, 0, 1)
        assert await read() == "stale_reads"  # the cached version 0
        await race.write_once(opts, floors, 0, engine, cache, 0)  # version 2, invalidated
        assert floors.floor(0) == 2
        assert await read() == "fresh"
        if cache is None:
            assert await race.read_once(opts, floors, engine, None, opts.rows, 0.0) == "wrong"  # no such row
            assert cachedecor.stats("race")["race"]["hits"] == 1
    finally:
        if cache is not None:
            await cache.close()
        await engine.dispose()


def test_no_stale_or_wrong_rows_through_twemproxy(tmp_path: Path, nutcracker: Nutcracker) -> None:
    postgresql_available()
    out = tmp_path / "race.json"
    status = race.main(
        [
            "--backend",
            "memcached",
            "--proxy",
            "twemproxy",
            "--memcached",
            nutcracker.url,
            "--variants",
            SYNC_VARIANTS,
            "--seconds",
            "2",
            "--rows",
            "50",
            "--json",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    assert status == 0
    assert [(r["backend"], r["variant"]) for r in results] == [
        ("twemproxy", variant) for variant in ("naive", "cachedecor", "forked", "mixed")
    ]
    for r in results[1:]:
        assert r["stale"] == 0, r
        assert r["stale_reads"] == 0, r
        assert r["wrong"] == 0, r
        assert r["cached"] > 0 and r["writes"] > 0 and r["reads"] > 0 and r["hit_rate"] > 0, r
    # the entries are on the backends behind the proxy, on both of them
    assert all(b.proc is not None and b.proc.poll() is None for b in nutcracker.backends)
    from pymemcache.client.base import Client

    for backend in nutcracker.backends:
        client = Client(("127.0.0.1", backend.port), connect_timeout=1, timeout=1)
        assert int(client.stats()[b"curr_items"]) > 0
        client.close()


# -- near caches ---------------------------------------------------------------------------


def test_near_caches_serve_no_stale_row_once_quiet_nor_any_older_than_local_ttl(
    tmp_path: Path, memcached: Any
) -> None:
    """A short storm with a near cache in every process, broadcast by PostgreSQL and by
    Redis, in front of memcached and of Redis. Stale reads may happen while a broadcast
    is on its way; none may come ``local_ttl`` or more after the write that made it
    stale, and once the writers have stopped (and their broadcasts have arrived) every
    reader process reads every row as the database has it."""
    postgresql_available()
    redis_available()
    out = tmp_path / "race.json"
    status = race.main(
        [
            "--backend",
            "both",
            "--memcached",
            memcached.url,
            "--redis",
            REDIS_URL,
            "--variants",
            "near-pg,near-redis,near-both",
            "--seconds",
            "3",
            "--rows",
            "50",
            "--local-ttl",
            "10",
            "--json",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    assert status == 0
    assert [(r["backend"], r["variant"]) for r in results] == [
        (backend, variant)
        for backend in ("memcached", "redis")
        for variant in ("near-pg", "near-redis", "near-both")
    ]
    for r in results:
        assert r["stale"] == 0, r
        assert r["wrong"] == 0, r
        assert r["quiet_reads"] == 4 * 50 and r["quiet_stale"] == 0, r
        assert r["quiet_local_hits"] > 0, r  # the quiet check read through the near caches
        assert r["stale_read_max_ms"] < 1000 * r["local_ttl"], r
        assert r["reads"] > 0 and r["writes"] > 0 and r["local_hit_rate"] > 0, r
        assert r["unsent"] == 0 and r["probe_complete"], r
        assert r["writes_heard"] > 0, r


def test_a_stale_read_is_timed_from_the_return_of_the_first_newer_write() -> None:
    floors = race.Floors(2, 1)
    floors.publish(0, 0, 1, returned=10.0, started=9.0)
    floors.publish(1, 0, 3, returned=11.0, started=10.5)  # before version 2's writer returned
    floors.publish(0, 0, 2, returned=12.0, started=10.0)
    assert floors.floor(0) == 3
    assert floors.check(0, 3, 3, 20.0) is None
    assert floors.check(0, 3, 0, 20.0) == (1, 10.0)
    assert floors.check(0, 3, 1, 20.0) == (3, 9.0)  # version 3 returned first
    assert floors.check(0, 2, 1, 20.0) == (2, 8.0)  # the floor when the read started: 2
    assert race.delay_summary([]) == {"p50": 0.0, "p99": 0.0, "max": 0.0}
    assert race.delay_summary([i / 1000 for i in range(1, 101)]) == pytest.approx(
        {"p50": 50.0, "p99": 99.0, "max": 100.0}
    )


def test_a_near_cache_keeps_its_guarantee_with_stale_reads_younger_than_local_ttl_only() -> None:
    def result(variant: str, **fields: Any) -> race.Result:
        counts: dict[str, Any] = {"reads": 100, "writes": 10, "cached": 5, "stale": 0, "wrong": 0}
        if variant in race.NEAR_VARIANTS:
            counts["local_ttl"] = 10.0
        return race.Result("memcached", variant, **{**counts, **fields})

    assert result("near-pg", stale_reads=3, stale_read_max_ms=9_999.0, quiet_stale=0).kept_guarantee()
    assert not result("near-pg", stale_reads=3, stale_read_max_ms=10_000.0).kept_guarantee()
    assert not result("near-redis", quiet_stale=1).kept_guarantee()
    assert not result("near-redis", stale=1).kept_guarantee()
    assert not result("cachedecor", stale_reads=1, stale_read_max_ms=0.1).kept_guarantee()
    assert result("cachedecor", quiet_stale=0).kept_guarantee()
    assert result("naive", stale_reads=5, stale=2, wrong=None).kept_guarantee()  # a baseline


def test_the_broadcast_delay_of_a_write_is_its_last_message_after_it_returned() -> None:
    floors = race.Floors(1, 2)
    floors.publish(0, 0, 1, returned=11.0, started=10.0)
    floors.publish(0, 0, 2, returned=21.0, started=20.0)
    floors.publish(0, 1, 1, returned=31.0, started=30.0)
    arrivals = {0: [10.5, 11.5, 22.0, 25.0]}  # nothing heard about row 1
    delays, last = race.broadcast_delays(floors, {0: 2, 1: 1}, arrivals, 2)
    assert delays == [0.5, 4.0]
    assert last == {(0, 1): 11.5, (0, 2): 25.0}


def test_the_quiet_check_counts_a_near_entry_that_the_database_has_moved_past(memcached: Any) -> None:
    """What the near storm's checks rest on: a row that changes behind the near cache
    is a stale read, timed from its write, and a stale read once quiet; an
    invalidation in this process evicts it."""
    postgresql_available()
    tag = f"racenear{os.getpid()}"
    broadcast_pg = (
        sqlalchemy.make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    opts = race.Options(
        "memcached",
        memcached.url,
        race.own_schema(PG_URL, tag),
        readers=1,
        writers=1,
        rows=3,
        seconds=0,
        max_pause_ms=0,
        tag=tag,
        broadcast_pg=broadcast_pg,
    )
    engine = sqlalchemy.create_engine(opts.database)
    try:
        race.reset_rows(opts)
        cachedecor.configure_regions(race.region_config(opts, "near-pg"))
        race.listening()
        truth = race.db_versions(opts)
        fill = race.quiet_reads(opts, engine, race.read_row, truth)
        assert fill == {"quiet_reads": 3, "quiet_stale": 0, "quiet_local_hits": 0}
        assert race.quiet_reads(opts, engine, race.read_row, truth)["quiet_local_hits"] == 3

        # version 1 of row 0 committed behind the caches (nothing invalidated), published
        with engine.begin() as conn:
            conn.execute(sqlalchemy.update(race.RaceRow).where(race.RaceRow.id == 0).values(version=1))
        floors = race.Floors(1, opts.rows)
        written = time.monotonic()
        floors.publish(0, 0, 1, returned=written, started=written)
        with sqlalchemy.orm.Session(engine) as s:
            row = race.read_row(s, 0)
            returned = time.monotonic()
            assert row is not None and row.version == 0
        assert floors.check(0, floors.floor(0), row.version, returned) == (1, returned - written)
        truth = race.db_versions(opts)
        assert race.quiet_reads(opts, engine, race.read_row, truth) == {
            "quiet_reads": 3,
            "quiet_stale": 1,
            "quiet_local_hits": 3,
        }

        cachedecor.invalidate(race.RaceRow, 0)  # evicted here before it returns
        after = race.quiet_reads(opts, engine, race.read_row, truth)
        assert after == {"quiet_reads": 3, "quiet_stale": 0, "quiet_local_hits": 2}
    finally:
        engine.dispose()
        race.drop_schema(PG_URL, tag)
