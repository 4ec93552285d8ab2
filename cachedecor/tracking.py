"""Which rows a transaction wrote, and what that means for reads and invalidation.

Both decorators rely on this module:

* ``@invalidates`` opens a *scope* (a context variable, so per thread and per
  asyncio task) naming the models it watches. While the scope is open, every
  session's flushes and every INSERT/UPDATE/DELETE executed on a session's
  connections, ORM or Core, are resolved to rows of the watched models. The rows
  are queued on the session's :class:`Tracker` and delivered (their keys deleted in
  every region) when the transaction commits, or dropped when it rolls back.
* ``@cached_by_pk`` asks the tracker of its session whether it may use the cache:
  not for a row that the transaction wrote (it must see its own write), and no fill
  at all once the transaction has written anything or reads an older snapshot.

A write that cannot be resolved to rows (textual SQL, a statement whose rows
cannot be selected) is logged at WARNING and invalidates the watched models
wholesale (see :func:`cachedecor.invalidate_model`).

Rows are named by ``(hierarchy root class, space, primary key)``: the space is the
schema a ``schema_translate_map`` selects and the horizontal-sharding identity
token (see :mod:`cachedecor.keys`).
"""

from __future__ import annotations

import contextvars
import logging
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, cast

import sqlalchemy
from sqlalchemy import event, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, SessionTransaction
from sqlalchemy.sql import dml, elements

from cachedecor.invalidation import Group, deliver
from cachedecor.keys import Space, key_maker

__all__ = [
    "Scope",
    "Tracker",
    "enter_scope",
    "exit_scope",
    "may_fill",
    "queue_rows",
    "reads_old_snapshot",
    "session_space",
    "session_tracker",
]

log = logging.getLogger("cachedecor")

_TRACKER = "cachedecor.tracker"
_INTERNAL = "cachedecor_internal"


# --------------------------------------------------------------------------------------
# scopes: the models watched by the @invalidates functions running in this context


class Scope:
    """One running ``@invalidates`` function: what it watches and which sessions it used."""

    __slots__ = ("committed", "models", "name", "parent", "plain_rows", "plain_wide", "sessions")

    def __init__(self, models: tuple[type, ...], name: str, parent: Scope | None) -> None:
        self.models: tuple[type, ...] = models + (parent.models if parent is not None else ())
        self.name = name
        self.parent = parent
        self.sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        # writes on connections that belong to no session: delivered when the scope ends
        self.plain_rows: dict[Group, set[tuple[Any, ...]]] = {}
        self.plain_wide: set[Group] = set()
        # a transaction committed while the function ran (its pk= keys cannot wait for the next)
        self.committed = False

    def covers(self, cls: type) -> bool:
        return any(issubclass(cls, m) or issubclass(m, cls) for m in self.models)


_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("cachedecor_scope", default=None)


def enter_scope(models: tuple[type, ...], name: str) -> tuple[Scope, contextvars.Token[Scope | None]]:
    """Open a scope watching ``models``; pass the result to :func:`exit_scope`."""
    scope = Scope(models, name, _scope.get())
    return scope, _scope.set(scope)


def exit_scope(scope: Scope, token: contextvars.Token[Scope | None]) -> list[Session]:
    """Close ``scope``; return the sessions it wrote through that are still in a transaction.

    Changes the function made without flushing them (its caller flushes and commits
    later) are remembered on their sessions, so that they are tracked when flushed.
    """
    _scope.reset(token)
    models = scope.models
    for session in _live_sessions(scope):
        try:
            if not session.in_transaction():
                continue
            pending = [*session.new, *session.dirty, *session.deleted]
        except Exception:  # a session being torn down by another thread
            continue
        for obj in pending:
            if isinstance(obj, models) or scope.covers(type(obj)):
                tracker = _tracker(session)
                tracker.watched[id(obj)] = obj
                scope.sessions.add(session)
    if scope.plain_rows or scope.plain_wide:
        deliver({g: list(p) for g, p in scope.plain_rows.items()}, scope.plain_wide)
    return [s for s in scope.sessions if s.in_transaction()]


def _live_sessions(scope: Scope) -> list[Session]:
    """Every session of the process: a change made in the scope may sit in any of them.

    Watching a session of another thread costs at most an extra invalidation; missing
    one would leave a stale row, so all are scanned.
    """
    try:
        from sqlalchemy.orm.session import _sessions

        return list(_sessions.values())
    except Exception:  # pragma: no cover - private registry gone: the scope's own sessions
        return list(scope.sessions)


