"""A background worker that only writes: it never imports the readers."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

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


if __name__ == "__main__":
    serve({"write": write})
