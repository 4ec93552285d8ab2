"""Session events: flushes record rows, commits deliver them, rollbacks drop them."""

from __future__ import annotations

import weakref
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction

from cachedecor.invalidation import deliver
from cachedecor.tracking.scope import _scope
from cachedecor.tracking.session import _TRACKER, Tracker, _tracker, session_space

__all__: list[str] = []


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
