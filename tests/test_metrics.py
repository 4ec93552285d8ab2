"""The counters exported to Prometheus and OpenTelemetry, read back through the real libraries."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, Gauge, InMemoryMetricReader, Sum
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import metrics
from cachedecor.config import region_settings
from cachedecor.metrics import MissingExtra
from tests.conftest import memcached_config, once, wait_until
from tests.models import User
from tests.servers import REDIS_URL, Memcached


@cachedecor.cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cachedecor.cached_by_pk(User, region="users")
def get_user_elsewhere(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cachedecor.invalidates(User)
def rename_user(session: Session, user_id: int, name: str) -> None:
    session.get(User, user_id).name = name  # type: ignore[union-attr]
    session.commit()


FIELDS = [f.name for f in dataclasses.fields(cachedecor.RegionStats)]
STATES = metrics.states()


@pytest.fixture
def traffic(sqlite_engine: Engine, memcached: Memcached) -> Engine:
    """Two regions on memcached. default: 2 misses, 1 hit, 2 fills; users: 1 miss, 1 fill;
    then one committed write (its key deleted in both regions)."""
    config = memcached_config(memcached.url)
    config["regions"]["users"] = {**config["regions"]["default"], "namespace": "other"}
    cachedecor.configure_regions(config)
    with Session(sqlite_engine) as s:
        s.add_all([User(id=1, name="one"), User(id=2, name="two")])
        s.commit()
    once(sqlite_engine, get_user, 1)
    once(sqlite_engine, get_user, 1)
    once(sqlite_engine, get_user, 2)
    once(sqlite_engine, get_user_elsewhere, 1)
    once(sqlite_engine, rename_user, 1, "uno")
    return sqlite_engine


def expected(region: str) -> dict[str, int]:
    return cachedecor.stats(region)[region]


# -- Prometheus ---------------------------------------------------------------------------


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    metrics.register_prometheus(registry)
    yield registry
    metrics.unregister_prometheus(registry)


def scrape(registry: CollectorRegistry) -> dict[str, Any]:
    """The text exposition, parsed: family name -> family."""
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, region: str) -> float:
    family = families[name.removesuffix("_total")]
    values = [s.value for s in family.samples if s.name == name and s.labels == {"region": region}]
    assert len(values) == 1, (name, region, family.samples)
    return float(values[0])


class TestPrometheus:
    def test_a_scrape_shows_the_counts_of_real_traffic_per_region(
        self, traffic: Engine, registry: CollectorRegistry
    ) -> None:
        families = scrape(registry)
        assert sample(families, "cachedecor_hits_total", "default") == 1
        assert sample(families, "cachedecor_misses_total", "default") == 2
        assert sample(families, "cachedecor_fills_total", "default") == 2
        assert sample(families, "cachedecor_lease_wins_total", "default") == 2
        assert sample(families, "cachedecor_misses_total", "users") == 1
        assert sample(families, "cachedecor_hits_total", "users") == 0
        assert sample(families, "cachedecor_invalidations_total", "default") == 1
        assert sample(families, "cachedecor_invalidations_total", "users") == 1

    def test_every_counter_is_a_counter_family_with_its_docstring_as_help(
        self, traffic: Engine, registry: CollectorRegistry
    ) -> None:
        families = scrape(registry)
        assert sorted(families) == sorted(
            [f"cachedecor_{f}" for f in FIELDS] + [s.prometheus for s in STATES]
        )
        for field in FIELDS:
            family = families[f"cachedecor_{field}"]
            assert family.type == "counter"
            for region in ("default", "users"):
                assert sample(families, f"cachedecor_{field}_total", region) == expected(region)[field]
        hits_help = "Entries served from the cache (the near cache's included)."
        assert families["cachedecor_hits"].documentation == hits_help
        assert families["cachedecor_misses"].documentation.startswith(
            "Keys not found (or found unusable). Each call counts once: a hit or a miss."
        )
        assert "``" not in generate_latest(registry).decode()

    def test_each_scrape_reads_the_counters_again(self, traffic: Engine, registry: CollectorRegistry) -> None:
        assert sample(scrape(registry), "cachedecor_hits_total", "default") == 1
        once(traffic, get_user, 2)
        assert sample(scrape(registry), "cachedecor_hits_total", "default") == 2

    def test_a_configured_region_is_there_at_zero_before_it_counts(
        self, memcached: Memcached, registry: CollectorRegistry
    ) -> None:
        config = memcached_config(memcached.url)
        config["regions"] = {"configured_only": config["regions"]["default"]}  # a name no test counted in
        cachedecor.configure_regions(config)
        families = scrape(registry)
        assert all(sample(families, f"cachedecor_{field}_total", "configured_only") == 0 for field in FIELDS)

    def test_after_a_reset_regions_no_longer_configured_are_gone(
        self, traffic: Engine, registry: CollectorRegistry
    ) -> None:
        cachedecor.reset()
        assert all(family.samples == [] for family in scrape(registry).values())

    def test_registering_twice_returns_the_same_collector(self, registry: CollectorRegistry) -> None:
        collector = metrics.register_prometheus(registry)
        assert metrics.register_prometheus(registry) is collector
        metrics.unregister_prometheus(registry)
        assert b"cachedecor_" not in generate_latest(registry)
        assert metrics.register_prometheus(registry) is not collector

    def test_the_default_registry(self, traffic: Engine) -> None:
        from prometheus_client import REGISTRY

        metrics.register_prometheus()
        try:
            assert REGISTRY.get_sample_value("cachedecor_hits_total", {"region": "default"}) == 1
        finally:
            metrics.unregister_prometheus()
        assert REGISTRY.get_sample_value("cachedecor_hits_total", {"region": "default"}) is None


# -- OpenTelemetry ------------------------------------------------------------------------


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.instrument_opentelemetry(provider)
    yield reader
    provider.shutdown()


def collected(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Metric name -> metric, of the ``cachedecor`` meter's scope."""
    data = reader.get_metrics_data()
    assert data is not None
    scopes = [sm for rm in data.resource_metrics for sm in rm.scope_metrics]
    assert [sm.scope.name for sm in scopes] == ["cachedecor"]
    assert scopes[0].scope.version == cachedecor.__version__
    return {m.name: m for m in scopes[0].metrics}


