"""The write side: ``@invalidates``, session tracking and direct invalidation.

While an ``@invalidates(Model, ...)`` function runs, cachedecor watches its
session: the primary keys of rows of the named models that are inserted, updated
or deleted (by the unit of work, or by bulk ``update()``/``delete()`` statements)
are collected on the session. When the transaction that holds them commits, their
cache entries are deleted in every region where the model is cached; when it rolls
back, they are forgotten. Until then, cached reads of those rows in the same
session bypass the cache (they see the transaction's own writes and fill nothing).
"""

from __future__ import annotations

import functools
import inspect as pyinspect
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import sqlalchemy
from sqlalchemy import event, select
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, SessionTransaction

from cachedecor.backends import UndeliveredInvalidation
from cachedecor.binding import CallBinding
from cachedecor.config import configured_regions
from cachedecor.errors import UsageError
from cachedecor.keys import key_maker
from cachedecor.stats import counters as region_counters
from cachedecor.stats import log_failure

__all__ = ["invalidate", "invalidate_many", "invalidates"]

log = logging.getLogger("cachedecor")

F = TypeVar("F", bound=Callable[..., Any])

_TRACKER = "cachedecor.tracker"

#: model class -> names of the regions where ``@cached_by_pk`` caches it
_cached_in: dict[type, set[str]] = {}


def register_cached(model: type, region: str) -> None:
    """Record that ``model`` is cached in ``region`` (called by ``@cached_by_pk``)."""
    _cached_in.setdefault(model, set()).add(region)


def _related_cached(model: type) -> list[tuple[type, str]]:
    """(cached model, region) pairs whose entries can hold rows of ``model``."""
    out: list[tuple[type, str]] = []
    for cached, regions in _cached_in.items():
        if issubclass(model, cached) or issubclass(cached, model):
            out.extend((cached, r) for r in sorted(regions))
    return out


def _identity_text(model: type, pk: Any) -> tuple[type, str]:
    """(hierarchy root class, encoded pk): how the tracker names a row."""
    maker = key_maker(model)
    base: type = sqlalchemy.inspect(model).base_mapper.class_
    return base, maker.encode_pk(pk)


def invalidate_many(model: Any, pks: Iterable[Any], *, session: Session | None = None) -> None:
    """Delete the cache entries of ``model`` rows with primary keys ``pks``.

    Entries are deleted in every region where ``model`` (or a class of its
    inheritance hierarchy) is cached by :func:`cached_by_pk`. With ``session``
    the deletion waits until that session's transaction commits (and is dropped
    if it rolls back); without, it happens now. A cache failure is logged and
    counted, never raised.
    """
    pks = list(pks)
    if not pks:
        return
    if session is not None:
        tracker = _tracker(session)
        for pk in pks:
            tracker.add_row(model, pk)
        if session.in_transaction():
            return
        # No transaction is open: the change was committed already, or the caller
        # has yet to write it. Delete now for the first case; the keys also stay
        # queued for the session's next commit, for the second.
    _delete_now({model: pks})


def invalidate(model: Any, pk: Any, *, session: Session | None = None) -> None:
    """Delete the cache entries of one row; see :func:`invalidate_many`."""
    invalidate_many(model, [pk], session=session)


def _delete_now(rows: dict[type, list[Any]]) -> None:
    regions = configured_regions()
    by_region: dict[str, list[str]] = {}
    for model, pks in rows.items():
        for cached, region_name in _related_cached(model):
            settings = regions.get(region_name)
            if settings is None:
                continue
            maker = key_maker(cached, settings.namespace)
            keys = by_region.setdefault(region_name, [])
            for pk in pks:
                keys.append(maker(pk))
    for region_name, keys in by_region.items():
        settings = regions[region_name]
        counters = region_counters(region_name)
        unique = list(dict.fromkeys(keys))
        try:
            settings.store.delete_many(unique)
        except UndeliveredInvalidation as exc:
            counters.errors += 1
            counters.invalidations_queued += len(exc.keys)
            counters.invalidations += len(unique) - len(exc.keys)
            log_failure(region_name, "invalidation", f"{exc}; retrying in the background")
        except Exception as exc:
            counters.errors += 1
            log_failure(region_name, "invalidation", exc)
            bound = (
                f"{settings.expiration_time}s" if settings.expiration_time else "ever (no expiration_time)"
            )
            log.error(
                "cache region %r: could not invalidate %d key(s); they may be stale for up to %s: %s",
                region_name,
                len(unique),
                bound,
                ", ".join(unique[:20]) + (" ..." if len(unique) > 20 else ""),
            )
        else:
            counters.invalidations += len(unique)


