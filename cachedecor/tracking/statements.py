"""Statements: every INSERT/UPDATE/DELETE on a session's connections, ORM or Core, resolved to rows."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper, ORMExecuteState, Session
from sqlalchemy.sql import dml, elements

from cachedecor import _runtime
from cachedecor._sa import all_mappers, dml_parts, session_shards
from cachedecor.keys import Space, key_maker
from cachedecor.tracking.events import connection_owner
from cachedecor.tracking.scope import Scope, current_scope
from cachedecor.tracking.session import ensure_tracker, session_space, space_for_options

__all__: list[str] = []

log = logging.getLogger("cachedecor")

#: execution option marking the statements cachedecor runs itself (the SELECT of the rows
#: an UPDATE or DELETE will write): the hooks here leave them alone
_INTERNAL = "cachedecor_internal"

#: the first words of SQL that writes nothing (textual and driver-level SQL is told apart by them)
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


@event.listens_for(Mapper, "after_mapper_constructed")
def _new_mapper(mapper: Mapper[Any], cls: type) -> None:
    _runtime.table_models.clear()


def _models_of(table: Any) -> tuple[type, ...]:
    """The mapped classes whose rows live in ``table`` (hierarchy roots first)."""
    found = _runtime.table_models.get(table)
    if found is None:
        models: list[type] = []
        for mapper in all_mappers():
            if table in mapper.tables and mapper.class_ not in models:
                models.append(mapper.class_)
        found = _runtime.table_models[table] = tuple(models)
    return found


def _writes_text(text: str) -> bool:
    words = text.lstrip().split(None, 1)
    return bool(words) and words[0].upper() not in _READ_ONLY_SQL


@event.listens_for(Engine, "before_execute", retval=True)
def _before_execute(
    conn: Connection, elem: Any, multiparams: Any, params: Any, execution_options: Mapping[str, Any]
) -> tuple[Any, Any, Any]:
    if isinstance(elem, elements.TextClause):
        if _writes_text(elem.text):
            _untracked_write(conn, "textual SQL", execution_options)
    elif isinstance(elem, dml.UpdateBase) and not execution_options.get(_INTERNAL):
        elem = _track(conn, elem, multiparams, params, execution_options)
    return elem, multiparams, params


def _track(
    conn: Connection, elem: Any, multiparams: Any, params: Any, execution_options: Mapping[str, Any]
) -> Any:
    """Resolve an INSERT, UPDATE or DELETE to the rows it writes; the statement to run
    (an UPDATE or DELETE made to return its rows' primary keys, see :func:`_returning`)."""
    session = connection_owner(conn)
    if session is not None:
        tracker = ensure_tracker(session)
        tracker.wrote = True
        if tracker.flushing:
            return elem  # the unit of work: after_flush records its rows
    scope = current_scope()
    if scope is None:
        return elem
    table = getattr(elem, "table", None)
    models = [m for m in _models_of(table) if scope.covers(m)] if table is not None else []
    if not models:
        return elem
    if session is not None:
        scope.sessions.add(session)
    param_list = list(multiparams) if multiparams else ([params] if params else [])
    model = models[0]  # the classes of one table share their keys
    spaces = _spaces(conn, session, model, execution_options)
    returning = _returning(conn, elem, table, param_list)
    if returning is not None:
        _runtime.pending_returns[conn] = (returning, session, scope, model, spaces)
        return returning
    pks = _affected(conn, elem, table, param_list, execution_options)
    if pks is not None:
        for space in spaces:
            _add_rows(session, scope, model, space, pks)
    elif isinstance(elem, dml.Insert) and dml_parts(elem).post_values_clause is None:
        # new rows whose keys the database assigns: known once the statement has run
        _runtime.pending_inserts[conn] = (elem, session, scope, model, spaces)
    else:
        what = f"a {type(elem).__name__.upper()} on {getattr(table, 'name', table)} whose rows are not known"
        _unresolved(session, scope, model, spaces, what)
    return elem


def _returning(conn: Connection, elem: Any, table: Any, params: list[Mapping[str, Any]]) -> Any:
    """``elem`` made to return the primary keys of the rows it writes, or ``None``.

    For an UPDATE or DELETE run once (not executemany), with no RETURNING of its own
    and no change to primary keys, on a dialect that has RETURNING for it and keeps
    the ``rowcount`` of a statement with RETURNING (PostgreSQL; not SQLite, whose
    driver then counts 0, and where a transaction's first write cannot interleave
    with another writer's commit anyway). The rows it returns are those it
    wrote, in the same statement: a SELECT run before it (:func:`_affected`, the way
    left for the others) costs a round trip more, and misses a row that another
    transaction's commit makes match the WHERE clause between the two. The caller
    sees the result it would have had: the rows are read by :func:`_after_execute`
    (a statement without RETURNING returns none to its caller), its ``rowcount``
    stays.
    """
    if len(params) > 1 or not isinstance(elem, (dml.Update, dml.Delete)):
        return None
    dialect = conn.dialect
    if not (dialect.update_returning if isinstance(elem, dml.Update) else dialect.delete_returning):
        return None
    if not getattr(dialect, "supports_sane_rowcount_returning", False):
        return None  # its rowcount would be lost (SQLite's driver: 0 once RETURNING is added)
    parts = dml_parts(elem)
    if parts.returning:
        return None  # the caller reads the rows: they cannot be read here too
    pk_cols = _pk_columns(table)
    if not pk_cols:
        return None
    if isinstance(elem, dml.Update):
        names = {c.key for c in pk_cols}
        if {getattr(k, "key", k) for k in parts.values or {}} & names:
            return None  # the statement changes primary keys: the old ones are not returned
    return elem.returning(*pk_cols)


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
    options: Mapping[str, Any] = conn.get_execution_options()
    if execution_options:
        options = {**options, **execution_options}
    token = options.get("identity_token")
    if token is not None or session is None:
        return [space_for_options(model, options, token)]
    # ShardedSession keeps its shards private; a session without shards has no token
    shards = session_shards(session)
    engine = conn.engine
    tokens = [
        t for t, bind in (shards or {}).items() if bind is engine or getattr(bind, "engine", None) is engine
    ]
    return [space_for_options(model, options, t) for t in tokens or [None]]


#: connection -> the INSERT it is running whose new primary keys are still to be read


@event.listens_for(Engine, "after_execute")
def _after_execute(
    conn: Connection,
    elem: Any,
    multiparams: Any,
    params: Any,
    execution_options: Mapping[str, Any],
    result: Any,
) -> None:
    if _runtime.pending_returns:
        returned = _runtime.pending_returns.pop(conn, None)
        if returned is not None and returned[0] is elem:
            _read_returned(returned, result)
            return
    pending = _runtime.pending_inserts.pop(conn, None) if _runtime.pending_inserts else None
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
    what = (
        f"an INSERT into {model.__name__} that does not show the primary keys of its new rows "
        f"(RETURNING without them, or executemany)"
    )
    _unresolved(session, scope, model, spaces, what)


def _read_returned(returned: tuple[Any, ...], result: Any) -> None:
    """The primary keys an UPDATE or DELETE made by :func:`_returning` returned."""
    elem, session, scope, model, spaces = returned
    try:
        pks = [tuple(row) for row in result.fetchall()]
    except Exception:
        what = f"a {type(elem).__name__.upper()} on {model.__name__} whose returned rows could not be read"
        _unresolved(session, scope, model, spaces, what)
        return
    if pks:
        for space in spaces:
            _add_rows(session, scope, model, space, pks)


_RETURNING = "cachedecor_returning"


@event.listens_for(Session, "do_orm_execute")
def _do_orm_execute(state: ORMExecuteState) -> Any:
    """Inside a scope: the session is one the scope looks at when it ends (any ORM
    statement: a query, ``session.get`` that reads, a lazy load); an ORM INSERT ...
    RETURNING: read the new primary keys from its own rows."""
    scope = current_scope()
    if scope is None:
        return None
    scope.used.add(state.session)
    if not state.is_insert:
        return None
    statement: Any = state.statement
    if not dml_parts(statement).returning or state.execution_options.get(_INTERNAL):
        return None
    mapper = state.bind_mapper
    if mapper is None or not scope.covers(mapper.class_):
        return None
    session = state.session
    options = state.execution_options
    token = options.get("identity_token", state.bind_arguments.get("shard_id"))
    if token is None and session_shards(session):
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
        ensure_tracker(session).add_wide(mapper.class_, space)
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
        tracker = ensure_tracker(session)
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
            ensure_tracker(session).add_wide(model, space)
        else:
            scope.plain_wide.add((key_maker(model).model, space))


def _untracked_write(conn: Connection, what: str, execution_options: Mapping[str, Any]) -> None:
    session = connection_owner(conn)
    if session is not None:
        ensure_tracker(session).wrote = True
    scope = current_scope()
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
        values = dml_parts(elem).values or {}
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
    parts = dml_parts(elem)
    multi = parts.multi_values
    value_sets: list[Mapping[Any, Any]] = []
    if multi:
        for group in multi:
            value_sets.extend(group)
    values = parts.values
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
