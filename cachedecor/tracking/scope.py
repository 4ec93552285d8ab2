"""Scopes: the models watched by the ``@invalidates`` functions running in this context,
and the sessions they used.

Which sessions a scope looks at when it ends
--------------------------------------------

A change the function made without flushing it (its caller flushes and commits
later) is found in the sessions the scope knows, and only there; no other session
of the process is looked at (another thread's session is neither thread-safe to
read nor any of this function's business). A session is known to the scope when:

* it is the function's session as its binding finds it (an argument, ``self.session``
  or what ``session=`` names), or the current session of the one ``scoped_session``
  the function's code names, if that registry already holds one when the function
  starts;
* an argument of the function is a mapped instance that belongs to it;
* inside the scope, it is given to a cachedecor read (``@cached_by_pk``, a hit
  included: :func:`note_session`), runs an ORM statement (a query, ``session.get``
  that reads the row, a lazy load: the ``do_orm_execute`` event), attaches an object (``add``,
  ``merge`` of a new object, a cascade: ``after_attach``), flushes, or holds a
  connection that runs an INSERT, UPDATE or DELETE of a watched model;
* an ``@invalidates`` function nested in this one knew it (it is passed up when
  that scope ends).

Not covered: an object of a session the scope does not know, obtained without SQL
(already in the identity map before the function started) and changed or deleted without a
flush. Such a change is tracked if it is flushed while the function runs (every
flush inside a scope is); otherwise it is not, and nothing can log it, since
finding it would mean reading every session. Passing the object, or its session,
as an argument covers it.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state

from cachedecor.binding import as_session
from cachedecor.invalidation import Group
from cachedecor.tracking.session import ensure_tracker

__all__ = ["Scope", "current_scope", "enter_scope", "exit_scope", "note_session"]


class Scope:
    """One running ``@invalidates`` function: what it watches and which sessions it used.

    ``sessions``: the function's own session and those it wrote through (a flush, a
    statement), whose transactions get its ``pk=`` keys. ``used``: the other sessions
    it used (see the module's docstring), looked at when the scope ends; one found
    holding an unflushed change of a watched model is then counted with ``sessions``.
    """

    __slots__ = ("committed", "models", "name", "parent", "plain_rows", "plain_wide", "sessions", "used")

    def __init__(self, models: tuple[type, ...], name: str, parent: Scope | None) -> None:
        self.models: tuple[type, ...] = models + (parent.models if parent is not None else ())
        self.name = name
        self.parent = parent
        self.sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self.used: weakref.WeakSet[Session] = weakref.WeakSet()
        # writes on connections that belong to no session: delivered when the scope ends
        self.plain_rows: dict[Group, set[tuple[Any, ...]]] = {}
        self.plain_wide: set[Group] = set()
        # a transaction committed while the function ran (its pk= keys cannot wait for the next)
        self.committed = False

    def covers(self, cls: type) -> bool:
        return any(issubclass(cls, m) or issubclass(m, cls) for m in self.models)


_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("cachedecor_scope", default=None)

current_scope: Callable[[], Scope | None] = _scope.get
"""``current_scope()``: the innermost scope open in this context (thread, asyncio task), or ``None``.

The scope :func:`enter_scope` opened last and :func:`exit_scope` has not closed; its
``parent`` chain leads to the enclosing ones. Callers may read and add to its
``sessions``, ``used``, ``plain_rows``, ``plain_wide`` and ``committed``; scopes are
opened and closed only through :func:`enter_scope` and :func:`exit_scope`. It is the
context variable's own ``get``, so the statement and session hooks pay no extra call.
"""


def note_session(session: Session | None) -> None:
    """``session`` is used by the running scope, if any (a cachedecor read: its hits
    attach instances without SQL, so no session event tells). Outside scopes it costs
    one context-variable read."""
    scope = _scope.get()
    if scope is not None and session is not None:
        scope.used.add(session)


def enter_scope(
    models: tuple[type, ...],
    name: str,
    session: Session | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    registry: Any = None,
) -> tuple[Scope, contextvars.Token[Scope | None]]:
    """Open a scope watching ``models``; pass the result to :func:`exit_scope`.

    ``session`` is the function's own (as its binding found it). The scope also
    starts knowing the sessions of the mapped instances among ``args`` and
    ``kwargs`` (the values themselves, not what containers hold), and the current
    session of ``registry`` (the ``scoped_session`` or ``async_scoped_session`` the
    function's code names) if it holds one already; a session made later is known
    through its events. Each argument costs a failed attribute read (0.6 us) when it
    is not a mapped instance.
    """
    scope = Scope(models, name, _scope.get())
    if session is not None:
        scope.sessions.add(session)
    used = scope.used
    for value in (*args, *kwargs.values()) if kwargs else args:
        try:
            owner = instance_state(value).session
        except Exception:  # not a mapped instance (or a proxy that cannot say)
            continue
        if owner is not None:
            used.add(owner)
    if registry is not None:
        try:
            # asked first, so that a registry without a session is not given one
            current = as_session(registry) if registry.registry.has() else None
        except Exception:  # no scope to hold a session in (Flask: outside an app context)
            current = None
        if current is not None:
            used.add(current)
    return scope, _scope.set(scope)


def exit_scope(
    scope: Scope, token: contextvars.Token[Scope | None]
) -> tuple[list[Session], tuple[dict[Group, list[Any]], set[Group]] | None]:
    """Close ``scope``: the sessions it wrote through that are still in a transaction,
    and the invalidation to deliver now (``(rows, wide)`` for ``deliver``/``adeliver``),
    if any: writes on connections that belong to no session.

    Changes to watched models that the function left unflushed, in the sessions the
    scope knows (``sessions`` and ``used``, see the module's docstring), are
    remembered on their sessions so that they are tracked when flushed, and such a
    session counts as written through. The enclosing scope, if any, then knows every
    session this one knew.
    """
    _scope.reset(token)
    models = scope.models
    wrote = set(scope.sessions)
    known = wrote.union(scope.used)
    for session in known:
        if not session.in_transaction():
            continue
        for obj in (*session.new, *session.dirty, *session.deleted):
            if isinstance(obj, models) or scope.covers(type(obj)):
                ensure_tracker(session).watched[id(obj)] = obj
                wrote.add(session)
    if scope.parent is not None:
        scope.parent.used.update(known)
    now = None
    if scope.plain_rows or scope.plain_wide:
        now = ({g: list(p) for g, p in scope.plain_rows.items()}, set(scope.plain_wide))
    return [s for s in wrote if s.in_transaction()], now
