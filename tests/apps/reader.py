"""A web worker: reads accounts through ``@cached_by_pk``."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from cachedecor import cached_by_pk
from tests.apps.serve import engine, models, serve

Account = models().Account
ENGINE = engine()


@cached_by_pk(Account)
def get_account(session: Session, account_id: int) -> Any:
    return session.get(Account, account_id)


def read(id: int) -> dict[str, Any]:
    with Session(ENGINE) as session:
        account = get_account(session, id)
        if account is None:
            return {"row": None, "key": get_account.cache_key(id)}
        return {"row": {"id": account.id, "owner": account.owner}, "key": get_account.cache_key(id)}


if __name__ == "__main__":
    serve({"read": read})
