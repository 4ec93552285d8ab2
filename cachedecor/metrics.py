"""cachedecor's counters (:class:`cachedecor.RegionStats`) as Prometheus and OpenTelemetry metrics.

Every counter of every region becomes one monotonic counter, labelled with the
region's name: ``cachedecor_hits_total{region="default"}`` in Prometheus,
``cachedecor.hits`` with the attribute ``region`` in OpenTelemetry. The state of the
near caches (rows and bytes held, keys evicted, by region) and of the broadcast
(listener connected, messages received, connections lost, by transport) is
exported too (:func:`states`). The values are read when the metrics are collected
(a scrape, an export), never copied on the cache's hot path.

Each exporter needs an optional extra, imported only when it is used:
``pip install 'cachedecor[prometheus]'`` for :func:`register_prometheus`,
``pip install 'cachedecor[opentelemetry]'`` for :func:`instrument_opentelemetry`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import itertools
import textwrap
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from cachedecor import _runtime
from cachedecor.errors import MissingExtra, missing_extra
from cachedecor.stats import RegionStats, stats

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Instrument, MeterProvider, Observation
    from prometheus_client.metrics_core import Metric as PrometheusMetric
    from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "Metric",
    "MissingExtra",
    "PrometheusCollector",
    "State",
    "instrument_opentelemetry",
    "metrics",
    "register_prometheus",
    "states",
    "unregister_prometheus",
]

#: The label (Prometheus) or attribute (OpenTelemetry) that names the region.
REGION_LABEL = "region"
#: The one that names a broadcast transport (``postgresql`` or ``redis``).
TRANSPORT_LABEL = "transport"


class Metric(NamedTuple):
    """How one :class:`~cachedecor.RegionStats` counter is exported."""

    field: str
    """The counter's name in :func:`cachedecor.stats`."""
    prometheus: str
    """The Prometheus sample name (the counter family's name plus ``_total``)."""
    opentelemetry: str
    """The OpenTelemetry instrument name."""
    help: str
    """The counter's documentation (its docstring in :class:`~cachedecor.RegionStats`)."""


@functools.cache
def metrics() -> tuple[Metric, ...]:
    """Every exported counter, in the order of :class:`~cachedecor.RegionStats`.

    >>> m = metrics()[0]
    >>> m.prometheus, m.opentelemetry, m.help
    ('cachedecor_hits_total', 'cachedecor.hits', "Entries served from the cache (the near cache's included).")
    """
    docs = _field_docs()
    return tuple(
        Metric(
            f.name,
            f"cachedecor_{f.name}_total",
            f"cachedecor.{f.name}",
            docs.get(f.name) or f"cachedecor counter {f.name} (see cachedecor.RegionStats)",
        )
        for f in dataclasses.fields(RegionStats)
    )


def _field_docs() -> dict[str, str]:
    """The attribute docstrings of :class:`RegionStats`, read from its source (one plain line each)."""
    try:
        source = textwrap.dedent(inspect.getsource(RegionStats))
    except (OSError, TypeError):  # no source shipped: generic help texts
        return {}
    body = cast("ast.ClassDef", ast.parse(source).body[0]).body
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.replace("``", "").split())
    return docs


class State(NamedTuple):
    """A state of this process's near caches or broadcast, exported as it is when collected."""

    prometheus: str
    """The Prometheus family name (a counter's sample adds ``_total``)."""
    opentelemetry: str
    """The OpenTelemetry instrument name."""
    help: str
    """What it measures."""
    counter: bool
    """A monotonic counter (``True``) or a gauge."""
    label: str
    """What its values are by: :data:`REGION_LABEL` or :data:`TRANSPORT_LABEL`."""
    read: Callable[[], dict[str, float]]
    """Its values now, by region or transport."""


def _near_caches() -> dict[str, Any]:
    regions = _runtime.configured_regions()
    return {name: s.near for name, s in regions.items() if getattr(s, "near", None) is not None}


