"""memcached over TLS: sync and async callers (async ones through the sync client in threads).

A real memcached started with TLS (``-Z``) and a certificate made for the test.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import cached_by_pk, invalidates
from tests.models import User
from tests.servers import Memcached, unavailable


@pytest.fixture
def tls_memcached(tmp_path: Path) -> Iterator[tuple[Memcached, ssl.SSLContext]]:
    if shutil.which("openssl") is None:
        unavailable("openssl is needed to make the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server = Memcached(extra=["-Z", "-o", f"ssl_chain_cert={cert},ssl_key={key}"])
    context = ssl.create_default_context(cafile=str(cert))
    yield server, context
    server.kill()


@pytest.fixture
def tls_region(tls_memcached: tuple[Memcached, ssl.SSLContext], sqlite_engine: Engine) -> Engine:
    server, context = tls_memcached
    cachedecor.configure_regions(
        {
            "regions": {
                "default": {
                    "backend": "cachedecor.pymemcache",
                    "arguments": {
                        "url": [server.url],
                        "tls_context": context,
                        "timeout": 1,
                        "connect_timeout": 1,
                    },
                }
            }
        }
    )
    with Session(sqlite_engine) as s:
        s.add(User(id=1, name="user1", version=0, bio=""))
        s.commit()
    return sqlite_engine


@cached_by_pk(User)
async def aget_user(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


@invalidates(User)
async def arename(session: AsyncSession, user_id: int, name: str) -> None:
    (await session.get(User, user_id)).name = name  # type: ignore[union-attr]
    await session.commit()


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


def test_async_callers_read_fill_and_invalidate_over_tls(tls_region: Engine) -> None:
    engine = create_async_engine(tls_region.url.set(drivername="sqlite+aiosqlite"))

    async def scenario() -> list[str]:
        names = []
        for _ in range(2):
            async with AsyncSession(engine) as s:
                names.append((await aget_user(s, 1)).name)  # type: ignore[union-attr]
        async with AsyncSession(engine) as s:
            await arename(s, 1, "Ada")
        async with AsyncSession(engine) as s:
            names.append((await aget_user(s, 1)).name)  # type: ignore[union-attr]
        await cachedecor.aclose()
        await engine.dispose()
        return names

    assert asyncio.run(scenario()) == ["user1", "user1", "Ada"]
    counters = cachedecor.stats()["default"]
    assert (counters["hits"], counters["fills"], counters["invalidations"], counters["errors"]) == (
        1,
        2,
        1,
        0,
    )


def test_sync_and_async_callers_share_entries_over_tls(tls_region: Engine) -> None:
    with Session(tls_region) as s:
        assert get_user(s, 1).name == "user1"  # type: ignore[union-attr]
    with Session(tls_region) as s:
        s.execute(update(User).values(name="behind"))
        s.commit()
    engine = create_async_engine(tls_region.url.set(drivername="sqlite+aiosqlite"))

    async def read() -> str:
        async with AsyncSession(engine) as s:
            name = (await aget_user(s, 1)).name  # type: ignore[union-attr]
        await engine.dispose()
        return name

    assert asyncio.run(read()) == "user1"  # the sync caller's entry
    assert cachedecor.stats()["default"]["hits"] == 1
