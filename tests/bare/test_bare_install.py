"""What ``pip install cachedecor`` gives, with no extra: the sync API, memcached, the dogpile backend.

This module runs only in the virtual environments ``make bare`` builds (``make test``
runs it): cachedecor installed without extras, once on the oldest and once on the
newest versions of its dependencies that ``pyproject.toml`` allows, beside pytest.
It is not collected by the main suite, whose environment has every extra; it runs
with ``--noconftest``, so it needs nothing the main suite's fixtures import.
dogpile.cache's own backend suites for ``cachedecor.pymemcache``
(``tests/test_dogpile_suite.py``) run in the same environments.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from dogpile.cache import make_region
from pymemcache.client.base import Client
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import cachedecor
from cachedecor import cached_by_pk, invalidates
from tests.servers import Memcached

#: the command line installed beside this interpreter
COMMAND = str(Path(sys.executable).with_name("cachedecor"))
#: packages that only extras bring; none may be importable here
EXTRA_PACKAGES = ("redis", "psycopg", "zstandard", "prometheus_client", "opentelemetry")


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@cached_by_pk(Account)
def get_account(session: Session, account_id: int) -> Account | None:
    return session.get(Account, account_id)


@invalidates(Account)
def rename_account(session: Session, account_id: int, name: str) -> None:
    account = session.get(Account, account_id)
    assert account is not None
    account.name = name
    session.commit()


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    cachedecor.reset()
    yield
    cachedecor.reset()


@pytest.fixture(scope="module")
def memcached_server() -> Iterator[Memcached]:
    server = Memcached()  # fails under CI=true when memcached is missing
    yield server
    server.stop()


@pytest.fixture
def memcached(memcached_server: Memcached) -> Memcached:
    """The module's memcached, emptied."""
    Client(("127.0.0.1", memcached_server.port), connect_timeout=1, timeout=1).flush_all(noreply=False)
    return memcached_server


@pytest.fixture
def engine(tmp_path: Path) -> sqlalchemy.engine.Engine:
    made = create_engine(f"sqlite:///{tmp_path / 'bare.sqlite'}")
    Base.metadata.create_all(made)
    with Session(made) as s:
        s.add_all([Account(id=1, name="Ada"), Account(id=2, name="Grace")])
        s.commit()
    return made


def hits() -> int:
    return cachedecor.stats("default")["default"]["hits"]


class TestTheEnvironment:
    def test_no_extra_is_installed(self) -> None:
        present = [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is not None]
        assert present == [], f"not a bare install: {present} importable"

    def test_greenlet_is_there_only_where_sqlalchemy_itself_requires_it(self) -> None:
        requires = importlib.metadata.requires("SQLAlchemy") or []
        pulls_greenlet = any(r.startswith("greenlet") and "extra ==" not in r for r in requires)
        assert (importlib.util.find_spec("greenlet") is not None) == pulls_greenlet


