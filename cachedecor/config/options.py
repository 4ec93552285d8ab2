"""The options: what each backend and region accepts, their types, ranges and coercion.

Every table here is read-only (a :class:`types.MappingProxyType`, a tuple or a frozenset):
the options are fixed when the package is imported.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cachedecor.backends import (
    MEMCACHED_ARGUMENTS,
)
from cachedecor.errors import ConfigError, missing_extra
from cachedecor.keys import DEFAULT_NAMESPACE
from cachedecor.outbox import OutboxSettings

__all__ = [
    "ARGUMENT_RANGES",
    "BACKEND_ARGUMENTS",
    "BACKEND_NAMES",
    "GLOBAL_OPTIONS",
    "MOVED_TO_CONNECTION_KWARGS",
    "NO_EFFECT",
    "NO_LEASES",
    "OUTBOX_RANGES",
    "REFUSED_BACKENDS",
    "REGION_OPTIONS",
    "REGION_RANGES",
    "SENTINEL_SCHEMES",
    "SENTINEL_TIMEOUTS",
    "SERIALIZERS",
    "SUBSTITUTES",
    "OutboxSettings",
    "broadcast_settings",
    "coerce",
    "outbox_settings",
]

#: Backends that cachedecor replaces by its own implementation (name written -> name
#: used), and why: dogpile's pymemcache backend drops connect_timeout/timeout, so a
#: hung server blocks forever. Read-only.
SUBSTITUTES: Mapping[str, str] = MappingProxyType({"dogpile.cache.pymemcache": "cachedecor.pymemcache"})

_REDIS_ARGUMENTS: Mapping[str, type] = MappingProxyType(
    {
        "url": str,
        "host": str,
        "port": int,
        "db": int,
        "username": str,
        "password": str,
        "socket_timeout": float,
        "socket_connect_timeout": float,
        "socket_keepalive": bool,
        "socket_keepalive_options": object,
        "ssl": bool,
        "distributed_lock": bool,
        "lock_timeout": int,
        "lock_sleep": float,
        "lock_blocking": bool,
        "lock_blocking_timeout": float,
        "thread_local_lock": bool,
        "connection_kwargs": object,
        "redis_expiration_time": int,
        "connection_pool": object,
        "lock_prefix": str,
    }
)
_VALKEY_ARGUMENTS: Mapping[str, type] = MappingProxyType(
    {
        **{k: v for k, v in _REDIS_ARGUMENTS.items() if k != "redis_expiration_time"},
        "valkey_expiration_time": int,
    }
)
_SENTINEL: Mapping[str, type] = MappingProxyType(
    {"sentinels": object, "service_name": str, "sentinel_kwargs": object}
)
_CLUSTER: Mapping[str, type] = MappingProxyType({"startup_nodes": object})
_MEMORY: Mapping[str, type] = MappingProxyType({"cache_dict": object})

#: Arguments accepted by each backend cachedecor supports (backend name -> argument ->
#: type), read-only. The schema of ``cachedecor.pymemcache`` is
#: :data:`cachedecor.backends.MEMCACHED_ARGUMENTS` itself (callers may test it with ``is``).
BACKEND_ARGUMENTS: Mapping[str, Mapping[str, type]] = MappingProxyType(
    {
        "cachedecor.pymemcache": MEMCACHED_ARGUMENTS,
        "dogpile.cache.memory": _MEMORY,
        "dogpile.cache.memory_pickle": _MEMORY,
        "dogpile.cache.redis": _REDIS_ARGUMENTS,
        "dogpile.cache.redis_sentinel": MappingProxyType({**_REDIS_ARGUMENTS, **_SENTINEL}),
        "dogpile.cache.redis_cluster": MappingProxyType({**_REDIS_ARGUMENTS, **_CLUSTER}),
        "dogpile.cache.valkey": _VALKEY_ARGUMENTS,
        "dogpile.cache.valkey_sentinel": MappingProxyType({**_VALKEY_ARGUMENTS, **_SENTINEL}),
        "dogpile.cache.valkey_cluster": MappingProxyType({**_VALKEY_ARGUMENTS, **_CLUSTER}),
    }
)

_CLUSTERS = ("dogpile.cache.redis_cluster", "dogpile.cache.valkey_cluster")
_SENTINELS = ("dogpile.cache.redis_sentinel", "dogpile.cache.valkey_sentinel")
_CONNECTION = (
    "username",
    "password",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "socket_keepalive_options",
    "ssl",
)

#: Arguments that a dogpile backend accepts but does not hand to its client, which
#: cachedecor moves into ``connection_kwargs`` so that they take effect (backend ->
#: arguments), read-only. dogpile's cluster backends pass only ``url`` (or
#: ``startup_nodes``) and ``connection_kwargs`` to ``RedisCluster``, which gives its
#: keyword arguments to the connection of every node (measured: without this, a read of
#: a key on a paused master blocked for the whole pause with ``socket_timeout`` set);
#: its sentinel backends drop ``ssl``.
MOVED_TO_CONNECTION_KWARGS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        **dict.fromkeys(_CLUSTERS, ("host", "port", *_CONNECTION)),
        **dict.fromkeys(_SENTINELS, ("ssl",)),
    }
)
#: Timeouts of a sentinel backend that cachedecor also gives to the connections to the
#: sentinels (``sentinel_kwargs``, unless set there): dogpile gives them only to the
#: connections to the master and replicas, so a paused sentinel blocked discovery.
SENTINEL_TIMEOUTS: tuple[str, ...] = ("socket_timeout", "socket_connect_timeout")

_POOL = "the client of {kind} makes its own connection pools; set the connection arguments instead"
#: Arguments a backend accepts in dogpile's schema but that would have no effect
#: there: a :class:`ConfigError` (backend -> argument -> why, a phrase), read-only.
NO_EFFECT: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        **dict.fromkeys(_CLUSTERS, MappingProxyType({"connection_pool": _POOL.format(kind="a cluster")})),
        **dict.fromkeys(
            _SENTINELS,
            MappingProxyType(
                {
                    "host": "a sentinel backend finds its master through the sentinels; set "
                    "arguments.url = redis+sentinel://host:port/service_name (or arguments.sentinels)",
                    "port": "a sentinel backend finds its master through the sentinels; set "
                    "arguments.url = redis+sentinel://host:port/service_name (or arguments.sentinels)",
                    "connection_pool": _POOL.format(kind="a sentinel backend"),
                }
            ),
        ),
    }
)
#: The URL scheme of each sentinel backend's ``arguments.url``
#: (``<scheme>://host:port[,host:port...]/service_name[/db]``).
SENTINEL_SCHEMES: Mapping[str, str] = MappingProxyType(
    {"dogpile.cache.redis_sentinel": "redis+sentinel", "dogpile.cache.valkey_sentinel": "valkey+sentinel"}
)

#: Every name the ``backend`` option accepts (those of :data:`BACKEND_ARGUMENTS` and
#: :data:`SUBSTITUTES`), sorted: the list an error message offers.
BACKEND_NAMES: tuple[str, ...] = tuple(sorted({*BACKEND_ARGUMENTS, *SUBSTITUTES}))

#: Why a backend without leases is refused: a phrase that follows "it has" in a message.
NO_LEASES = (
    "no atomic add and compare-and-set, which cachedecor's fill leases need to keep a slow "
    "reader from storing a row older than a committed write"
)
_OTHER_MEMCACHED_CLIENT = (
    f"through {{client}} it has {NO_LEASES} (cachedecor has them only through its own "
    "pymemcache client); use backend = dogpile.cache.pymemcache with the same arguments.url"
)

#: dogpile backends cachedecor cannot use (name -> why, a phrase that follows "cachedecor
#: cannot use <name>: "), read-only. Checked before anything else about the region, so
#: the reason comes first rather than a complaint about an argument.
REFUSED_BACKENDS: Mapping[str, str] = MappingProxyType(
    {
        "dogpile.cache.dbm": (
            f"it keeps values in a DBM file that no other host sees, and it has {NO_LEASES}; use "
            "cachedecor.pymemcache or dogpile.cache.redis (dogpile.cache.memory for a single process)"
        ),
        "dogpile.cache.null": (
            f"it stores nothing, and it has {NO_LEASES}; "
            "to run without a shared cache use dogpile.cache.memory"
        ),
        "dogpile.cache.memcached": _OTHER_MEMCACHED_CLIENT.format(client="python-memcached"),
        "dogpile.cache.pylibmc": _OTHER_MEMCACHED_CLIENT.format(client="pylibmc"),
        "dogpile.cache.bmemcached": _OTHER_MEMCACHED_CLIENT.format(client="python-binary-memcached"),
    }
)


@dataclass(frozen=True)
class _Range:
    """The valid range of a numeric option, and why, where it is not obvious."""

    low: float
    exclusive: bool = False  # the value must be more than ``low``, not equal to it
    high: float | None = None
    unit: str = ""
    why: str = ""

    def check(self, value: float, where: str) -> None:
        if (value > self.low if self.exclusive else value >= self.low) and (
            self.high is None or value <= self.high
        ):
            return
        raise ConfigError(f"{where}: must be {self.expected()}, got {_number(value)}")

    def expected(self) -> str:
        """The range in words: ``"more than 0 seconds"``, ``"between 1 and 65535 (a TCP port)"``."""
        unit = f" {self.unit}" if self.unit else ""
        low = _number(self.low)
        if self.high is not None:
            expected = f"between {low} and {_number(self.high)}{unit}"
        elif self.exclusive:
            expected = f"more than {low}{unit}"
        else:
            expected = f"{low} or more{unit}" if self.low in (0, 1) else f"at least {low}{unit}"
        return expected + (f" ({self.why})" if self.why else "")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


#: memcached reads an expiry above 30 days as an absolute Unix time.
_MEMCACHED_MAX_TTL = 30 * 24 * 3600
_ABSOLUTE = "memcached reads a larger expiry as an absolute Unix time, so it would expire at once"

#: Ranges of the numeric region options (option -> range), read-only.
REGION_RANGES: Mapping[str, _Range] = MappingProxyType(
    {
        "expiration_time": _Range(0, unit="seconds"),
        "compress_threshold": _Range(0, unit="bytes"),
        "lease_timeout": _Range(1, unit="seconds"),
        "lease_wait": _Range(0, unit="seconds"),
        "max_entry_size": _Range(1, unit="bytes"),
        "local_entries": _Range(0, unit="entries"),
        "local_ttl": _Range(0, exclusive=True, unit="seconds"),
        "local_max_bytes": _Range(1024, unit="bytes"),
    }
)

_MEMCACHED_RANGES: Mapping[str, _Range] = MappingProxyType(
    {
        "connect_timeout": _Range(0, exclusive=True, unit="seconds"),
        "timeout": _Range(0, exclusive=True, unit="seconds"),
        "dead_timeout": _Range(0, unit="seconds"),
        "hashclient_dead_timeout": _Range(0, unit="seconds"),
        "hashclient_retry_timeout": _Range(0, unit="seconds"),
        "hashclient_retry_attempts": _Range(0),
        "retry_attempts": _Range(
            1, why="how many times a call is tried in all, as dogpile.cache.pymemcache counts"
        ),
        "retry_delay": _Range(0, unit="seconds"),
        "memcached_expire_time": _Range(0, high=_MEMCACHED_MAX_TTL, unit="seconds", why=_ABSOLUTE),
        "lock_timeout": _Range(0, high=_MEMCACHED_MAX_TTL, unit="seconds", why=_ABSOLUTE),
        "invalidation_retry_interval": _Range(
            0.01,
            unit="seconds",
            why="a shorter interval makes the retry thread spin, taking a CPU core while a server is down",
        ),
        "invalidation_retry_for": _Range(0, exclusive=True, unit="seconds"),
        "max_pending_invalidations": _Range(1),
    }
)
_REDIS_RANGES: Mapping[str, _Range] = MappingProxyType(
    {
        "port": _Range(1, high=65535, why="a TCP port"),
        "db": _Range(0),
        "socket_timeout": _Range(0, exclusive=True, unit="seconds"),
        "socket_connect_timeout": _Range(0, exclusive=True, unit="seconds"),
        "lock_timeout": _Range(0, unit="seconds"),
        "lock_sleep": _Range(0, exclusive=True, unit="seconds", why="0 polls the lock in a busy loop"),
        "lock_blocking_timeout": _Range(0, unit="seconds"),
        "redis_expiration_time": _Range(0, unit="seconds"),
        "valkey_expiration_time": _Range(0, unit="seconds"),
    }
)

#: Ranges of the numeric ``arguments.*`` of each backend (backend -> argument -> range;
#: every int and float argument has one), read-only.
ARGUMENT_RANGES: Mapping[str, Mapping[str, _Range]] = MappingProxyType(
    {
        name: MappingProxyType(
            {
                arg: valid
                for arg, valid in (
                    _MEMCACHED_RANGES if schema is MEMCACHED_ARGUMENTS else _REDIS_RANGES
                ).items()
                if arg in schema
            }
        )
        for name, schema in BACKEND_ARGUMENTS.items()
        if any(kind in (int, float) for kind in schema.values())
    }
)


#: Per-region options (besides ``arguments.*``): option -> (type, default), read-only.
REGION_OPTIONS: Mapping[str, tuple[type, Any]] = MappingProxyType(
    {
        "backend": (str, None),
        "expiration_time": (int, 3600),
        "compress_threshold": (int, 1024),
        "compress_level": (int, None),
        "compression": (str, "zlib"),
        "serializer": (str, "msgpack"),
        "namespace": (str, DEFAULT_NAMESPACE),
        "secret": (str, None),
        "lease_timeout": (int, 5),
        "lease_wait": (float, 0.1),
        "max_entry_size": (int, 1_000_000),
        "tables": (list, None),
        "local_entries": (int, 0),
        "local_ttl": (float, 10.0),
        "local_max_bytes": (int, 64 * 1024 * 1024),
    }
)
#: The top-level options (``<prefix><option>``, beside the regions' ``<prefix><region>.*``).
GLOBAL_OPTIONS: tuple[str, ...] = (
    "regions",
    "secret",
    "outbox_url",
    "outbox_table",
    "outbox_interval",
    "outbox_grace",
    "broadcast_url",
    "broadcast_channel",
)
#: The values the ``serializer`` option accepts.
SERIALIZERS: tuple[str, ...] = ("msgpack",)
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


# --------------------------------------------------------------------------------------
# value coercion


def coerce(value: Any, kind: type, where: str) -> Any:
    """``value`` as an option of type ``kind`` (a type of :data:`REGION_OPTIONS` or
    :data:`BACKEND_ARGUMENTS`), so a string from an INI file and a typed value from a dict
    mean the same.

    ``str`` and numbers are stripped and parsed (``" 5 "`` -> ``5``); ``bool`` takes
    true/yes/on/1 and false/no/off/0 in any case; ``list`` takes a comma-separated string
    or a list (a new list of stripped strings, none empty); ``object`` takes anything but
    a string, as is. A bool is never an int or a float; a float is finite.

    :raises ConfigError: naming ``where`` (the option as the user wrote it) and the value.
    """
    if kind is object:
        if isinstance(value, str):
            raise ConfigError(
                f"{where}: expects a Python object (not the string {value!r}); "
                f"pass the object in a dict configuration"
            )
        return value
    if kind is list:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
        elif isinstance(value, (list, tuple)):
            items = [str(v).strip() for v in value]
        else:
            raise ConfigError(f"{where}: expected a comma-separated list, got {value!r}")
        if not items or any(not v for v in items):
            raise ConfigError(f"{where}: expected a non-empty comma-separated list, got {value!r}")
        return items
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value.strip()
    raise AssertionError(kind)  # pragma: no cover


# --------------------------------------------------------------------------------------
# top-level options of durable invalidation (see cachedecor.outbox)


#: Ranges of the numeric ``outbox_*`` options, read-only.
OUTBOX_RANGES: Mapping[str, _Range] = MappingProxyType(
    {
        "outbox_interval": _Range(0.01, high=60, unit="seconds", why="how often each process looks for rows"),
        "outbox_grace": _Range(0, high=60, unit="seconds"),
    }
)


def outbox_settings(options: dict[str, Any], prefix: str) -> OutboxSettings | None:
    """The outbox options among the top-level ``options``; ``None`` without ``outbox_url``."""
    import re

    import sqlalchemy

    names = [n for n in ("outbox_table", "outbox_interval", "outbox_grace") if n in options]
    if "outbox_url" not in options:
        if names:
            raise ConfigError(f"{prefix}{names[0]}: set {prefix}outbox_url too (the database of the outbox)")
        return None
    url_text = coerce(options["outbox_url"], str, f"{prefix}outbox_url")
    try:
        url = sqlalchemy.make_url(url_text)
    except Exception as exc:
        raise ConfigError(
            f"{prefix}outbox_url: expected a SQLAlchemy database URL such as "
            f"postgresql://user@host/dbname, got {url_text!r} ({exc})"
        ) from None
    table = coerce(options.get("outbox_table", "cachedecor_outbox"), str, f"{prefix}outbox_table")
    schema, _, name = table.rpartition(".")
    ident = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")
    if not ident.match(name) or (schema and not ident.match(schema)):
        raise ConfigError(f"{prefix}outbox_table: expected a table name or schema.table, got {table!r}")
    values: dict[str, float] = {}
    for option, default in (("outbox_interval", 0.1), ("outbox_grace", 0.25)):
        value = coerce(options.get(option, default), float, f"{prefix}{option}")
        OUTBOX_RANGES[option].check(value, f"{prefix}{option}")
        values[option] = value
    return OutboxSettings(
        url=url,
        table=name,
        schema=schema or None,
        interval=values["outbox_interval"],
        grace=values["outbox_grace"],
    )


# --------------------------------------------------------------------------------------
# top-level options of the near cache's broadcast (see cachedecor.broadcast)


def broadcast_settings(options: dict[str, Any], prefix: str) -> tuple[list[Any], str] | None:
    """``(urls, channel)`` of ``broadcast_url``/``broadcast_channel``; ``None`` without a URL.

    ``broadcast_url`` is one URL, or two (a comma list, or a list): one of each transport.
    """
    import re

    import sqlalchemy

    if "broadcast_url" not in options:
        if "broadcast_channel" in options:
            raise ConfigError(f"{prefix}broadcast_channel: set {prefix}broadcast_url too")
        return None
    value = options["broadcast_url"]
    if isinstance(value, str):
        texts = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(part, str) for part in value):
        texts = [part.strip() for part in value]
    else:
        raise ConfigError(
            f"{prefix}broadcast_url: expected a URL, or a list of two (one postgresql://, one redis://), "
            f"got {value!r}"
        )
    if not texts:
        raise ConfigError(f"{prefix}broadcast_url: expected a postgresql:// or a redis:// URL, got {value!r}")
    urls = []
    kinds: dict[str, str] = {}
    for text in texts:
        try:
            url = sqlalchemy.make_url(text)
        except Exception:
            url = None
        if url is None or url.get_backend_name() not in ("postgresql", "redis", "rediss"):
            raise ConfigError(
                f"{prefix}broadcast_url: expected a postgresql:// URL (LISTEN/NOTIFY) or a redis:// URL "
                f"(pub/sub), got {text!r}"
            )
        kind = "postgresql" if url.get_backend_name() == "postgresql" else "redis"
        if kind in kinds:
            raise ConfigError(
                f"{prefix}broadcast_url: at most one URL per transport (one postgresql://, one redis://), "
                f"got {kinds[kind]!r} and {text!r}"
            )
        client = "psycopg" if kind == "postgresql" else "redis"
        if importlib.util.find_spec(client) is None:
            raise missing_extra(f"{prefix}broadcast_url: the {kind} transport ({text!r})", client)
        kinds[kind] = text
        urls.append(url)
    channel = coerce(
        options.get("broadcast_channel", "cachedecor_invalidations"), str, f"{prefix}broadcast_channel"
    )
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", channel):
        raise ConfigError(
            f"{prefix}broadcast_channel: expected letters, digits and '_' (at most 63), got {channel!r}"
        )
    return urls, channel
