"""A short run of the race harness (``make race`` runs the long one), forked workers included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy

from benchmarks import race
from tests.conftest import redis_available
from tests.servers import PG_URL, unavailable


def test_no_stale_or_wrong_rows_after_a_short_storm_on_memcached_and_redis(
    tmp_path: Path, memcached: Any
) -> None:
    try:
        sqlalchemy.create_engine(PG_URL).connect().close()
    except Exception as exc:
        unavailable(f"PostgreSQL is not reachable: {exc}")
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