# --------------------------------------------------------------------------------------
# per-session state


class Tracker:
    """Per-session state: what the current transaction wrote and must invalidate."""

    __slots__ = ("bulk", "flushing", "rows", "watched", "wide", "written", "wrote")

    def __init__(self) -> None:
        self.wrote = False
        self.flushing = False
        self.rows: dict[Group, set[tuple[Any, ...]]] = {}
        self.written: set[tuple[type, Any, str]] = set()
        self.bulk: set[type] = set()
        self.wide: set[Group] = set()
        self.watched: dict[int, Any] = {}

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


def _tracker(session: Session) -> Tracker:
    tracker = session.info.get(_TRACKER)
    if tracker is None:
        tracker = session.info[_TRACKER] = Tracker()
    return cast(Tracker, tracker)


def session_tracker(session: Session) -> Tracker | None:
    """The tracker of ``session`` if it has one (read side, hot path)."""
    tracker: Tracker | None = session.info.get(_TRACKER)
    return tracker


def queue_rows(session: Session, model: type, pks: Iterable[Any]) -> None:
    """Invalidate these rows when ``session``'s transaction commits (dropped on rollback)."""
    tracker = _tracker(session)
    space = session_space(session, model)
    for pk in pks:
        tracker.add_row(model, pk, space)


def queue_wide(session: Session, model: type) -> None:
    """Invalidate every row of ``model`` when ``session``'s transaction commits."""
    _tracker(session).add_wide(model, session_space(session, model))


# --------------------------------------------------------------------------------------
# where a session's rows live: schema_translate_map


def _translate_map(session: Session, mapper: Mapper[Any], token: Any = None) -> Mapping[Any, Any] | None:
    try:
        # a ShardedSession binds each shard (identity token) to an engine of its own
        bind = session.get_bind(mapper) if token is None else session.get_bind(mapper, shard_id=token)
    except Exception:
        return None
    transaction = session._transaction
    while transaction is not None:
        entry = transaction._connections.get(bind)
        transaction = transaction._parent
        if entry is not None:
            return cast("Mapping[Any, Any] | None", entry[0]._execution_options.get("schema_translate_map"))
    options = getattr(bind, "_execution_options", None)
    return None if options is None else options.get("schema_translate_map")


def session_space(session: Session | None, model: Any, token: Any = None) -> Space | None:
    """The space (schema, identity token) in which ``session`` reads rows of ``model``.

    ``None`` when neither a ``schema_translate_map`` moves the model's table nor a
    token applies: the common case, whose keys carry only the table's own schema.
    """
    found = _models.get(model)
    if found is None:
        found = _models[model] = (sqlalchemy.inspect(model), key_maker(model).schema)
    mapper, schema = found
    if session is not None:
        translate = _translate_map(session, mapper, token)
        if translate and schema in translate:
            return (translate[schema], token)
    if token is not None:
        return (schema, token)
    return None


#: model -> (mapper, schema of its hierarchy's root table)
_models: dict[Any, tuple[Mapper[Any], Any]] = {}


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
    tracker: Tracker | None = session.info.get(_TRACKER)
    return tracker is None or not tracker.wrote


_READ_ONLY_SQL = (
    "SELECT",
    "WITH",
    "SHOW",
    "EXPLAIN",
    "VALUES",
    "SET",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "PRAGMA",
)
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


# --------------------------------------------------------------------------------------
# session events: flushes, commits, rollbacks

#: connection -> the session whose transaction it belongs to
_owners: weakref.WeakKeyDictionary[Connection, weakref.ref[Session]] = weakref.WeakKeyDictionary()


@event.listens_for(Session, "after_begin")
def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    _owners[connection] = weakref.ref(session)


def _record_instance(session: Session, tracker: Tracker, obj: Any) -> None:
    state = sqlalchemy.inspect(obj)
    mapper = state.mapper
    model = mapper.class_
    token = state.key[2] if state.key is not None else state.identity_token
    space = session_space(session, model, token)
    if state.key is not None:  # persisted identity before this flush (old pk, deletes)
        tracker.add_row(model, state.key[1], space)
    pk = mapper.primary_key_from_instance(obj)
    if None not in pk:
        tracker.add_row(model, tuple(pk), space)


@event.listens_for(Session, "before_flush")
def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    _tracker(session).flushing = True


