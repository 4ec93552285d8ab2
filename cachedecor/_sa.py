"""What cachedecor takes from SQLAlchemy that a plain install may lack.

``sqlalchemy.ext.asyncio`` needs greenlet. SQLAlchemy 2.0 installed greenlet on
common platforms; 2.1 does not, and importing the extension then raises
``ImportError`` (checked on SQLAlchemy 2.0.0, 2.0.x and 2.1.9). Without greenlet no
``AsyncSession`` can exist, so the sync API needs nothing from the extension:
:data:`ASYNC_SESSION_TYPES` is then empty, and the async API says which extra to
install (:func:`require_asyncio`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, scoped_session, sessionmaker

__all__ = [
    "ASYNCIO_EXTRA",
    "ASYNC_SESSION_TYPES",
    "SESSION_CLASSES",
    "SESSION_FACTORIES",
    "SESSION_TYPES",
    "asyncio_available",
    "require_asyncio",
    "sync_session_of",
]

#: what ``pip install`` needs for the async API
ASYNCIO_EXTRA = "pip install 'cachedecor[asyncio]'"

try:
    from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
except ImportError as exc:  # SQLAlchemy 2.1 without greenlet
    _ASYNC_MISSING: ImportError | None = exc
    ASYNC_SESSION_TYPES: tuple[type[Any], ...] = ()
    SESSION_CLASSES: tuple[type[Any], ...] = (Session,)
    SESSION_FACTORIES: tuple[type[Any], ...] = (sessionmaker,)
else:
    _ASYNC_MISSING = None
    ASYNC_SESSION_TYPES = (AsyncSession, async_scoped_session)
    SESSION_CLASSES = (Session, AsyncSession)
    SESSION_FACTORIES = (sessionmaker, async_sessionmaker)

#: every kind of object that is, or resolves to, a session
SESSION_TYPES: tuple[type[Any], ...] = (Session, scoped_session, *ASYNC_SESSION_TYPES)


def asyncio_available() -> bool:
    """Whether SQLAlchemy's asyncio extension (and so greenlet) can be imported."""
    return _ASYNC_MISSING is None


def require_asyncio(what: str) -> None:
    """Raise an :class:`ImportError` naming the ``asyncio`` extra unless it is installed."""
    if _ASYNC_MISSING is not None:
        raise ImportError(
            f"{what} needs SQLAlchemy's asyncio extension, which needs greenlet: {ASYNCIO_EXTRA} "
            f"({_ASYNC_MISSING})"
        )


def sync_session_of(value: Any) -> Session | None:
    """The ``Session`` an ``AsyncSession`` or ``async_scoped_session`` runs on, else ``None``."""
    if not ASYNC_SESSION_TYPES or not isinstance(value, ASYNC_SESSION_TYPES):
        return None
    if not isinstance(value, AsyncSession):
        value = value()  # an async_scoped_session: its current AsyncSession
    session: Session = value.sync_session
    return session
