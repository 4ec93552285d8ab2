"""A background worker that only writes: it never imports the readers."""

from __future__ import annotations

import os
import signal
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import invalidates
from tests.apps.serve import engine, models, serve

Account = models().Account
ENGINE = engine()


@invalidates(Account)
def set_owner(session: Session, account_id: int, owner: str) -> None:
    session.get(Account, account_id).owner = owner
    session.commit()


def write(id: int, owner: str) -> dict[str, Any]:
    with Session(ENGINE) as session:
        set_owner(session, id, owner)
    return {}


def probe() -> dict[str, Any]:
    """Touch the cache once (a read through the region API): a paused node is then marked
    down, and this process's deletes for it are queued instead of sent into its socket."""
    cachedecor.get_region().get("probe")
    return {}


def write_and_die(id: int, owner: str, how: str) -> dict[str, Any]:
    """Commit a write, then die without cachedecor's after-commit work or with it lost.

    ``inside-commit``: an ``after_commit`` listener placed ahead of cachedecor's ends the
    process (``os._exit``) once the database has committed, before any delete is sent.
    ``sigkill``: the process is killed with SIGKILL as soon as the commit returns (with
    whatever it could not deliver still in its memory).
    """
    if how == "inside-commit":
        event.listen(Session, "after_commit", lambda session: os._exit(0), insert=True)
    with Session(ENGINE) as session:
        set_owner(session, id, owner)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError(f"unknown way to die: {how!r}")


if __name__ == "__main__":
    serve({"probe": probe, "write": write, "write_and_die": write_and_die})
