"""Short runs of the race harness (``make race`` runs the long one), forked workers and
asyncio programs included, and its staleness check on reads it can tell apart."""

from __future__ import annotations

import asyncio
import json
import os
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
