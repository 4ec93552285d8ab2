"""The :class:`~cachedecor.backends.base.Store` of dogpile's Redis and Valkey backends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cachedecor.backends.base import Store, new_lease_marker
from cachedecor.keys import KeyPattern

__all__ = ["RedisStore"]


_REDIS_FILL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if tonumber(ARGV[3]) > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  else
    redis.call('SET', KEYS[1], ARGV[2])
  end
  return 1
end
return 0
"""

_REDIS_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore(Store):
    """Leases with ``SET NX EX`` and compare-and-set scripts for the fill and the release."""

    name = "redis"

    def __init__(self, backend: Any) -> None:
        self.reader = backend.reader_client
        self.writer = backend.writer_client
        self._fill = self.writer.register_script(_REDIS_FILL)
        self._release = self.writer.register_script(_REDIS_RELEASE)

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self.reader.get(key)
        return value

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        return {k: v for k, v in zip(keys, self.reader.mget(keys), strict=True) if v is not None}

    def lease(self, key: str, ttl: int) -> Any:
        marker = new_lease_marker()
        if self.writer.set(key, marker, nx=True, ex=ttl):
            return marker
        return None

    def fill(self, key: str, value: bytes, token: Any, ttl: int | None) -> bool:
        return bool(self._fill(keys=[key], args=[token, value, int(ttl or 0)]))

    def release(self, key: str, token: Any) -> None:
        self._release(keys=[key], args=[token])

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            self.writer.delete(*keys)

    def delete_matching(self, patterns: Sequence[KeyPattern]) -> int:
        deleted = 0
        for pattern in patterns:
            glob = "".join("\\" + c if c in "*?[]\\" else c for c in pattern.prefix) + "*"
            batch: list[Any] = []
            for key in self.writer.scan_iter(match=glob, count=1000):
                text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
                if not pattern.matches(text):
                    continue
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(self.writer.delete(*batch))
                    batch = []
            if batch:
                deleted += int(self.writer.delete(*batch))
        return deleted
