"""Changing a memcached pool's servers while processes restart one by one (docs/scaling.rst).

End to end: real memcached servers, real PostgreSQL, and each application process a
separate interpreter (``python -m tests.apps.worker``) configured from its own INI file,
reading through ``@cached_by_pk`` and writing through ``@invalidates``. The purge of
step 2 runs through the installed ``cachedecor`` command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from cachedecor.backends.memcached.cluster import RendezvousPlacement
from tests.apps import accounts_v1
from tests.servers import Memcached
from tests.test_deploy import CLI, ROOT, App

PROCESSES = 3
CANDIDATES = range(1, 401)


class Worker(App):
    """One application process on its own configuration, driven through JSON lines.

    The process starts when the object is made; it is waited for on the first command, so
    a roll can start the next processes while the current ones serve (an idle process does
    not touch the cache).
    """

    def __init__(self, ini: Path, env: dict[str, str]) -> None:
        self.ini = ini
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.apps.worker"],
            cwd=ROOT,
            env={**os.environ, **env, "CACHEDECOR_CONFIG": str(ini)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = False

    def __call__(self, op: str, **kwargs: Any) -> Any:
        if not self.ready:
            self._answer()
            self.ready = True
        return super().__call__(op, **kwargs)


class Deployment:
    """Processes restarted one at a time on a new configuration, with traffic after each.

    ``database`` holds the last committed owner of each row, so every read can be
    compared with it: a read returning anything else is a stale read.
    """

    def __init__(self, engine: Engine, tmp_path: Path, url: list[str]) -> None:
        schema = engine.info["schema"]  # type: ignore[attr-defined]
        database_url = engine.url.set(query={"options": f"-csearch_path={schema}"})
        self.env = {
            "APP_MODELS": "tests.apps.accounts_v1",
            "APP_DATABASE": database_url.render_as_string(hide_password=False),
            "PYTHONPATH": str(ROOT),
        }
        self.tmp_path = tmp_path
        self.configs = 0
        self.started: list[Worker] = []
        self.processes = [self.spawn(url) for _ in range(PROCESSES)]
        self.rows: list[int] = []
        self.hot: list[int] = []
        self.database: dict[int, str] = {}
        self.writes = 0
        self.stale_reads = 0
        self.hits = 0  # the most cache hits one process reported: reads do hit the cache

    def config(self, url: list[str], **arguments: str) -> Path:
        """A new INI file, as a deploy would ship one."""
        self.configs += 1
        path = self.tmp_path / f"cache{self.configs}.ini"
        lines = [
            "[cachedecor]",
            "regions = default",
            "default.backend = cachedecor.pymemcache",
            f"default.arguments.url = {', '.join(url)}",
            "default.expiration_time = 300",
            *(f"default.arguments.{k} = {v}" for k, v in arguments.items()),
        ]
        path.write_text("\n".join(lines) + "\n")
        return path

    def spawn(self, url: list[str], **arguments: str) -> Worker:
        worker = Worker(self.config(url, **arguments), self.env)
        self.started.append(worker)
        return worker

    def read_all(self, process: Worker) -> int:
        """``process`` reads every row; the number of its reads that were stale."""
        answer = process("read_many", ids=self.rows)
        self.hits = max(self.hits, answer["stats"].get("hits", 0))
        return sum(owner != self.database[id] for id, owner in zip(self.rows, answer["owners"], strict=True))

    def write(self, process: Worker, ids: list[int]) -> None:
        self.writes += 1
        owners = {id: f"owner{id}-w{self.writes}" for id in ids}
        process("write_many", owners=owners)
        self.database.update(owners)

    def traffic(self, writer: Worker) -> None:
        """Every process reads every row (filling its owners), ``writer`` rewrites every hot
        row, then every process reads every row again, counting stale reads."""
        for process in self.processes:
            self.stale_reads += self.read_all(process)
        self.write(writer, self.hot)
        for process in self.processes:
            self.stale_reads += self.read_all(process)

    def roll(self, url: list[str], **arguments: str) -> None:
        """Restart every process on the new configuration, one at a time; after each
        restart a process not yet restarted writes (the last restart: the restarted one)."""
        replacements = [self.spawn(url, **arguments) for _ in self.processes]
        for i, replacement in enumerate(replacements):
            self.processes[i].stop()
            self.processes[i] = replacement
            self.traffic(writer=self.processes[(i + 1) % len(self.processes)])

    def purge(self, url: list[str], **arguments: str) -> None:
        """Step 2, through the command line with the configuration of step 1."""
        done = subprocess.run(
            [CLI, "servers", "purge", "--config", str(self.config(url, **arguments))],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("region default: deleted ")

    def change(self, old: list[str], new: list[str], *, purge: bool = True) -> None:
        """The four steps of docs/scaling.rst, from the list ``old`` to the list ``new``."""
        self.roll(old, also_invalidate_url=", ".join(new))
        if purge:
            self.purge(old, also_invalidate_url=", ".join(new))
            self.traffic(writer=self.processes[0])
        self.roll(new, also_invalidate_url=", ".join(old))
        self.roll(new)

    @property
    def cold(self) -> list[int]:
        return [id for id in self.rows if id not in self.hot]

    def stale_at_rest(self) -> int:
        """With no write left to come, every process reads every row once more."""
        return sum(self.read_all(process) for process in self.processes)

    def stop(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def pool(memcached_factory: Any) -> list[str]:
    """Five memcached servers: the pool grows from the first four to all five."""
    servers: list[Memcached] = [memcached_factory() for _ in range(5)]
    return [server.url for server in servers]


@pytest.fixture
def deployment(pg_engine: Engine, pool: list[str], tmp_path: Path) -> Iterator[Deployment]:
    """Processes on the first four servers, over dp_accounts rows: 32 hot rows, rewritten
    after every restart, and 8 cold rows, written only when a test says; in each, a
    quarter are rows the fifth server owns once it joins."""
    accounts_v1.Base.metadata.create_all(pg_engine)
    deployment = Deployment(pg_engine, tmp_path, pool[:4])
    try:
        keys = dict(
            zip(CANDIDATES, deployment.processes[0]("keys", ids=list(CANDIDATES))["keys"], strict=True)
        )
        old, new = RendezvousPlacement(pool[:4]), RendezvousPlacement(pool)
        moved = [id for id, key in keys.items() if old.node_for(key) != new.node_for(key)]
        stayed = [id for id in keys if id not in moved]
        deployment.hot = sorted(moved[:8] + stayed[:24])
        deployment.rows = sorted(deployment.hot + moved[8:10] + stayed[24:30])
        deployment.database = {id: f"owner{id}" for id in deployment.rows}
        with pg_engine.begin() as conn:
            conn.execute(accounts_v1.Account.__table__.delete())
            conn.execute(
                accounts_v1.Account.__table__.insert(),
                [{"id": id, "owner": owner, "balance": 0} for id, owner in deployment.database.items()],
            )
        yield deployment
    finally:
        deployment.stop()
        accounts_v1.Base.metadata.drop_all(pg_engine)


def test_growing_and_shrinking_the_pool_by_the_procedure_serves_nothing_stale(
    deployment: Deployment, pool: list[str]
) -> None:
    deployment.traffic(writer=deployment.processes[0])
    deployment.change(pool[:4], pool)
    grown = (deployment.stale_reads, deployment.stale_at_rest())
    # the cold rows change once on five servers: their entries filled on four stay behind
    deployment.write(deployment.processes[0], deployment.cold)
    deployment.change(pool, pool[:4])
    assert (grown, deployment.stale_reads, deployment.stale_at_rest()) == ((0, 0), 0, 0)
    assert deployment.hits > 0


def test_changing_the_url_directly_serves_stale_rows(deployment: Deployment, pool: list[str]) -> None:
    deployment.traffic(writer=deployment.processes[0])
    # the first restarted process fills the fifth server; a process on four servers
    # rewrites the rows, deleting on the old owners only; the first reads them again
    deployment.roll(pool)
    grown = deployment.stale_reads
    deployment.roll(pool[:4])
    assert grown > 0
    assert deployment.stale_reads > grown


def test_skipping_the_purge_serves_what_an_earlier_list_left_behind(
    deployment: Deployment, pool: list[str]
) -> None:
    deployment.traffic(writer=deployment.processes[0])
    deployment.change(pool[:4], pool)
    # a cold row that moved to the fifth server changes there; its entry from before the
    # growth stays on its owner among the four, which the shrink gives it back
    deployment.write(deployment.processes[0], deployment.cold)
    deployment.change(pool, pool[:4], purge=False)
    assert deployment.stale_reads > 0
