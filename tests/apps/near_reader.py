"""A process with a near cache: reads users through a near-cached region, renames them.

Configured from the INI file named by ``CACHEDECOR_CONFIG`` (a region with
``local_entries`` and the top-level ``broadcast_url``), reading the rows of
``tests.models`` from ``APP_DATABASE``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from cachedecor import broadcast, cached_by_pk, invalidates
from tests.apps.serve import engine, serve
from tests.models import User

ENGINE = engine()


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@invalidates(User)
def rename_user(session: Session, user_id: int, name: str) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.name = name
    session.commit()


def _listener() -> dict[str, Any]:
    sender = broadcast.current()
    assert sender is not None, "no broadcast configured"
    return {
        "connected": sender.connected.is_set(),
        "received": sender.received,
        "sent": sender.sent,
        "lost": sender.lost,
    }


def read(id: int) -> dict[str, Any]:
    with Session(ENGINE) as session:
        user = get_user(session, id)
        return {"row": None if user is None else user.name, **_listener()}


def rename(id: int, name: str) -> dict[str, Any]:
    with Session(ENGINE) as session:
        rename_user(session, id, name)
    return _listener()


def wait_connected(timeout: float = 10.0) -> dict[str, Any]:
    """Block until the broadcast listener is connected (or ``timeout`` seconds have passed)."""
    sender = broadcast.current()
    assert sender is not None, "no broadcast configured"
    sender.connected.wait(timeout)
    return _listener()


def status() -> dict[str, Any]:
    return _listener()


if __name__ == "__main__":
    serve({"read": read, "rename": rename, "wait_connected": wait_connected, "status": status})