def point(found: dict[str, Any], name: str, region: str) -> int:
    values = [p.value for p in found[name].data.data_points if dict(p.attributes) == {"region": region}]
    assert len(values) == 1, (name, region)
    return int(values[0])


class TestOpenTelemetry:
    def test_the_in_memory_reader_sees_the_counts_of_real_traffic_per_region(
        self, traffic: Engine, reader: InMemoryMetricReader
    ) -> None:
        found = collected(reader)
        assert point(found, "cachedecor.hits", "default") == 1
        assert point(found, "cachedecor.misses", "default") == 2
        assert point(found, "cachedecor.fills", "default") == 2
        assert point(found, "cachedecor.misses", "users") == 1
        assert point(found, "cachedecor.invalidations", "users") == 1

    def test_every_counter_is_a_monotonic_cumulative_sum_with_its_docstring(
        self, traffic: Engine, reader: InMemoryMetricReader
    ) -> None:
        found = collected(reader)
        assert sorted(found) == sorted(f"cachedecor.{f}" for f in FIELDS)
        for field in FIELDS:
            metric = found[f"cachedecor.{field}"]
            assert isinstance(metric.data, Sum)
            assert metric.data.is_monotonic
            assert metric.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
            for region in ("default", "users"):
                assert point(found, f"cachedecor.{field}", region) == expected(region)[field]
        hits_help = "Entries served from the cache (the near cache's included)."
        assert found["cachedecor.hits"].description == hits_help

    def test_each_collection_reads_the_counters_again(
        self, traffic: Engine, reader: InMemoryMetricReader
    ) -> None:
        assert point(collected(reader), "cachedecor.hits", "default") == 1
        once(traffic, get_user, 2)
        assert point(collected(reader), "cachedecor.hits", "default") == 2

    def test_instrumenting_a_provider_twice_returns_its_instruments(self) -> None:
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        first = metrics.instrument_opentelemetry(provider)
        assert metrics.instrument_opentelemetry(provider) is first
        assert len(first) == len(FIELDS) + len(STATES)
        cachedecor.configure_regions({"regions": {"configured_only": {"backend": "dogpile.cache.memory"}}})
        found = collected(reader)
        assert all(point(found, f"cachedecor.{field}", "configured_only") == 0 for field in FIELDS)
        provider.shutdown()


# -- the near caches and the broadcast ---------------------------------------------------


