"""Region configuration: INI files, nested dicts, flat dotted dicts, the environment.

Every source is first turned into the same flat form (``region -> option -> value``)
and validated by one parser, so an INI section ``[cachedecor.users]`` with key
``expiration_time`` is exactly the setting ``cachedecor.users.expiration_time``.
All validation happens in :func:`configure_regions`; a configuration that passes
never fails later at the first cache call.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dogpile.cache
from dogpile.cache import CacheRegion, make_region
from dogpile.util import PluginLoader

from cachedecor.backends import (
    MEMCACHED_ARGUMENTS,
    AsyncStore,
    PyMemcacheBackend,
    Store,
    async_store_for,
    store_for,
)
from cachedecor.codec import Codec
from cachedecor.errors import ConfigError, RegionNotConfigured
from cachedecor.keys import DEFAULT_NAMESPACE, check_namespace, mangle_key

__all__ = [
    "ENV_VAR",
    "RegionSettings",
    "check_arguments",
    "check_server",
    "configure_regions",
    "get_region",
    "region_settings",
    "reset",
]

#: Environment variable naming the INI file used by ``configure_regions(None)``.
ENV_VAR = "CACHEDECOR_CONFIG"

dogpile.cache.register_backend(  # type: ignore[no-untyped-call]
    "cachedecor.pymemcache", "cachedecor.backends", "PyMemcacheBackend"
)

#: Backends that cachedecor replaces by its own implementation, and why: dogpile's
#: pymemcache backend drops connect_timeout/timeout, so a hung server blocks forever.
_SUBSTITUTES = {"dogpile.cache.pymemcache": "cachedecor.pymemcache"}

_REDIS_ARGUMENTS: dict[str, type] = {
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
_VALKEY_ARGUMENTS = {
    **{k: v for k, v in _REDIS_ARGUMENTS.items() if k != "redis_expiration_time"},
    "valkey_expiration_time": int,
}
_SENTINEL: dict[str, type] = {"sentinels": object, "service_name": str, "sentinel_kwargs": object}
_CLUSTER: dict[str, type] = {"startup_nodes": object}
_MEMORY: dict[str, type] = {"cache_dict": object}

#: Arguments accepted by each backend cachedecor supports, with their types.
BACKEND_ARGUMENTS: dict[str, dict[str, type]] = {
    "cachedecor.pymemcache": MEMCACHED_ARGUMENTS,
    "dogpile.cache.memory": _MEMORY,
    "dogpile.cache.memory_pickle": _MEMORY,
    "dogpile.cache.redis": _REDIS_ARGUMENTS,
    "dogpile.cache.redis_sentinel": {**_REDIS_ARGUMENTS, **_SENTINEL},
    "dogpile.cache.redis_cluster": {**_REDIS_ARGUMENTS, **_CLUSTER},
    "dogpile.cache.valkey": _VALKEY_ARGUMENTS,
    "dogpile.cache.valkey_sentinel": {**_VALKEY_ARGUMENTS, **_SENTINEL},
    "dogpile.cache.valkey_cluster": {**_VALKEY_ARGUMENTS, **_CLUSTER},
}

#: Every name ``backend`` accepts.
_BACKEND_NAMES = sorted({*BACKEND_ARGUMENTS, *_SUBSTITUTES})

_NO_LEASES = (
    "no atomic add and compare-and-set, which cachedecor's fill leases need to keep a slow "
    "reader from storing a row older than a committed write"
)
_OTHER_MEMCACHED_CLIENT = (
    f"through {{client}} it has {_NO_LEASES} (cachedecor has them only through its own "
    "pymemcache client); use backend = dogpile.cache.pymemcache with the same arguments.url"
)

#: dogpile backends cachedecor cannot use, and why. Checked before anything else about
#: the region, so the reason comes first rather than a complaint about an argument.
_REFUSED_BACKENDS = {
    "dogpile.cache.dbm": (
        f"it keeps values in a DBM file that no other host sees, and it has {_NO_LEASES}; use "
        "cachedecor.pymemcache or dogpile.cache.redis (dogpile.cache.memory for a single process)"
    ),
    "dogpile.cache.null": (
        f"it stores nothing, and it has {_NO_LEASES}; to run without a shared cache use dogpile.cache.memory"
    ),
    "dogpile.cache.memcached": _OTHER_MEMCACHED_CLIENT.format(client="python-memcached"),
    "dogpile.cache.pylibmc": _OTHER_MEMCACHED_CLIENT.format(client="pylibmc"),
    "dogpile.cache.bmemcached": _OTHER_MEMCACHED_CLIENT.format(client="python-binary-memcached"),
}


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

#: Ranges of the region options.
REGION_RANGES: dict[str, _Range] = {
    "expiration_time": _Range(0, unit="seconds"),
    "compress_threshold": _Range(0, unit="bytes"),
    "lease_timeout": _Range(1, unit="seconds"),
    "lease_wait": _Range(0, unit="seconds"),
    "max_entry_size": _Range(1, unit="bytes"),
}

_MEMCACHED_RANGES: dict[str, _Range] = {
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
_REDIS_RANGES: dict[str, _Range] = {
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

#: Ranges of the numeric ``arguments.*`` of each backend (every int and float argument has one).
ARGUMENT_RANGES: dict[str, dict[str, _Range]] = {
    name: {
        arg: valid
        for arg, valid in (_MEMCACHED_RANGES if schema is MEMCACHED_ARGUMENTS else _REDIS_RANGES).items()
        if arg in schema
    }
    for name, schema in BACKEND_ARGUMENTS.items()
    if any(kind in (int, float) for kind in schema.values())
}


#: Per-region options (besides ``arguments.*``): type and default.
REGION_OPTIONS: dict[str, tuple[type, Any]] = {
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
}
_GLOBAL_OPTIONS = ("regions", "secret")
_SERIALIZERS = ("msgpack",)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class RegionSettings:
    """A configured region: the dogpile region plus what cachedecor resolved for it."""

    name: str
    region: CacheRegion
    store: Store
    #: the same store for asyncio callers (connects on first use, per event loop)
    astore: AsyncStore
    codec: Codec
    backend: str
    expiration_time: int
    namespace: str
    lease_timeout: int
    lease_wait: float
    max_entry_size: int
    arguments: Mapping[str, Any] = field(repr=False)
    tables: frozenset[str] | None = None


_lock = threading.Lock()
_settings: dict[str, RegionSettings] = {}


def _new_lock_in_child() -> None:
    # a lock another thread of the parent held at fork time would never be released
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


# --------------------------------------------------------------------------------------
# value coercion


def _coerce(value: Any, kind: type, where: str) -> Any:
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
# sources -> one flat form


@dataclass
class _Parsed:
    globals: dict[str, Any] = field(default_factory=dict)
    regions: dict[str, dict[str, Any]] = field(default_factory=dict)
    arguments: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: where the settings come from: "ini", "flat" or "nested" (to name a region's options)
    form: str = "flat"


def _check_name(name: str, origin: str) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ConfigError(f"{origin}: region name {name!r} must be letters, digits, '_' or '-'")
    return name


def _from_flat(settings: Mapping[str, Any], prefix: str, form: str = "flat") -> _Parsed:
    parsed = _Parsed(form=form)
    for full_key, value in settings.items():
        if not isinstance(full_key, str) or not full_key.startswith(prefix):
            continue
        rest = full_key[len(prefix) :]
        if rest in _GLOBAL_OPTIONS:
            parsed.globals[rest] = value
            continue
        name, dot, option = rest.partition(".")
        if not dot or not option:
            raise ConfigError(
                f"unknown option {full_key!r};{_did_you_mean(rest, _GLOBAL_OPTIONS)} expected "
                f"{prefix}regions, {prefix}secret or {prefix}<region>.<option>"
            )
        _check_name(name, full_key)
        if option.startswith("arguments."):
            arg = option[len("arguments.") :]
            if not arg:
                raise ConfigError(f"{full_key!r}: empty argument name")
            parsed.arguments.setdefault(name, {})[arg] = value
            parsed.regions.setdefault(name, {})
        else:
            parsed.regions.setdefault(name, {})[option] = value
    return parsed


def _from_nested(source: Mapping[str, Any]) -> _Parsed:
    parsed = _Parsed(form="nested")
    for key in source:
        if key not in _GLOBAL_OPTIONS:
            raise ConfigError(
                f"unknown top-level option {key!r};{_did_you_mean(str(key), _GLOBAL_OPTIONS)} expected "
                f"'regions' (a dict of regions) and optionally 'secret'"
            )
    regions = source.get("regions")
    if not isinstance(regions, Mapping) or not regions:
        raise ConfigError("'regions' must be a non-empty dict of region name -> options")
    if "secret" in source:
        parsed.globals["secret"] = source["secret"]
    for name, options in regions.items():
        _check_name(name, "regions")
        if not isinstance(options, Mapping):
            raise ConfigError(f"region {name!r}: options must be a dict, got {options!r}")
        opts = dict(options)
        args = opts.pop("arguments", {})
        if not isinstance(args, Mapping):
            raise ConfigError(f"region {name!r}: option 'arguments' must be a dict, got {args!r}")
        parsed.regions[name] = opts
        parsed.arguments[name] = dict(args)
    parsed.globals["regions"] = list(regions)
    return parsed


def _read_ini(path: str | os.PathLike[str], prefix: str) -> dict[str, str]:
    section = prefix.rstrip(".")
    # A [DEFAULT] section (Paste-deploy files have one) would otherwise add its keys to
    # every section; "\n" can never be a section name, so [DEFAULT] is just ignored.
    parser = configparser.ConfigParser(interpolation=None, default_section="\n")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {os.fspath(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {os.fspath(path)!r} cannot be read: {exc}") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {os.fspath(path)!r} is not valid INI: {exc}") from None
    flat: dict[str, str] = {}
    found = False
    for name in parser.sections():
        if name == section:
            found = True
            for key, value in parser.items(name, raw=True):
                flat[f"{prefix}{key}"] = value
        elif name.startswith(section + "."):
            found = True
            for key, value in parser.items(name, raw=True):
                flat[f"{prefix}{name[len(section) + 1 :]}.{key}"] = value
    if not found:
        raise ConfigError(
            f"configuration file {os.fspath(path)!r} has no [{section}] or [{section}.<region>] "
            f"section{_misspelled_section(section, parser.sections())}"
        )
    return flat


def _misspelled_section(section: str, sections: list[str]) -> str:
    """``"; did you mean [cachedecor.default] (not [cachdecor.default])?"`` or ``""``."""
    parts = section.count(".") + 1
    for name in sections:
        head, tail = ".".join(name.split(".")[:parts]), name.split(".")[parts:]
        if difflib.SequenceMatcher(None, head, section).ratio() >= 0.8:
            meant = ".".join([section, *tail])
            return f"; did you mean [{meant}] (not [{name}])?"
    return ""


def _parse(source: Any, prefix: str) -> _Parsed:
    if source is None:
        path = os.environ.get(ENV_VAR)
        if not path:
            return _Parsed(
                globals={"regions": ["default"]},
                regions={"default": {"backend": "dogpile.cache.memory"}},
                arguments={"default": {}},
            )
        return _from_flat(_read_ini(path, prefix), prefix, form="ini")
    if isinstance(source, (str, os.PathLike)):
        return _from_flat(_read_ini(source, prefix), prefix, form="ini")
    if isinstance(source, Mapping):
        if "regions" in source and isinstance(source["regions"], Mapping):
            return _from_nested(source)
        parsed = _from_flat(source, prefix)
        if not parsed.regions and not parsed.globals:
            close = _did_you_mean_key(source, prefix)
            if close:
                raise ConfigError(f"no regions are configured:{close}")
        return parsed
    raise ConfigError(f"configure_regions() takes an INI path, a dict or None, not {type(source).__name__}")


def _did_you_mean_key(source: Mapping[str, Any], prefix: str) -> str:
    """A hint for a dict with no key of ours: a misspelled ``regions`` or prefix."""
    for key in source:
        if not isinstance(key, str):
            continue
        if key != "regions" and _closest(key, ["regions"]):
            return f" did you mean 'regions' (not {key!r}) for a nested configuration?"
        dots = prefix.count(".")
        parts = key.split(".", dots)
        if (
            len(parts) > dots
            and difflib.SequenceMatcher(None, ".".join(parts[:dots]) + ".", prefix).ratio() >= 0.8
        ):
            return f" did you mean {prefix + parts[dots]!r} (not {key!r})?"
    return ""


# --------------------------------------------------------------------------------------
# validation and building


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` (difflib), or one it is the last part of."""
    names = [c for c in candidates if c != word]
    matches = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if not matches:  # "memory" for "dogpile.cache.memory"
        matches = [c for c in names if c.endswith("." + word)][:1]
    return matches[0] if matches else None


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``" did you mean 'x'?"`` for the closest candidate, or ``""``."""
    match = _closest(word, candidates)
    return f" did you mean {match!r}?" if match else ""


def _origin(parsed: _Parsed, prefix: str, name: str) -> str:
    """Where the options of region ``name`` were written, as the user wrote them."""
    if parsed.form == "ini":
        return f"section [{prefix}{name}]"
    return f"{prefix}{name}.*"


def _region_names(parsed: _Parsed, prefix: str) -> list[str]:
    listed = parsed.globals.get("regions")
    if listed is None:
        if not parsed.regions:
            raise ConfigError(f"no regions are configured: set {prefix}regions and define each region")
        return list(parsed.regions)
    names: list[str] = _coerce(listed, list, f"{prefix}regions")
    for name in names:
        _check_name(name, f"{prefix}regions")
    missing = [name for name in names if name not in parsed.regions]
    unlisted = [name for name in parsed.regions if name not in names]
    for name in unlisted:
        meant = _closest(name, missing)
        if meant is not None:
            raise ConfigError(
                f"{_origin(parsed, prefix, name)} configures region {name!r}, which {prefix}regions "
                f"does not list ({', '.join(names)}): did you mean {meant!r}? Region {meant!r} is "
                f"listed but not defined"
            )
    for name in missing:
        where = f"[{prefix}{name}] section" if parsed.form == "ini" else f"{prefix}{name}.backend = ..."
        raise ConfigError(
            f"region {name!r} is listed in {prefix}regions but not defined: add a {where}"
            + (f" (defined: {', '.join(parsed.regions)})" if parsed.regions else "")
        )
    for name in unlisted:
        raise ConfigError(
            f"region {name!r} is defined but not listed in {prefix}regions (listed: {', '.join(names)})"
        )
    return names


def _usable(cls: Any) -> bool:
    """Whether cachedecor has a lease-safe store for backends of class ``cls``."""
    import importlib

    from dogpile.cache.backends.memory import MemoryBackend

    bases: list[type] = [PyMemcacheBackend, MemoryBackend]
    for module, name in (
        ("dogpile.cache.backends.redis", "RedisBackend"),
        ("dogpile.cache.backends.valkey", "ValkeyBackend"),
    ):
        try:
            bases.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # pragma: no cover - older dogpile.cache
            continue
    return isinstance(cls, type) and issubclass(cls, tuple(bases))


def _check_backend(name: str, backend: str, prefix: str) -> str:
    """The backend cachedecor uses for ``backend``; refuses those it cannot use, saying why."""
    where = f"{prefix}{name}.backend"
    reason = _REFUSED_BACKENDS.get(backend)
    if reason is not None:
        raise ConfigError(f"{where}: cachedecor cannot use {backend!r}: {reason}")
    backend = _SUBSTITUTES.get(backend, backend)
    try:
        cls = dogpile.cache.region._backend_loader.load(backend)  # type: ignore[attr-defined,no-untyped-call]
    except PluginLoader.NotFound:
        raise ConfigError(
            f"{where}: unknown backend {backend!r};{_did_you_mean(backend, _BACKEND_NAMES)} "
            f"supported: {', '.join(_BACKEND_NAMES)}"
        ) from None
    except ImportError as exc:
        raise ConfigError(f"{where}: backend {backend!r} cannot be imported: {exc}") from None
    if not _usable(cls):
        raise ConfigError(
            f"{where}: cachedecor cannot use {backend!r} ({cls.__module__}.{cls.__qualname__}): "
            f"it has {_NO_LEASES}; cachedecor has them for memcached, Redis, Valkey and the memory "
            f"backend (and subclasses of their dogpile backends): use one of {', '.join(_BACKEND_NAMES)}"
        )
    return backend


def _build(name: str, parsed: _Parsed, prefix: str) -> RegionSettings:
    where = f"{prefix}{name}"
    options = parsed.regions[name]
    raw_backend = options.get("backend")
    named = raw_backend.strip() if isinstance(raw_backend, str) else ""
    schema = BACKEND_ARGUMENTS.get(_SUBSTITUTES.get(named, named), {})
    for option in options:
        if option not in REGION_OPTIONS:
            known = [*REGION_OPTIONS, *(f"arguments.{arg}" for arg in schema)]
            raise ConfigError(
                f"{where}.{option}: unknown option;{_did_you_mean(option, known)} known options: "
                f"{', '.join(sorted(REGION_OPTIONS))}, arguments.*"
            )
    if raw_backend is None:
        raise ConfigError(f"{where}.backend: missing; e.g. cachedecor.pymemcache or dogpile.cache.memory")
    backend = _check_backend(name, _coerce(raw_backend, str, f"{where}.backend"), prefix)
    values: dict[str, Any] = {}
    for option, (kind, default) in REGION_OPTIONS.items():
        raw = options.get(option)
        values[option] = default if raw is None else _coerce(raw, kind, f"{where}.{option}")
    for option, valid in REGION_RANGES.items():
        valid.check(values[option], f"{where}.{option}")
    if values["serializer"] not in _SERIALIZERS:
        raise ConfigError(
            f"{where}.serializer: unknown serializer {values['serializer']!r};"
            f"{_did_you_mean(values['serializer'], _SERIALIZERS)} supported: {', '.join(_SERIALIZERS)}"
        )
    try:
        namespace = check_namespace(values["namespace"])
    except ConfigError as exc:
        raise ConfigError(f"{where}.namespace: {exc}") from None
    secret_option = f"{where}.secret" if values["secret"] is not None else f"{prefix}secret"
    secret = values["secret"] if values["secret"] is not None else parsed.globals.get("secret")
    if secret is not None:
        secret = _coerce(secret, str, secret_option)
        if not secret:
            raise ConfigError(f"{secret_option}: must not be empty when set")
    try:
        codec = Codec(
            compress_threshold=values["compress_threshold"],
            compress_level=values["compress_level"],
            compression=values["compression"],
            secret=secret.encode() if secret else None,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None

    arguments = check_arguments(name, backend, parsed.arguments.get(name, {}), prefix)
    if backend == "cachedecor.pymemcache" and "url" not in arguments:
        raise ConfigError(f"{where}.arguments.url: missing; e.g. 127.0.0.1:11211")
    region = make_region(name=name, key_mangler=mangle_key)
    try:
        region.configure(
            backend,
            expiration_time=values["expiration_time"] or None,
            arguments=arguments,
        )
    except ConfigError:
        raise
    except ImportError as exc:
        package = f"the Python package {exc.name!r}" if exc.name else "a Python package"
        raise ConfigError(
            f"{where}.backend: backend {backend!r} needs {package}, which cannot be imported: {exc}"
        ) from exc
    except Exception as exc:
        raise ConfigError(f"{where}: backend {backend!r} refused its arguments: {exc}") from exc
    health = getattr(region.actual_backend, "health", None)
    if health is not None:
        health.region = name
    store = store_for(region.actual_backend)
    if store is None:  # pragma: no cover - _check_backend refuses these first
        raise ConfigError(f"{where}.backend: cachedecor cannot use {backend!r}: it has {_NO_LEASES}")
    return RegionSettings(
        name=name,
        region=region,
        store=store,
        astore=async_store_for(store),
        codec=codec,
        backend=backend,
        expiration_time=values["expiration_time"],
        namespace=namespace,
        lease_timeout=values["lease_timeout"],
        lease_wait=values["lease_wait"],
        max_entry_size=values["max_entry_size"],
        arguments=arguments,
        tables=frozenset(values["tables"]) if values["tables"] is not None else None,
    )


def check_arguments(
    name: str, backend: str, raw: Mapping[str, Any], prefix: str = "cachedecor."
) -> dict[str, Any]:
    """``raw`` arguments of region ``name`` on ``backend``, coerced and checked.

    :raises ConfigError: for an argument the backend does not accept, of the wrong
        type or out of its range (see :data:`ARGUMENT_RANGES`).
    """
    where = f"{prefix}{name}.arguments"
    schema = BACKEND_ARGUMENTS.get(backend)
    if schema is None:
        return dict(raw)  # a subclass of a supported backend: it validates its own arguments
    ranges = ARGUMENT_RANGES.get(backend, {})
    out: dict[str, Any] = {}
    for arg, value in raw.items():
        kind = schema.get(arg)
        if kind is None and arg == "serde" and schema is MEMCACHED_ARGUMENTS:
            raise ConfigError(
                f"{where}.serde: not accepted: cachedecor stores its own MessagePack entries as bytes "
                f"and never unpickles; values stored through dogpile's region API are pickled by dogpile"
            )
        if kind is None:
            raise ConfigError(
                f"{where}.{arg}: unknown argument for backend {backend};"
                f"{_did_you_mean(str(arg), schema)} accepted: {', '.join(sorted(schema))}"
            )
        out[arg] = _coerce(value, kind, f"{where}.{arg}")
        if arg in ranges:
            ranges[arg].check(out[arg], f"{where}.{arg}")
    if schema is MEMCACHED_ARGUMENTS and "url" in out:
        for server in out["url"]:
            check_server(server, f"{where}.url")
    return out


_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def check_server(server: str, where: str = "url") -> None:
    """Check one memcached server of ``arguments.url``.

    Accepted: ``host:port`` (a host name or IPv4 address), ``[IPv6 address]:port``,
    or the path of a Unix socket, starting with ``/``. The port is required. A URL
    scheme (``memcache://``) is refused: dogpile.cache.pymemcache takes none, and
    each server's text names its node in the key hashing, so every process must
    write a server the same way.

    >>> check_server("[::1]:11211")
    >>> check_server("memcache://10.0.0.1:1")
    Traceback (most recent call last):
        ...
    cachedecor.errors.ConfigError: url: 'memcache://10.0.0.1:1' is a URL; write host:port: '10.0.0.1:1'
    """
    expected = "expected host:port, [IPv6 address]:port or the path of a Unix socket"
    if server.startswith("/"):
        return
    if "://" in server:
        bare = server.split("://", 1)[1].rstrip("/")
        raise ConfigError(f"{where}: {server!r} is a URL; write host:port: {bare!r}")
    if server.startswith("unix:"):
        raise ConfigError(f"{where}: {server!r}: write a Unix socket as its path alone: {server[5:]!r}")
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ConfigError(f"{where}: {server!r}: {host!r} is not an IPv6 address; {expected}") from None
        sep, port = rest[:1], rest[1:]
        if sep != ":":
            raise ConfigError(f"{where}: {server!r} has no port; {expected}, e.g. [{host}]:11211")
    else:
        host, sep, port = server.rpartition(":")
        if not sep:
            raise ConfigError(f"{where}: {server!r} has no port; {expected}, e.g. {server}:11211")
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ConfigError(f"{where}: {server!r}: {host!r} is not a host name; {expected}") from None
            raise ConfigError(f"{where}: {server!r}: an IPv6 address goes in brackets: [{host}]:{port}")
        if not _HOST_NAME.fullmatch(host):
            raise ConfigError(f"{where}: {server!r}: {host!r} is not a host name; {expected}")
        if host.replace(".", "").isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ConfigError(f"{where}: {server!r}: {host!r} is not an IPv4 address") from None
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: {server!r}: the port must be a number from 1 to 65535; {expected}")


def configure_regions(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    prefix: str = "cachedecor.",
) -> dict[str, CacheRegion]:
    """Configure cache regions and return every region configured so far, by name.

    ``source`` is an INI file path, a nested dict (``{"regions": {...}}``), a flat
    dotted dict (``{"cachedecor.default.backend": ...}``, keys selected by
    ``prefix``) or ``None``: the INI file named by ``$CACHEDECOR_CONFIG``, or else
    one region ``default`` on the in-process memory backend.

    Regions named in ``source`` replace earlier configurations of the same name;
    others are kept. Nothing is replaced unless the whole source is valid.

    :raises ConfigError: on any invalid setting, naming the region and option.

    >>> import cachedecor
    >>> regions = cachedecor.configure_regions(
    ...     {"regions": {"default": {"backend": "dogpile.cache.memory", "expiration_time": 60}}}
    ... )
    >>> sorted(regions)
    ['default']
    >>> cachedecor.reset()
    """
    if not prefix.endswith("."):
        prefix += "."
    parsed = _parse(source, prefix)
    names = _region_names(parsed, prefix)
    built = {name: _build(name, parsed, prefix) for name in names}
    with _lock:
        _settings.update(built)
        return {name: s.region for name, s in _settings.items()}


def region_settings(name: str) -> RegionSettings:
    """The :class:`RegionSettings` of a configured region."""
    try:
        return _settings[name]
    except KeyError:
        raise RegionNotConfigured(name, _settings) from None


def get_region(name: str = "default") -> CacheRegion:
    """The dogpile :class:`~dogpile.cache.region.CacheRegion` configured under ``name``.

    :raises RegionNotConfigured: if ``name`` was never configured.
    """
    return region_settings(name).region


def configured_regions() -> dict[str, RegionSettings]:
    """A snapshot of every configured region's settings."""
    return dict(_settings)


def reset() -> None:
    """Forget every configured region and zero the counters (for tests)."""
    from cachedecor.stats import reset_stats

    with _lock:
        _settings.clear()
    reset_stats()
