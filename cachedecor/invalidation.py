"""From rows to deleted keys, in every region that may hold them.

A process cannot know which regions other processes read a model from: a worker
that only writes, a migration script or the ``cachedecor`` command never import
the readers. So invalidation reaches **every configured region**, unless a region
names the tables it caches with its ``tables`` option; then only rows of those
tables are invalidated there (and ``@cached_by_pk`` refuses to cache other tables
in it, so the narrowing can never hide a stale row).

One generator, :func:`deliveries`, makes every decision of a delivery (which keys in
which region, counting, logging, what a failure means, the near caches evicted before
and after, the broadcast after) as typed requests, and does no I/O. Three thin callers
carry them out: :func:`deliver` (blocking stores, after a commit and for direct
invalidation), :func:`adeliver` (asyncio stores) and :func:`deliver_now` (the outbox's
deliverer: the same generator in its ``now`` mode). Queueing deletes until a session
commits is :mod:`cachedecor.tracking`'s job, and the public functions are in
:mod:`cachedecor.write`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from cachedecor import broadcast, near
from cachedecor._runtime import configured_regions
from cachedecor._sa import await_only, in_async_greenlet
from cachedecor.backends import UndeliveredInvalidation
from cachedecor.keys import KeyPattern, Plan, key_maker
from cachedecor.stats import counters as region_counters
from cachedecor.stats import log_failure

if TYPE_CHECKING:
    from cachedecor.config.regions import RegionSettings

__all__ = [
    "EVERY_SPACE",
    "Delete",
    "DeleteMatching",
    "Deliveries",
    "Evict",
    "Group",
    "HandOver",
    "Plan",
    "Publish",
    "Request",
    "adeliver",
    "deliver",
    "deliver_now",
    "deliveries",
    "plan",
    "regions_for",
]

#: Rows of one hierarchy in one place: (hierarchy root class, space or ``None``).
Group = tuple[type, Any]

#: The space of a model-wide invalidation that covers every schema and every shard.
EVERY_SPACE: Any = ("*", "*")

log = logging.getLogger("cachedecor")


def regions_for(model: Any, regions: dict[str, RegionSettings] | None = None) -> list[RegionSettings]:
    """The configured regions in which any process may cache rows of ``model``."""
    table = key_maker(model).table_name
    regions = configured_regions() if regions is None else regions
    return [s for s in regions.values() if s.tables is None or table in s.tables]


class Evict(NamedTuple):
    """Evict ``keys`` from this process's near caches (memory only: before the deletes, so
    that a commit returns with its own near entries gone, and again after them)."""

    keys: Plan


class Delete(NamedTuple):
    """Delete ``keys`` in the region of ``settings``; answered with ``None``.

    ``now``: on every node, whatever the circuit breakers say, and nothing queued (the
    outbox keeps the keys: :meth:`~cachedecor.backends.Store.delete_now`); otherwise a
    node that is down gets them queued as owed (:class:`UndeliveredInvalidation`)."""

    settings: RegionSettings
    keys: list[str]
    now: bool


class DeleteMatching(NamedTuple):
    """Delete every key of the region of ``settings`` that one of ``patterns`` matches;
    answered with how many were deleted."""

    settings: RegionSettings
    patterns: list[KeyPattern]


class Publish(NamedTuple):
    """Send ``keys`` to every process's near caches (after the deletes)."""

    keys: Plan


class HandOver(NamedTuple):
    """The driver was interrupted (cancelled) after the transaction committed: deliver
    ``rest`` from a thread of its own, with the sync stores (counted and logged already)."""

    rest: Plan
    durable: bool


#: What a delivery asks its driver to do (:func:`deliveries`); only the deletes wait on a server.
Request = Evict | Delete | DeleteMatching | Publish | HandOver

#: A delivery: yields :data:`Request`\ s, is sent the answer of each (the count of a
#: :class:`DeleteMatching`, else ``None``) or has the store's exception thrown in;
#: counts and logs itself; returns whether every delete was delivered.
Deliveries = Generator[Request, int | None, bool]

#: A step of a delivery: (region, model-wide).
_Step = tuple[str, bool]


def plan(rows: dict[Group, list[Any]], wide: Iterable[Group] = ()) -> Plan:
    """The keys (and key patterns) that invalidate ``rows`` (and every row of the
    ``wide`` groups) in every region that may hold them."""
    regions = configured_regions()
    out: Plan = {}
    for (base, space), pks in rows.items():
        for settings in regions_for(base, regions):
            maker = key_maker(base, settings.namespace)
            keys = out.setdefault(settings.name, ([], []))[0]
            for pk in pks:
                try:
                    keys.append(maker(pk, space))
                except Exception:  # no key: such a row is never cached
                    continue
    for base, space in wide:
        for settings in regions_for(base, regions):
            maker = key_maker(base, settings.namespace)
            pattern = maker.every_space() if space is EVERY_SPACE else maker.pattern(space)
            out.setdefault(settings.name, ([], []))[1].append(pattern)
    return {name: (list(dict.fromkeys(keys)), patterns) for name, (keys, patterns) in out.items()}


