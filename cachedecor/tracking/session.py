"""Per session: what its transaction wrote, may it fill, where its rows live."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any, cast

import sqlalchemy
from sqlalchemy.orm import Session

from cachedecor import _runtime
from cachedecor._sa import held_connection, root_connections
from cachedecor.invalidation import Group
from cachedecor.keys import Space, key_maker

__all__ = [
    "TRACKER_KEY",
    "Tracker",
    "ensure_tracker",
    "may_fill",
    "queue_rows",
    "queue_wide",
    "reads_old_snapshot",
    "session_space",
    "session_tracker",
    "space_for_options",
]

TRACKER_KEY = "cachedecor.tracker"
"""The key of a session's :class:`Tracker` in ``session.info``.

``session.info.get(TRACKER_KEY)`` is the session's tracker, or ``None`` if it has none
yet: the same answer as :func:`session_tracker`, without the call, for the read path
of every cached call. Callers may rely on that and on the key staying a constant
string; they read it only. A tracker is created by :func:`ensure_tracker` (or by
:func:`queue_rows` and :func:`queue_wide`), never stored under this key by hand.
"""


class Tracker:
    """Per-session state: what the current transaction wrote and must invalidate."""

    __slots__ = ("bulk", "flushing", "outbox", "rows", "watched", "wide", "written", "wrote")

    def __init__(self) -> None:
        self.wrote = False
        self.flushing = False
        self.rows: dict[Group, set[tuple[Any, ...]]] = {}
        self.written: set[tuple[type, Any, str]] = set()
        self.bulk: set[type] = set()
        self.wide: set[Group] = set()
        self.watched: dict[int, Any] = {}
        #: (row id, keys) written to the outbox by this transaction (see cachedecor.outbox)
        self.outbox: tuple[int, Any] | None = None

    @property
    def dirty(self) -> bool:
        return bool(self.written or self.bulk)

    def add_row(self, model: type, pk: Any, space: Space | None = None) -> None:
        pk = tuple(pk) if isinstance(pk, (list, tuple)) else (pk,)
        maker = key_maker(model)
        self.rows.setdefault((maker.model, space), set()).add(pk)
        try:
            self.written.add((maker.model, space, maker.encode_pk(pk)))
        except Exception:  # a key that cannot be encoded is never cached: nothing to block
            pass

    def add_wide(self, model: type, space: Space | None = None) -> None:
        base = key_maker(model).model
        self.wide.add((base, space))
        self.bulk.add(base)

    def blocks(self, base: type, pk_text: str, space: Space | None) -> bool:
        """Whether a read of this row must bypass the cache in this transaction."""
        if base in self.bulk:
            return True
        return (base, space, pk_text) in self.written

    def clear(self) -> None:
        self.wrote = False
        self.flushing = False
        self.rows.clear()
        self.written.clear()
        self.bulk.clear()
        self.wide.clear()
        self.watched.clear()
        self.outbox = None


def ensure_tracker(session: Session) -> Tracker:
    """The tracker of ``session``, created (and kept in ``session.info``) if it has none.

    For the write side: a flush, a statement or a scope that records rows. Every call
    for one session returns the same tracker until the session's ``info`` is cleared;
    the tracker itself is cleared, not replaced, when a transaction ends.
    """
    tracker = session.info.get(TRACKER_KEY)
    if tracker is None:
        tracker = session.info[TRACKER_KEY] = Tracker()
    return cast(Tracker, tracker)


def session_tracker(session: Session) -> Tracker | None:
    """The tracker of ``session`` if it has one (read side, hot path)."""
    tracker: Tracker | None = session.info.get(TRACKER_KEY)
    return tracker


def queue_rows(session: Session, model: type, pks: Iterable[Any]) -> None:
    """Invalidate these rows when ``session``'s transaction commits (dropped on rollback)."""
    tracker = ensure_tracker(session)
    space = session_space(session, model)
    for pk in pks:
        tracker.add_row(model, pk, space)


