"""Example user code that mypy --strict must accept (checked by ``make lint``)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, scoped_session, sessionmaker

import cachedecor
from cachedecor import AsyncCachedFunction, CachedFunction, cached_by_pk, invalidates


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "typing_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


@cached_by_pk(Account, region="default", expiration_time=60)
def get_account(session: Session, account_id: int) -> Account | None:
    return session.get(Account, account_id)


@cached_by_pk(Account, many=True)
def get_accounts(session: Session, account_ids: list[int]) -> list[Account]:
    return list(session.scalars(select(Account).where(Account.id.in_(account_ids))))


@invalidates(Account, pk="account_id")
def rename_account(session: Session, account_id: int, name: str) -> None:
    account = session.get(Account, account_id)
    if account is not None:
        account.name = name
    session.commit()


db_session = scoped_session(sessionmaker())


@cached_by_pk(Account, session=db_session)
def get_account_implicitly(account_id: int) -> Account | None:
    return db_session.get(Account, account_id)


class AccountRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    @cached_by_pk(Account, session="self.session")
    def get(self, account_id: int) -> Account | None:
        return self.session.get(Account, account_id)


def use(session: Session) -> str:
    regions = cachedecor.configure_regions({"regions": {"default": {"backend": "dogpile.cache.memory"}}})
    assert "default" in regions
    account: Account | None = get_account(session, 1)
    accounts: list[Account] = get_accounts(session, [1, 2])
    fn: CachedFunction[Account | None] = get_account
    key: str = fn.cache_key(1) + cachedecor.key_for(Account, 1)
    get_account.invalidate(1)
    cachedecor.invalidate(Account, 1)
    cachedecor.invalidate_many(Account, [1, 2], session=session)
    rename_account(session, 1, "x")
    cachedecor.invalidate_model(Account, session=session)
    cachedecor.invalidate_many(Account, [3], schema="tenant_1")
    implicit: Account | None = get_account_implicitly(1)
    held: Account | None = AccountRepository(session).get(1)
    key += cachedecor.key_for(Account, 1, schema="tenant_1", identity_token=None) + repr((implicit, held))
    hits: int = cachedecor.stats()["default"]["hits"]
    return f"{account} {accounts} {key} {hits}"


@cached_by_pk(Account)
async def aget_account(session: AsyncSession, account_id: int) -> Account | None:
    return await session.get(Account, account_id)


@cached_by_pk(Account, many=True)
async def aget_accounts(session: AsyncSession, account_ids: list[int]) -> list[Account]:
    return list(await session.scalars(select(Account).where(Account.id.in_(account_ids))))


@invalidates(Account)
async def arename_account(session: AsyncSession, account_id: int, name: str) -> None:
    account = await session.get(Account, account_id)
    if account is not None:
        account.name = name
    await session.commit()


async def ause(session: AsyncSession) -> str:
    account: Account | None = await aget_account(session, 1)
    accounts: list[Account] = await aget_accounts(session, [1, 2])
    fn: AsyncCachedFunction[Account | None] = aget_account
    refreshed: Account | None = await fn.refresh(session, 1)
    await aget_account.invalidate(1)
    await arename_account(session, 1, "y")
    await cachedecor.ainvalidate(Account, 1)
    await cachedecor.ainvalidate_many(Account, [1, 2], session=session)
    await cachedecor.ainvalidate_model(Account, session=session)
    return f"{account} {accounts} {refreshed} {aget_account.cache_key(1)}"
