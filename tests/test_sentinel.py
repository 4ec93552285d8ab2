"""Redis Sentinel configured by URL: a real master and sentinel on free ports."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import cached_by_pk
from tests.conftest import SQLCounter
from tests.models import Base, User
from tests.servers import free_port, unavailable, wait_for_port


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[str]:
    """The URL (``redis+sentinel://``) of a sentinel watching a master ``cache``."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    master, watcher = free_port(), free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {watcher}\ndir {tmp_path}\nsentinel monitor cache 127.0.0.1 {master} 1\n"
        "sentinel down-after-milliseconds cache 2000\n"
    )
    procs = [
        subprocess.Popen(
            ["redis-server", "--port", str(master), "--save", "", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen(["redis-server", str(config), "--sentinel"], stdout=subprocess.DEVNULL),
    ]
    try:
        wait_for_port(master)
        wait_for_port(watcher)
        yield f"redis+sentinel://127.0.0.1:{watcher}/cache/0"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def db(tmp_path: Any) -> Iterator[Engine]:
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'sentinel.sqlite'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in (1, 2)])
        s.commit()
    yield engine
    engine.dispose()


def test_a_region_configured_by_sentinel_url_fills_then_hits_through_the_master(
    sentinel: str, db: Engine, tmp_path: Path
) -> None:
    ini = tmp_path / "cache.ini"
    ini.write_text(
        "[cachedecor]\nregions = default\n\n[cachedecor.default]\n"
        "backend = dogpile.cache.redis_sentinel\nexpiration_time = 300\n"
        f"arguments.url = {sentinel}\narguments.socket_timeout = 1\n"
    )
    cachedecor.configure_regions(str(ini))
    sql = SQLCounter(db)
    try:
        for _ in range(3):
            with Session(db) as s:
                user = get_user(s, 1)
                assert user is not None and user.name == "user1"
        assert sql.selects() == 1
    finally:
        sql.close()
    master = cachedecor.get_region("default").actual_backend.writer_client
    assert master.get(get_user.cache_key(1)) is not None
