"""The dogpile.cache backend ``cachedecor.pymemcache`` (also used for ``dogpile.cache.pymemcache``).

Through dogpile's region API it behaves as dogpile's own pymemcache backend: the
region hands it :class:`~dogpile.cache.api.CachedValue` objects through ``get`` and
``set`` (so a ``ProxyBackend`` overriding them sees every call), and they are stored
pickled under pymemcache's flags, so that either backend reads what the other
wrote. A region given a ``serializer`` of its own uses ``get_serialized`` and
``set_serialized``, which store and return bytes, as dogpile's do.

Where dogpile's backend raises, this one does not: a node that is down or fails is
a miss for reads and a logged, counted failure for writes and deletes, and a value
that cannot be read (a cachedecor entry, garbage, a pickle that does not load) is a
miss counted in ``bad_entries``. Values are unpickled only here, for the region
API; the decorators' entries are plain bytes and never unpickled.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from dogpile.cache.api import NO_VALUE, CachedValue
from dogpile.cache.backends.memcached import MemcachedLock
from dogpile.cache.backends.memcached import PyMemcacheBackend as _DogpilePyMemcacheBackend

from cachedecor.backends.base import PartialResult, UndeliveredInvalidation
from cachedecor.backends.memcached.cluster import MemcachedCluster, NodeHealth, Routing, placement

__all__ = ["MEMCACHED_ARGUMENTS", "MEMCACHED_DEFAULTS", "Flagged", "PyMemcacheBackend"]


#: Arguments of ``cachedecor.pymemcache`` (and ``dogpile.cache.pymemcache``), with types.
MEMCACHED_ARGUMENTS: Mapping[str, type] = MappingProxyType(
    {
        "url": list,
        "connect_timeout": float,
        "timeout": float,
        "no_delay": bool,
        "dead_timeout": float,
        "hashclient_dead_timeout": float,
        "hashclient_retry_timeout": float,
        "hashclient_retry_attempts": int,
        "enable_retry_client": bool,
        "retry_attempts": int,
        "retry_delay": float,
        "retry_for": object,
        "do_not_retry_for": object,
        "default_noreply": bool,
        "memcached_expire_time": int,
        "distributed_lock": bool,
        "lock_timeout": int,
        "socket_keepalive": object,
        "tls_context": object,
        "invalidation_retry_interval": float,
        "invalidation_retry_for": float,
        "max_pending_invalidations": int,
        "meta_protocol": bool,
        "placement": str,
        "also_invalidate_url": list,
        "also_invalidate_placement": str,
    }
)

#: Defaults cachedecor applies where dogpile's backend would wait forever.
MEMCACHED_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "connect_timeout": 0.25,
        "timeout": 0.25,
        "no_delay": True,
        "dead_timeout": 5.0,
        "hashclient_retry_attempts": 1,
        "invalidation_retry_interval": 0.5,
        "invalidation_retry_for": 300.0,
        "max_pending_invalidations": 10_000,
        "meta_protocol": True,
        "placement": "rendezvous",
    }
)

# pymemcache's flags (pymemcache.serde), which dogpile's backend stores values under
FLAG_BYTES = 0
FLAG_PICKLE = 1 << 0
FLAG_INTEGER = 1 << 1
FLAG_LONG = 1 << 2
FLAG_TEXT = 1 << 4


class Flagged(bytes):
    """A stored value returned as its bytes, with the pymemcache ``flags`` it was stored under.

    Pickles (and values under flags this client does not decode) come back as
    ``Flagged``: never unpickled by the client, so that nothing read on the
    decorators' path is ever unpickled.
    """

    flags: int = FLAG_BYTES


class _Serde:
    """pymemcache serde that writes what pymemcache's default serde writes.

    bytes, str and int are stored and returned as pymemcache's default serde (and so
    dogpile's backend) stores and returns them, flags included: a ``str`` comes back
    as a ``str``, cachedecor's entries (bytes) as bytes. Any other value is pickled
    under ``FLAG_PICKLE``, as dogpile's backend stores its ``CachedValue`` objects,
    but is returned undecoded, as :class:`Flagged`: only the region API unpickles.
    """

    @staticmethod
    def serialize(key: Any, value: Any) -> tuple[bytes, int]:
        kind = type(value)
        if kind is bytes:
            return value, FLAG_BYTES
        if kind is str:
            return value.encode(), FLAG_TEXT
        if kind is int:
            return b"%d" % value, FLAG_INTEGER
        if kind is Flagged:
            return bytes(value), value.flags
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL), FLAG_PICKLE

    @staticmethod
    def deserialize(key: Any, value: bytes, flags: int) -> Any:
        if flags == FLAG_BYTES:
            return value
        try:
            if flags == FLAG_TEXT:
                return value.decode()
            if flags in (FLAG_INTEGER, FLAG_LONG):
                return int(value)
        except ValueError:  # UnicodeDecodeError included: not what the flags say
            pass
        out = Flagged(value)
        out.flags = flags
        return out


class _LockClient:
    """What dogpile's :class:`MemcachedLock` needs of a client, failing open.

    A lock whose node cannot be reached is taken (the creator runs, as it does when
    the value cannot be read), and releasing it or asking about it never raises.
    ``add`` waits for the server's answer: with ``noreply`` it would always succeed.
    """

    __slots__ = ("backend",)

    def __init__(self, backend: PyMemcacheBackend) -> None:
        self.backend = backend

    def add(self, key: str, value: Any, expire: int = 0) -> bool:
        try:
            return bool(self.backend.client.add(key, value, expire, noreply=False))
        except Exception as exc:
            self.backend._failed("distributed lock", exc)
            return True

    def get(self, key: str) -> Any:
        try:
            return self.backend.client.get(key)
        except Exception as exc:
            self.backend._failed("distributed lock", exc)
            return None

    def delete(self, key: str) -> None:
        try:
            self.backend.client.delete(key, noreply=False)
        except UndeliveredInvalidation:
            pass  # queued: delivered when the node is back, or expires (lock_timeout)
        except Exception as exc:
            self.backend._failed("distributed lock", exc)


def _exception_classes(name: str, value: Any) -> tuple[type[BaseException], ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, type) else value
    if not isinstance(items, (tuple, list, set, frozenset)) or not all(
        isinstance(c, type) and issubclass(c, Exception) for c in items
    ):
        raise ValueError(f"{name}: expected a tuple, list or set of Exception subclasses, got {value!r}")
    return tuple(items)


def _routing(url: list[str], args: Mapping[str, Any]) -> Routing:
    """The placement of ``url`` and, during a change of the pool, of ``also_invalidate_url``."""
    current = placement(str(args["placement"]), url)
    also_url = args.get("also_invalidate_url")
    also_name = args.get("also_invalidate_placement")
    if also_url is None and also_name is None:
        return Routing(current)
    try:
        also = placement(str(also_name or current.name), url if also_url is None else list(also_url))
    except ValueError as exc:
        raise ValueError(f"also_invalidate_{exc}") from None
    return Routing(current, also)


class PyMemcacheBackend(_DogpilePyMemcacheBackend):
    """dogpile.cache backend ``cachedecor.pymemcache``: pymemcache with timeouts, failing open.

    Takes dogpile's ``dogpile.cache.pymemcache`` arguments (``serde`` excepted) with
    dogpile's meaning, plus ``connect_timeout``, ``timeout``, ``no_delay``,
    ``dead_timeout``, ``invalidation_retry_interval``, ``invalidation_retry_for``,
    ``max_pending_invalidations``, ``meta_protocol``, ``placement``,
    ``also_invalidate_url`` and ``also_invalidate_placement`` (see :doc:`/configuration`).
    Through the region API it stores what dogpile's backend stores (pickled
    ``CachedValue`` objects), so either reads the other's values; unlike dogpile's, it
    never raises into the caller for a failing node or an unreadable value.
    """

    def __init__(self, arguments: dict[str, Any]) -> None:
        # dogpile's own argument handling, warnings included ("enable_retry_client is
        # not set; retry options will be ignored")
        super().__init__(dict(arguments))  # type: ignore[no-untyped-call]
        args = {**MEMCACHED_DEFAULTS, **arguments}
        if "dead_timeout" not in arguments:
            # dogpile's names for the same wait, in order of precedence
            for alias in ("hashclient_dead_timeout", "hashclient_retry_timeout"):
                if alias in arguments:
                    args["dead_timeout"] = arguments[alias]
                    break
        self.connect_timeout = float(args["connect_timeout"])
        self.timeout = float(args["timeout"])
        self.no_delay = bool(args["no_delay"])
        self.retries = 0
        self.retry_delay_ = 0.0
        self.retry_for_: tuple[type[BaseException], ...] = ()
        self.do_not_retry_for_: tuple[type[BaseException], ...] = ()
        if self.enable_retry_client:
            attempts = arguments.get("retry_attempts")
            if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
                raise ValueError(
                    f"retry_attempts: with enable_retry_client, how many times a call is tried "
                    f"(1 or more) is required, as with dogpile.cache.pymemcache; got {attempts!r}"
                )
            self.retries = attempts - 1
            self.retry_delay_ = float(arguments.get("retry_delay") or 0.0)
            self.retry_for_ = _exception_classes("retry_for", arguments.get("retry_for"))
            self.do_not_retry_for_ = _exception_classes("do_not_retry_for", arguments.get("do_not_retry_for"))
            overlap = sorted(c.__name__ for c in set(self.retry_for_) & set(self.do_not_retry_for_))
            if overlap:
                raise ValueError(f"retry_for and do_not_retry_for both name {', '.join(overlap)}")
        # dogpile.cache before 1.3.3 ignores memcached_expire_time: set it here
        self.set_arguments = {}
        if "memcached_expire_time" in arguments:
            self.set_arguments["expire"] = int(arguments["memcached_expire_time"])
        self.health = NodeHealth(
            float(args["dead_timeout"]),
            int(args["hashclient_retry_attempts"]),
            retry_interval=float(args["invalidation_retry_interval"]),
            retry_for=float(args["invalidation_retry_for"]),
            max_pending=int(args["max_pending_invalidations"]),
        )
        self.health.client_factory = self._create_client
        self.meta_protocol = bool(args["meta_protocol"])
        self.routing = _routing(self.url, args)

    def _create_client(self) -> MemcachedCluster:
        kwargs: dict[str, Any] = {
            "serde": _Serde(),
            "connect_timeout": self.connect_timeout,
            "timeout": self.timeout,
            "no_delay": self.no_delay,
            "default_noreply": self.default_noreply,
        }
        if self.tls_context is not None:
            kwargs["tls_context"] = self.tls_context
        if self.socket_keepalive is not None:
            kwargs["socket_keepalive"] = self.socket_keepalive
        return MemcachedCluster(
            self.url,
            self.health,
            routing=self.routing,
            retry_attempts=self.retries,
            retry_delay=self.retry_delay_,
            retry_for=self.retry_for_,
            do_not_retry_for=self.do_not_retry_for_,
            **kwargs,
        )

    # -- failures: logged and counted, never raised --------------------------------------

    def _failed(self, what: str, exc: BaseException) -> None:
        from cachedecor.stats import counters, log_failure

        counters(self.health.region).errors += 1
        log_failure(self.health.region, f"{what} through the region API", exc)

    def _bad(self, key: str, why: str) -> Any:
        from cachedecor.stats import counters, log_failure

        counters(self.health.region).bad_entries += 1
        log_failure(self.health.region, "reading a value through the region API", f"{key}: {why}")
        return NO_VALUE

    def _loaded(self, key: str, value: Any) -> Any:
        """The ``CachedValue`` stored under ``key``, or ``NO_VALUE``."""
        if value is None:
            return NO_VALUE
        if type(value) is not Flagged or value.flags != FLAG_PICKLE:
            return self._bad(key, "not a value stored through dogpile's region API")
        try:
            loaded = pickle.loads(value)
        except Exception as exc:
            return self._bad(key, f"does not unpickle: {type(exc).__name__}: {exc}")
        if (
            not isinstance(loaded, CachedValue)
            or not isinstance(loaded.metadata, dict)
            or "ct" not in loaded.metadata
            or "v" not in loaded.metadata
        ):
            return self._bad(key, f"holds a {type(loaded).__name__}, not a dogpile CachedValue")
        return loaded

    def _read_many(self, keys: list[str]) -> dict[str, Any]:
        try:
            return self.client.get_many(keys)  # type: ignore[no-any-return]
        except PartialResult as exc:
            self._failed("get_multi", exc.error)
            return exc.found
        except Exception as exc:
            self._failed("get_multi", exc)
            return {}

    def _write(self, what: str, mapping: Mapping[str, Any]) -> None:
        try:
            if len(mapping) == 1:
                ((key, value),) = mapping.items()
                self.client.set(key, value, **self.set_arguments)
            else:
                self.client.set_many(dict(mapping), **self.set_arguments)
        except Exception as exc:
            self._failed(what, exc)

    # -- dogpile's CacheBackend API ------------------------------------------------------

    def get(self, key: str) -> Any:
        try:
            value = self.client.get(key)
        except Exception as exc:
            self._failed("get", exc)
            return NO_VALUE
        return self._loaded(key, value)

    def get_multi(self, keys: Iterable[str]) -> list[Any]:
        keys = list(keys)
        values = self._read_many(keys)
        return [self._loaded(k, values.get(k)) for k in keys]

    def set(self, key: str, value: Any) -> None:
        self._write("set", {key: value})

    def set_multi(self, mapping: Mapping[str, Any]) -> None:
        if mapping:
            self._write("set_multi", mapping)

    def get_serialized(self, key: str) -> Any:
        try:
            value = self.client.get(key)
        except Exception as exc:
            self._failed("get", exc)
            return NO_VALUE
        return self._serialized(key, value)

    def get_serialized_multi(self, keys: Iterable[str]) -> list[Any]:
        keys = list(keys)
        values = self._read_many(keys)
        return [self._serialized(k, values.get(k)) for k in keys]

    def _serialized(self, key: str, value: Any) -> Any:
        if value is None:
            return NO_VALUE
        if type(value) is not bytes:
            return self._bad(key, "not a value stored by a region with its own serializer")
        return value

    def set_serialized(self, key: str, value: bytes) -> None:
        self._write("set", {key: value})

    def set_serialized_multi(self, mapping: Mapping[str, bytes]) -> None:
        if mapping:
            self._write("set_multi", mapping)

    def delete(self, key: str) -> None:
        self.delete_multi([key])

    def delete_multi(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        try:
            self.client.delete_many(keys)
        except UndeliveredInvalidation as exc:
            # queued per node and retried in the background (see invalidation_retry_for)
            from cachedecor.stats import counters, log_failure

            counters(self.health.region).invalidations_queued += len(exc.keys)
            log_failure(self.health.region, "delete through the region API (queued for retry)", exc.error)
        except Exception as exc:
            self._failed("delete", exc)

    def get_mutex(self, key: str) -> Any:
        if not self.distributed_lock:
            return None
        return MemcachedLock(lambda: _LockClient(self), key, timeout=self.lock_timeout)  # type: ignore[no-untyped-call]