@pytest.fixture
def near_traffic(sqlite_engine: Engine, memcached: Memcached) -> Iterator[Engine]:
    """Region default with a near cache, broadcast over Redis: rows 1 and 2 held near,
    then row 1 renamed (evicted here, and its message received back)."""
    config = memcached_config(memcached.url, local_entries=100)
    config["broadcast_url"] = REDIS_URL
    config["broadcast_channel"] = f"cd_metrics_{uuid.uuid4().hex[:8]}"
    cachedecor.configure_regions(config)
    sender = cachedecor.broadcast.current()
    assert sender is not None and sender.connected.wait(10), "the broadcast listener did not connect"
    with Session(sqlite_engine) as s:
        s.add_all([User(id=1, name="one"), User(id=2, name="two")])
        s.commit()
    for user_id in (1, 2, 1, 2):
        once(sqlite_engine, get_user, user_id)
    heard = sender.received
    once(sqlite_engine, rename_user, 1, "uno")
    wait_until(lambda: sender.received > heard)
    yield sqlite_engine
    cachedecor.reset()


def live_states() -> dict[str, Any]:
    near = region_settings("default").near
    sender = cachedecor.broadcast.current()
    assert near is not None and sender is not None
    [link] = sender.links
    return {
        "near.entries": len(near),
        "near.bytes": near.bytes,
        "near.evictions": near.evictions,
        "broadcast.connected": 1,
        "broadcast.received": link.received,
        "broadcast.lost": link.lost,
    }


def test_prometheus_shows_the_near_cache_and_the_broadcast(
    near_traffic: Engine, registry: CollectorRegistry
) -> None:
    live = live_states()
    assert live["near.entries"] == 1 and live["near.bytes"] > 0 and live["near.evictions"] >= 1
    families = scrape(registry)
    for state in STATES:
        family = families[state.prometheus]
        assert family.type == ("counter" if state.counter else "gauge")
        name = state.prometheus + ("_total" if state.counter else "")
        where = {"region": "default"} if state.label == "region" else {"transport": "redis"}
        [value] = [s.value for s in family.samples if s.name == name and s.labels == where]
        assert value == live[state.opentelemetry.removeprefix("cachedecor.")], state


def test_opentelemetry_shows_the_near_cache_and_the_broadcast(
    near_traffic: Engine, reader: InMemoryMetricReader
) -> None:
    live = live_states()
    found = collected(reader)
    for state in STATES:
        metric = found[state.opentelemetry]
        assert isinstance(metric.data, Sum if state.counter else Gauge)
        where = {"region": "default"} if state.label == "region" else {"transport": "redis"}
        [value] = [p.value for p in metric.data.data_points if dict(p.attributes) == where]
        assert value == live[state.opentelemetry.removeprefix("cachedecor.")], state


def test_a_lost_broadcast_shows(near_traffic: Engine, registry: CollectorRegistry) -> None:
    sender = cachedecor.broadcast.current()
    assert sender is not None
    [link] = sender.links
    fd = link.ear.fd
    assert fd is not None
    with socket.socket(fileno=os.dup(fd)) as listening:
        port = listening.getsockname()[1]
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
    try:  # the server closes the listener's connection (it reconnects)
        assert client.execute_command("CLIENT", "KILL", "ADDR", f"127.0.0.1:{port}") in (True, b"OK", "OK")
    finally:
        client.close()
    wait_until(lambda: link.lost >= 1)
    families = scrape(registry)
    [lost] = [s.value for s in families["cachedecor_broadcast_lost"].samples if s.name.endswith("_total")]
    assert lost == link.lost >= 1


# -- optional extras ----------------------------------------------------------------------


class TestExtras:
    def test_importing_the_module_imports_neither_library(self) -> None:
        code = (
            "import sys, cachedecor.metrics as m; m.metrics(); "
            "roots = ('prometheus_client', 'opentelemetry'); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in roots))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"

    def test_without_prometheus_client_the_error_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A missing package is simulated the way Python's import system honours:
        # a None entry in sys.modules makes the import raise ImportError.
        monkeypatch.setitem(sys.modules, "prometheus_client", None)
        with pytest.raises(MissingExtra, match=r"pip install 'cachedecor\[prometheus\]'") as info:
            metrics.register_prometheus()
        assert isinstance(info.value, cachedecor.ConfigError) and isinstance(info.value, ImportError)

    def test_without_opentelemetry_the_error_names_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "opentelemetry.metrics", None)
        with pytest.raises(MissingExtra, match=r"pip install 'cachedecor\[opentelemetry\]'"):
            metrics.instrument_opentelemetry()

    def test_every_counter_has_its_own_help_text(self) -> None:
        assert [m.field for m in metrics.metrics()] == FIELDS
        for m in metrics.metrics():
            assert "see cachedecor.RegionStats" not in m.help, m.field
            assert m.prometheus == f"cachedecor_{m.field}_total"
            assert m.opentelemetry == f"cachedecor.{m.field}"
