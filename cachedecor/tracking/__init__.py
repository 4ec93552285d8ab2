"""Which rows a transaction wrote, and what that means for reads and invalidation.

Both decorators rely on this module:

* ``@invalidates`` opens a *scope* (a context variable, so per thread and per
  asyncio task) naming the models it watches. While the scope is open, every
  session's flushes and every INSERT/UPDATE/DELETE executed on a session's
  connections, ORM or Core, are resolved to rows of the watched models. The rows
  are queued on the session's :class:`~cachedecor.tracking.session.Tracker` and
  delivered (their keys deleted in every region) when the transaction commits, or
  dropped when it rolls back. Changes the function leaves unflushed are looked for,
  when it returns, in the sessions it used and only there (which those are, and the
  case this leaves out: :mod:`cachedecor.tracking.scope`); they are tracked when
  their session flushes them.
* ``@cached_by_pk`` asks the tracker of its session whether it may use the cache:
  not for a row that the transaction wrote (it must see its own write), and no fill
  at all once the transaction has written anything or reads an older snapshot.

A write that cannot be resolved to rows (textual SQL, a statement whose rows
cannot be selected) is logged at WARNING and invalidates the watched models
wholesale (see :func:`cachedecor.invalidate_model`).

Rows are named by ``(hierarchy root class, space, primary key)``: the space is the
schema a ``schema_translate_map`` selects and the horizontal-sharding identity
token (see :mod:`cachedecor.keys`).

Modules, imported from where they are defined: :mod:`.scope` (what the running
``@invalidates`` functions watch, and which sessions a scope looks at for changes
left unflushed when it ends), :mod:`.session` (the per-session ``Tracker``, spaces,
whether a read may fill), :mod:`.events` (session events) and :mod:`.statements`
(statement events). Importing this package registers the events; it re-exports only
the questions the read path asks.
"""

from __future__ import annotations

from cachedecor.tracking import events, statements
from cachedecor.tracking.session import (
    TRACKER_KEY,
    may_fill,
    reads_old_snapshot,
    session_space,
    session_tracker,
)

__all__ = [
    "TRACKER_KEY",
    "events",
    "may_fill",
    "reads_old_snapshot",
    "session_space",
    "session_tracker",
    "statements",
]