def queue_wide(session: Session, model: type) -> None:
    """Invalidate every row of ``model`` when ``session``'s transaction commits."""
    ensure_tracker(session).add_wide(model, session_space(session, model))


# --------------------------------------------------------------------------------------
# where a session's rows live: schema_translate_map


#: Session.get_bind's first answer, taken here without the call when it is not overridden:
#: a session with one bind and no per-mapper binds reads everything through it
_BASE_GET_BIND = Session.get_bind
_binds = operator.attrgetter("binds" if "binds" in vars(Session()) else "_Session__binds")


def session_space(session: Session | None, model: Any, token: Any = None) -> Space | None:
    """The space (schema, identity token) in which ``session`` reads rows of ``model``.

    ``None`` when neither a ``schema_translate_map`` moves the model's table nor a
    token applies: the common case, whose keys carry only the table's own schema.
    The map is the one of the connection the session's transaction holds to the
    model's bind, else the bind's own (read on every call: a connection's
    ``schema_translate_map`` is set when it is taken).
    """
    found = _runtime.tracked_models.get(model)
    if found is None:
        found = _runtime.tracked_models[model] = (sqlalchemy.inspect(model), key_maker(model).schema)
    mapper, schema = found
    if session is not None:
        translate: Mapping[Any, Any] | None = None
        bind: Any = session.bind
        if (
            token is not None
            or bind is None
            or type(session).get_bind is not _BASE_GET_BIND
            or _binds(session)
        ):
            try:
                # a ShardedSession binds each shard (identity token) to an engine of its own
                bind = session.get_bind(mapper) if token is None else session.get_bind(mapper, shard_id=token)
            except Exception:
                bind = None
        if bind is not None:
            conn = held_connection(session, bind)
            if conn is not None:
                translate = conn.get_execution_options().get("schema_translate_map")
            else:
                options = getattr(bind, "get_execution_options", None)
                translate = None if options is None else options().get("schema_translate_map")
        if translate is not None and schema in translate:
            return (translate[schema], token)
    if token is not None:
        return (schema, token)
    return None


#: model -> (mapper, schema of its hierarchy's root table)


def _root_schema(model: Any) -> Any:
    return key_maker(model).schema


def space_for_options(model: Any, options: Mapping[str, Any], token: Any = None) -> Space | None:
    """:func:`session_space` for a statement executed with ``options``."""
    translate = options.get("schema_translate_map")
    schema = _root_schema(model)
    if translate and schema in translate:
        return (translate[schema], token)
    if token is not None:
        return (schema, token)
    return None


# --------------------------------------------------------------------------------------
# whether a read may fill


def may_fill(session: Session | None) -> bool:
    """Whether a row read in ``session`` may be written to the cache.

    Not once the session's transaction has written anything: what it reads may then
    be its own uncommitted change, which other sessions must never see.
    """
    if session is None:
        return True
    tracker: Tracker | None = session.info.get(TRACKER_KEY)
    return tracker is None or not tracker.wrote


_SNAPSHOT_LEVELS = frozenset({"REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"})


def reads_old_snapshot(session: Session) -> bool:
    """Whether the session's transaction already reads from a snapshot taken earlier.

    At REPEATABLE READ or SERIALIZABLE, a transaction sees the data as of its first
    statement. If that statement ran before a miss takes its lease, what the miss
    reads may predate a write committed (and invalidated) in between, so it must
    not be cached. SQLite is left out: without WAL its readers block writers, and
    its isolation level is always reported as SERIALIZABLE.
    """
    connections = root_connections(session)
    if not connections:
        return False  # no statement yet: the snapshot will start after the lease
    for connection in connections:
        if connection.dialect.name == "sqlite":
            continue
        level = (
            connection.get_execution_options().get("isolation_level") or connection.default_isolation_level
        )
        if level is not None and str(level).upper() in _SNAPSHOT_LEVELS:
            return True
    return False
