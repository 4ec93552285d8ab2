"""From rows to deleted keys, in every region that may hold them.

A process cannot know which regions other processes read a model from: a worker
that only writes, a migration script or the ``cachedecor`` command never import
the readers. So invalidation reaches **every configured region**, unless a region
names the tables it caches with its ``tables`` option; then only rows of those
tables are invalidated there (and ``@cached_by_pk`` refuses to cache other tables
in it, so the narrowing can never hide a stale row).

Deletes are sent now (:func:`deliver`, or :func:`adeliver` for asyncio callers;
both run the same steps, :func:`deliveries`); queueing them until a session commits is
:mod:`cachedecor.tracking`'s job, and the public functions are in
:mod:`cachedecor.write`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING, Any

from cachedecor import broadcast, near
from cachedecor._runtime import configured_regions
from cachedecor.backends import UndeliveredInvalidation
from cachedecor.keys import KeyPattern, Plan, key_maker
from cachedecor.stats import counters as region_counters
from cachedecor.stats import log_failure

if TYPE_CHECKING:
    from cachedecor.config.regions import RegionSettings

__all__ = [
    "EVERY_SPACE",
    "Deliveries",
    "Group",
    "Plan",
    "adeliver",
    "deliver",
    "deliver_now",
    "deliveries",
    "hand_over",
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


#: A delivery: yields ``(settings, keys)`` (delete these keys) or ``(settings,
#: patterns)`` (delete every key matching these :class:`KeyPattern`), receives the
#: number deleted or has the store's exception thrown in; counts and logs itself.
Deliveries = Generator[tuple["RegionSettings", list[Any]], Any, bool]


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
    rows: dict[Group, list[Any]], wide: Iterable[Group] = (), keys: Plan | None = None, durable: bool = False
) -> Deliveries:
    """The deletes that invalidate ``rows`` (and every key of the ``wide`` groups) in every
    region, or of the :data:`Plan` ``keys``, as steps: :func:`deliver` runs them with the
    sync stores, :func:`adeliver` with the asyncio ones. Returns whether every delete
    was delivered."""
    regions = configured_regions()
    todo = plan(rows, wide) if keys is None else keys
    ok = True
    for name, (_, patterns) in todo.items():
        if patterns and name in regions:
            ok = (yield from _delete_matching(regions[name], patterns, durable)) and ok
    for name, (names, _) in todo.items():
        if names and name in regions:
            ok = (yield from _delete_keys(regions[name], names, durable)) and ok
    return ok


def deliver(
    rows: dict[Group, list[Any]], wide: Iterable[Group] = (), keys: Plan | None = None, durable: bool = False
) -> bool:
    """Delete now the keys of ``rows`` (and every key of the ``wide`` groups) in every region.

    Called inside SQLAlchemy's greenlet (an ``AsyncSession``'s commit, or any sync
    code an ``AsyncSession`` runs), the deletes go through the asyncio stores and
    this returns when they are done: the event loop is never blocked on a socket.
    """
    if _in_async_greenlet():
        from sqlalchemy.util import await_only

        return await_only(adeliver(rows, wide, keys, durable))
    keys = plan(rows, wide) if keys is None else keys
    evict_here(keys)
    steps = deliveries(rows, wide, keys, durable)
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            settings, items = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            evict_here(keys)  # again: another thread may have refilled it from the old entry
            broadcast_after(keys)
            return bool(done.value)
        answer = error = None
        try:
            if isinstance(items[0], KeyPattern):
                answer = settings.store.delete_matching(items)
            else:
                settings.store.delete_many(items)
        except Exception as exc:
            error = exc


async def adeliver(
    rows: dict[Group, list[Any]], wide: Iterable[Group] = (), keys: Plan | None = None, durable: bool = False
) -> bool:
    """:func:`deliver` for asyncio callers: the same deletes, through the asyncio stores."""
    keys = plan(rows, wide) if keys is None else keys
    evict_here(keys)
    steps = deliveries(rows, wide, keys, durable)
    answer: Any = None
    error: BaseException | None = None
    taken: set[tuple[str, bool]] = set()  # (region, model-wide) steps the generator has handled
    while True:
        try:
            settings, items = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            evict_here(keys)  # again: another thread may have refilled it from the old entry
            broadcast_after(keys)
            return bool(done.value)
        answer = error = None
        wide_step = isinstance(items[0], KeyPattern)
        try:
            if wide_step:
                answer = await settings.astore.delete_matching(items)
            else:
                await settings.astore.delete_many(items)
        except Exception as exc:
            error = exc
        except BaseException as exc:  # cancelled (asyncio.wait_for, a closing loop), mid-delivery
            steps.close()
            hand_over(_rest(keys, taken), exc, durable)
            raise
        taken.add((settings.name, wide_step))


def _rest(keys: Plan, taken: set[tuple[str, bool]]) -> Plan:
    """The steps of ``keys`` not in ``taken``."""
    rest: Plan = {}
    for name, (names, patterns) in keys.items():
        names = [] if (name, False) in taken else names
        patterns = [] if (name, True) in taken else patterns
        if names or patterns:
            rest[name] = (names, patterns)
    return rest


def hand_over(rest: Plan, cause: BaseException, durable: bool = False) -> None:
    """An asyncio delivery interrupted after its transaction committed: deliver ``rest``
    from a thread of its own with the sync stores, logged and counted as queued.

    The caller re-raises ``cause`` (a cancellation is honoured at once); the deletes
    are not dropped with it. A memcached store has also queued the interrupted delete
    as owed to its node, so that no caller reads the node before it. What the thread
    cannot deliver is queued or logged as lost, with its count and bound, as any
    failed delete is (:func:`deliver`).
    """
    if not rest:
        return
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
    threading.Thread(
        target=_deliver_rest, args=(rest, durable), name="cachedecor-handed-over", daemon=True
    ).start()


def _deliver_rest(rest: Plan, durable: bool) -> None:
    try:
        deliver({}, (), rest, durable)
    except Exception as exc:  # deliver logs what it could not delete; anything else is logged here
        log_failure(", ".join(sorted(rest)), "handed-over invalidation", exc)


def deliver_now(keys: Plan) -> bool:
    """Delete ``keys`` in every region this process configured, whatever the circuit
    breakers say; whether every delete was delivered (to regions it knows).

    The outbox's deliverer delivers its rows with it (wired by :mod:`cachedecor.config`):
    a row is removed only once this returns ``True``.
    """
    regions = configured_regions()
    evict_here(keys)
    ok = True
    for name, (names, patterns) in keys.items():
        settings = regions.get(name)
        if settings is None:
            log_failure(
                "outbox", "delivering to an unknown region", f"region {name!r} is not configured here"
            )
            ok = False
            continue
        counters = region_counters(name)
        try:
            if patterns:
                counters.invalidations += settings.store.delete_matching(patterns)
                counters.model_invalidations += len(patterns)
            if names:
                settings.store.delete_now(names)
                counters.invalidations += len(names)
        except Exception as exc:
            counters.errors += 1
            log_failure(name, "outbox delivery (kept in the outbox, retried)", exc)
            ok = False
    evict_here(keys)  # again: another thread may have refilled it from the old entry
    broadcast_after(keys)
    return ok


def evict_here(keys: Plan) -> None:
    """Evict ``keys`` from this process's near caches, now (before the deletes: a commit
    returns with its own near entries gone)."""
    if near.active():
        near.evict_everywhere(keys)


def broadcast_after(keys: Plan) -> None:
    """Send ``keys`` to every process's near caches, once the remote deletes are done."""
    sender = broadcast.current()
    if sender is not None:
        sender.publish(keys)