@event.listens_for(Session, "after_soft_rollback")
def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    tracker = session.info.get(_TRACKER)
    if tracker is not None:
        tracker.flushing = False  # a flush that failed


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, flush_context: Any) -> None:
    tracker = _tracker(session)
    tracker.wrote = True
    tracker.flushing = False
    scope = _scope.get()
    if scope is None and not tracker.watched:
        return
    if scope is not None:
        scope.sessions.add(session)
    watched = tracker.watched
    for group in (session.new, session.dirty, session.deleted):
        for obj in group:
            if id(obj) in watched or (scope is not None and scope.covers(type(obj))):
                _record_instance(session, tracker, obj)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    scope = _scope.get()
    while scope is not None:
        scope.committed = True
        scope = scope.parent
    tracker = session.info.get(_TRACKER)
    if tracker is None:
        return
    # watched instances were recorded by _after_flush: a commit flushes first
    rows = {group: list(pks) for group, pks in tracker.rows.items()}
    wide = set(tracker.wide)
    tracker.clear()
    if rows or wide:
        deliver(rows, wide)


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:
        return  # a savepoint: its changes may still commit with the outer transaction
    tracker = session.info.get(_TRACKER)
    if tracker is not None:
        tracker.clear()  # a commit already delivered its keys; a rollback drops them


# --------------------------------------------------------------------------------------
# statements: every INSERT/UPDATE/DELETE on a session's connections, ORM or Core


_table_models: dict[Any, tuple[type, ...]] = {}


@event.listens_for(Mapper, "after_mapper_constructed")
def _new_mapper(mapper: Mapper[Any], cls: type) -> None:
    _table_models.clear()


def _models_of(table: Any) -> tuple[type, ...]:
    """The mapped classes whose rows live in ``table`` (hierarchy roots first)."""
    found = _table_models.get(table)
    if found is None:
        from sqlalchemy.orm import mapperlib

        models: list[type] = []
        for registry in list(mapperlib._all_registries()):
            for mapper in list(registry.mappers):
                if table in mapper.tables and mapper.class_ not in models:
                    models.append(mapper.class_)
        found = _table_models[table] = tuple(models)
    return found


def _owner(conn: Connection) -> Session | None:
    ref = _owners.get(conn)
    session = ref() if ref is not None else None
    if session is None:
        return None
    transaction = session._transaction
    while transaction is not None:  # subtransactions (a flush's) hold no connections themselves
        if any(e[0] is conn for e in list(transaction._connections.values())):
            return session
        transaction = transaction._parent
    return None  # the session has moved on: this connection is someone else's now


def _writes_text(text: str) -> bool:
    words = text.lstrip().split(None, 1)
    return bool(words) and words[0].upper() not in _READ_ONLY_SQL


@event.listens_for(Engine, "before_execute")
def _before_execute(
    conn: Connection, elem: Any, multiparams: Any, params: Any, execution_options: Mapping[str, Any]
) -> None:
    if isinstance(elem, elements.TextClause):
        if not _writes_text(elem.text):
            return
        _untracked_write(conn, "textual SQL", execution_options)
        return
    if not isinstance(elem, dml.UpdateBase) or execution_options.get(_INTERNAL):
        return
    session = _owner(conn)
    if session is not None:
        tracker = _tracker(session)
        tracker.wrote = True
        if tracker.flushing:
            return  # the unit of work: after_flush records its rows
    scope = _scope.get()
    if scope is None:
        return
    table = getattr(elem, "table", None)
    models = [m for m in _models_of(table) if scope.covers(m)] if table is not None else []
    if not models:
        return
    if session is not None:
        scope.sessions.add(session)
    param_list = list(multiparams) if multiparams else ([params] if params else [])
    model = models[0]  # the classes of one table share their keys
    spaces = _spaces(conn, session, model, execution_options)
    pks = _affected(conn, elem, table, param_list, execution_options)
    if pks is not None:
        for space in spaces:
            _add_rows(session, scope, model, space, pks)
    elif isinstance(elem, dml.Insert) and getattr(elem, "_post_values_clause", None) is None:
        # new rows whose keys the database assigns: known once the statement has run
        _inserts[conn] = (elem, session, scope, model, spaces)
    else:
        what = f"a {type(elem).__name__.upper()} on {getattr(table, 'name', table)} whose rows are not known"
        _unresolved(session, scope, model, spaces, what)