def deliveries(
    rows: dict[Group, list[Any]],
    wide: Iterable[Group] = (),
    keys: Plan | None = None,
    durable: bool = False,
    *,
    now: bool = False,
) -> Deliveries:
    """Every decision of a delivery, as requests, with no I/O: the deletes that invalidate
    ``rows`` (and every key of the ``wide`` groups) in every region, or of the :data:`Plan`
    ``keys``, between the near-cache evictions and before the broadcast.

    ``durable``: the keys are in the outbox, so a failed delete is not lost. ``now``: the
    outbox's deliverer (:func:`deliver_now`): deletes whatever the circuit breakers say,
    queue nothing, and the result says whether its row may be removed (a region not
    configured here fails it). Returns whether every delete was delivered.
    A driver interrupted by a cancellation throws it in: the steps not done are handed
    over (:class:`HandOver`), then it is re-raised.
    """
    regions = configured_regions()
    todo = plan(rows, wide) if keys is None else keys
    yield Evict(todo)
    ok = True
    if now:
        for name in todo:
            if name not in regions:
                log_failure(
                    "outbox", "delivering to an unknown region", f"region {name!r} is not configured here"
                )
                ok = False
    steps = [(name, True) for name, (_, patterns) in todo.items() if patterns and name in regions]
    steps += [(name, False) for name, (names, _) in todo.items() if names and name in regions]
    done: set[_Step] = set()
    failed: set[str] = set()  # regions whose model-wide delete failed
    for name, model_wide in steps:
        settings = regions[name]
        names, patterns = todo[name]
        try:
            if model_wide:
                landed = yield from _delete_matching(settings, patterns, durable, now)
            elif now and name in failed:
                landed = False  # the outbox retries the region whole: its keys wait for that
            else:
                landed = yield from _delete_keys(settings, names, durable, now)
        except GeneratorExit:
            raise
        except BaseException as exc:  # the driver was cancelled mid-delete, after the commit
            rest = _rest(todo, done)
            if rest:
                _handed_over(rest, exc)
                yield HandOver(rest, durable)
            raise
        done.add((name, model_wide))
        if not landed:
            ok = False
            failed.add(name)
    yield Evict(todo)  # again: another thread may have refilled it from the old entry
    yield Publish(todo)
    return ok


def deliver(
    rows: dict[Group, list[Any]], wide: Iterable[Group] = (), keys: Plan | None = None, durable: bool = False
) -> bool:
    """Delete now the keys of ``rows`` (and every key of the ``wide`` groups) in every region.

    Called inside SQLAlchemy's greenlet (an ``AsyncSession``'s commit, or any sync
    code an ``AsyncSession`` runs), the deletes go through the asyncio stores and
    this returns when they are done: the event loop is never blocked on a socket.
    """
    if in_async_greenlet():
        return await_only(adeliver(rows, wide, keys, durable))
    return _drive(deliveries(rows, wide, keys, durable))


def deliver_now(keys: Plan) -> bool:
    """Delete ``keys`` in every region this process configured, whatever the circuit
    breakers say; whether every delete was delivered (to regions it knows).

    The outbox's deliverer delivers its rows with it (wired by :mod:`cachedecor.config`):
    a row is removed only once this returns ``True``.
    """
    return _drive(deliveries({}, (), keys, now=True))


def _drive(steps: Deliveries) -> bool:
    """The sync driver: carry out the requests of ``steps`` with the blocking stores."""
    outcome: int | Exception | None = None
    while not isinstance(request := _resume(steps, outcome), _Finished):
        outcome = None
        try:
            if isinstance(request, Delete):
                store = request.settings.store
                (store.delete_now if request.now else store.delete_many)(request.keys)
            elif isinstance(request, DeleteMatching):
                outcome = request.settings.store.delete_matching(request.patterns)
            else:
                _here(request)
        except Exception as exc:
            outcome = exc
    return request.ok


async def adeliver(
    rows: dict[Group, list[Any]], wide: Iterable[Group] = (), keys: Plan | None = None, durable: bool = False
) -> bool:
    """:func:`deliver` for asyncio callers, its async driver: the same requests, the
    deletes awaited on the asyncio stores."""
    steps = deliveries(rows, wide, keys, durable)
    outcome: int | Exception | None = None
    while not isinstance(request := _resume(steps, outcome), _Finished):
        outcome = None
        try:
            if isinstance(request, Delete):
                if request.now:  # the outbox's mode (its deliverer is a thread): no asyncio twin
                    await asyncio.to_thread(request.settings.store.delete_now, request.keys)
                else:
                    await request.settings.astore.delete_many(request.keys)
            elif isinstance(request, DeleteMatching):
                outcome = await request.settings.astore.delete_matching(request.patterns)
            else:
                _here(request)
        except Exception as exc:
            outcome = exc
        except BaseException as exc:  # cancelled (asyncio.wait_for, a closing loop), mid-delivery
            handed = steps.throw(exc)  # the generator hands over the steps not done
            if isinstance(handed, HandOver):
                _here(handed)
            steps.close()
            raise
    return request.ok