def _links() -> dict[str, Any]:
    sender = _runtime.current_broadcast
    return {} if sender is None else {link.kind: link for link in sender.links}


@functools.cache
def states() -> tuple[State, ...]:
    """The exported states of the near caches (by region) and of the broadcast (by transport).

    >>> [s.prometheus for s in states()][:2]
    ['cachedecor_near_entries', 'cachedecor_near_bytes']
    """
    return (
        State(
            "cachedecor_near_entries",
            "cachedecor.near.entries",
            "Rows held in this process's near cache.",
            False,
            REGION_LABEL,
            lambda: {name: len(near) for name, near in _near_caches().items()},
        ),
        State(
            "cachedecor_near_bytes",
            "cachedecor.near.bytes",
            "Bytes of the rows held in this process's near cache, as local_max_bytes counts them.",
            False,
            REGION_LABEL,
            lambda: {name: near.bytes for name, near in _near_caches().items()},
        ),
        State(
            "cachedecor_near_evictions",
            "cachedecor.near.evictions",
            "Keys evicted from this process's near cache (invalidations heard or made here).",
            True,
            REGION_LABEL,
            lambda: {name: near.evictions for name, near in _near_caches().items()},
        ),
        State(
            "cachedecor_broadcast_connected",
            "cachedecor.broadcast.connected",
            "1 while this process's broadcast listener on the transport is connected, else 0.",
            False,
            TRANSPORT_LABEL,
            lambda: {kind: int(link.connected.is_set()) for kind, link in _links().items()},
        ),
        State(
            "cachedecor_broadcast_received",
            "cachedecor.broadcast.received",
            "Invalidation messages this process received on the transport.",
            True,
            TRANSPORT_LABEL,
            lambda: {kind: link.received for kind, link in _links().items()},
        ),
        State(
            "cachedecor_broadcast_lost",
            "cachedecor.broadcast.lost",
            "Broadcast connections of this process lost or refused on the transport.",
            True,
            TRANSPORT_LABEL,
            lambda: {kind: link.lost for kind, link in _links().items()},
        ),
    )


def _snapshot() -> dict[str, dict[str, int]]:
    """The counters of every configured region (zeros until it counts), and of any other
    region that has counted something since the last :func:`cachedecor.reset_stats`."""
    configured = _runtime.configured_regions()
    counted = {name: values for name, values in stats().items() if any(values.values())}
    names = sorted({*counted, *configured})
    return {name: counted.get(name) or stats(name)[name] for name in names}


def _require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(what, module) from exc


# -- Prometheus ---------------------------------------------------------------------------


class PrometheusCollector:
    """A ``prometheus_client`` collector of the counters of every region of this process.

    Each scrape reads :func:`cachedecor.stats`: every configured region appears (at
    zero until it counts something), and so does any other region that counted.
    :func:`register_prometheus` registers one.
    """

    def collect(self) -> Iterator[PrometheusMetric]:
        """One counter family per counter, one sample per region."""
        core = _require("prometheus_client.core", "cachedecor's Prometheus collector")
        snapshot = _snapshot()
        for metric in metrics():
            family = core.CounterMetricFamily(
                metric.prometheus.removesuffix("_total"), metric.help, labels=[REGION_LABEL]
            )
            for region, values in snapshot.items():
                family.add_metric([region], values[metric.field])
            yield family
        for state in states():
            family = _state_family(core, state)
            for name, value in state.read().items():
                family.add_metric([name], value)
            yield family

    def describe(self) -> Iterator[PrometheusMetric]:
        """The families without samples, so that registering does not read the counters."""
        core = _require("prometheus_client.core", "cachedecor's Prometheus collector")
        for metric in metrics():
            yield core.CounterMetricFamily(
                metric.prometheus.removesuffix("_total"), metric.help, labels=[REGION_LABEL]
            )
        for state in states():
            yield _state_family(core, state)


