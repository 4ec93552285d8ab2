"""The decisions of a cached read, as generators that ask for I/O and do none.

Each function here is a generator. It yields a request, a small named tuple whose type
names the operation (:class:`Lookup`, :class:`Fill`, :class:`Call`, ...), and is
resumed with the answer, or with the exception the operation raised thrown in at
the ``yield``. It returns the value of the read. A driver
(:mod:`cachedecor.drivers`) carries the requests out: with a thread's blocking
calls, or with asyncio. So the lease, the wait, the fill and the release are
decided once, in this module, for every kind of caller.

``fn`` is the :class:`~cachedecor.read.CachedFunction` being called and ``r`` its
resolved region (:class:`~cachedecor.read.Resolved`). ``fn`` stays ``Any``: its ``_plan`` is
``ModelPlan | None`` until the first call resolves it, and narrowing it would cost a
check per use on the hit path.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Generator, Iterable, Sized
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar, cast

import sqlalchemy
from sqlalchemy.orm import Session, object_session

from cachedecor.backends import PartialResult, ValueRefused, is_lease
from cachedecor.codec import BadEntry, UnencodableValue
from cachedecor.errors import UsageError
from cachedecor.keys import Space
from cachedecor.rows import EntryMismatch, OtherClass
from cachedecor.stats import log_failure
from cachedecor.tracking import may_fill, reads_old_snapshot, session_tracker
from cachedecor.tracking.scope import note_session

if TYPE_CHECKING:
    from cachedecor.read import Resolved

T = TypeVar("T")

__all__ = [
    "HIT",
    "Call",
    "Delete",
    "Fill",
    "FillMany",
    "Load",
    "Lookup",
    "LookupMany",
    "Peek",
    "Release",
    "Request",
    "Sleep",
    "Steps",
    "check_result",
    "decode",
    "read_many",
    "read_one",
    "refresh_one",
]


class Lookup(NamedTuple):
    """Look ``key`` up, taking its fill lease (for ``lease_ttl`` seconds) if it is absent.

    Answer: ``(entry or None, lease or None)``."""

    key: str
    lease_ttl: int


class LookupMany(NamedTuple):
    """:class:`Lookup` for many keys. Answer: ``{key: (entry, lease)}`` (may raise
    :class:`~cachedecor.backends.PartialResult`)."""

    keys: list[str]
    lease_ttl: int


class Peek(NamedTuple):
    """Read ``key`` without taking a lease. Answer: the stored bytes or ``None``."""

    key: str


class Fill(NamedTuple):
    """Store ``entry`` under ``key`` if ``lease`` still holds. Answer: stored or not."""

    key: str
    entry: bytes
    lease: object
    ttl: int | None


class FillMany(NamedTuple):
    """:class:`Fill` for many ``(key, entry, lease)``. Answer: ``{key: True, False or
    exception}``."""

    entries: list[tuple[str, bytes, object]]
    ttl: int | None


class Release(NamedTuple):
    """Give up the fill lease of ``key``."""

    key: str
    lease: object


class Delete(NamedTuple):
    """Delete ``keys``."""

    keys: list[str]


class Sleep(NamedTuple):
    """Wait ``seconds`` for another reader's fill of ``key``; a driver that knows the
    fill is under way in its own process may wait for it instead, up to ``longest``
    (the lease's lifetime), and be woken when it is done."""

    seconds: float
    key: str
    longest: float


class Call(NamedTuple):
    """Call the wrapped function. Answer: what it returns."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class Load(NamedTuple):
    """Load the unloaded column attributes ``names`` of ``instance`` (a joined
    subclass's columns that the base query did not fetch) before the row is stored."""

    instance: object
    names: list[str]


#: What a read asks its driver for. (NamedTuples: measured on CPython 3.11, building
#: one costs 0.20 us against 0.47 for a frozen slotted dataclass, and a dispatch on
#: ``type(request) is ...`` 0.07-0.08 us against 0.14-0.15 for ``match``.)
Request = Lookup | LookupMany | Peek | Fill | FillMany | Release | Delete | Sleep | Call | Load

#: A read: yields requests, is resumed with their answers, returns ``T``.
Steps = Generator[Request, Any, T]

#: a call's (key, primary key, identity token, space)
Target = tuple[str, Any, Any, "Space | None"]

_SKIP: Final = object()
#: what decode found: a row to return, a sibling class's row, an entry to delete, an
#: entry to leave (it could not be attached to the session)
HIT: Final = object()
_OTHER: Final = object()
_DROP: Final = object()
_KEEP: Final = object()

#: read_many modes: a call through the cache, a refresh, a call without the cache
CACHED = 0
REFRESH = 1
UNCACHED = 2


# -- one key ---------------------------------------------------------------------------


def read_one(
    fn: Any,
    r: Resolved,
    session: Session | None,
    target: Target,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    first: tuple[bytes | None, object] | BaseException,
    status: object = None,
    since: int | None = None,
) -> Steps[Any]:
    """A call through the cache, from the answer to its first lookup on.

    The driver makes the first lookup itself, and decodes an entry it finds with
    :func:`decode`, so that a hit, which needs nothing else, costs no generator:
    ``first`` is that lookup's answer (or the exception it raised) and ``status``
    what :func:`decode` said of its entry (``None``: no entry). ``since`` is the near
    cache's eviction sequence when the read started (``None``: no near cache).
    """
    key, pk, token, space = target
    counters = r.counters
    lease_ttl = r.settings.lease_timeout
    try:
        if isinstance(first, BaseException):
            raise first
        data, lease = first
        if data is not None:
            if status is None:
                status, value = decode(fn, r, key, data, session, token, since)
                if status is HIT:
                    counters.hits += 1
                    return value
            if status is _DROP:
                yield from _drop(r, key)
                data, lease = yield Lookup(key, lease_ttl)  # leased by this reader, or filled
    except Exception as exc:
        counters.errors += 1
        log_failure(r.name, "get", exc)
        return (yield from _call(fn, session, args, kwargs))
    counters.misses += 1
    if status is _OTHER or status is _KEEP:  # a sibling class's row, or one not attachable
        return (yield from _call(fn, session, args, kwargs))
    if data is not None:
        status, value = decode(fn, r, key, data, session, token, since)
        if status is HIT:
            return value
        if status is _DROP:
            yield from _drop(r, key)
        return (yield from _call(fn, session, args, kwargs))
    if lease is None:
        found, value = yield from _wait_for_fill(fn, r, key, session, token, since)
        if found:
            return value
        return (yield from _call(fn, session, args, kwargs))
    counters.lease_wins += 1
    return (yield from _call_and_fill(fn, r, key, lease, session, pk, token, space, args, kwargs, since))


def refresh_one(
    fn: Any,
    r: Resolved,
    session: Session | None,
    target: Target,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Steps[Any]:
    """Call the function and refill the entry under a fresh lease, whatever it held."""
    key, pk, token, space = target
    since = None
    near = r.near
    if near is not None:
        near.evict((key,))
        since = near.mark()
    r.counters.misses += 1
    try:
        yield Delete([key])
        _, lease = yield Lookup(key, r.settings.lease_timeout)
    except Exception as exc:
        r.counters.errors += 1
        log_failure(r.name, "refresh", exc)
        return (yield from _call(fn, session, args, kwargs))
    if lease is None:  # filled or being filled by a reader that started after the delete
        return (yield from _call(fn, session, args, kwargs))
    r.counters.lease_wins += 1
    return (yield from _call_and_fill(fn, r, key, lease, session, pk, token, space, args, kwargs, since))


def _call_and_fill(
    fn: Any,
    r: Resolved,
    key: str,
    lease: object,
    session: Session | None,
    pk: object,
    token: object,
    space: Space | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    since: int | None = None,
) -> Steps[Any]:
    """Call the function holding the fill lease of ``key``, and fill it with the result
    (and the near cache, with ``since``, when the fill was stored)."""
    unfillable = session is not None and _unfillable(fn, session, r, pk, token)
    started = time.time()
    try:
        result = yield Call(args, kwargs)
        check_result(fn, result, session)
    except BaseException:
        yield from _release(r, key, lease)
        raise
    if unfillable:
        yield from _release(r, key, lease)
        return result
    yield from _load(fn, result)
    payload = _payload(fn, r, key, result, token, space)
    if payload is _SKIP:
        yield from _release(r, key, lease)
    else:
        entry = yield from _entry(r, key, lease, payload, started)
        if entry is not None:
            try:
                outcome: object = yield Fill(key, entry, lease, r.ttl)
            except Exception as exc:
                outcome = exc
            yield from _filled(r, key, lease, outcome)
            if outcome is True and since is not None:
                keep_near(fn, r, key, entry, token, since)
    return result


def check_result(fn: Any, result: object, session: Session | None) -> None:
    """Raise :class:`UsageError` unless ``result`` is ``None`` or a row of ``fn``'s model;
    warn (once per function) when the row belongs to another session than ``session``,
    the one hits are attached to.

    A reader that returns another model would be served as the declared one by the
    next hit (whatever another reader stored under that key): hits and misses would
    return different classes. It is a mistake in the program, said at the first call.
    A row of a session the decorator does not know (a global session it was not told
    of) means hits come back detached, or attached elsewhere, while misses did not.
    """
    if result is None:
        return
    if not isinstance(result, fn.model):
        raise UsageError(
            f"{fn._name} is decorated with @cached_by_pk({fn.model.__name__}) but returned "
            f"{type(result).__module__}.{type(result).__qualname__}: it must return "
            f"{fn.model.__name__} rows (or None); nothing was cached"
        )
    if fn.session_warned:
        return
    owner = object_session(result)
    if owner is not None and owner is not session:
        fn.warn_session(owner, session)


def _call(fn: Any, session: Session | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Steps[Any]:
    """Call the function (without filling) and check what it returned."""
    result = yield Call(args, kwargs)
    check_result(fn, result, session)
    return result


def _unfillable(fn: Any, session: Session, r: Resolved, pk: object, token: object) -> bool:
    """Whether what this session reads for ``pk`` must not become the shared entry.

    The session held the row before the call (its copy may predate a committed
    write), its transaction reads an older snapshot, or it has written (the row may
    be its own uncommitted change).
    """
    return _in_identity_map(fn, session, r, pk, token) or not may_fill(session) or reads_old_snapshot(session)


def _in_identity_map(fn: Any, session: Session, r: Resolved, pk: object, token: object) -> bool:
    try:
        ident = (fn._plan.identity_class, r.maker.normalize(pk), token)
        return session.identity_map.get(ident) is not None
    except Exception:
        return True


def decode(
    fn: Any,
    r: Resolved,
    key: str,
    data: bytes,
    session: Session | None,
    token: object,
    since: int | None = None,
) -> tuple[Any, Any]:
    """``(HIT, instance or None)`` for a usable entry; ``(_OTHER, None)`` for an entry of
    a class outside the model; ``(_DROP, None)`` for one to delete: unusable (counted
    and logged), or written before the region's invalidation (``region.invalidate()``).
    No I/O: the caller deletes (:func:`_drop`). With ``since`` (the near cache's
    eviction sequence when the lookup started), a usable entry is also kept in the
    region's near cache."""
    try:
        payload, written_at = r.codec.decode_timed(key, data)
        row = fn._plan.prepare(payload, key, token, written_at)
    except Exception as exc:
        return _refused(r, key, exc), None
    if since is not None:
        row.share()  # before the first instance: it gets copies of the row's documents
    # written before region.invalidate()? then build (the same steps as near_hit's, in
    # line in both: these are the two hottest paths there are)
    invalidator = r.region.region_invalidator
    written_at = row.written_at
    try:
        if invalidator.is_invalidated(written_at):
            return _DROP, None
        value = fn._plan.instantiate(row, session, token)
    except OtherClass:
        return _OTHER, None
    except Exception as exc:
        return _refused(r, key, exc), None
    if since is not None:
        near = r.near
        assert near is not None  # since is None without a near cache
        near.put(key, row, since)
    return HIT, value


def _refused(r: Resolved, key: str, exc: Exception) -> Any:
    """Count and log why an entry was not used: ``_DROP`` (delete it) for an entry that
    is wrong, ``_KEEP`` for a failure of ours (the entry may be fine)."""
    counters = r.counters
    if isinstance(exc, EntryMismatch):
        counters.mismatches += 1
        # another deployed version's entry is routine during a rolling deploy
        level = logging.INFO if exc.other_mapping else logging.WARNING
        log_failure(r.name, "verifying an entry", f"{key}: {exc}", level)
    elif isinstance(exc, BadEntry):
        counters.bad_entries += 1
        log_failure(r.name, "decoding an entry", f"{key}: {exc}")
    else:
        counters.errors += 1
        log_failure(r.name, "attaching a cached row", exc)
        return _KEEP
    return _DROP


def keep_near(fn: Any, r: Resolved, key: str, data: bytes, token: object, since: int) -> None:
    """Keep an entry this process has just stored in the region's near cache."""
    try:
        payload, written_at = r.codec.decode_timed(key, data)
        row = fn._plan.prepare(payload, key, token, written_at)
    except Exception as exc:  # our own entry: only a bug of ours gets here
        r.counters.errors += 1
        log_failure(r.name, "keeping a filled entry near", exc)
        return
    near = r.near
    assert near is not None  # since is None without a near cache
    near.put(key, row.share(), since)


#: :func:`near_hit`'s "not served from the near cache"
NEAR_MISS: Final = object()


def near_hit(fn: Any, r: Resolved, key: str, session: Session | None, token: object) -> Any:
    """The near cache's answer for ``key`` (an instance, or ``None`` for a cached absent
    row), or :data:`NEAR_MISS` (not there, or not usable: then it is evicted and the
    read goes on to the remote cache)."""
    near = r.near
    assert near is not None  # called only for a region with a near cache
    row = near.get(key)
    if row is None:
        return NEAR_MISS
    # the same steps as decode()'s, with the near cache's outcome
    invalidator = r.region.region_invalidator
    written_at = row.written_at
    try:
        if not invalidator.is_invalidated(written_at):
            value = fn._plan.instantiate(row, session, token)
            counters = r.counters
            counters.hits += 1
            counters.local_hits += 1
            return value
    except OtherClass:
        pass
    except Exception as exc:
        _refused(r, key, exc)
    near.evict((key,))
    return NEAR_MISS


def near_many(
    fn: Any, r: Resolved, keys: list[str], session: Session | None, token: object
) -> dict[str, Any]:
    """:func:`near_hit` for many keys: the instances (or ``None``) of those the near cache
    holds, by key, in the order of ``keys``. Unusable rows are evicted (their keys go
    on to the remote cache)."""
    near = r.near
    assert near is not None  # called only for a region with a near cache
    rows = near.get_many(keys)
    if not rows:
        return {}
    invalidator = r.region.region_invalidator
    # dogpile's public checks: per row only once the region was ever invalidated
    # (``region.invalidate()``); the two calls per batch save 1-2% of a batch's
    # time, which is mostly building instances
    if invalidator.was_hard_invalidated() or invalidator.was_soft_invalidated():
        stale = [k for k, row in rows.items() if invalidator.is_invalidated(row.written_at)]
        if stale:
            for key in stale:
                del rows[key]
            near.evict(stale)
    built: dict[str, Any]
    failed: dict[str, Exception]
    built, failed = fn._plan.instantiate_many(rows, session, token)
    if failed:
        for key, exc in failed.items():
            if not isinstance(exc, OtherClass):
                _refused(r, key, exc)
        near.evict(failed)
    counters = r.counters
    counters.hits += len(built)
    counters.local_hits += len(built)
    return built


def _drop(r: Resolved, key: str) -> Steps[Any]:
    """Delete an entry :func:`decode` refused."""
    try:
        yield Delete([key])
    except Exception:
        r.counters.errors += 1


def _load(fn: Any, result: object) -> Steps[Any]:
    """Load the stored columns ``result`` has not loaded yet (inside the lease), so that
    hits carry the whole row; what cannot be loaded leaves it uncached."""
    if result is None or not isinstance(result, fn.model):
        return
    names = fn._plan.unloaded(result)
    if names:
        try:
            yield Load(result, names)
        except Exception:
            pass  # the snapshot finds them unloaded and does not cache the row


def _payload(fn: Any, r: Resolved, key: str, result: object, token: object, space: Space | None) -> Any:
    """The payload to cache for ``result`` under ``key``, or ``_SKIP``.

    A result that is not a row of the model, or whose primary key or identity token
    is not the one asked for (``25.0`` for row ``25``, say), is returned to the
    caller as it is and not cached: counted as ``uncacheable`` and logged.
    """
    model = fn.model
    if result is None:
        # a subclass reader's None says "no such subclass row", not "no such row":
        # it must not answer the hierarchy's other readers, which share the key
        return [key, None, 0, None] if fn.cache_none and model is r.base else _SKIP
    plan = fn._plan
    state = sqlalchemy.inspect(result)
    row_token = state.key[2] if state.key is not None else None
    if row_token != token:
        fn._uncacheable(
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
        fn._uncacheable(r, f"asked for the row with key {key!r}, it returned {result!r} (key {row_key!r})")
        return _SKIP
    payload = plan.snapshot(result, key)
    return _SKIP if payload is None else payload


def _entry(r: Resolved, key: str, lease: object, payload: object, started: float) -> Steps[Any]:
    """The stored form of ``payload`` (read from the database from ``started`` on),
    or ``None`` (lease released) if it cannot be cached."""
    try:
        entry = r.codec.encode(key, payload, started)
    except UnencodableValue as exc:
        r.counters.errors += 1
        log_failure(r.name, "encoding a row", exc)
        yield from _release(r, key, lease)
        return None
    if len(entry) > r.settings.max_entry_size:
        r.counters.oversized += 1
        log_failure(r.name, "caching an entry", f"{key} is {len(entry)} bytes, over max_entry_size")
        yield from _release(r, key, lease)
        return None
    return entry


def _filled(r: Resolved, key: str, lease: object, outcome: object) -> Steps[Any]:
    """Count the outcome of a fill: stored, refused by the lease, or failed."""
    if outcome is True:
        r.counters.fills += 1
    elif outcome is False:
        r.counters.lease_losses += 1
    elif isinstance(outcome, ValueRefused):
        r.counters.oversized += 1
        log_failure(r.name, "caching an entry", f"{key} refused by the server: {outcome}")
        yield from _release(r, key, lease)
    else:
        r.counters.errors += 1
        log_failure(r.name, "fill", cast("BaseException", outcome))


def _release(r: Resolved, key: str, lease: object) -> Steps[Any]:
    try:
        yield Release(key, lease)
    except Exception as exc:
        r.counters.errors += 1
        log_failure(r.name, "lease release", exc)


def _wait_for_fill(
    fn: Any, r: Resolved, key: str, session: Session | None, token: object, since: int | None = None
) -> Steps[Any]:
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
        yield Sleep(min(delay, remaining), key, r.settings.lease_timeout)
        delay = min(delay * 2, 0.02)
        try:
            data = yield Peek(key)
        except Exception as exc:
            r.counters.errors += 1
            log_failure(r.name, "get", exc)
            return False, None
        if data is None:
            return False, None  # the lease was released or invalidated
        if not is_lease(data):
            # counted as the miss it was (and in lease_waits), not as a hit
            status, value = decode(fn, r, key, data, session, token, since)
            if status is _DROP:
                yield from _drop(r, key)
            return status is HIT, value


# -- many keys -------------------------------------------------------------------------


def read_many(
    fn: Any, r: Resolved, args: tuple[Any, ...], kwargs: dict[str, Any], mode: int = CACHED
) -> Steps[Any]:
    """``many=True``: one multi-get, the function called once with the missing keys."""
    binding = fn.binding
    session = binding.session(args, kwargs)
    note_session(session)  # an @invalidates function running may change what this returns
    requested = binding.pk(args, kwargs)
    if isinstance(requested, (str, bytes)) or not isinstance(requested, Iterable):
        raise UsageError(f"{fn._name} uses many=True: pass an iterable of primary keys, not {requested!r}")
    maker = r.maker
    counters = r.counters
    wanted: dict[str, Any] = {}
    blocked: set[str] = set()
    results: dict[str, Any] = {}
    replies: dict[str, tuple[bytes | None, Any]] = {}
    near = r.near
    since = None
    lookup: list[str] = []
    unkeyed = None
    # no I/O from here to the lookup: making many keys and instances, with no
    # collection pass per few hundred objects
    with _GcPaused(len(requested) if isinstance(requested, Sized) else 100):
        try:
            token, space = fn._space(session, args, kwargs)
            tracker = session_tracker(session) if session is not None else None
            if tracker is not None and tracker.dirty:
                for pk in requested:
                    key = maker(pk, space)
                    wanted.setdefault(key, pk)
                    if tracker.blocks(r.base, maker.encode_pk(pk), space):
                        blocked.add(key)
            else:
                wanted = maker.keys_for(requested, space)
        except (UsageError, ValueError, TypeError) as exc:
            unkeyed = exc
        if unkeyed is None and mode != UNCACHED:
            counters.bypasses += len(blocked)
            lookup = [k for k in wanted if k not in blocked] if blocked else list(wanted)
            if near is not None:
                if mode == REFRESH:
                    near.evict(lookup)
                else:
                    results = near_many(fn, r, lookup, session, token)
                    lookup = [k for k in lookup if k not in results] if results else lookup
                since = near.mark()
    if unkeyed is not None:
        fn._uncacheable(r, f"no cache key for this call: {unkeyed}")
        return (yield Call(args, kwargs))
    if len(results) == len(wanted):  # nothing asked for, or all near (in the order wanted)
        return [v for v in results.values() if v is not None]
    if lookup and mode == REFRESH:
        try:
            yield Delete(lookup)
        except Exception as exc:
            counters.errors += 1
            log_failure(r.name, "refresh", exc)
            lookup = []
    if lookup:
        replies = yield from _lookup_many(r, lookup)
    missing: list[str] = []
    leases: dict[str, Any] = {}
    dropped: list[str] = []
    with _GcPaused(len(wanted)):  # building many instances: no collection pass per few hundred
        for key in wanted:
            if key in results:
                continue  # a near-cache hit
            data, lease = replies.get(key, (None, None))
            if data is not None and mode != REFRESH:
                status, value = decode(fn, r, key, data, session, token, since)
                if status is HIT:
                    counters.hits += 1
                    results[key] = value
                    continue
                if status is _DROP:
                    dropped.append(key)
            elif lease is not None:
                leases[key] = lease
            missing.append(key)
    for key in dropped:
        yield from _drop(r, key)  # deleted: it may be leased now
    if dropped:
        relooked = yield from _lookup_many(r, dropped)
        for key, (data, lease) in relooked.items():
            if data is None and lease is not None:
                leases[key] = lease
    if not missing:
        return [results[k] for k in wanted if results.get(k) is not None]
    if mode != UNCACHED:
        counters.misses += len(missing)
        counters.lease_wins += len(leases)
    if session is not None and leases:
        unfillable = not may_fill(session) or reads_old_snapshot(session)
        for key in [k for k in leases if unfillable or _in_identity_map(fn, session, r, wanted[k], token)]:
            yield from _release(r, key, leases.pop(key))
    call_args, call_kwargs = binding.replace_pk(args, kwargs, [wanted[k] for k in missing])
    started = time.time()
    try:
        rows = yield Call(call_args, call_kwargs)
    except BaseException:
        for key, lease in leases.items():
            yield from _release(r, key, lease)
        raise
    plan = fn._plan
    for row in cast("Iterable[Any]", rows or ()):
        if not isinstance(row, fn.model):
            for key, lease in leases.items():
                yield from _release(r, key, lease)
            raise UsageError(
                f"{fn._name} (many=True) returned a {type(row).__name__}; "
                f"it must return {fn.model.__name__} instances"
            )
        try:
            key = maker(plan.pk_of(row), space)
        except Exception:
            continue
        if key in wanted and key not in results:
            results[key] = row
    entries: list[tuple[str, bytes, Any]] = []
    for key, lease in leases.items():
        yield from _load(fn, results.get(key))
        payload = _payload(fn, r, key, results.get(key), token, space)
        entry = None if payload is _SKIP else (yield from _entry(r, key, lease, payload, started))
        if entry is not None:
            entries.append((key, entry, lease))
        elif payload is _SKIP:
            yield from _release(r, key, lease)
    if entries:
        try:
            outcomes = yield FillMany(entries, r.ttl)
        except Exception as exc:
            outcomes = {key: exc for key, _, _ in entries}
        for key, entry, lease in entries:
            outcome = outcomes.get(key, False)
            yield from _filled(r, key, lease, outcome)
            if outcome is True and since is not None:
                keep_near(fn, r, key, entry, token, since)
    return [results[k] for k in wanted if results.get(k) is not None]


class _GcPaused:
    """Pause the cyclic garbage collector while ``n`` (100 or more) instances are built.

    Building many objects triggers collection passes whose cost grows with the
    number of live objects, which made the cost per row grow with the batch; the
    pause covers only a loop that does no I/O (nothing else runs meanwhile, not even
    another task of an event loop), and the collector runs afterwards as usual.

    Measured (``many=True`` hits from the memory backend, the two ways alternated in
    one run, 6 rounds each): with 2,000 rows and 300,000 other live objects it saves
    nothing (6.56 against 6.61 us a row, medians); with 10,000 rows and a million
    live objects a full collection falls inside the batch in most rounds, and the
    pause keeps the median at 7.26 us a row against 11.34 (both 7.1 at best). It
    stays for large batches in large processes (docs/performance.rst).
    """

    __slots__ = ("paused",)

    def __init__(self, n: int) -> None:
        self.paused = n >= 100 and gc.isenabled()

    def __enter__(self) -> None:
        if self.paused:
            gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.paused:
            gc.enable()


def _lookup_many(r: Resolved, keys: list[str]) -> Steps[Any]:
    try:
        return (yield LookupMany(keys, r.settings.lease_timeout))
    except PartialResult as exc:
        r.counters.errors += 1
        log_failure(r.name, "get_many", exc.error)
        return exc.found
    except Exception as exc:
        r.counters.errors += 1
        log_failure(r.name, "get_many", exc)
        return {}
