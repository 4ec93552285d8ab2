"""Session events: flushes record rows, commits deliver them, rollbacks drop them."""

from __future__ import annotations

import weakref
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction

from cachedecor import _runtime, broadcast, outbox
from cachedecor._sa import held_connections
from cachedecor.invalidation import deliver, plan
from cachedecor.tracking.scope import current_scope
from cachedecor.tracking.session import TRACKER_KEY, Tracker, ensure_tracker, session_space

__all__ = ["connection_owner"]


#: connection -> the session whose transaction it belongs to


@event.listens_for(Session, "after_begin")
def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    _runtime.connection_owners[connection] = weakref.ref(session)


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


@event.listens_for(Session, "after_attach")
def _after_attach(session: Session, instance: Any) -> None:
    """An object added to ``session`` (``add``, ``merge``, a cascade) inside a scope: the
    scope looks at the session when it ends (see :mod:`cachedecor.tracking.scope`)."""
    scope = current_scope()
    if scope is not None:
        scope.used.add(session)


@event.listens_for(Session, "before_flush")
def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    ensure_tracker(session).flushing = True


@event.listens_for(Session, "after_soft_rollback")
def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    tracker = session.info.get(TRACKER_KEY)
    if tracker is not None:
        tracker.flushing = False  # a flush that failed


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, flush_context: Any) -> None:
    tracker = ensure_tracker(session)
    tracker.wrote = True
    tracker.flushing = False
    scope = current_scope()
    if scope is None and not tracker.watched:
        return
    if scope is not None:
        scope.sessions.add(session)
    watched = tracker.watched
    for group in (session.new, session.dirty, session.deleted):
        for obj in group:
            if id(obj) in watched or (scope is not None and scope.covers(type(obj))):
                _record_instance(session, tracker, obj)


@event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    """With an outbox configured: write the transaction's keys to it, in the transaction.
    With a PostgreSQL broadcast: notify them, in the transaction (sent at its commit)."""
    box = outbox.current()
    sender = broadcast.current()
    if box is None and (sender is None or "postgresql" not in sender.kinds):
        return
    transaction = session.get_transaction()
    if transaction is None or transaction.nested:
        return  # a savepoint: the keys go with the outer transaction's commit
    if session.new or session.dirty or session.deleted:
        session.flush()  # the commit's own flush, done first so that its rows are recorded
    tracker = session.info.get(TRACKER_KEY)
    if tracker is None or not (tracker.rows or tracker.wide):
        return
    keys = plan({group: list(pks) for group, pks in tracker.rows.items()}, tracker.wide)
    if not keys:
        return
    if sender is not None:
        for held in outbox.connections(session):
            if sender.notify_in_transaction(held, keys):
                break
    if box is None:
        return
    conn = box.connection_for(session)
    if conn is None:
        return  # the transaction holds no connection to the outbox's database: in-process
    row_id = box.write(conn, keys)
    if row_id is not None:
        tracker.outbox = (row_id, keys)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    scope = current_scope()
    while scope is not None:
        scope.committed = True
        scope = scope.parent
    tracker = session.info.get(TRACKER_KEY)
    if tracker is None:
        return
    # watched instances were recorded by _after_flush: a commit flushes first
    rows = {group: list(pks) for group, pks in tracker.rows.items()}
    wide = set(tracker.wide)
    written = tracker.outbox
    tracker.clear()
    if written is not None:
        row_id, keys = written
        box = outbox.current()
        if deliver({}, (), keys, durable=True) and box is not None:
            box.done(row_id)  # every delete delivered: the row is removed in the background
    elif rows or wide:
        deliver(rows, wide)


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:
        return  # a savepoint: its changes may still commit with the outer transaction
    tracker = session.info.get(TRACKER_KEY)
    if tracker is not None:
        tracker.clear()  # a commit already delivered its keys; a rollback drops them


def connection_owner(conn: Connection) -> Session | None:
    """The session whose current transaction holds ``conn``, or ``None``.

    ``None`` for a connection no session began a transaction on (a plain
    ``engine.connect()``) and for one its session has since released (its transaction
    ended, or moved to another connection). The session is held weakly: asking never
    keeps one alive.
    """
    ref = _runtime.connection_owners.get(conn)
    session = ref() if ref is not None else None
    if session is None:
        return None
    if any(held is conn for _, held in held_connections(session)):
        return session
    return None  # the session has moved on: this connection is someone else's now
