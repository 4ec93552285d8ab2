"""Scopes: the models watched by the ``@invalidates`` functions running in this context."""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from cachedecor._sa import live_sessions
from cachedecor.invalidation import Group
from cachedecor.tracking.session import ensure_tracker

__all__ = ["Scope", "current_scope", "enter_scope", "exit_scope"]


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

current_scope: Callable[[], Scope | None] = _scope.get
"""``current_scope()``: the innermost scope open in this context (thread, asyncio task), or ``None``.

The scope :func:`enter_scope` opened last and :func:`exit_scope` has not closed; its
``parent`` chain leads to the enclosing ones. Callers may read and add to its
``sessions``, ``plain_rows``, ``plain_wide`` and ``committed``; scopes are opened and
closed only through :func:`enter_scope` and :func:`exit_scope`. It is the context
variable's own ``get``, so the statement and session hooks pay no extra call.
"""


def enter_scope(models: tuple[type, ...], name: str) -> tuple[Scope, contextvars.Token[Scope | None]]:
    """Open a scope watching ``models``; pass the result to :func:`exit_scope`."""
    scope = Scope(models, name, _scope.get())
    return scope, _scope.set(scope)


def exit_scope(
    scope: Scope, token: contextvars.Token[Scope | None]
) -> tuple[list[Session], tuple[dict[Group, list[Any]], set[Group]] | None]:
    """Close ``scope``: the sessions it wrote through that are still in a transaction,
    and the invalidation to deliver now (``(rows, wide)`` for ``deliver``/``adeliver``),
    if any: writes on connections that belong to no session.

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
                tracker = ensure_tracker(session)
                tracker.watched[id(obj)] = obj
                scope.sessions.add(session)
    now = None
    if scope.plain_rows or scope.plain_wide:
        now = ({g: list(p) for g, p in scope.plain_rows.items()}, set(scope.plain_wide))
    return [s for s in scope.sessions if s.in_transaction()], now


def _live_sessions(scope: Scope) -> list[Session]:
    """Every session of the process: a change made in the scope may sit in any of them.

    Watching a session of another thread costs at most an extra invalidation; missing
    one would leave a stale row, so all are scanned.
    """
    sessions = live_sessions()
    return list(scope.sessions) if sessions is None else sessions
