"""A FastAPI application that reads users through cachedecor, on an asyncio engine.

Users and their posts live in the database. ``GET /users/{user_id}`` is served
from the cache; ``PATCH /users/{user_id}`` changes a user, and the cached row is
deleted once the change has committed, before the response is sent.

Run it with any ASGI server, for example::

    CACHEDECOR_CONFIG=/etc/myapp/cache.ini \\
    DATABASE_URL=postgresql+asyncpg://app@db.internal/app \\
        uvicorn fastapi_app:create_app --factory

The tables are expected to exist (created by the application's migrations, or by
``Base.metadata.create_all``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import cachedecor
from cachedecor import cached_by_pk, invalidates

# -- models ------------------------------------------------------------------------------


class Base(AsyncAttrs, DeclarativeBase):
    """``AsyncAttrs`` gives every instance ``awaitable_attrs``, to load a relationship
    with ``await`` (a plain lazy load cannot run under asyncio)."""


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200), unique=True)
    posts: Mapped[list[Post]] = relationship(back_populates="author", order_by="Post.id")


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    title: Mapped[str] = mapped_column(String(200))
    author: Mapped[User] = relationship(back_populates="posts")


# -- data access -------------------------------------------------------------------------


@cached_by_pk(User)
async def get_user(session: AsyncSession, user_id: int) -> User | None:
    """One user, from the cache when it holds the row."""
    return await session.get(User, user_id)


@cached_by_pk(User, many=True)
async def get_users(session: AsyncSession, user_ids: list[int]) -> list[User]:
    """Several users with one multi-get; called with the ids the cache lacks only."""
    return list(await session.scalars(select(User).where(User.id.in_(user_ids))))


@invalidates(User)
async def update_user(session: AsyncSession, user_id: int, changes: Mapping[str, Any]) -> User | None:
    """Apply ``changes`` to a user and commit.

    The cached row is deleted when ``await session.commit()`` returns; if the
    commit fails, the transaction rolls back and the cache is left as it was.
    """
    user = await session.get(User, user_id)
    if user is None:
        return None
    for field, value in changes.items():
        setattr(user, field, value)
    await session.commit()
    return user


# -- HTTP --------------------------------------------------------------------------------


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    email: str


class PostOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str


class UserWithPosts(UserOut):
    posts: list[PostOut]


class UserPatch(BaseModel):
    name: str | None = None
    email: str | None = None


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, closed (and its transaction rolled back) at the end."""
    async with request.app.state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]

router = APIRouter()


@router.get("/users/{user_id}")
async def show_user(user_id: int, session: SessionDep) -> UserOut:
    user = await get_user(session, user_id)
    if user is None:
        raise HTTPException(status_code=404, detail="no such user")
    return UserOut.model_validate(user)


@router.get("/users")
async def list_users(ids: Annotated[list[int], Query(alias="id")], session: SessionDep) -> list[UserOut]:
    """``GET /users?id=3&id=1``: the users that exist, in the order asked."""
    return [UserOut.model_validate(user) for user in await get_users(session, ids)]


@router.get("/users/{user_id}/posts")
async def show_user_posts(user_id: int, session: SessionDep) -> UserWithPosts:
    user = await get_user(session, user_id)
    if user is None:
        raise HTTPException(status_code=404, detail="no such user")
    # A cached user comes back without its relationships: load them with await,
    # whether the row came from the cache or from the database.
    await user.awaitable_attrs.posts
    return UserWithPosts.model_validate(user)


@router.patch("/users/{user_id}")
async def patch_user(user_id: int, patch: UserPatch, session: SessionDep) -> UserOut:
    try:
        user = await update_user(session, user_id, patch.model_dump(exclude_unset=True))
    except IntegrityError:
        await session.rollback()
        raise HTTPException(status_code=409, detail="that email address is taken") from None
    if user is None:
        raise HTTPException(status_code=404, detail="no such user")
    return UserOut.model_validate(user)


def create_app(
    database_url: str | None = None,
    cache_config: Any = None,
    engine_options: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The application, on the database at ``database_url`` (else ``$DATABASE_URL``).

    ``cache_config`` is what :func:`cachedecor.configure_regions` takes (a dict, or
    the path of an INI file); ``None`` reads the file named by ``CACHEDECOR_CONFIG``.
    ``engine_options`` are passed to ``create_async_engine``.
    """
    url = database_url or os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///example.sqlite")
    engine = create_async_engine(url, **dict(engine_options or {}))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # before the first request: a configuration mistake stops the start-up
        cachedecor.configure_regions(cache_config)
        yield
        await cachedecor.aclose()  # this loop's cache connections
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.state.engine = engine
    # expire_on_commit=False: what a write returns can be read after its commit
    # without a query (an expired attribute would need I/O to load)
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
    app.include_router(router)
    return app
