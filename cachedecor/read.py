"""The read side: ``@cached_by_pk``.

Everything that can be decided once is decided when the decorator is applied (the
argument positions of the session and the key) or on the first call (the mapper
plan, which needs configured mappers, and the region, which may be configured after
import). A hit then costs: format the key, one round trip, decode, attach.
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, cast

import sqlalchemy
from dogpile.cache import CacheRegion
from sqlalchemy.orm import Session

from cachedecor import config as _config
from cachedecor.backends import PartialResult, ValueRefused, is_lease
from cachedecor.binding import CallBinding
from cachedecor.codec import BadEntry, UnencodableValue
from cachedecor.errors import RegionNotConfigured, UsageError
from cachedecor.keys import KeyMaker, key_maker
from cachedecor.rows import ModelPlan, model_plan
from cachedecor.stats import counters as region_counters
from cachedecor.stats import log_failure
from cachedecor.write import invalidate_many, may_fill, reads_old_snapshot, register_cached, session_tracker

__all__ = ["CachedFunction", "cached_by_pk"]

R = TypeVar("R")


class _Resolved:
    """Per (function, region configuration): what a call needs, looked up once."""

    __slots__ = ("codec", "counters", "maker", "name", "settings", "store", "ttl")

    def __init__(self, fn: CachedFunction[Any], settings: _config.RegionSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.store = settings.store
        self.codec = settings.codec
        self.maker: KeyMaker = key_maker(fn.model, settings.namespace)
        self.counters = region_counters(settings.name)
        self.ttl = fn.expiration_time if fn.expiration_time is not None else settings.expiration_time


class CachedFunction(Generic[R]):
    """A function wrapped by :func:`cached_by_pk`.

    Calls behave like the wrapped function, served from the cache where possible.
    Attributes: :meth:`invalidate`, :meth:`cache_key`, :attr:`region`,
    ``__wrapped__`` (the original function), ``model``, ``region_name``.
    """

    def __init__(
        self,
        fn: Callable[..., R],
        model: Any,
        *,
        region: str,
        pk: str | tuple[str, ...] | None,
        many: bool,
        expiration_time: int | None,
        cache_none: bool,
    ) -> None:
        functools.update_wrapper(self, fn)
        self._name: str = getattr(fn, "__qualname__", repr(fn))
        self.__wrapped__ = fn
        self.model = model
        self.region_name = region
        self.many = many
        self.cache_none = cache_none
        if expiration_time is not None and (
            isinstance(expiration_time, bool) or not isinstance(expiration_time, int) or expiration_time < 0
        ):
            raise UsageError(
                f"expiration_time must be a whole number of seconds >= 0, got {expiration_time!r}"
            )
        self.expiration_time = expiration_time
        self.binding = CallBinding(fn, pk)
        if many and self.binding.composite:
            raise UsageError(
                "many=True takes one parameter holding the list of primary keys "
                "(composite keys as tuples), not several pk names"
            )
        self._plan: ModelPlan | None = None
        self._resolved: _Resolved | None = None
        register_cached(model, region)

    # -- public attributes --------------------------------------------------------------

    @property
    def region(self) -> CacheRegion:
        """The dogpile region currently configured under this function's region name."""
        return _config.get_region(self.region_name)

    def cache_key(self, pk: Any) -> str:
        """The cache key of the row with primary key ``pk`` in this function's region."""
        return self._resolve().maker(pk)

    def invalidate(self, pk: Any) -> None:
        """Delete the cached entry of ``pk`` in every region that caches the model, now."""
        invalidate_many(self.model, [pk])

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return types.MethodType(self, obj)

    def __repr__(self) -> str:
        return f"<cached_by_pk {self._name} of {self.model.__name__} in region {self.region_name!r}>"

    # -- resolution ---------------------------------------------------------------------

    def _resolve(self) -> _Resolved:
        settings = _config._settings.get(self.region_name)
        if settings is None:
            raise RegionNotConfigured(self.region_name)
        resolved = self._resolved
        if resolved is None or resolved.settings is not settings:
            resolved = self._resolved = _Resolved(self, settings)
        if self._plan is None:
            self._plan = model_plan(self.model)
        return resolved

    # -- calls --------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        r = self._resolved
        if r is None or _config._settings.get(self.region_name) is not r.settings:
            r = self._resolve()
        if self.many:
            return self._call_many(r, args, kwargs)  # type: ignore[return-value]
        binding = self.binding
        session = binding.session(args, kwargs)
        pk = binding.pk(args, kwargs)
        key = r.maker(pk)
        if session is not None:
            tracker = session_tracker(session)
            if tracker is not None and tracker.dirty and tracker.blocks(self.model, r.maker.encode_pk(pk)):
                r.counters.bypasses += 1
                return self.__wrapped__(*args, **kwargs)
        lease_ttl = r.settings.lease_timeout
        try:
            data, token = r.store.lookup(key, lease_ttl)
            if data is not None:
                found, value = self._decode(r, key, data, session)
                if found:
                    r.counters.hits += 1
                    return value  # type: ignore[no-any-return]
                data, token = r.store.lookup(key, lease_ttl)  # the bad entry was deleted
        except Exception as exc:
            r.counters.errors += 1
            log_failure(r.name, "get", exc)
            return self.__wrapped__(*args, **kwargs)
        r.counters.misses += 1
        if data is not None:
            found, value = self._decode(r, key, data, session)
            if found:
                return value  # type: ignore[no-any-return]
            return self.__wrapped__(*args, **kwargs)
        if token is None:
            found, value = self._wait_for_fill(r, key, session)
            if found:
                return value  # type: ignore[no-any-return]
            return self.__wrapped__(*args, **kwargs)
        return self._fill_after_call(r, key, pk, token, session, args, kwargs)

    def _decode(self, r: _Resolved, key: str, data: bytes, session: Session | None) -> tuple[bool, Any]:
        """(True, instance or None) for a usable entry; (False, None) after dropping a bad one."""
        try:
            payload = r.codec.decode(key, data)
            if payload is None:
                return True, None
            assert self._plan is not None
            return True, self._plan.build(payload, session)
        except BadEntry as exc:
            r.counters.bad_entries += 1
            log_failure(r.name, "decoding an entry", f"{key}: {exc}")
            try:
                r.store.delete_many([key])
            except Exception:
                r.counters.errors += 1
            return False, None
        except Exception as exc:
            r.counters.errors += 1
            log_failure(r.name, "attaching a cached row", exc)
            return False, None

    def _fill_after_call(
        self,
        r: _Resolved,
        key: str,
        pk: Any,
        token: Any,
        session: Session | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        """Call the function while holding the lease of ``key``, then fill the entry."""
        r.counters.lease_wins += 1
        preloaded = session is not None and (
            self._in_identity_map(session, r, pk) or not may_fill(session) or reads_old_snapshot(session)
        )
        try:
            result = self.__wrapped__(*args, **kwargs)
        except BaseException:
            self._release(r, key, token)
            raise
        if preloaded:
            # the session held this row before the call (its copy may predate a
            # committed write), its transaction reads an older snapshot, or it has
            # written (the row may be its own uncommitted change): either way the
            # row must not become the shared entry
            self._release(r, key, token)
            return result
        payload = self._payload(r, key, result)
        if payload is _SKIP:
            self._release(r, key, token)
        else:
            self._fill(r, key, token, payload)
        return result

    def _in_identity_map(self, session: Session, r: _Resolved, pk: Any) -> bool:
        assert self._plan is not None
        try:
            ident = (self._plan.identity_class, r.maker.normalize(pk), None)
            return session.identity_map.get(ident) is not None
        except Exception:
            return True

    def _payload(self, r: _Resolved, key: str, result: Any) -> Any:
        """The payload to cache for ``result`` under ``key``, or ``_SKIP``."""
        if result is None:
            return None if self.cache_none else _SKIP
        plan = self._plan
        assert plan is not None
        if not isinstance(result, self.model):
            raise UsageError(
                f"{self._name} is decorated with @cached_by_pk({self.model.__name__}) "
                f"but returned {type(result).__name__}; it must return a {self.model.__name__} or None"
            )
        if r.maker(plan.pk_of(result)) != key:
            raise UsageError(
                f"{self._name} was asked for the row with key {key!r} but returned "
                f"{result!r} with primary key {plan.pk_of(result)!r}"
            )
        payload = plan.snapshot(result)
        return _SKIP if payload is None else payload

    def _entry(self, r: _Resolved, key: str, token: Any, payload: Any) -> bytes | None:
        """The stored form of ``payload``, or ``None`` (lease released) if it cannot be cached."""
        try:
            entry = r.codec.encode(key, payload)
        except UnencodableValue as exc:
            r.counters.errors += 1
            log_failure(r.name, "encoding a row", exc)
            self._release(r, key, token)
            return None
        if len(entry) > r.settings.max_entry_size:
            r.counters.oversized += 1
            log_failure(r.name, "caching an entry", f"{key} is {len(entry)} bytes, over max_entry_size")
            self._release(r, key, token)
            return None
        return entry

    def _fill(self, r: _Resolved, key: str, token: Any, payload: Any) -> None:
        entry = self._entry(r, key, token, payload)
        if entry is None:
            return
        try:
            stored = r.store.fill(key, entry, token, r.ttl)
        except Exception as exc:
            self._fill_failed(r, key, token, exc)
            return
        if stored:
            r.counters.fills += 1
        else:
            r.counters.lease_losses += 1

    def _fill_failed(self, r: _Resolved, key: str, token: Any, exc: BaseException) -> None:
        if isinstance(exc, ValueRefused):
            r.counters.oversized += 1
            log_failure(r.name, "caching an entry", f"{key} refused by the server: {exc}")
            self._release(r, key, token)
        else:
            r.counters.errors += 1
            log_failure(r.name, "fill", exc)

    def _release(self, r: _Resolved, key: str, token: Any) -> None:
        try:
            r.store.release(key, token)
        except Exception as exc:
            r.counters.errors += 1
            log_failure(r.name, "lease release", exc)

    def _wait_for_fill(self, r: _Resolved, key: str, session: Session | None) -> tuple[bool, Any]:
        """Another reader holds the lease: wait up to ``lease_wait`` for its value."""
        wait = r.settings.lease_wait
        if wait <= 0:
            return False, None
        r.counters.lease_waits += 1
        deadline = time.monotonic() + wait
        delay = 0.001
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)
            try:
                data = r.store.peek(key)
            except Exception as exc:
                r.counters.errors += 1
                log_failure(r.name, "get", exc)
                return False, None
            if data is None:
                return False, None  # the lease was released or invalidated
            if not is_lease(data):
                # counted as the miss it was (and in lease_waits), not as a hit
                return self._decode(r, key, data, session)

    # -- many=True ----------------------------------------------------------------------

    def _call_many(self, r: _Resolved, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        binding = self.binding
        session = binding.session(args, kwargs)
        requested = binding.pk(args, kwargs)
        if isinstance(requested, (str, bytes)) or not isinstance(requested, Iterable):
            raise UsageError(
                f"{self._name} uses many=True: pass an iterable of primary keys, not {requested!r}"
            )
        maker = r.maker
        wanted: dict[str, Any] = {}
        for pk in requested:
            wanted.setdefault(maker(pk), pk)
        if not wanted:
            return []
        counters = r.counters
        blocked: set[str] = set()
        if session is not None:
            tracker = session_tracker(session)
            if tracker is not None and tracker.dirty:
                blocked = {k for k, pk in wanted.items() if tracker.blocks(self.model, maker.encode_pk(pk))}
                counters.bypasses += len(blocked)
        lookup = [k for k in wanted if k not in blocked]
        results: dict[str, Any] = {}
        replies: dict[str, tuple[bytes | None, Any]] = {}
        if lookup:
            try:
                replies = r.store.lookup_many(lookup, r.settings.lease_timeout)
            except PartialResult as exc:
                replies = exc.found
                counters.errors += 1
                log_failure(r.name, "get_many", exc.error)
            except Exception as exc:
                counters.errors += 1
                log_failure(r.name, "get_many", exc)
        missing: list[str] = []
        tokens: dict[str, Any] = {}
        for key in wanted:
            data, token = replies.get(key, (None, None))
            if data is not None:
                ok, value = self._decode(r, key, data, session)
                if ok:
                    counters.hits += 1
                    results[key] = value
                    continue
            elif token is not None:
                tokens[key] = token
            missing.append(key)
        if not missing:
            return [results[k] for k in wanted if results[k] is not None]
        counters.misses += len(missing)
        counters.lease_wins += len(tokens)
        if session is not None and tokens:
            unfillable = not may_fill(session) or reads_old_snapshot(session)
            for key in [k for k in tokens if unfillable or self._in_identity_map(session, r, wanted[k])]:
                self._release(r, key, tokens.pop(key))
        call_args, call_kwargs = binding.replace_pk(args, kwargs, [wanted[k] for k in missing])
        try:
            rows = self.__wrapped__(*call_args, **call_kwargs)
        except BaseException:
            for key, token in tokens.items():
                self._release(r, key, token)
            raise
        plan = self._plan
        assert plan is not None
        for row in cast("Iterable[Any]", rows or ()):
            if not isinstance(row, self.model):
                raise UsageError(
                    f"{self._name} (many=True) returned a {type(row).__name__}; "
                    f"it must return {self.model.__name__} instances"
                )
            key = maker(plan.pk_of(row))
            if key in wanted and key not in results:
                results[key] = row
        entries: list[tuple[str, bytes, Any]] = []
        for key, token in tokens.items():
            row = results.get(key)
            payload = _SKIP if row is None and not self.cache_none else None
            if row is not None:
                payload = plan.snapshot(row)
                if payload is None:
                    payload = _SKIP
            if payload is _SKIP:
                self._release(r, key, token)
                continue
            entry = self._entry(r, key, token, payload)
            if entry is not None:
                entries.append((key, entry, token))
        if entries:
            try:
                outcomes = r.store.fill_many(entries, r.ttl)
            except Exception as exc:
                outcomes = {key: exc for key, _, _ in entries}
            for key, _, token in entries:
                outcome = outcomes.get(key, False)
                if outcome is True:
                    counters.fills += 1
                elif outcome is False:
                    counters.lease_losses += 1
                else:
                    self._fill_failed(r, key, token, outcome)
        return [results[k] for k in wanted if results.get(k) is not None]


_SKIP: Any = object()


def cached_by_pk(
    model: Any,
    *,
    region: str = "default",
    pk: str | tuple[str, ...] | None = None,
    many: bool = False,
    expiration_time: int | None = None,
    cache_none: bool = False,
) -> Callable[[Callable[..., R]], CachedFunction[R]]:
    """Cache the rows a function loads by primary key.

    :param model: the mapped class the function returns.
    :param region: name of the region to cache in (looked up at call time).
    :param pk: ``None`` (the first parameter that is not the session), the name of
        the parameter holding the key, or a tuple of names forming a composite key.
    :param many: the function takes a list of keys and returns a list of rows; it is
        called once, with the keys missing from the cache only.
    :param expiration_time: seconds; overrides the region's ``expiration_time``.
    :param cache_none: also cache a ``None`` result (a row that does not exist).

    >>> from cachedecor import cached_by_pk
    >>> from sqlalchemy import Integer
    >>> from sqlalchemy.orm import DeclarativeBase, mapped_column
    >>> class Base(DeclarativeBase): pass
    >>> class Note(Base):
    ...     __tablename__ = "notes"
    ...     id = mapped_column(Integer, primary_key=True)
    >>> @cached_by_pk(Note)
    ... def get_note(session, note_id):
    ...     "Load a note."
    ...     return session.get(Note, note_id)
    >>> get_note.__name__, get_note.__doc__
    ('get_note', 'Load a note.')
    """
    mapper = sqlalchemy.inspect(model, raiseerr=False)
    if mapper is None or not isinstance(mapper, sqlalchemy.orm.Mapper):
        raise UsageError(f"@cached_by_pk needs a mapped class, got {model!r}")
    if not isinstance(region, str) or not region:
        raise UsageError(f"region must be a region name, got {region!r}")

    def decorate(fn: Callable[..., R]) -> CachedFunction[R]:
        return CachedFunction(
            fn,
            mapper.class_,
            region=region,
            pk=pk,
            many=many,
            expiration_time=expiration_time,
            cache_none=cache_none,
        )

    return decorate