def _in_async_greenlet() -> bool:
    """Whether this code runs inside SQLAlchemy's asyncio greenlet (may ``await_only``)."""
    try:
        return bool(_in_greenlet())
    except Exception:  # no greenlet installed: no async session either
        return False


try:
    from sqlalchemy.util.concurrency import in_greenlet as _in_greenlet
except ImportError:  # pragma: no cover - SQLAlchemy without the helper

    def _in_greenlet() -> bool:
        return False


def _delete_keys(settings: RegionSettings, keys: list[str], durable: bool = False) -> Deliveries:
    counters = region_counters(settings.name)
    try:
        yield settings, keys
    except UndeliveredInvalidation as exc:
        counters.errors += 1
        counters.invalidations_queued += len(exc.keys)
        counters.invalidations += len(keys) - len(exc.keys)
        log_failure(settings.name, "invalidation", f"{exc}; retrying in the background")
        return False
    except Exception as exc:
        counters.errors += 1
        log_failure(settings.name, "invalidation", exc)
        if not durable:
            _log_lost(
                settings, f"{len(keys)} key(s)", ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
            )
        return False
    counters.invalidations += len(keys)
    return True


def _delete_matching(
    settings: RegionSettings, patterns: list[KeyPattern], durable: bool = False
) -> Deliveries:
    counters = region_counters(settings.name)
    try:
        deleted = yield settings, patterns
    except Exception as exc:
        counters.errors += 1
        log_failure(settings.name, "model-wide invalidation", exc)
        if not durable:
            _log_lost(settings, "every key of " + ", ".join(map(repr, patterns)), "")
        return False
    counters.invalidations += deleted
    counters.model_invalidations += len(patterns)
    return True


def _log_lost(settings: RegionSettings, what: str, detail: str) -> None:
    bound = f"{settings.expiration_time}s" if settings.expiration_time else "ever (no expiration_time)"
    log.error(
        "cache region %r: could not invalidate %s; they may be stale for up to %s%s",
        settings.name,
        what,
        bound,
        f": {detail}" if detail else "",
    )
