"""Short runs of the race harness (``make race`` runs the long one), forked workers included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy

from benchmarks import race
from tests.conftest import redis_available
from tests.servers import PG_URL, Nutcracker, unavailable


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
        assert r["wrong"] == 0, r
        assert r["cached"] > 0 and r["writes"] > 0 and r["reads"] > 0, r


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
        assert r["wrong"] == 0, r
        assert r["cached"] > 0 and r["writes"] > 0 and r["reads"] > 0 and r["hit_rate"] > 0, r
    # the entries are on the backends behind the proxy, on both of them
    assert all(b.proc is not None and b.proc.poll() is None for b in nutcracker.backends)
    from pymemcache.client.base import Client

    for backend in nutcracker.backends:
        client = Client(("127.0.0.1", backend.port), connect_timeout=1, timeout=1)
        assert int(client.stats()[b"curr_items"]) > 0
        client.close()
