"""Every use cachedecor makes of SQLAlchemy's internals, and of its optional asyncio
extension, in one place: an upgrade of SQLAlchemy is read here.

Each internal below names the versions it was checked against. The asyncio part:

``sqlalchemy.ext.asyncio`` needs greenlet. SQLAlchemy 2.0 installed greenlet on
common platforms; 2.1 does not, and importing the extension then raises
``ImportError`` (checked on SQLAlchemy 2.0.2 and 2.1.9). cachedecor never imports
it for the sync API: an ``AsyncSession`` can only exist once the application has
imported the extension, so the async session classes are taken from
``sys.modules`` when they are asked for, and are none before. A plain install
works on SQLAlchemy 2.1 without greenlet, and a sync application on 2.0 does not
pay for importing the extension.
"""

from __future__ import annotations

import importlib.util
import operator
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import sqlalchemy
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, Session, mapperlib, scoped_session, sessionmaker
from sqlalchemy.orm.identity import IdentityMap
from sqlalchemy.orm.instrumentation import ClassManager
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.util import await_only, greenlet_spawn

from cachedecor import _runtime

__all__ = [
    "ADD_UNPRESENT",
    "COMMIT_ATTRIBUTES",
    "EXPIRE_ATTRIBUTES",
    "STATE_ATTR",
    "all_mappers",
    "async_session_types",
    "await_only",
    "dml_parts",
    "greenlet_missing",
    "greenlet_spawn",
    "held_connection",
    "held_connections",
    "identity_dict",
    "in_async_greenlet",
    "registry_types",
    "root_connections",
    "same_database",
    "session_classes",
    "session_factories",
    "session_shards",
    "session_types",
    "state_constructor",
    "sync_session_of",
]

_ASYNC_MODULE = "sqlalchemy.ext.asyncio"
_SYNC_TYPES: tuple[type[Any], ...] = (Session, scoped_session)


def _async() -> _runtime.AsyncClasses | None:
    """The extension's classes, found once it is imported (then kept in ``_runtime``: a
    call costs one attribute read; looking in ``sys.modules`` and building the tuples on
    every call cost a read without a session argument about 10% of a near hit)."""
    found = _runtime.async_classes
    if found is None:
        module = sys.modules.get(_ASYNC_MODULE)
        if module is None:
            return None
        try:
            found = _runtime.AsyncClasses(
                module.AsyncSession, module.async_scoped_session, module.async_sessionmaker, _SYNC_TYPES
            )
        except AttributeError:  # imported half-way (another thread is importing it)
            return None
        _runtime.async_classes = found
    return found


def async_session_types() -> tuple[type[Any], ...]:
    """``(AsyncSession, async_scoped_session)`` once the extension is imported, else ``()``."""
    found = _async()
    return () if found is None else (found.session, found.scoped)


def session_types() -> tuple[type[Any], ...]:
    """Every kind of object that is, or resolves to, a session (read as
    :func:`sync_session_of` reads the classes: on the path of a call)."""
    found = _runtime.async_classes
    if found is None:
        if _ASYNC_MODULE not in sys.modules:
            return _SYNC_TYPES
        found = _async()
    return _SYNC_TYPES if found is None else found.all_sessions


def registry_types() -> tuple[type[Any], ...]:
    """The session registries: ``scoped_session``, and ``async_scoped_session`` once imported."""
    found = _async()
    return (scoped_session,) if found is None else (scoped_session, found.scoped)


def session_classes() -> tuple[type[Any], ...]:
    """The session classes (a class passed where a session is expected is a mistake)."""
    found = _async()
    return (Session,) if found is None else (Session, found.session)


def session_factories() -> tuple[type[Any], ...]:
    """The factories that make a new session on every call (never where a function's session is)."""
    found = _async()
    return (sessionmaker,) if found is None else (sessionmaker, found.sessionmaker)


def sync_session_of(value: Any) -> Session | None:
    """The ``Session`` an ``AsyncSession`` or ``async_scoped_session`` runs on, else ``None``.

    On the path of every call whose session is not an argument: the found classes are
    read first, and ``sys.modules`` only while the extension is not imported.
    """
    found = _runtime.async_classes
    if found is None:
        if _ASYNC_MODULE not in sys.modules:
            return None
        found = _async()
    if found is None or not isinstance(value, found.async_sessions):
        return None
    if not isinstance(value, found.session):
        value = value()  # an async_scoped_session: its current AsyncSession
    session: Session = value.sync_session
    return session


def greenlet_missing() -> bool:
    """Whether greenlet, which SQLAlchemy's asyncio extension needs, is not installed."""
    return importlib.util.find_spec("greenlet") is None


def same_database(a: sqlalchemy.URL, b: sqlalchemy.URL) -> bool:
    """Whether two URLs name the same database (driver and credentials aside): the same
    file for SQLite, the same host, port and database name otherwise."""
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        return os.path.abspath(a.database or "") == os.path.abspath(b.database or "")
    return (a.host or "localhost", a.port, a.database) == (b.host or "localhost", b.port, b.database)


# -- internals of the ORM's session and mapper registries ------------------------------
# Checked against SQLAlchemy 2.0.2, 2.0.x and 2.1.9 (the versions the suite runs on).


def held_connections(session: Session) -> Iterator[tuple[Any, Connection]]:
    """``(bind, connection)`` of each connection held by ``session``'s current transaction
    and the transactions it is nested in, innermost first.

    Internals: ``Session._transaction`` (the innermost transaction),
    ``SessionTransaction._connections`` (bind -> a tuple whose first item is the
    connection) and ``SessionTransaction._parent``. A subtransaction (a flush's) holds
    no connection of its own. No public API names the connection of a given bind
    without opening one.
    """
    transaction = session._transaction
    while transaction is not None:
        for bind, entry in list(transaction._connections.items()):
            yield bind, entry[0]
        transaction = transaction._parent


def held_connection(session: Session, bind: Any) -> Connection | None:
    """The connection ``session``'s current transaction (or one it is nested in) holds
    to ``bind``, or ``None``: :func:`held_connections` for one bind, without a
    generator (the read path asks this on every hit). Same internals."""
    transaction = session._transaction
    while transaction is not None:
        entry = transaction._connections.get(bind)
        if entry is not None:
            return entry[0]
        transaction = transaction._parent
    return None


def session_shards(session: Session) -> Mapping[Any, Any] | None:
    """A ``ShardedSession``'s shards (identity token -> bind), or ``None`` for any other
    session. Internal: the name-mangled ``ShardedSession.__shards`` (no public API lists
    them), checked against 2.0.2 and 2.1.9."""
    shards: Mapping[Any, Any] | None = getattr(session, "_ShardedSession__shards", None)
    return shards


def root_connections(session: Session) -> list[Connection]:
    """The connections the root transaction of ``session`` holds (none without one).

    Internals: ``SessionTransaction._connections`` of ``Session.get_transaction()``.
    """
    transaction = session.get_transaction()
    if transaction is None:
        return []
    return [entry[0] for entry in list(transaction._connections.values())]


def all_mappers() -> Iterator[Mapper[Any]]:
    """Every mapper of every registry this process has made.

    Internal: ``sqlalchemy.orm.mapperlib._all_registries()`` (a weak set of the
    registries); each registry's ``mappers`` is public.
    """
    for registry in list(mapperlib._all_registries()):
        yield from list(registry.mappers)


# -- internals of the ORM's loader: building a persistent instance from a cached row ----
# What the ORM's own loader does for a row it has read (loading.py's _instance), done
# for a row from the cache without a query. Checked against SQLAlchemy 2.0.2, 2.0.x and
# 2.1.9. The hit path calls these directly (module attributes, no wrapper call).

#: ``identity_map._dict``: the identity map's dictionary (key -> state), looked in
#: before ``identity_map.get()``, which is a call the usual absent case can do without
identity_dict: Callable[[IdentityMap], dict[Any, Any]] = operator.attrgetter("_dict")

#: the identity map class of every ``Session``: ``WeakInstanceDict`` in 2.0,
#: ``_WeakInstanceDict`` in 2.1 (2.0.2 and 2.1.9 checked)
_SESSION_IDENTITY_MAP: type[IdentityMap] = (
    getattr(sqlalchemy.orm.identity, "_WeakInstanceDict", None)
    or getattr(sqlalchemy.orm.identity, "WeakInstanceDict", None)
    or IdentityMap
)

#: ``_add_unpresent(state, key)`` of the session's identity map class: add a state
#: known to be absent, as the loader does (``None`` where a version lacks it:
#: instances are then ``session.add``-ed). Not the ``IdentityMap`` base class's,
#: whose stand-in goes through ``add()``: about 1 µs more per near hit in ``make
#: bench`` (14.2 against 12.9 µs, attached). Its callers (``rows.py``, in line on the
#: hit path) first set ``state.session_id = session.hash_key``, as the loader does:
#: two more internals, checked on 2.0.2 and 2.1.9.
ADD_UNPRESENT: Callable[[IdentityMap, InstanceState[Any], Any], None] | None = getattr(
    _SESSION_IDENTITY_MAP, "_add_unpresent", None
)

#: the key of an instance's state in its ``__dict__`` (``sqlalchemy.orm.base``'s
#: ``DEFAULT_STATE_ATTR``, ``"_sa_instance_state"`` in 2.0.2 and 2.1.9)
STATE_ATTR: str = getattr(sqlalchemy.orm.base, "DEFAULT_STATE_ATTR", "_sa_instance_state")

#: ``InstanceState._expire_attributes(dict, keys)``: mark attributes not loaded
EXPIRE_ATTRIBUTES: Callable[..., None] = InstanceState._expire_attributes

#: ``InstanceState._commit(dict, keys)``: mark attributes loaded and unmodified
COMMIT_ATTRIBUTES: Callable[..., None] = InstanceState._commit


def state_constructor(manager: ClassManager[Any]) -> Callable[..., InstanceState[Any]] | None:
    """``manager._state_constructor`` (the ``InstanceState`` factory of a class) when the
    class is instrumented the default way, else ``None`` (build through
    ``manager.new_instance()`` then)."""
    if type(manager) is ClassManager and manager.STATE_ATTR == "_sa_instance_state":
        constructor: Callable[..., InstanceState[Any]] = manager._state_constructor
        return constructor
    return None


# -- internals of Core DML statements: what a statement writes, read before it runs ----
# Checked against SQLAlchemy 2.0.2, 2.0.x and 2.1.9; each is read with a default, so a
# version without one reads as "not known" (the statement then invalidates its model).


class DmlParts:
    """What an INSERT/UPDATE/DELETE statement holds, read from its internals.

    ``values``: ``_values``, the single VALUES/SET mapping (column or name -> value);
    ``multi_values``: ``_multi_values``, the value sets of a multi-row ``values()``;
    ``returning``: ``_returning``, the RETURNING columns; ``post_values_clause``:
    ``_post_values_clause``, an ``ON CONFLICT``/``ON DUPLICATE KEY`` clause.
    """

    __slots__ = ("multi_values", "post_values_clause", "returning", "values")

    def __init__(self, statement: Any) -> None:
        self.values: Any = getattr(statement, "_values", None)
        self.multi_values: Any = getattr(statement, "_multi_values", None)
        self.returning: Any = getattr(statement, "_returning", None)
        self.post_values_clause: Any = getattr(statement, "_post_values_clause", None)


def dml_parts(statement: Any) -> DmlParts:
    """The :class:`DmlParts` of ``statement``."""
    return DmlParts(statement)


# -- running async code from SQLAlchemy's greenlet, and the greenlet's own helpers ------
# ``sqlalchemy.util``'s greenlet adapter, documented for writing async dialects; checked
# against 2.0.2, 2.0.x and 2.1.9. Importing them needs no greenlet; calling them does.


try:
    from sqlalchemy.util.concurrency import in_greenlet
except ImportError:  # SQLAlchemy 2.0 releases before in_greenlet() (2.0.2 checked)
    try:
        from sqlalchemy.util._concurrency_py3k import (  # type: ignore[import-not-found]
            _AsyncIoGreenlet,
            getcurrent,
        )

        def in_greenlet() -> bool:
            """What later releases' ``in_greenlet()`` answers, from the same internals."""
            return isinstance(getcurrent(), _AsyncIoGreenlet)

    except ImportError:  # no greenlet installed: no async session either

        def in_greenlet() -> bool:
            return False


def in_async_greenlet() -> bool:
    """Whether this code runs inside SQLAlchemy's asyncio greenlet, where ``await_only``
    may drive a coroutine (an ``AsyncSession``'s commit and the sync code it runs)."""
    try:
        return bool(in_greenlet())
    except Exception:  # no greenlet installed: no async session either
        return False