class Tracker:
    """Per-session state: which models are watched and which rows changed."""

    __slots__ = ("active", "bulk", "rows", "watched", "written", "wrote")

    def __init__(self) -> None:
        self.wrote = False
        self.active: dict[type, int] = {}
        self.rows: dict[type, set[Any]] = {}
        self.written: set[tuple[type, str]] = set()
        self.bulk: set[type] = set()
        self.watched: dict[int, Any] = {}

    @property
    def dirty(self) -> bool:
        return bool(self.written or self.bulk)

    def watching(self, obj: Any) -> bool:
        return isinstance(obj, tuple(self.active)) or id(obj) in self.watched

    def add_row(self, model: type, pk: Any) -> None:
        pk = tuple(pk) if isinstance(pk, (list, tuple)) else (pk,)
        self.rows.setdefault(model, set()).add(pk)
        self.written.add(_identity_text(model, pk))

    def blocks(self, model: type, pk_text: str) -> bool:
        """Whether a read of this row must bypass the cache in this transaction."""
        if self.bulk and any(issubclass(model, b) or issubclass(b, model) for b in self.bulk):
            return True
        base: type = sqlalchemy.inspect(model).base_mapper.class_
        return (base, pk_text) in self.written

    def clear(self) -> None:
        self.wrote = False
        self.rows.clear()
        self.written.clear()
        self.bulk.clear()
        self.watched.clear()


def _tracker(session: Session) -> Tracker:
    tracker = session.info.get(_TRACKER)
    if tracker is None:
        tracker = session.info[_TRACKER] = Tracker()
    return cast(Tracker, tracker)


def session_tracker(session: Session) -> Tracker | None:
    """The tracker of ``session`` if it has one (read side, hot path)."""
    tracker: Tracker | None = session.info.get(_TRACKER)
    return tracker


# --------------------------------------------------------------------------------------
# session events


def _record_instance(tracker: Tracker, obj: Any) -> None:
    state = sqlalchemy.inspect(obj)
    mapper = state.mapper
    model = mapper.class_
    if state.key is not None:  # persisted identity before this flush (old pk, deletes)
        tracker.add_row(model, state.key[1])
    pk = mapper.primary_key_from_instance(obj)
    if None not in pk:
        tracker.add_row(model, tuple(pk))


def may_fill(session: Session | None) -> bool:
    """Whether a row read in ``session`` may be written to the cache.

    Not once the session's transaction has written anything: what it reads may then
    be its own uncommitted change, which other sessions must never see.
    """
    if session is None:
        return True
    tracker: Tracker | None = session.info.get(_TRACKER)
    return tracker is None or not tracker.wrote


_READ_ONLY_SQL = ("SELECT", "WITH", "SHOW", "EXPLAIN", "VALUES")
_SNAPSHOT_LEVELS = frozenset({"REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"})


def reads_old_snapshot(session: Session) -> bool:
    """Whether the session's transaction already reads from a snapshot taken earlier.

    At REPEATABLE READ or SERIALIZABLE, a transaction sees the data as of its first
    statement. If that statement ran before a miss takes its lease, what the miss
    reads may predate a write committed (and invalidated) in between, so it must
    not be cached. SQLite is left out: without WAL its readers block writers, and
    its isolation level is always reported as SERIALIZABLE.
    """
    transaction = session.get_transaction()
    connections = getattr(transaction, "_connections", None) if transaction is not None else None
    if not connections:
        return False  # no statement yet: the snapshot will start after the lease
    for entry in list(connections.values()):
        connection = entry[0]
        if connection.dialect.name == "sqlite":
            continue
        level = (
            connection.get_execution_options().get("isolation_level") or connection.default_isolation_level
        )
        if level is not None and str(level).upper() in _SNAPSHOT_LEVELS:
            return True
    return False


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, flush_context: Any) -> None:
    tracker = _tracker(session)
    tracker.wrote = True
    if not (tracker.active or tracker.watched):
        return
    for group in (session.new, session.dirty, session.deleted):
        for obj in group:
            if tracker.watching(obj):
                _record_instance(tracker, obj)