def _spaces(
    conn: Connection, session: Session | None, model: type, execution_options: Mapping[str, Any]
) -> list[Space | None]:
    """Where the rows that a statement on ``conn`` writes live: usually one space.

    The schema comes from the connection's and the statement's ``schema_translate_map``;
    the identity token from the statement (the ORM in a ``ShardedSession`` names it) or
    else from the shard whose engine the connection belongs to (a Core statement on
    ``session.connection(bind_arguments={"shard_id": ...})``). Shards that share one
    engine cannot be told apart by the connection: the rows are then named in each.
    """
    options = (
        {**conn._execution_options, **execution_options} if execution_options else conn._execution_options
    )
    token = options.get("identity_token")
    if token is not None or session is None:
        return [space_for_options(model, options, token)]
    # ShardedSession keeps its shards private; a session without shards has no token
    shards: Mapping[Any, Any] | None = getattr(session, "_ShardedSession__shards", None)
    engine = conn.engine
    tokens = [
        t for t, bind in (shards or {}).items() if bind is engine or getattr(bind, "engine", None) is engine
    ]
    return [space_for_options(model, options, t) for t in tokens or [None]]


#: connection -> the INSERT it is running whose new primary keys are still to be read
_inserts: weakref.WeakKeyDictionary[Connection, tuple[Any, ...]] = weakref.WeakKeyDictionary()


@event.listens_for(Engine, "after_execute")
def _after_execute(
    conn: Connection,
    elem: Any,
    multiparams: Any,
    params: Any,
    execution_options: Mapping[str, Any],
    result: Any,
) -> None:
    pending = _inserts.pop(conn, None) if _inserts else None
    if pending is None or pending[0] is not elem:
        return
    _, session, scope, model, spaces = pending
    if execution_options.get(_RETURNING):
        return  # the ORM statement reads its own RETURNING rows (see _do_orm_execute)
    try:
        pks = [tuple(row) for row in result.inserted_primary_key_rows]
    except Exception:
        pks = []
    if pks and all(None not in pk for pk in pks):
        for space in spaces:
            _add_rows(session, scope, model, space, pks)
        return
    log.warning(
        "cachedecor: an INSERT into %s in %s does not show the primary keys of its new rows "
        "(RETURNING without them, or executemany): a cached 'no such row' (cache_none=True) of "
        "those keys is invalidated by invalidating every cached row of %s",
        model.__name__,
        scope.name,
        model.__name__,
    )
    for space in spaces:
        if session is not None:
            _tracker(session).add_wide(model, space)
        else:
            scope.plain_wide.add((key_maker(model).model, space))


_RETURNING = "cachedecor_returning"


@event.listens_for(Session, "do_orm_execute")
def _do_orm_execute(state: ORMExecuteState) -> Any:
    """An ORM INSERT ... RETURNING: read the new primary keys from its own rows."""
    if not state.is_insert:
        return None
    scope = _scope.get()
    statement: Any = state.statement
    if scope is None or not getattr(statement, "_returning", None) or state.execution_options.get(_INTERNAL):
        return None
    mapper = state.bind_mapper
    if mapper is None or not scope.covers(mapper.class_):
        return None
    session = state.session
    options = state.execution_options
    token = options.get("identity_token", state.bind_arguments.get("shard_id"))
    if token is None and getattr(session, "_ShardedSession__shards", None):
        return None  # the shard is chosen later, by its connection: see _before_execute
    if "schema_translate_map" in options:
        space = space_for_options(mapper.class_, options, token)
    else:  # the map of the session's engine or connection
        space = session_space(session, mapper.class_, token)
    state.update_execution_options(**{_RETURNING: True})
    frozen = state.invoke_statement().freeze()
    pks = _returned_keys(mapper, frozen())
    if pks is None:
        log.warning(
            "cachedecor: an INSERT ... RETURNING into %s in %s returns neither its rows nor their "
            "primary keys: every cached row of %s is invalidated at commit",
            mapper.class_.__name__,
            scope.name,
            mapper.class_.__name__,
        )
        _tracker(session).add_wide(mapper.class_, space)
    else:
        _add_rows(session, scope, mapper.class_, space, pks)
    return frozen()


def _returned_keys(mapper: Mapper[Any], result: Any) -> list[tuple[Any, ...]] | None:
    """Primary keys found in the rows of an INSERT ... RETURNING, or ``None``."""
    names = [mapper.get_property_by_column(c).key for c in mapper.primary_key]
    keys: list[tuple[Any, ...]] = []
    for row in result:
        mapping = row._mapping
        found = None
        for value in row:
            if isinstance(value, mapper.class_):
                found = tuple(mapper.primary_key_from_instance(value))
                break
        if found is None:
            try:
                found = tuple(mapping[n] for n in names)
            except KeyError:
                return None
        keys.append(found)
    return keys


