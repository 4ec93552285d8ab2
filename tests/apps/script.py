"""A migration or cron script: models only, no decorated function at all."""

from __future__ import annotations

from typing import Any

import sqlalchemy

import cachedecor
from tests.apps.serve import engine, models, serve

Account = models().Account
ENGINE = engine()


def migrate(id: int, owner: str) -> dict[str, Any]:
    """A raw UPDATE, then the direct invalidation a script would call."""
    with ENGINE.begin() as conn:
        conn.execute(
            sqlalchemy.update(Account.__table__).where(Account.__table__.c.id == id).values(owner=owner)
        )
    cachedecor.invalidate(Account, id)
    return {}


if __name__ == "__main__":
    serve({"migrate": migrate})