@event.listens_for(Session, "do_orm_execute")
def _do_orm_execute(state: ORMExecuteState) -> None:
    if state.is_select:
        return
    if not (state.is_update or state.is_delete):
        if state.is_insert or _writes(state.statement):
            _tracker(state.session).wrote = True
        return
    session = state.session
    _tracker(session).wrote = True
    tracker = session.info.get(_TRACKER)
    if tracker is None or not tracker.active:
        return
    mapper = state.bind_mapper
    if mapper is None:
        return
    model = mapper.class_
    if not any(issubclass(model, m) or issubclass(m, model) for m in tracker.active):
        return
    tracker.bulk.add(model)  # until the rows are known, bypass every row of the model
    pks = _bulk_affected(state, mapper)
    if pks is None:
        log.warning(
            "cachedecor: could not determine the rows affected by a bulk %s on %s; "
            "their cache entries are left to expire",
            "UPDATE" if state.is_update else "DELETE",
            model.__name__,
        )
        return
    for pk in pks:
        tracker.add_row(model, pk)


def _writes(statement: Any) -> bool:
    """Whether a textual statement may write (anything but a plain query)."""
    text = getattr(statement, "text", None)
    if not isinstance(text, str):
        return False
    words = text.lstrip().split(None, 1)
    return bool(words) and words[0].upper() not in _READ_ONLY_SQL


def _bulk_affected(state: ORMExecuteState, mapper: Mapper[Any]) -> list[tuple[Any, ...]] | None:
    """Primary keys of the rows a bulk UPDATE/DELETE will touch (selected first)."""
    pk_attrs = [getattr(mapper.class_, mapper.get_property_by_column(c).key) for c in mapper.primary_key]
    params = state.parameters
    if isinstance(params, list) and params:  # bulk UPDATE by primary key (executemany)
        names = [a.key for a in pk_attrs]
        try:
            return [tuple(p[n] for n in names) for p in params]
        except KeyError:
            return None
    stmt: Any = state.statement
    query = select(*pk_attrs)
    where = getattr(stmt, "whereclause", None)
    if where is not None:
        query = query.where(where)
    try:
        rows = state.session.execute(
            query,
            params if isinstance(params, dict) else None,
            execution_options={"cachedecor_internal": True},
        )
        return [tuple(r) for r in rows]
    except Exception:
        log.debug("cachedecor: pre-selecting bulk statement rows failed", exc_info=True)
        return None


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    tracker = session.info.get(_TRACKER)
    if tracker is None:
        return
    # watched instances were recorded by _after_flush: a commit flushes first
    rows = {model: list(pks) for model, pks in tracker.rows.items()}
    tracker.clear()
    if rows:
        _delete_now(rows)


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:
        return  # a savepoint: its changes may still commit with the outer transaction
    tracker = session.info.get(_TRACKER)
    if tracker is not None:
        tracker.clear()  # a commit already delivered its keys; a rollback drops them


# --------------------------------------------------------------------------------------
# the decorator


def invalidates(*models: Any, pk: str | tuple[str, ...] | None = None) -> Callable[[F], F]:
    """Invalidate the cached rows of ``models`` that the decorated function changes.

    Rows of the named models that the function's session inserts, updates or
    deletes while it runs (also through bulk ``update()``/``delete()``) are
    invalidated after the transaction that holds the change commits, whether the
    function or its caller commits, and never if it rolls back. ``pk`` names
    parameter(s) whose value is a primary key of the first model to invalidate as
    well, under the same after-commit rule.

    >>> from cachedecor import invalidates
    >>> @invalidates()
    ... def noop(session):
    ...     return "ok"
    >>> noop(None)
    'ok'
    """
    mapped = tuple(sqlalchemy.inspect(m).class_ for m in models)
    if pk is not None and not mapped:
        raise UsageError("@invalidates(pk=...) needs a model to know which key to invalidate")

    def decorate(fn: F) -> F:
        binding = CallBinding(fn, pk, needs_pk=False)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            session = binding.session(args, kwargs)
            explicit = binding.pk(args, kwargs) if pk is not None else None
            if session is None:
                result = fn(*args, **kwargs)
                if explicit is not None:
                    invalidate(mapped[0], explicit)
                return result
            tracker = _tracker(session)
            for m in mapped:
                tracker.active[m] = tracker.active.get(m, 0) + 1
            try:
                result = fn(*args, **kwargs)
            finally:
                for m in mapped:
                    n = tracker.active[m] - 1
                    if n:
                        tracker.active[m] = n
                    else:
                        del tracker.active[m]
                # changes made but not yet flushed are flushed later, by the caller
                if session.in_transaction():
                    for group in (session.new, session.dirty, session.deleted):
                        for obj in group:
                            if isinstance(obj, mapped):
                                tracker.watched[id(obj)] = obj
            if explicit is not None:
                invalidate(mapped[0], explicit, session=session)
            return result

        wrapper.__signature__ = pyinspect.signature(fn)  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate
