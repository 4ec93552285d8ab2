"""The write side: ``@invalidates`` and direct invalidation.

While an ``@invalidates(Model, ...)`` function runs, cachedecor watches every
session it writes through, whether the session is an argument, an attribute of
``self`` (a repository), Flask-SQLAlchemy's ``db.session`` or any other
``scoped_session`` (see :mod:`cachedecor.tracking`). The primary keys of rows of
the named models that are inserted, updated or deleted, by the unit of work or by
ORM and Core statements on the session's connections, are collected on the
session. When the transaction that holds them commits, their cache entries are
deleted in every region that may hold them; when it rolls back, they are
forgotten. Until then, cached reads of those rows in the same session bypass the
cache (they see the transaction's own writes and fill nothing).
"""

from __future__ import annotations

import functools
import inspect as pyinspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import sqlalchemy
from sqlalchemy.orm import Session

from cachedecor.binding import CallBinding, as_session, registry_in_code, require_asyncio
from cachedecor.errors import UsageError
from cachedecor.invalidation import EVERY_SPACE, Group, adeliver, deliver
from cachedecor.keys import key_maker
from cachedecor.tracking.scope import Scope, enter_scope, exit_scope
from cachedecor.tracking.session import queue_rows, queue_wide, session_space

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = [
    "ainvalidate",
    "ainvalidate_many",
    "ainvalidate_model",
    "invalidate",
    "invalidate_many",
    "invalidate_model",
    "invalidates",
]

F = TypeVar("F", bound=Callable[..., Any])


#: What to delete now: ``(rows, wide groups)``, for :func:`deliver` or :func:`adeliver`.
Delivery = tuple[dict[Group, list[Any]], Iterable[Group]]


def _rows_now(
    model: Any, pks: Iterable[Any], session: Any, schema: Any, identity_token: Any
) -> Delivery | None:
    """:func:`invalidate_many`'s decision: queue on the session, and/or what to delete now."""
    pks = list(pks)
    if not pks:
        return None
    if schema is not None or identity_token is not None:
        maker = key_maker(model)
        return {(maker.model, (maker.schema if schema is None else schema, identity_token)): pks}, ()
    sync = as_session(session) if session is not None else None
    if session is not None and sync is None:
        raise UsageError(f"session= takes a Session or an AsyncSession, got {session!r}")
    if sync is not None:
        queue_rows(sync, model, pks)
        if sync.in_transaction():
            return None
        # No transaction is open: the change was committed already, or the caller
        # has yet to write it. Delete now for the first case; the keys also stay
        # queued for the session's next commit, for the second.
    return {(key_maker(model).model, session_space(sync, model)): pks}, ()


def invalidate_many(
    model: Any,
    pks: Iterable[Any],
    *,
    session: Session | AsyncSession | None = None,
    schema: Any = None,
    identity_token: Any = None,
) -> None:
    """Delete the cache entries of ``model`` rows with primary keys ``pks``.

    Entries are deleted in every configured region that may cache the model (every
    region, unless its ``tables`` option narrows it), whatever this process imported.
    With ``session`` (a ``Session`` or an ``AsyncSession``) the deletion waits until
    that session's transaction commits (and is dropped if it rolls back), and the
    keys are those of the schema the session reads (its ``schema_translate_map``);
    without, it happens now. ``schema`` names a translated schema (one tenant)
    instead of a session's, and ``identity_token`` the shard of the rows under
    horizontal sharding. A cache failure is logged and counted, never raised.
    In a coroutine, use :func:`ainvalidate_many`, which does not block the loop.
    """
    now = _rows_now(model, pks, session, schema, identity_token)
    if now is not None:
        deliver(*now)


async def ainvalidate_many(
    model: Any,
    pks: Iterable[Any],
    *,
    session: Session | AsyncSession | None = None,
    schema: Any = None,
    identity_token: Any = None,
) -> None:
    """:func:`invalidate_many` for coroutines: the deletes are awaited on the asyncio
    stores; it returns when they are done (or queued, for a node that is down)."""
    now = _rows_now(model, pks, session, schema, identity_token)
    if now is not None:
        await adeliver(*now)


def invalidate(
    model: Any,
    pk: Any,
    *,
    session: Session | AsyncSession | None = None,
    schema: Any = None,
    identity_token: Any = None,
) -> None:
    """Delete the cache entries of one row; see :func:`invalidate_many`."""
    invalidate_many(model, [pk], session=session, schema=schema, identity_token=identity_token)


async def ainvalidate(
    model: Any,
    pk: Any,
    *,
    session: Session | AsyncSession | None = None,
    schema: Any = None,
    identity_token: Any = None,
) -> None:
    """Delete the cache entries of one row, from a coroutine; see :func:`invalidate_many`."""
    await ainvalidate_many(model, [pk], session=session, schema=schema, identity_token=identity_token)


def _model_now(model: Any, session: Any, schema: Any) -> Delivery | None:
    sync = as_session(session) if session is not None else None
    if sync is not None and schema is None:
        queue_wide(sync, model)
        if sync.in_transaction():
            return None
    space: Any
    if schema is not None:
        space = (schema, None)
    elif sync is not None:
        space = session_space(sync, model)
    else:
        space = EVERY_SPACE
    return {}, [(key_maker(model).model, space)]


def invalidate_model(
    model: Any, *, session: Session | AsyncSession | None = None, schema: Any = None
) -> None:
    """Delete every cached row of ``model`` and of its whole inheritance hierarchy.

    For writes that cannot be resolved to rows (textual SQL, a data migration); it
    does not wait for expiry. The entries are found on the servers and deleted
    (memcached's LRU crawler, Redis ``SCAN``), which takes time in proportion to the
    number of entries a server holds: meant for rare writes, not for every request.
    Fills under way are refused, as with any invalidation.

    Without ``session`` and ``schema`` it happens now, in every schema and every
    shard. With ``session`` it happens when the session's transaction commits
    (nothing on rollback), in the schema the session reads; ``schema`` names one
    translated schema (one tenant) instead. In a coroutine, use
    :func:`ainvalidate_model` (the listing of keys then runs in a worker thread).
    """
    now = _model_now(model, session, schema)
    if now is not None:
        deliver(*now)


async def ainvalidate_model(
    model: Any, *, session: Session | AsyncSession | None = None, schema: Any = None
) -> None:
    """:func:`invalidate_model` for coroutines."""
    now = _model_now(model, session, schema)
    if now is not None:
        await adeliver(*now)


def invalidates(*models: Any, pk: str | tuple[str, ...] | None = None) -> Callable[[F], F]:
    """Invalidate the cached rows of ``models`` that the decorated function changes.

    Rows of the named models that the function inserts, updates or deletes while
    it runs, through any session (also through bulk and Core statements on a
    session's connection), are invalidated after the transaction that holds the
    change commits, whether the function or its caller commits, and never if it
    rolls back. ``pk`` names parameter(s) whose value is a primary key of the first
    model to invalidate as well, under the same after-commit rule.

    The function may be an ``async def`` using an ``AsyncSession``: the deletes of a
    commit are then done when ``await session.commit()`` returns, through the
    asyncio stores, and the ``pk`` keys when the awaited call returns.

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
        registry = registry_in_code(fn)  # its session is one the scope looks at (tracking.scope)
        name = getattr(fn, "__qualname__", repr(fn))

        def finish(
            scope: Scope, open_sessions: list[Session], explicit: Any, session: Any
        ) -> Delivery | None:
            """After the function: queue its ``pk`` key, and say what to delete now."""
            if explicit is None:
                return None
            if open_sessions:
                for s in open_sessions:
                    queue_rows(s, mapped[0], [explicit])
                if scope.committed:
                    # the write may be in a transaction that committed while the function
                    # ran: the open ones (begun after it, say by a read) may never commit
                    return {(key_maker(mapped[0]).model, session_space(session, mapped[0])): [explicit]}, ()
                return None
            return _rows_now(mapped[0], [explicit], session, None, None)

        if pyinspect.iscoroutinefunction(fn):
            require_asyncio(f"@invalidates on the async function {name}")

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                explicit = binding.pk(args, kwargs) if pk is not None else None
                session = binding.session(args, kwargs)
                scope, token = enter_scope(mapped, name, session, args, kwargs, registry)
                try:
                    result = await fn(*args, **kwargs)
                finally:
                    open_sessions, plain = exit_scope(scope, token)
                    if plain is not None:
                        await adeliver(*plain)
                now = finish(scope, open_sessions, explicit, session)
                if now is not None:
                    await adeliver(*now)
                return result

            wrapper: Any = awrapper
        else:

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                explicit = binding.pk(args, kwargs) if pk is not None else None
                session = binding.session(args, kwargs)
                scope, token = enter_scope(mapped, name, session, args, kwargs, registry)
                try:
                    result = fn(*args, **kwargs)
                finally:
                    open_sessions, plain = exit_scope(scope, token)
                    if plain is not None:
                        deliver(*plain)
                now = finish(scope, open_sessions, explicit, session)
                if now is not None:
                    deliver(*now)
                return result

        wrapper.__signature__ = pyinspect.signature(fn)
        return cast(F, wrapper)

    return decorate
