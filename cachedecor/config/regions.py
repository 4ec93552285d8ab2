"""Regions: from options to a dogpile region, its store and codec (:class:`RegionSettings`)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import dogpile.cache
from dogpile.cache import CacheRegion, make_region
from dogpile.util import PluginLoader

from cachedecor.backends import (
    MEMCACHED_ARGUMENTS,
    PLACEMENTS,
    AsyncStore,
    PyMemcacheBackend,
    Store,
    async_store_for,
    store_for,
)
from cachedecor.codec import Codec
from cachedecor.config.options import (
    ARGUMENT_RANGES,
    BACKEND_ARGUMENTS,
    BACKEND_NAMES,
    MOVED_TO_CONNECTION_KWARGS,
    NO_EFFECT,
    NO_LEASES,
    REFUSED_BACKENDS,
    REGION_OPTIONS,
    REGION_RANGES,
    SENTINEL_SCHEMES,
    SENTINEL_TIMEOUTS,
    SERIALIZERS,
    SUBSTITUTES,
    coerce,
)
from cachedecor.config.sources import Parsed, check_region_name
from cachedecor.config.suggestions import closest, did_you_mean
from cachedecor.errors import EXTRAS, ConfigError, MissingExtra, missing_extra
from cachedecor.keys import check_namespace, mangle_key
from cachedecor.near import NearCache

__all__ = [
    "RegionSettings",
    "build_region",
    "check_arguments",
    "check_server",
    "client_arguments",
    "region_names",
]


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
    #: the near cache of this process (``local_entries`` > 0), or ``None``
    near: NearCache | None = None


def _origin(parsed: Parsed, prefix: str, name: str) -> str:
    """Where the options of region ``name`` were written, as the user wrote them."""
    if parsed.form == "ini":
        return f"section [{prefix}{name}]"
    return f"{prefix}{name}.*"


def region_names(parsed: Parsed, prefix: str) -> list[str]:
    """The names of the regions ``parsed`` configures, in order.

    Those ``<prefix>regions`` lists, each of which must be defined and none defined
    beside them; without ``<prefix>regions``, every region defined. Only names are
    checked here, not options.

    :raises ConfigError: for no region, or a region listed but not defined or the reverse
        (with a did-you-mean when one looks like a misspelling of the other).
    """
    listed = parsed.globals.get("regions")
    if listed is None:
        if not parsed.regions:
            raise ConfigError(f"no regions are configured: set {prefix}regions and define each region")
        return list(parsed.regions)
    names: list[str] = coerce(listed, list, f"{prefix}regions")
    for name in names:
        check_region_name(name, f"{prefix}regions")
    missing = [name for name in names if name not in parsed.regions]
    unlisted = [name for name in parsed.regions if name not in names]
    for name in unlisted:
        meant = closest(name, missing)
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
    reason = REFUSED_BACKENDS.get(backend)
    if reason is not None:
        raise ConfigError(f"{where}: cachedecor cannot use {backend!r}: {reason}")
    backend = SUBSTITUTES.get(backend, backend)
    try:
        cls = dogpile.cache.region._backend_loader.load(backend)  # type: ignore[attr-defined,no-untyped-call]
    except PluginLoader.NotFound:
        raise ConfigError(
            f"{where}: unknown backend {backend!r};{did_you_mean(backend, BACKEND_NAMES)} "
            f"supported: {', '.join(BACKEND_NAMES)}"
        ) from None
    except ImportError as exc:
        raise ConfigError(f"{where}: backend {backend!r} cannot be imported: {exc}") from None
    if not _usable(cls):
        raise ConfigError(
            f"{where}: cachedecor cannot use {backend!r} ({cls.__module__}.{cls.__qualname__}): "
            f"it has {NO_LEASES}; cachedecor has them for memcached, Redis, Valkey and the memory "
            f"backend (and subclasses of their dogpile backends): use one of {', '.join(BACKEND_NAMES)}"
        )
    return backend


def build_region(name: str, parsed: Parsed, prefix: str) -> RegionSettings:
    """Region ``name`` of ``parsed``, every option checked, as a new :class:`RegionSettings`.

    Checks every option first, then makes and configures a new dogpile region, its
    stores and codec (and its near cache when ``local_entries`` is set); it opens no
    connection. The region is not added to the configured regions: the caller keeps it
    or drops it.

    :raises ConfigError: for any invalid option, naming the region and option
        (:class:`~cachedecor.errors.MissingExtra` when an extra is not installed).
    """
    where = f"{prefix}{name}"
    options = parsed.regions[name]
    raw_backend = options.get("backend")
    named = raw_backend.strip() if isinstance(raw_backend, str) else ""
    schema = BACKEND_ARGUMENTS.get(SUBSTITUTES.get(named, named), {})
    for option in options:
        if option not in REGION_OPTIONS:
            known = [*REGION_OPTIONS, *(f"arguments.{arg}" for arg in schema)]
            raise ConfigError(
                f"{where}.{option}: unknown option;{did_you_mean(option, known)} known options: "
                f"{', '.join(sorted(REGION_OPTIONS))}, arguments.*"
            )
    if raw_backend is None:
        raise ConfigError(f"{where}.backend: missing; e.g. cachedecor.pymemcache or dogpile.cache.memory")
    backend = _check_backend(name, coerce(raw_backend, str, f"{where}.backend"), prefix)
    values: dict[str, Any] = {}
    for option, (kind, default) in REGION_OPTIONS.items():
        raw = options.get(option)
        values[option] = default if raw is None else coerce(raw, kind, f"{where}.{option}")
    for option, valid in REGION_RANGES.items():
        valid.check(values[option], f"{where}.{option}")
    if values["serializer"] not in SERIALIZERS:
        raise ConfigError(
            f"{where}.serializer: unknown serializer {values['serializer']!r};"
            f"{did_you_mean(values['serializer'], SERIALIZERS)} supported: {', '.join(SERIALIZERS)}"
        )
    try:
        namespace = check_namespace(values["namespace"])
    except ConfigError as exc:
        raise ConfigError(f"{where}.namespace: {exc}") from None
    secret_option = f"{where}.secret" if values["secret"] is not None else f"{prefix}secret"
    secret = values["secret"] if values["secret"] is not None else parsed.globals.get("secret")
    if secret is not None:
        secret = coerce(secret, str, secret_option)
        if not secret:
            raise ConfigError(f"{secret_option}: must not be empty when set")
    try:
        codec = Codec(
            compress_threshold=values["compress_threshold"],
            compress_level=values["compress_level"],
            compression=values["compression"],
            secret=secret.encode() if secret else None,
        )
    except MissingExtra as exc:
        raise MissingExtra(f"{where}: {exc}", extra=exc.extra) from None
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
            arguments=client_arguments(backend, arguments, f"{where}.arguments"),
        )
    except ConfigError:
        raise
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in EXTRAS:
            raise missing_extra(f"{where}.backend: backend {backend!r}", exc.name) from exc
        package = f"the Python package {exc.name!r}" if exc.name else "a Python package"
        raise ConfigError(
            f"{where}.backend: backend {backend!r} needs {package}, which cannot be imported: {exc}"
        ) from exc
    except Exception as exc:
        raise ConfigError(f"{where}: backend {backend!r} refused its arguments: {exc}") from exc
    health = getattr(region.actual_backend, "health", None)
    if health is not None:
        health.region = name
        health.expiration_time = values["expiration_time"] or None
    store = store_for(region.actual_backend)
    if store is None:  # pragma: no cover - _check_backend refuses these first
        raise ConfigError(f"{where}.backend: cachedecor cannot use {backend!r}: it has {NO_LEASES}")
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
        near=NearCache(values["local_entries"], values["local_ttl"], values["local_max_bytes"])
        if values["local_entries"]
        else None,
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
                f"{did_you_mean(str(arg), schema)} accepted: {', '.join(sorted(schema))}"
            )
        out[arg] = coerce(value, kind, f"{where}.{arg}")
        if arg in ranges:
            ranges[arg].check(out[arg], f"{where}.{arg}")
    if schema is MEMCACHED_ARGUMENTS:
        for arg in ("url", "also_invalidate_url"):
            for server in out.get(arg, ()):
                check_server(server, f"{where}.{arg}")
        for arg in ("placement", "also_invalidate_placement"):
            if arg in out and out[arg] not in PLACEMENTS:
                raise ConfigError(
                    f"{where}.{arg}: {out[arg]!r} is not a placement; one of {', '.join(PLACEMENTS)} "
                    f"(see 'Growing a memcached pool' before changing it on a running pool)"
                )
    return out


_SINGLE_NODE = ("dogpile.cache.redis", "dogpile.cache.valkey")
#: What dogpile's single-node backends ignore beside ``url`` (``from_url`` gets the URL alone).
_IN_THE_URL = ("host", "port", "db", "username", "password")


def client_arguments(backend: str, arguments: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The arguments dogpile's ``backend`` is configured with: ``arguments`` (as
    :func:`check_arguments` returns them) with each one put where the client takes it.

    A sentinel backend's ``url`` becomes ``sentinels``, ``service_name`` and ``db`` (see
    :func:`sentinel_url`) and its timeouts are given to the sentinels too
    (:data:`~cachedecor.config.options.SENTINEL_TIMEOUTS`); the arguments of
    :data:`~cachedecor.config.options.MOVED_TO_CONNECTION_KWARGS` move into
    ``connection_kwargs``. ``where`` names the arguments in messages
    (``cachedecor.default.arguments``).

    :raises ConfigError: naming an argument that would have no effect
        (:data:`~cachedecor.config.options.NO_EFFECT`, ``host``/``port``/``db``/... beside a
        ``url`` that decides them, a ``db`` other than 0 on a cluster), or one given
        both as itself and in ``connection_kwargs`` with different values.
    """
    out = dict(arguments)
    for arg, why in NO_EFFECT.get(backend, {}).items():
        if arg in out:
            raise ConfigError(f"{where}.{arg}: would have no effect on {backend}: {why}")
    if "url" in out and (backend in _SINGLE_NODE or backend.endswith("_cluster")):
        for arg in _IN_THE_URL if backend in _SINGLE_NODE else ("host", "port"):
            if arg in out:
                raise ConfigError(
                    f"{where}.{arg}: would have no effect beside {where}.url, which {backend} "
                    f"connects with alone: write it in the URL"
                )
    if backend.endswith("_cluster") and out.pop("db", 0) != 0:
        raise ConfigError(f"{where}.db: a cluster has only database 0; remove {where}.db")
    if backend in SENTINEL_SCHEMES:
        if "url" in out:
            out = {**out, **sentinel_url(SENTINEL_SCHEMES[backend], out.pop("url"), out, f"{where}.url")}
        if "sentinels" not in out:
            raise ConfigError(
                f"{where}.url: missing: {backend} needs its sentinels, e.g. "
                f"{SENTINEL_SCHEMES[backend]}://127.0.0.1:26379/mymaster (or {where}.sentinels in a dict)"
            )
        sentinel_kwargs = _mapping(out.get("sentinel_kwargs", {}), f"{where}.sentinel_kwargs")
        for arg in SENTINEL_TIMEOUTS:
            if arg in out:
                sentinel_kwargs.setdefault(arg, out[arg])
        out["sentinel_kwargs"] = sentinel_kwargs
    moved = [arg for arg in MOVED_TO_CONNECTION_KWARGS.get(backend, ()) if arg in out]
    if moved:
        kwargs = _mapping(out.get("connection_kwargs", {}), f"{where}.connection_kwargs")
        for arg in moved:
            value = out.pop(arg)
            if arg in kwargs and kwargs[arg] != value:
                raise ConfigError(
                    f"{where}.{arg}: given twice, {value!r} here and {kwargs[arg]!r} in "
                    f"{where}.connection_kwargs: keep one"
                )
            kwargs[arg] = value
        out["connection_kwargs"] = kwargs
    return out


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a dict of keyword arguments, got {value!r}")
    return dict(value)


