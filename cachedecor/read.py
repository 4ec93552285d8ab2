"""The read side: ``@cached_by_pk``.

Everything that can be decided once is decided when the decorator is applied (the
argument positions of the session and the key) or on the first call (the mapper
plan, which needs configured mappers, and the region, which may be configured after
import). A hit then costs: format the key, one round trip, decode, attach.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
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
from cachedecor.keys import KeyMaker, Space, key_maker
from cachedecor.rows import EntryMismatch, ModelPlan, OtherClass, model_plan
from cachedecor.stats import counters as region_counters
from cachedecor.stats import log_failure
from cachedecor.tracking import may_fill, reads_old_snapshot, session_space, session_tracker
from cachedecor.write import invalidate_many

__all__ = ["CachedFunction", "cached_by_pk"]

R = TypeVar("R")

_SKIP: Any = object()
#: _decode's answer for an entry of a class outside the reader's model
_OTHER: Any = object()


class _Resolved:
    """Per (function, region configuration): what a call needs, looked up once."""

    __slots__ = ("base", "codec", "counters", "maker", "name", "region", "settings", "store", "ttl")

    def __init__(self, fn: CachedFunction[Any], settings: _config.RegionSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.region = settings.region
        self.store = settings.store
        self.codec = settings.codec
        self.maker: KeyMaker = key_maker(fn.model, settings.namespace)
        self.base = self.maker.model
        if settings.tables is not None and self.maker.table_name not in settings.tables:
            raise UsageError(
                f"{fn._name} caches table {self.maker.table_name!r} in region {settings.name!r}, "
                f"whose 'tables' option does not list it: writers would not invalidate it there; "
                f"add it to {settings.name}.tables"
            )
        self.counters = region_counters(settings.name)
        self.ttl = fn.expiration_time if fn.expiration_time is not None else settings.expiration_time


class CachedFunction(Generic[R]):
    """A function wrapped by :func:`cached_by_pk`.

    Calls behave like the wrapped function, served from the cache where possible.
    Attributes: :meth:`refresh` (call through and refill the entry), :meth:`uncached`
    (call through, the cache untouched), :meth:`invalidate`, :meth:`cache_key`,
    :attr:`region`, ``__wrapped__`` (the original function), ``model``,
    ``region_name``. On a decorated method, the attributes that take the function's
    arguments (:meth:`refresh`, :meth:`uncached`) are bound to the instance as the
    call is.
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
        session: Any = None,
        identity_token: str | None = None,
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
        self.binding = CallBinding(fn, pk, session=session)
        if many and self.binding.composite:
            raise UsageError(
                "many=True takes one parameter holding the list of primary keys "
                "(composite keys as tuples), not several pk names"
            )
        self._token = CallBinding(fn, identity_token) if identity_token is not None else None
        self._plan: ModelPlan | None = None
        self._resolved: _Resolved | None = None

    # -- public attributes --------------------------------------------------------------

    @property
    def region(self) -> CacheRegion:
        """The dogpile region currently configured under this function's region name."""
        return _config.get_region(self.region_name)

    def cache_key(self, pk: Any) -> str:
        """The cache key of the row with primary key ``pk`` in this function's region."""
        return self._resolve().maker(pk)

    def invalidate(self, pk: Any) -> None:
        """Delete the cached entry of ``pk`` in every region that may cache the model, now."""
        invalidate_many(self.model, [pk])

    def refresh(self, *args: Any, **kwargs: Any) -> R:
        """Call the function and refill the cache with its result, whatever the cache holds.

        Takes the function's arguments. The entry is deleted, then refilled under a
        fill lease as on a miss: a write committed while the function runs deletes
        the lease, and the older row it read is not stored. If another reader is
        filling the key at that moment, the refresh returns its own result and that
        reader's fill (which read the database after the delete) is the new entry.
        Inside a transaction that has written the row, the result is not stored (as
        for any read there). With ``many=True`` every requested row is refreshed.
        Returns what a call returns (rows from the function, never from the cache).
        """
        r = self._resolve()
        if self.many:
            return self._call_many(r, args, kwargs, _REFRESH)  # type: ignore[return-value]
        session = self.binding.session(args, kwargs)
        target = self._target(r, session, args, kwargs)
        if target is None:
            return self.__wrapped__(*args, **kwargs)
        key, pk, token, space = target
        r.counters.misses += 1
        try:
            r.store.delete_many([key])
            _, lease = r.store.lookup(key, r.settings.lease_timeout)
        except Exception as exc:
            r.counters.errors += 1
            log_failure(r.name, "refresh", exc)
            return self.__wrapped__(*args, **kwargs)
        if lease is None:  # filled or being filled by a reader that started after the delete
            return self.__wrapped__(*args, **kwargs)
        r.counters.lease_wins += 1
        return self._call_and_fill(r, key, lease, session, pk, token, space, args, kwargs)

    def uncached(self, *args: Any, **kwargs: Any) -> R:
        """Call the function without the cache: nothing is read from it or stored in it.

        Takes the function's arguments and returns what a call returns: with
        ``many=True``, the rows in the order of the requested keys, duplicates and
        missing rows left out, the function called once with every requested key.
        Nothing is counted. The function itself is ``__wrapped__``.
        """
        if not self.many:
            return self.__wrapped__(*args, **kwargs)
        return self._call_many(self._resolve(), args, kwargs, _UNCACHED)  # type: ignore[return-value]

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return _BoundCachedFunction(self, obj)

    def __repr__(self) -> str:
        return f"<cached_by_pk {self._name} of {self.model.__name__} in region {self.region_name!r}>"

    # -- resolution ---------------------------------------------------------------------

    def _resolve(self) -> _Resolved:
        settings = _config._settings.get(self.region_name)
        if settings is None:
            raise RegionNotConfigured(self.region_name, _config._settings)
        resolved = self._resolved
        if resolved is None or resolved.settings is not settings:
            resolved = self._resolved = _Resolved(self, settings)
        if self._plan is None:
            self._plan = model_plan(self.model)
        return resolved

    def _space(self, session: Session | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """(identity token, space) of this call."""
        token = self._token.pk(args, kwargs) if self._token is not None else None
        if session is None and token is None:
            return None, None
        return token, session_space(session, self.model, token)

    def _uncacheable(self, r: _Resolved, why: str) -> None:
        r.counters.uncacheable += 1
        log_failure(r.name, f"caching a call of {self._name}", why)

    # -- calls --------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        r = self._resolved
        if r is None or _config._settings.get(self.region_name) is not r.settings:
            r = self._resolve()
        if self.many:
            return self._call_many(r, args, kwargs)  # type: ignore[return-value]
        session = self.binding.session(args, kwargs)
        target = self._target(r, session, args, kwargs)
        if target is None:
            return self.__wrapped__(*args, **kwargs)
        key, pk, token, space = target
        lease_ttl = r.settings.lease_timeout
        try:
            data, lease = r.store.lookup(key, lease_ttl)
            if data is not None:
                found, value = self._decode(r, key, data, session, token)
                if found:
                    r.counters.hits += 1
                    return value  # type: ignore[no-any-return]
                if value is _OTHER:
                    r.counters.misses += 1
                    return self.__wrapped__(*args, **kwargs)
                data, lease = r.store.lookup(key, lease_ttl)  # the bad entry was deleted
        except Exception as exc:
            r.counters.errors += 1
            log_failure(r.name, "get", exc)
            return self.__wrapped__(*args, **kwargs)
        r.counters.misses += 1
        if data is not None:
            found, value = self._decode(r, key, data, session, token)
            if found:
                return value  # type: ignore[no-any-return]
            return self.__wrapped__(*args, **kwargs)
        if lease is None:
            found, value = self._wait_for_fill(r, key, session, token)
            if found:
                return value  # type: ignore[no-any-return]
            return self.__wrapped__(*args, **kwargs)
        r.counters.lease_wins += 1
        return self._call_and_fill(r, key, lease, session, pk, token, space, args, kwargs)

    def _call_and_fill(
        self,
        r: _Resolved,
        key: str,
        lease: Any,
        session: Session | None,
        pk: Any,
        token: Any,
        space: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        """Call the function holding the fill lease of ``key``, and fill it with the result."""
        unfillable = session is not None and self._unfillable(session, r, pk, token)
        started = time.time()
        try:
            result = self.__wrapped__(*args, **kwargs)
        except BaseException:
            self._release(r, key, lease)
            raise
        if unfillable:
            self._release(r, key, lease)
            return result
        payload = self._payload(r, key, result, token, space)
        if payload is _SKIP:
            self._release(r, key, lease)
        else:
            entry = self._entry(r, key, lease, payload, started)
            if entry is not None:
                try:
                    outcome: Any = r.store.fill(key, entry, lease, r.ttl)
                except Exception as exc:
                    outcome = exc
                self._filled(r, key, lease, outcome)
        return result

    def _target(
        self, r: _Resolved, session: Session | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, Any, Any, Space | None] | None:
        """(key, pk, identity token, space) of a call, or ``None`` when it must call through.

        ``None`` for a row the session's transaction wrote (counted in ``bypasses``)
        and for arguments with no cache key (counted in ``uncacheable``): the function
        itself decides what such an argument means (an error, ``None``, ...).
        """
        try:
            pk = self.binding.pk(args, kwargs)
            token, space = self._space(session, args, kwargs)
            key = r.maker(pk, space)
            if session is not None:
                tracker = session_tracker(session)
                if (
                    tracker is not None
                    and tracker.dirty
                    and tracker.blocks(r.base, r.maker.encode_pk(pk), space)
                ):
                    r.counters.bypasses += 1
                    return None
        except (UsageError, ValueError, TypeError) as exc:
            self._uncacheable(r, f"no cache key for this call: {exc}")
            return None
        return key, pk, token, space

    def _unfillable(self, session: Session, r: _Resolved, pk: Any, token: Any) -> bool:
        """Whether what this session reads for ``pk`` must not become the shared entry.

        The session held the row before the call (its copy may predate a committed
        write), its transaction reads an older snapshot, or it has written (the row
        may be its own uncommitted change).
        """
        return (
            self._in_identity_map(session, r, pk, token)
            or not may_fill(session)
            or reads_old_snapshot(session)
        )

    def _decode(
        self, r: _Resolved, key: str, data: bytes, session: Session | None, token: Any
    ) -> tuple[bool, Any]:
        """(True, instance or None) for a usable entry; (False, _OTHER) for an entry of a
        class outside the model; (False, None) after dropping an unusable one, or one
        written before the region's invalidation (dogpile's ``region.invalidate()``)."""
        try:
            payload, written_at = r.codec.decode_timed(key, data)
            invalidator = r.region.region_invalidator
            if getattr(invalidator, "_invalidated", True) is not None and invalidator.is_invalidated(
                written_at
            ):
                r.store.delete_many([key])
                return False, None
            assert self._plan is not None
            return True, self._plan.build(payload, session, key, token)
        except OtherClass:
            return False, _OTHER
        except EntryMismatch as exc:
            r.counters.mismatches += 1
            # another deployed version's entry is routine during a rolling deploy
            level = logging.INFO if exc.other_mapping else logging.WARNING
            log_failure(r.name, "verifying an entry", f"{key}: {exc}", level)
        except BadEntry as exc:
            r.counters.bad_entries += 1
            log_failure(r.name, "decoding an entry", f"{key}: {exc}")
        except Exception as exc:
            r.counters.errors += 1
            log_failure(r.name, "attaching a cached row", exc)
            return False, None
        try:
            r.store.delete_many([key])
        except Exception:
            r.counters.errors += 1
        return False, None

    def _in_identity_map(self, session: Session, r: _Resolved, pk: Any, token: Any) -> bool:
        assert self._plan is not None
        try:
            ident = (self._plan.identity_class, r.maker.normalize(pk), token)
            return session.identity_map.get(ident) is not None
        except Exception:
            return True

    def _payload(self, r: _Resolved, key: str, result: Any, token: Any, space: Space | None) -> Any:
        """The payload to cache for ``result`` under ``key``, or ``_SKIP``.

        A result that is not a row of the model, or whose primary key or identity
        token is not the one asked for (``25.0`` for row ``25``, say), is returned to
        the caller as it is and not cached: counted as ``uncacheable`` and logged.
        """
        if result is None:
            # a subclass reader's None says "no such subclass row", not "no such row":
            # it must not answer the hierarchy's other readers, which share the key
            return [key, None, 0, None] if self.cache_none and self.model is r.base else _SKIP
        plan = self._plan
        assert plan is not None
        if not isinstance(result, self.model):
            self._uncacheable(
                r,
                f"it is decorated with @cached_by_pk({self.model.__name__}) but returned "
                f"{type(result).__name__}: results that are not {self.model.__name__} rows are not cached",
            )
            return _SKIP
        state = sqlalchemy.inspect(result)
        row_token = state.key[2] if state.key is not None else None
        if row_token != token:
            self._uncacheable(
                r,
                f"it returned a row of shard {row_token!r}; name the parameter holding the shard "
                f"with identity_token= so that rows of different shards get different keys",
            )
            return _SKIP
        try:
            row_key = r.maker(plan.pk_of(result), space)
        except Exception:
            row_key = None
        if row_key != key:
            self._uncacheable(
                r, f"asked for the row with key {key!r}, it returned {result!r} (key {row_key!r})"
            )
            return _SKIP
        payload = plan.snapshot(result, key)
        return _SKIP if payload is None else payload

    def _entry(self, r: _Resolved, key: str, lease: Any, payload: Any, started: float) -> bytes | None:
        """The stored form of ``payload`` (read from the database from ``started`` on),
        or ``None`` (lease released) if it cannot be cached."""
        try:
            entry = r.codec.encode(key, payload, started)
        except UnencodableValue as exc:
            r.counters.errors += 1
            log_failure(r.name, "encoding a row", exc)
            self._release(r, key, lease)
            return None
        if len(entry) > r.settings.max_entry_size:
            r.counters.oversized += 1
            log_failure(r.name, "caching an entry", f"{key} is {len(entry)} bytes, over max_entry_size")
            self._release(r, key, lease)
            return None
        return entry

    def _filled(self, r: _Resolved, key: str, lease: Any, outcome: Any) -> None:
        """Count the outcome of a fill: stored, refused by the lease, or failed."""
        if outcome is True:
            r.counters.fills += 1
        elif outcome is False:
            r.counters.lease_losses += 1
        elif isinstance(outcome, ValueRefused):
            r.counters.oversized += 1
            log_failure(r.name, "caching an entry", f"{key} refused by the server: {outcome}")
            self._release(r, key, lease)
        else:
            r.counters.errors += 1
            log_failure(r.name, "fill", outcome)

    def _release(self, r: _Resolved, key: str, lease: Any) -> None:
        try:
            r.store.release(key, lease)
        except Exception as exc:
            r.counters.errors += 1
            log_failure(r.name, "lease release", exc)

    def _wait_for_fill(self, r: _Resolved, key: str, session: Session | None, token: Any) -> tuple[bool, Any]:
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
                return self._decode(r, key, data, session, token)

    # -- many=True ----------------------------------------------------------------------

    def _call_many(
        self, r: _Resolved, args: tuple[Any, ...], kwargs: dict[str, Any], mode: int = 0
    ) -> list[Any]:
        binding = self.binding
        session = binding.session(args, kwargs)
        requested = binding.pk(args, kwargs)
        if isinstance(requested, (str, bytes)) or not isinstance(requested, Iterable):
            raise UsageError(
                f"{self._name} uses many=True: pass an iterable of primary keys, not {requested!r}"
            )
        maker = r.maker
        counters = r.counters
        wanted: dict[str, Any] = {}
        blocked: set[str] = set()
        try:
            token, space = self._space(session, args, kwargs)
            tracker = session_tracker(session) if session is not None else None
            for pk in requested:
                key = maker(pk, space)
                wanted.setdefault(key, pk)
                if (
                    tracker is not None
                    and tracker.dirty
                    and tracker.blocks(r.base, maker.encode_pk(pk), space)
                ):
                    blocked.add(key)
        except (UsageError, ValueError, TypeError) as exc:
            self._uncacheable(r, f"no cache key for this call: {exc}")
            return self.__wrapped__(*args, **kwargs)  # type: ignore[return-value]
        if not wanted:
            return []
        results: dict[str, Any] = {}
        replies: dict[str, tuple[bytes | None, Any]] = {}
        if mode == _UNCACHED:
            lookup = []
        else:
            counters.bypasses += len(blocked)
            lookup = [k for k in wanted if k not in blocked]
        if lookup and mode == _REFRESH:
            try:
                r.store.delete_many(lookup)
            except Exception as exc:
                counters.errors += 1
                log_failure(r.name, "refresh", exc)
                lookup = []
        if lookup:
            replies = self._lookup_many(r, lookup)
        missing: list[str] = []
        leases: dict[str, Any] = {}
        dropped: list[str] = []
        for key in wanted:
            data, lease = replies.get(key, (None, None))
            if data is not None and mode != _REFRESH:
                ok, value = self._decode(r, key, data, session, token)
                if ok:
                    counters.hits += 1
                    results[key] = value
                    continue
                if value is None:
                    dropped.append(key)  # deleted: it may be leased now
            elif lease is not None:
                leases[key] = lease
            missing.append(key)
        if dropped:
            for key, (data, lease) in self._lookup_many(r, dropped).items():
                if data is None and lease is not None:
                    leases[key] = lease
        if not missing:
            return [results[k] for k in wanted if results[k] is not None]
        if mode != _UNCACHED:
            counters.misses += len(missing)
            counters.lease_wins += len(leases)
        if session is not None and leases:
            unfillable = not may_fill(session) or reads_old_snapshot(session)
            for key in [
                k for k in leases if unfillable or self._in_identity_map(session, r, wanted[k], token)
            ]:
                self._release(r, key, leases.pop(key))
        call_args, call_kwargs = binding.replace_pk(args, kwargs, [wanted[k] for k in missing])
        started = time.time()
        try:
            rows = self.__wrapped__(*call_args, **call_kwargs)
        except BaseException:
            for key, lease in leases.items():
                self._release(r, key, lease)
            raise
        plan = self._plan
        assert plan is not None
        for row in cast("Iterable[Any]", rows or ()):
            if not isinstance(row, self.model):
                for key, lease in leases.items():
                    self._release(r, key, lease)
                raise UsageError(
                    f"{self._name} (many=True) returned a {type(row).__name__}; "
                    f"it must return {self.model.__name__} instances"
                )
            try:
                key = maker(plan.pk_of(row), space)
            except Exception:
                continue
            if key in wanted and key not in results:
                results[key] = row
        entries: list[tuple[str, bytes, Any]] = []
        for key, lease in leases.items():
            payload = self._payload(r, key, results.get(key), token, space)
            entry = None if payload is _SKIP else self._entry(r, key, lease, payload, started)
            if entry is not None:
                entries.append((key, entry, lease))
            elif payload is _SKIP:
                self._release(r, key, lease)
        if entries:
            try:
                outcomes = r.store.fill_many(entries, r.ttl)
            except Exception as exc:
                outcomes = {key: exc for key, _, _ in entries}
            for key, _, lease in entries:
                self._filled(r, key, lease, outcomes.get(key, False))
        return [results[k] for k in wanted if results.get(k) is not None]

    def _lookup_many(self, r: _Resolved, keys: list[str]) -> dict[str, tuple[bytes | None, Any]]:
        try:
            return r.store.lookup_many(keys, r.settings.lease_timeout)
        except PartialResult as exc:
            r.counters.errors += 1
            log_failure(r.name, "get_many", exc.error)
            found: dict[str, tuple[bytes | None, Any]] = exc.found
            return found
        except Exception as exc:
            r.counters.errors += 1
            log_failure(r.name, "get_many", exc)
            return {}


#: _call_many modes: a call through the cache, a refresh, a call without the cache
_REFRESH = 1
_UNCACHED = 2


class _BoundCachedFunction:
    """A :class:`CachedFunction` bound to an instance (a decorated method), as a method is."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, fn: CachedFunction[Any], obj: Any) -> None:
        self.__func__ = fn
        self.__self__ = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__.refresh(self.__self__, *args, **kwargs)

    def uncached(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__.uncached(self.__self__, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__func__, name)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.__func__.__doc__

    @property
    def __signature__(self) -> inspect.Signature:
        """The method's signature without ``self``, as for a bound method."""
        sig = inspect.signature(self.__func__.__wrapped__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __repr__(self) -> str:
        return f"<bound {self.__func__!r} of {self.__self__!r}>"


def cached_by_pk(
    model: Any,
    *,
    region: str = "default",
    pk: str | tuple[str, ...] | None = None,
    many: bool = False,
    expiration_time: int | None = None,
    cache_none: bool = False,
    session: Any = None,
    identity_token: str | None = None,
) -> Callable[[Callable[..., R]], CachedFunction[R]]:
    """Cache the rows a function loads by primary key.

    :param model: the mapped class the function returns.
    :param region: name of the region to cache in (looked up at call time).
    :param pk: ``None`` (the first parameter that is not the session, nor a method's
        ``self``/``cls``), the name of the parameter holding the key, or a tuple of
        names forming a composite key.
    :param many: the function takes a list of keys and returns a list of rows; it is
        called once, with the keys missing from the cache only.
    :param expiration_time: seconds; overrides the region's ``expiration_time``.
    :param cache_none: also cache a ``None`` result (a row that does not exist).
    :param session: where the session is when it is not an argument: a
        ``scoped_session`` (Flask-SQLAlchemy's ``db.session``), a callable returning
        the session, or a parameter path such as ``"self.session"``. Without it, the
        session is the argument that is a ``Session`` (or ``scoped_session``), else a
        method's ``self.session``. Hits are attached to it.
    :param identity_token: with horizontal sharding, the parameter holding the shard
        (the identity token) the row is read from; it becomes part of the key.

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
            session=session,
            identity_token=identity_token,
        )

    return decorate
