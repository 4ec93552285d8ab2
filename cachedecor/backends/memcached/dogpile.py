"""The dogpile.cache backend ``cachedecor.pymemcache`` (also used for ``dogpile.cache.pymemcache``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dogpile.cache.api import NO_VALUE, DefaultSerialization
from dogpile.cache.backends.memcached import PyMemcacheBackend as _DogpilePyMemcacheBackend

from cachedecor.backends.memcached.cluster import MemcachedCluster, NodeHealth, _RawSerde

__all__ = ["MEMCACHED_ARGUMENTS", "MEMCACHED_DEFAULTS", "PyMemcacheBackend"]


#: Arguments of ``cachedecor.pymemcache`` (and ``dogpile.cache.pymemcache``), with types.
MEMCACHED_ARGUMENTS: dict[str, type] = {
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
}

#: Defaults cachedecor applies where dogpile's backend would wait forever.
MEMCACHED_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 0.25,
    "timeout": 0.25,
    "no_delay": True,
    "dead_timeout": 5.0,
    "hashclient_retry_attempts": 1,
    "retry_attempts": 0,
    "retry_delay": 0.0,
    "invalidation_retry_interval": 0.5,
    "invalidation_retry_for": 300.0,
    "max_pending_invalidations": 10_000,
    "meta_protocol": True,
}


class PyMemcacheBackend(DefaultSerialization, _DogpilePyMemcacheBackend):  # type: ignore[misc]
    """dogpile.cache backend ``cachedecor.pymemcache``: pymemcache with timeouts.

    Accepts dogpile's ``dogpile.cache.pymemcache`` arguments plus ``connect_timeout``,
    ``timeout``, ``no_delay``, ``dead_timeout``, ``retry_attempts``, ``retry_delay``,
    ``invalidation_retry_interval``, ``invalidation_retry_for``,
    ``max_pending_invalidations`` and ``meta_protocol`` (see :doc:`/configuration`
    for types and defaults). Values that dogpile itself
    stores through this backend are pickled by dogpile as with its Redis backend;
    cachedecor's own entries are plain bytes and are never unpickled.
    """

    def __init__(self, arguments: dict[str, Any]) -> None:
        args = {**MEMCACHED_DEFAULTS, **arguments}
        if "dead_timeout" not in arguments:
            # dogpile's names for the same wait, in order of precedence
            for alias in ("hashclient_dead_timeout", "hashclient_retry_timeout"):
                if alias in arguments:
                    args["dead_timeout"] = arguments[alias]
                    break
        super().__init__(  # type: ignore[no-untyped-call]
            {k: v for k, v in args.items() if k not in MEMCACHED_DEFAULTS}
        )
        self.connect_timeout = float(args["connect_timeout"])
        self.timeout = float(args["timeout"])
        self.no_delay = bool(args["no_delay"])
        self.retry_attempts_ = int(args["retry_attempts"]) if args.get("enable_retry_client", True) else 0
        self.retry_delay_ = float(args["retry_delay"] or 0.0)
        self.health = NodeHealth(
            float(args["dead_timeout"]),
            int(args["hashclient_retry_attempts"]),
            retry_interval=float(args["invalidation_retry_interval"]),
            retry_for=float(args["invalidation_retry_for"]),
            max_pending=int(args["max_pending_invalidations"]),
        )
        self.health.client_factory = self._create_client
        self.meta_protocol = bool(args["meta_protocol"])

    def _create_client(self) -> MemcachedCluster:
        kwargs: dict[str, Any] = {
            "serde": _RawSerde(),
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
            retry_attempts=self.retry_attempts_,
            retry_delay=self.retry_delay_,
            **kwargs,
        )

    def get_serialized(self, key: str) -> Any:
        value = self.client.get(key)
        return NO_VALUE if value is None else value

    def get_serialized_multi(self, keys: Iterable[str]) -> list[Any]:
        keys = list(keys)
        values = self.client.get_many(keys)
        return [values.get(k, NO_VALUE) for k in keys]

    def set_serialized(self, key: str, value: bytes) -> None:
        self.client.set(key, value, **self.set_arguments)

    def set_serialized_multi(self, mapping: Mapping[str, bytes]) -> None:
        self.client.set_many(dict(mapping), **self.set_arguments)