def sentinel_url(scheme: str, url: str, beside: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``sentinels``, ``service_name`` and ``db`` (and ``username``/``password`` when
    written) of a sentinel URL, ``<scheme>://[user:password@]host:port[,host:port...]/
    service_name[/db]``; ``beside`` are the other arguments, none of which may set the same.

    >>> sentinel_url("redis+sentinel", "redis+sentinel://10.0.0.1:26379,[::1]:26380/cache/2", {}, "url")
    {'sentinels': [('10.0.0.1', 26379), ('::1', 26380)], 'service_name': 'cache', 'db': 2}

    :raises ConfigError: naming ``where`` for a malformed URL, or an argument it sets
        that ``beside`` sets too.
    """
    expected = f"expected {scheme}://host:port[,host:port...]/service_name[/db], got {url!r}"
    head, sep, rest = url.partition("://")
    if head.lower() != scheme or not sep:
        raise ConfigError(f"{where}: {expected}")
    netloc, _, path = rest.partition("/")
    if "?" in path or "#" in path:
        raise ConfigError(f"{where}: no query or fragment is read; {expected}")
    out: dict[str, Any] = {}
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        username, colon, password = userinfo.partition(":")
        if username:
            out["username"] = unquote(username)
        if colon:
            out["password"] = unquote(password)
    sentinels = []
    for server in hosts.split(","):
        if not server or server.startswith("/"):
            raise ConfigError(f"{where}: a sentinel is host:port; {expected}")
        check_server(server, where)
        host, _, port = server.rpartition(":")
        sentinels.append((host.strip("[]"), int(port)))
    parts = path.split("/")
    if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ConfigError(f"{where}: {expected}")
    out["sentinels"] = sentinels
    out["service_name"] = unquote(parts[0])
    if len(parts) == 2:
        out["db"] = int(parts[1])
    for arg in out:
        if arg in beside:
            raise ConfigError(
                f"{where.rpartition('.')[0]}.{arg}: given beside {where}, which sets it: keep one"
            )
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