class _Finished(NamedTuple):
    """The end of a delivery (what its generator returned)."""

    ok: bool


def _resume(steps: Deliveries, outcome: int | Exception | None) -> Request | _Finished:
    """The next request of ``steps``, given the outcome of the last: its answer, or the
    exception it raised (thrown in at its ``yield``); or the end of the delivery."""
    try:
        return steps.throw(outcome) if isinstance(outcome, Exception) else steps.send(outcome)
    except StopIteration as finished:
        return _Finished(bool(finished.value))


def _here(request: Evict | Publish | HandOver) -> None:
    """Carry out a request that waits on no cache server (both drivers)."""
    if isinstance(request, Evict):
        if near.active():
            near.evict_everywhere(request.keys)
    elif isinstance(request, Publish):
        sender = broadcast.current()
        if sender is not None:
            sender.publish(request.keys)
    else:
        threading.Thread(
            target=_deliver_rest,
            args=(request.rest, request.durable),
            name="cachedecor-handed-over",
            daemon=True,
        ).start()


def _rest(keys: Plan, done: set[_Step]) -> Plan:
    """The steps of ``keys`` not in ``done``."""
    rest: Plan = {}
    for name, (names, patterns) in keys.items():
        names = [] if (name, False) in done else names
        patterns = [] if (name, True) in done else patterns
        if names or patterns:
            rest[name] = (names, patterns)
    return rest


def _handed_over(rest: Plan, cause: BaseException) -> None:
    """An asyncio delivery interrupted after its transaction committed: count ``rest`` as
    queued and say so; the driver delivers it from a thread of its own (:class:`HandOver`).

    The driver re-raises ``cause`` (a cancellation is honoured at once); the deletes
    are not dropped with it. A memcached store has also queued the interrupted delete
    as owed to its node, so that no caller reads the node before it. What the thread
    cannot deliver is queued or logged as lost, with its count and bound, as any
    failed delete is (:func:`deliver`).
    """
    regions = configured_regions()
    count = sum(len(names) for names, _ in rest.values())
    wide = sum(len(patterns) for _, patterns in rest.values())
    for name, (names, patterns) in rest.items():
        if name in regions:
            region_counters(name).invalidations_queued += len(names) + len(patterns)
    why = "cancelled" if isinstance(cause, asyncio.CancelledError) else type(cause).__name__
    log.warning(
        "cache region(s) %s: invalidation %s after its transaction committed; %d key(s)%s "
        "handed to a background delivery (queued, retried)",
        ", ".join(map(repr, sorted(rest))),
        why,
        count,
        f" and {wide} model-wide invalidation(s)" if wide else "",
    )


def _deliver_rest(rest: Plan, durable: bool) -> None:
    try:
        deliver({}, (), rest, durable)
    except Exception as exc:  # deliver logs what it could not delete; anything else is logged here
        log_failure(", ".join(sorted(rest)), "handed-over invalidation", exc)


def _delete_keys(settings: RegionSettings, keys: list[str], durable: bool, now: bool) -> Deliveries:
    counters = region_counters(settings.name)
    try:
        yield Delete(settings, keys, now)
    except Exception as exc:
        if isinstance(exc, UndeliveredInvalidation) and not now:  # the store queued them as owed
            counters.errors += 1
            counters.invalidations_queued += len(exc.keys)
            counters.invalidations += len(keys) - len(exc.keys)
            log_failure(settings.name, "invalidation", f"{exc}; retrying in the background")
        elif _failed(settings, "invalidation", exc, durable, now):
            _log_lost(
                settings, f"{len(keys)} key(s)", ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
            )
        return False
    counters.invalidations += len(keys)
    return True


def _delete_matching(
    settings: RegionSettings, patterns: list[KeyPattern], durable: bool, now: bool
) -> Deliveries:
    counters = region_counters(settings.name)
    try:
        deleted = yield DeleteMatching(settings, patterns)
    except Exception as exc:
        if _failed(settings, "model-wide invalidation", exc, durable, now):
            _log_lost(settings, "every key of " + ", ".join(map(repr, patterns)), "")
        return False
    counters.invalidations += deleted or 0
    counters.model_invalidations += len(patterns)
    return True


def _failed(settings: RegionSettings, step: str, exc: Exception, durable: bool, now: bool) -> bool:
    """Count and log a delete that failed; whether its keys are lost (no outbox keeps them)."""
    region_counters(settings.name).errors += 1
    if now:
        log_failure(settings.name, "outbox delivery (kept in the outbox, retried)", exc)
        return False
    log_failure(settings.name, step, exc)
    return not durable


def _log_lost(settings: RegionSettings, what: str, detail: str) -> None:
    bound = f"{settings.expiration_time}s" if settings.expiration_time else "ever (no expiration_time)"
    log.error(
        "cache region %r: could not invalidate %s; they may be stale for up to %s%s",
        settings.name,
        what,
        bound,
        f": {detail}" if detail else "",
    )
