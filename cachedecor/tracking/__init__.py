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

Modules: :mod:`.scope` (what the running ``@invalidates`` functions watch),
:mod:`.session` (the per-session :class:`Tracker`, spaces, whether a read may
fill), :mod:`.events` (session events) and :mod:`.statements` (statement events).
"""

from __future__ import annotations

from cachedecor.tracking import events, statements
from cachedecor.tracking.scope import Scope, enter_scope, exit_scope
from cachedecor.tracking.session import (
    TRACKER_KEY,
    Tracker,
    may_fill,
    queue_rows,
    queue_wide,
    reads_old_snapshot,
    session_space,
    session_tracker,
    space_for_options,
)

__all__ = [
    "TRACKER_KEY",
    "Scope",
    "Tracker",
    "enter_scope",
    "events",
    "exit_scope",
    "may_fill",
    "queue_rows",
    "queue_wide",
    "reads_old_snapshot",
    "session_space",
    "session_tracker",
    "space_for_options",
    "statements",
]
