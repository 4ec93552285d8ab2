"""Correct wherever it is deployed: processes that import only what they need, two versions.

Every test here starts real interpreters (``python -m tests.apps.<role>``) the way
a web server, a worker, a migration script and the command line start: configured
from an INI file named by ``CACHEDECOR_CONFIG``, importing the models from a real
module, each importing only its own role's functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from pymemcache.client.base import Client
from sqlalchemy.engine import Engine

from tests.apps import accounts_v1, accounts_v2
from tests.servers import Memcached

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "cachedecor")


class App:
    """One process of the application, driven through JSON lines."""

    def __init__(self, role: str, models: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"tests.apps.{role}"],
            cwd=ROOT,
            env={**os.environ, **env, "APP_MODELS": models},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self._answer()
        self.modules: list[str] = hello["modules"]

    def _answer(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the process exited with {self.proc.wait()}")
        return json.loads(line)

    def __call__(self, op: str, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        assert "error" not in answer, answer.get("trace")
        return answer

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def database(pg_engine: Engine) -> Iterator[Engine]:
    """dp_accounts in the test schema, with the columns of the newer version."""
    accounts_v2.Base.metadata.create_all(pg_engine)
    with pg_engine.begin() as conn:
        conn.execute(accounts_v2.Account.__table__.delete())
        conn.execute(
            accounts_v2.Account.__table__.insert(),
            [{"id": i, "owner": f"owner{i}", "balance": 0} for i in range(1, 6)],
        )
    yield pg_engine
    accounts_v2.Base.metadata.drop_all(pg_engine)


@pytest.fixture
def launch(database: Engine, memcached: Memcached, tmp_path: Path) -> Iterator[Any]:
    """Start application processes configured from an INI file, as deployed."""
    ini = tmp_path / "cache.ini"
    ini.write_text(
        "[cachedecor]\nregions = default\n\n[cachedecor.default]\n"
        f"backend = dogpile.cache.pymemcache\narguments.url = {memcached.url}\nexpiration_time = 300\n"
    )
    schema = database.info["schema"]  # type: ignore[attr-defined]
    url = database.url.set(query={"options": f"-csearch_path={schema}"})
    env = {
        "CACHEDECOR_CONFIG": str(ini),
        "APP_DATABASE": url.render_as_string(hide_password=False),
        "PYTHONPATH": str(ROOT),
    }
    started: list[App] = []

    def start(role: str, version: int = 1) -> App:
        app = App(role, f"tests.apps.accounts_v{version}", env)
        started.append(app)
        return app

    start.ini = ini  # type: ignore[attr-defined]
    start.env = env  # type: ignore[attr-defined]
    yield start
    for app in started:
        app.stop()


def cached_keys(memcached: Memcached, *keys: str) -> dict[str, bytes]:
    client = Client(("127.0.0.1", memcached.port), connect_timeout=1, timeout=1)
    try:
        return {k: v for k, v in client.get_many(list(keys)).items() if v}
    finally:
        client.close()


class TestWriterOnlyProcesses:
    def test_a_worker_that_never_imported_the_readers_invalidates_what_the_web_process_reads(
        self, launch: Any, memcached: Memcached
    ) -> None:
        web, worker = launch("reader"), launch("writer")
        assert "tests.apps.reader" not in worker.modules
        assert web("read", id=1)["row"]["owner"] == "owner1"
        assert web("read", id=1)["stats"]["hits"] == 1
        worker("write", id=1, owner="renamed by the worker")
        answer = web("read", id=1)
        assert answer["row"]["owner"] == "renamed by the worker"
        assert answer["stats"]["hits"] == 1  # the second read was a miss: invalidated

    def test_a_script_importing_only_the_models_invalidates_directly(
        self, launch: Any, memcached: Memcached
    ) -> None:
        web, script = launch("reader"), launch("script")
        assert not {"tests.apps.reader", "tests.apps.writer"} & set(script.modules)
        key = web("read", id=2)["key"]
        assert cached_keys(memcached, key)
        script("migrate", id=2, owner="migrated")
        assert not cached_keys(memcached, key)
        assert web("read", id=2)["row"]["owner"] == "migrated"

    def test_the_command_line_invalidates_given_only_the_models_module(
        self, launch: Any, memcached: Memcached, database: Engine
    ) -> None:
        web = launch("reader")
        key = web("read", id=3)["key"]
        with database.begin() as conn:
            conn.execute(
                sqlalchemy.update(accounts_v1.Account.__table__)
                .where(accounts_v1.Account.__table__.c.id == 3)
                .values(owner="changed by hand")
            )
        cli = [CLI, "invalidate", "--config", str(launch.ini)]
        done = subprocess.run(
            [*cli, "tests.apps.accounts_v1:Account", "3"],
            cwd=ROOT,
            env={**os.environ, **launch.env},
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert not cached_keys(memcached, key)
        assert web("read", id=3)["row"]["owner"] == "changed by hand"

    def test_the_command_line_invalidates_every_row_of_a_model(
        self, launch: Any, memcached: Memcached
    ) -> None:
        web = launch("reader")
        keys = [web("read", id=i)["key"] for i in (1, 2, 3)]
        assert len(cached_keys(memcached, *keys)) == 3
        done = subprocess.run(
            [
                CLI,
                "invalidate",
                "--config",
                str(launch.ini),
                "--all",
                "tests.apps.accounts_v2:Account",
            ],
            cwd=ROOT,
            env={**os.environ, **launch.env},
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert cached_keys(memcached, *keys) == {}


class TestRollingDeploy:
    def test_both_versions_use_one_key_per_row(self, launch: Any) -> None:
        old, new = launch("reader", 1), launch("reader", 2)
        assert old("read", id=1)["key"] == new("read", id=1)["key"] == "cachedecor:dp_accounts:1"

    def test_a_write_by_either_version_is_seen_by_both(self, launch: Any) -> None:
        old_web, new_web = launch("reader", 1), launch("reader", 2)
        old_worker, new_worker = launch("writer", 1), launch("writer", 2)
        for web in (old_web, new_web, old_web, new_web):
            assert web("read", id=1)["row"]["owner"] == "owner1"
        new_worker("write", id=1, owner="by v2")
        assert old_web("read", id=1)["row"]["owner"] == "by v2"
        assert new_web("read", id=1)["row"]["owner"] == "by v2"
        old_worker("write", id=1, owner="by v1")
        assert new_web("read", id=1)["row"]["owner"] == "by v1"
        assert old_web("read", id=1)["row"]["owner"] == "by v1"

    def test_an_entry_of_the_other_version_is_a_counted_miss_and_is_replaced(self, launch: Any) -> None:
        old_web, new_web = launch("reader", 1), launch("reader", 2)
        old_web("read", id=4)
        answer = new_web("read", id=4)
        assert answer["row"]["owner"] == "owner4"
        assert answer["stats"]["mismatches"] == 1 and answer["stats"]["hits"] == 0
        assert answer["stats"]["fills"] == 1
        again = new_web("read", id=4)
        assert again["stats"]["hits"] == 1 and again["stats"]["mismatches"] == 1


def test_one_mapping_imported_under_two_module_names_reads_the_other_ones_entries(tmp_path: Path) -> None:
    import importlib.util

    import cachedecor
    from cachedecor.rows import mapping_fingerprint

    spec = importlib.util.spec_from_file_location("legacy_name.accounts", accounts_v1.__file__)
    assert spec is not None and spec.loader is not None
    twin = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = twin  # the mapping resolves its annotations in its module
    try:
        spec.loader.exec_module(twin)
    finally:
        del sys.modules[spec.name]
    assert twin.Account is not accounts_v1.Account
    assert cachedecor.key_for(twin.Account, 7) == cachedecor.key_for(accounts_v1.Account, 7)
    assert mapping_fingerprint(sqlalchemy.inspect(twin.Account)) == mapping_fingerprint(
        sqlalchemy.inspect(accounts_v1.Account)
    )
    assert mapping_fingerprint(sqlalchemy.inspect(accounts_v2.Account)) != mapping_fingerprint(
        sqlalchemy.inspect(accounts_v1.Account)
    )