def _add_rows(
    session: Session | None, scope: Scope, model: type, space: Any, pks: list[tuple[Any, ...]]
) -> None:
    if session is not None:
        tracker = _tracker(session)
        base = key_maker(model).model
        tracker.bulk.add(base)  # until the commit, reads of the model see the transaction's writes
        for pk in pks:
            tracker.add_row(model, pk, space)
    else:
        group = (key_maker(model).model, space)
        scope.plain_rows.setdefault(group, set()).update(pks)


def _unresolved(
    session: Session | None, scope: Scope, model: type, spaces: Iterable[Space | None], what: str
) -> None:
    log.warning(
        "cachedecor: %s in %s cannot be resolved to rows: every cached row of %s is invalidated "
        "when the transaction commits (use ORM statements or primary-key WHERE clauses to avoid this)",
        what,
        scope.name,
        model.__name__,
    )
    for space in spaces:
        if session is not None:
            _tracker(session).add_wide(model, space)
        else:
            scope.plain_wide.add((key_maker(model).model, space))


def _untracked_write(conn: Connection, what: str, execution_options: Mapping[str, Any]) -> None:
    session = _owner(conn)
    if session is not None:
        _tracker(session).wrote = True
    scope = _scope.get()
    if scope is None:
        return
    if session is not None:
        scope.sessions.add(session)
    for model in dict.fromkeys(key_maker(m).model for m in scope.models):
        _unresolved(session, scope, model, _spaces(conn, session, model, execution_options), what)


@event.listens_for(Engine, "before_cursor_execute")
def _before_cursor_execute(
    conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    """SQL that was never compiled (``exec_driver_sql``), which ``before_execute`` does not see.

    A writing statement is treated as textual SQL. Compiled statements, which the
    other hooks see, cost two attribute checks here.
    """
    if context is None or context.compiled is not None or not _writes_text(statement):
        return
    _untracked_write(conn, "driver-level SQL (exec_driver_sql)", context.execution_options)


def _pk_columns(table: Any) -> list[Any]:
    return list(table.primary_key.columns)


def _affected(
    conn: Connection, elem: Any, table: Any, params: list[Mapping[str, Any]], options: Mapping[str, Any]
) -> list[tuple[Any, ...]] | None:
    """Primary keys of the rows ``elem`` will write, or ``None`` if they cannot be known."""
    pk_cols = _pk_columns(table)
    if not pk_cols:
        return None
    names = [c.key for c in pk_cols]
    if isinstance(elem, dml.Insert):
        return _inserted(elem, names, params)
    if isinstance(elem, dml.Update):
        values = getattr(elem, "_values", None) or {}
        if {getattr(k, "key", k) for k in values} & set(names):
            return None  # the statement changes primary keys
    if len(params) > 1:  # executemany: the ORM's bulk UPDATE/DELETE by primary key
        try:
            return [tuple(p[n] for n in names) for p in params]
        except KeyError:
            return None
    where = getattr(elem, "whereclause", None)
    query = select(*pk_cols)
    if where is not None:
        query = query.where(where)
    exec_options = {_INTERNAL: True}
    if "schema_translate_map" in options:
        exec_options["schema_translate_map"] = options["schema_translate_map"]
    try:
        rows = conn.execute(query, params[0] if params else {}, execution_options=exec_options)
        return [tuple(r) for r in rows]
    except Exception:
        log.debug("cachedecor: pre-selecting the rows of a statement failed", exc_info=True)
        return None


def _inserted(elem: Any, names: list[str], params: list[Mapping[str, Any]]) -> list[tuple[Any, ...]] | None:
    rows: list[tuple[Any, ...]] = []
    if params:
        for p in params:
            if not all(n in p for n in names):
                return None
            rows.append(tuple(p[n] for n in names))
        return rows
    multi = getattr(elem, "_multi_values", None)
    value_sets: list[Mapping[Any, Any]] = []
    if multi:
        for group in multi:
            value_sets.extend(group)
    values = getattr(elem, "_values", None)
    if values:
        value_sets.append(values)
    if not value_sets:
        return None
    for value_set in value_sets:
        if isinstance(value_set, (list, tuple)):
            return None
        by_name = {getattr(k, "key", k): v for k, v in value_set.items()}
        if not all(n in by_name for n in names):
            return None
        row = []
        for n in names:
            v = by_name[n]
            if isinstance(v, elements.BindParameter):
                v = v.effective_value
            elif isinstance(v, elements.ClauseElement):
                return None
            row.append(v)
        rows.append(tuple(row))
    return rows