class TestImport:
    def test_import_loads_no_optional_library(self) -> None:
        code = (
            "import sys, cachedecor, cachedecor.backends, cachedecor.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('redis', 'psycopg', 'zstandard', 'prometheus_client', 'opentelemetry') "
            "or m == 'sqlalchemy.ext.asyncio'))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"

    def test_the_command_line_runs(self) -> None:
        out = subprocess.run([COMMAND, "--help"], capture_output=True, text=True, check=True)
        assert "demo" in out.stdout


class TestSyncApi:
    @pytest.mark.parametrize(
        "backend", ["dogpile.cache.memory", "cachedecor.pymemcache", "dogpile.cache.pymemcache"]
    )
    def test_reads_hit_and_commits_invalidate(
        self, backend: str, engine: sqlalchemy.engine.Engine, request: pytest.FixtureRequest
    ) -> None:
        region: dict[str, Any] = {"backend": backend}
        if backend != "dogpile.cache.memory":
            region["arguments"] = {"url": request.getfixturevalue("memcached").url}
        cachedecor.configure_regions({"regions": {"default": region}})
        with Session(engine) as s:
            assert get_account(s, 1).name == "Ada"  # type: ignore[union-attr]
        with Session(engine) as s:
            account = get_account(s, 1)
            assert account is not None and account in s  # a hit, attached
            assert hits() == 1
            rename_account(s, 1, "Ada Lovelace")
        with Session(engine) as s:
            assert get_account(s, 1).name == "Ada Lovelace"  # type: ignore[union-attr]
        assert hits() == 1

    def test_the_demo_runs(self) -> None:
        out = subprocess.run(
            [COMMAND, "demo"],
            capture_output=True,
            text=True,
            env={**os.environ, "CACHEDECOR_CONFIG": ""},
        )
        assert out.returncode == 0, out.stderr
        assert "hit" in out.stdout

    def test_dogpile_finds_the_backend_by_its_entry_point(self, memcached: Memcached) -> None:
        region = make_region().configure("cachedecor.pymemcache", arguments={"url": memcached.url})
        region.set("bare", {"a": 1})
        assert region.get("bare") == {"a": 1}


class TestMissingExtras:
    def test_async_functions_name_the_asyncio_extra(self) -> None:
        def decorate() -> Any:
            @cached_by_pk(Account)
            async def aget_account(session: Any, account_id: int) -> Account | None:
                return await session.get(Account, account_id)

            return aget_account

        if importlib.util.find_spec("greenlet") is None:
            with pytest.raises(
                cachedecor.MissingExtra, match=r"pip install 'cachedecor\[asyncio\]'"
            ) as raised:
                decorate()
            assert isinstance(raised.value, ImportError) and raised.value.extra == "asyncio"
        else:  # SQLAlchemy 2.0 brings greenlet itself: async works without the extra
            assert decorate().__name__ == "aget_account"

    def test_sqlalchemys_greenlet_is_told_apart_from_plain_code(self) -> None:
        # what decides whether an async commit's deletes are awaited or made blocking
        from cachedecor._sa import greenlet_spawn, in_async_greenlet

        assert in_async_greenlet() is False
        if importlib.util.find_spec("greenlet") is not None:

            async def inside() -> bool:
                return bool(await greenlet_spawn(in_async_greenlet))

            assert asyncio.run(inside()) is True

    @pytest.mark.parametrize(
        ("region", "extra"),
        [
            ({"backend": "dogpile.cache.redis", "arguments": {"url": "redis://127.0.0.1:6379/0"}}, "redis"),
            ({"backend": "dogpile.cache.memory", "compression": "zstd", "compress_threshold": 10}, "zstd"),
        ],
    )
    def test_configuring_a_feature_names_its_extra(self, region: dict[str, Any], extra: str) -> None:
        with pytest.raises(cachedecor.MissingExtra, match=rf"pip install 'cachedecor\[{extra}\]'") as raised:
            cachedecor.configure_regions({"regions": {"default": region}})
        assert isinstance(raised.value, ImportError) and raised.value.extra == extra
        assert "default" in str(raised.value)

    @pytest.mark.parametrize(
        ("option", "url", "extra"),
        [
            ("broadcast_url", "redis://127.0.0.1:6379/0", "redis"),
            ("broadcast_url", "postgresql://postgres@127.0.0.1:5432/test", "postgresql"),
        ],
    )
    def test_top_level_options_name_their_extra(self, option: str, url: str, extra: str) -> None:
        source = {"regions": {"default": {"backend": "dogpile.cache.memory"}}, option: url}
        with pytest.raises(cachedecor.MissingExtra, match=rf"pip install 'cachedecor\[{extra}\]'"):
            cachedecor.configure_regions(source)

    def test_metrics_exporters_name_their_extra(self) -> None:
        from cachedecor import metrics

        with pytest.raises(cachedecor.MissingExtra, match=r"pip install 'cachedecor\[prometheus\]'"):
            metrics.register_prometheus()
