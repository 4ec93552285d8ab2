"""Region configuration: INI files, nested dicts, flat dotted dicts, the environment.

Every source is first turned into the same flat form (``region -> option -> value``)
and validated by one parser, so an INI section ``[cachedecor.users]`` with key
``expiration_time`` is exactly the setting ``cachedecor.users.expiration_time``.
All validation happens in :func:`configure_regions`; a configuration that passes
never fails later at the first cache call.
"""

from __future__ import annotations

import configparser
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dogpile.cache
from dogpile.cache import CacheRegion, make_region
from dogpile.util import PluginLoader

from cachedecor.backends import MEMCACHED_ARGUMENTS, Store, store_for
from cachedecor.codec import Codec
from cachedecor.errors import ConfigError, RegionNotConfigured
from cachedecor.keys import DEFAULT_NAMESPACE, check_namespace, mangle_key

__all__ = [
    "ENV_VAR",
    "RegionSettings",
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


def _check_name(name: str, origin: str) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ConfigError(f"{origin}: region name {name!r} must be letters, digits, '_' or '-'")
    return name


def _from_flat(settings: Mapping[str, Any], prefix: str) -> _Parsed:
    parsed = _Parsed()
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
                f"unknown option {full_key!r}: expected {prefix}regions, {prefix}secret "
                f"or {prefix}<region>.<option>"
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
    parsed = _Parsed()
    for key in source:
        if key not in _GLOBAL_OPTIONS:
            raise ConfigError(
                f"unknown top-level option {key!r}: expected 'regions' (a dict of regions) "
                f"and optionally 'secret'"
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
            f"configuration file {os.fspath(path)!r} has no [{section}] or [{section}.<region>] section"
        )
    return flat


def _parse(source: Any, prefix: str) -> _Parsed:
    if source is None:
        path = os.environ.get(ENV_VAR)
        if not path:
            return _Parsed(
                globals={"regions": ["default"]},
                regions={"default": {"backend": "dogpile.cache.memory"}},
                arguments={"default": {}},
            )
        return _from_flat(_read_ini(path, prefix), prefix)
    if isinstance(source, (str, os.PathLike)):
        return _from_flat(_read_ini(source, prefix), prefix)
    if isinstance(source, Mapping):
        if "regions" in source and isinstance(source["regions"], Mapping):
            return _from_nested(source)
        return _from_flat(source, prefix)
    raise ConfigError(f"configure_regions() takes an INI path, a dict or None, not {type(source).__name__}")


# --------------------------------------------------------------------------------------
# validation and building


def _region_names(parsed: _Parsed, prefix: str) -> list[str]:
    listed = parsed.globals.get("regions")
    if listed is None:
        if not parsed.regions:
            raise ConfigError(f"no regions are configured: set {prefix}regions and define each region")
        return list(parsed.regions)
    names: list[str] = _coerce(listed, list, f"{prefix}regions")
    for name in names:
        _check_name(name, f"{prefix}regions")
        if name not in parsed.regions:
            raise ConfigError(
                f"region {name!r} is listed in {prefix}regions but not defined: add a "
                f"[{prefix}{name}] section (or {prefix}{name}.backend = ...)"
            )
    for name in parsed.regions:
        if name not in names:
            raise ConfigError(
                f"region {name!r} is defined but not listed in {prefix}regions (listed: {', '.join(names)})"
            )
    return names


def _check_backend(name: str, backend: str, prefix: str) -> str:
    backend = _SUBSTITUTES.get(backend, backend)
    try:
        dogpile.cache.region._backend_loader.load(backend)  # type: ignore[attr-defined,no-untyped-call]
    except PluginLoader.NotFound:
        raise ConfigError(
            f"{prefix}{name}.backend: unknown backend {backend!r}; supported: "
            f"{', '.join(sorted(BACKEND_ARGUMENTS))}"
        ) from None
    except ImportError as exc:
        raise ConfigError(f"{prefix}{name}.backend: backend {backend!r} cannot be imported: {exc}") from None
    return backend


def _build(name: str, parsed: _Parsed, prefix: str) -> RegionSettings:
    where = f"{prefix}{name}"
    options = parsed.regions[name]
    for option in options:
        if option not in REGION_OPTIONS:
            raise ConfigError(
                f"{where}.{option}: unknown option; known options: "
                f"{', '.join(sorted(REGION_OPTIONS))}, arguments.*"
            )
    values: dict[str, Any] = {}
    for option, (kind, default) in REGION_OPTIONS.items():
        raw = options.get(option)
        values[option] = default if raw is None else _coerce(raw, kind, f"{where}.{option}")
    if values["backend"] is None:
        raise ConfigError(f"{where}.backend: missing; e.g. cachedecor.pymemcache or dogpile.cache.memory")
    backend = _check_backend(name, values["backend"], prefix)
    for option in ("expiration_time", "compress_threshold", "lease_wait"):
        if values[option] < 0:
            raise ConfigError(f"{where}.{option}: must be 0 or more, got {values[option]}")
    for option in ("lease_timeout", "max_entry_size"):
        if values[option] < 1:
            raise ConfigError(f"{where}.{option}: must be 1 or more, got {values[option]}")
    if values["serializer"] not in _SERIALIZERS:
        raise ConfigError(
            f"{where}.serializer: unknown serializer {values['serializer']!r}; "
            f"supported: {', '.join(_SERIALIZERS)}"
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

    arguments = _check_arguments(name, backend, parsed.arguments.get(name, {}), prefix)
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
    except Exception as exc:
        raise ConfigError(f"{where}: backend {backend!r} refused its arguments: {exc}") from exc
    health = getattr(region.actual_backend, "health", None)
    if health is not None:
        health.region = name
    store = store_for(region.actual_backend)
    if store is None:
        raise ConfigError(
            f"{where}.backend: {backend!r} cannot be used by cachedecor: it needs an atomic "
            f"add and compare-and-set to keep stale rows out; use one of "
            f"{', '.join(sorted(BACKEND_ARGUMENTS))}"
        )
    return RegionSettings(
        name=name,
        region=region,
        store=store,
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


def _check_arguments(name: str, backend: str, raw: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    where = f"{prefix}{name}.arguments"
    schema = BACKEND_ARGUMENTS.get(backend)
    if schema is None:
        return dict(raw)  # a third-party backend: it validates its own arguments
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
                f"{where}.{arg}: unknown argument for backend {backend}; accepted: "
                f"{', '.join(sorted(schema))}"
            )
        out[arg] = _coerce(value, kind, f"{where}.{arg}")
    for arg in ("connect_timeout", "timeout", "dead_timeout", "retry_delay"):
        if arg in out and out[arg] < 0:
            raise ConfigError(f"{where}.{arg}: must be 0 or more seconds, got {out[arg]}")
    if "connect_timeout" in out and out["connect_timeout"] == 0:
        raise ConfigError(f"{where}.connect_timeout: must be more than 0 seconds")
    if "timeout" in out and out["timeout"] == 0:
        raise ConfigError(f"{where}.timeout: must be more than 0 seconds")
    if "retry_attempts" in out and out["retry_attempts"] < 0:
        raise ConfigError(f"{where}.retry_attempts: must be 0 or more, got {out['retry_attempts']}")
    if "port" in out and not 0 < out["port"] < 65536:
        raise ConfigError(f"{where}.port: must be a TCP port, got {out['port']}")
    if backend == "cachedecor.pymemcache" and "url" in out:
        for server in out["url"]:
            host, sep, port = server.rpartition(":")
            if server.startswith("/"):
                continue
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"{where}.url: expected host:port, got {server!r}")
    return out


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
        raise RegionNotConfigured(name) from None


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