def _state_family(core: Any, state: State) -> Any:
    kind = core.CounterMetricFamily if state.counter else core.GaugeMetricFamily
    return kind(state.prometheus, state.help, labels=[state.label])


class _Global:
    """Stands for the global meter provider, also before one is set (its proxy forwards)."""


_GLOBAL_PROVIDER = _Global()


def register_prometheus(registry: CollectorRegistry | None = None) -> PrometheusCollector:
    """Register a :class:`PrometheusCollector` with ``registry`` (default: ``prometheus_client.REGISTRY``).

    Registering again with the same registry returns the collector it already has.
    Raises :class:`MissingExtra` if ``prometheus_client`` is not installed.

    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> registry = CollectorRegistry()
    >>> collector = register_prometheus(registry)
    >>> register_prometheus(registry) is collector
    True
    >>> b"# TYPE cachedecor_hits_total counter" in generate_latest(registry)
    True
    """
    client = _require("prometheus_client", "cachedecor.metrics.register_prometheus")
    target = client.REGISTRY if registry is None else registry
    with _runtime.exporters_lock:
        collector = _runtime.prometheus_collectors.get(target)
        if collector is None:
            collector = PrometheusCollector()
            target.register(cast("Collector", collector))
            _runtime.prometheus_collectors[target] = collector
    return collector


def unregister_prometheus(registry: CollectorRegistry | None = None) -> None:
    """Remove what :func:`register_prometheus` registered with ``registry`` (if anything)."""
    client = _require("prometheus_client", "cachedecor.metrics.unregister_prometheus")
    target = client.REGISTRY if registry is None else registry
    with _runtime.exporters_lock:
        collector = _runtime.prometheus_collectors.pop(target, None)
        if collector is not None:
            target.unregister(cast("Collector", collector))


# -- OpenTelemetry ------------------------------------------------------------------------


def instrument_opentelemetry(meter_provider: MeterProvider | None = None) -> list[Instrument]:
    """Create one observable counter per counter, and one observable counter or gauge per
    :func:`state <states>`, on a ``cachedecor`` meter of ``meter_provider``.

    Without ``meter_provider``, the global one (``opentelemetry.metrics.set_meter_provider``)
    is used, also when it is set later. Each collection reports the counters of every
    region, with the region's name in the ``region`` attribute. Instrumenting the same
    provider again returns the instruments it already has. Raises :class:`MissingExtra`
    if ``opentelemetry-api`` is not installed.
    """
    api = _require("opentelemetry.metrics", "cachedecor.metrics.instrument_opentelemetry")
    from cachedecor import __version__

    key = _GLOBAL_PROVIDER if meter_provider is None else meter_provider
    with _runtime.exporters_lock:
        instruments = _runtime.opentelemetry_instruments.get(key)
        if instruments is None:
            meter = api.get_meter("cachedecor", __version__, meter_provider=meter_provider)
            instruments = [
                meter.create_observable_counter(
                    metric.opentelemetry,
                    callbacks=[functools.partial(_observe, api.Observation, metric.field)],
                    description=metric.help,
                )
                for metric in metrics()
            ]
            for state in states():
                create = meter.create_observable_counter if state.counter else meter.create_observable_gauge
                instruments.append(
                    create(
                        state.opentelemetry,
                        callbacks=[functools.partial(_observe_state, api.Observation, state)],
                        description=state.help,
                    )
                )
            _runtime.opentelemetry_instruments[key] = instruments
    return instruments


def _observe(observation: type[Observation], field: str, options: CallbackOptions) -> Iterable[Observation]:
    return [observation(values[field], {REGION_LABEL: region}) for region, values in _snapshot().items()]


def _observe_state(
    observation: type[Observation], state: State, options: CallbackOptions
) -> Iterable[Observation]:
    return [observation(value, {state.label: name}) for name, value in state.read().items()]
