"""How long a committed change's old row is served after each fault, with and without the outbox.

Runs the faults of ``tests/test_outbox.py`` with real processes (a web reader, a
writer, a fresh reader), on PostgreSQL at 127.0.0.1:5432 (a schema of its own) and
a memcached of its own, once with ``outbox_url`` and once without:

* ``paused node, writer exits``: the node holding the row is paused, the writer
  commits (its delete cannot be sent) and exits; the node is resumed;
* ``writer dies inside its commit``: an ``after_commit`` listener ahead of
  cachedecor's ends the process;
* ``SIGKILL after commit, paused node``: the writer is killed as soon as its
  commit returns, its delete owed to a paused node;
* ``database unreachable for the deliverer`` (outbox only): the web process's
  role cannot log in while the node comes back; then it can again.

For each: the stale window, from the end of the fault to the last read that
returned the old row (watched for up to 5 s: "> 5 s" means it was still stale),
and the number of stale reads.

    python benchmarks/outbox_faults.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sqlalchemy

from cachedecor.outbox import outbox_table
from tests.apps import accounts_v2
from tests.conftest import _drop_pg, _pg_engine
from tests.servers import Memcached
from tests.test_outbox import _TERMINATE, Deployment, _url, watch

WATCH = 5.0


def _schema() -> sqlalchemy.Engine:
    engine = _pg_engine()  # a schema of its own
    accounts_v2.Base.metadata.create_all(engine)
    outbox_table().create(engine)
    return engine


def _reset(engine: sqlalchemy.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(outbox_table().delete())
        conn.execute(accounts_v2.Account.__table__.delete())
        conn.execute(
            accounts_v2.Account.__table__.insert(),
            [{"id": i, "owner": f"owner{i}", "balance": 0} for i in range(1, 6)],
        )


def _window(reader: Any, since: float) -> str:
    try:
        seen = watch(reader, "new", since, quiet=0.3, deadline=WATCH)
    except AssertionError:
        return f"> {WATCH:.0f} s (until it expires)"
    return f"{seen.seconds * 1000:.0f} ms ({seen.stale} stale of {seen.reads} reads)"


def paused_node_writer_exits(d: Deployment) -> str:
    web = d.start("reader")
    web("read", id=1)
    d.memcached.pause()
    writer = d.start("writer")
    writer("probe")  # its breaker marks the paused node down: the delete is queued, not sent
    writer("write", id=1, owner="new")
    writer.stop()
    d.memcached.resume()
    return _window(web, time.monotonic())


def writer_dies_inside_commit(d: Deployment) -> str:
    web = d.start("reader")
    web("read", id=1)
    writer = d.start("writer")
    d.die(writer, "write_and_die", id=1, owner="new", how="inside-commit")
    return _window(web, time.monotonic())


def sigkill_after_commit(d: Deployment) -> str:
    web = d.start("reader")
    web("read", id=1)
    d.memcached.pause()
    writer = d.start("writer")
    writer("probe")
    d.die(writer, "write_and_die", id=1, owner="new", how="sigkill")
    d.memcached.resume()
    return _window(web, time.monotonic())


def database_unreachable(d: Deployment) -> str:
    engine = d.database
    role = f"outbox_faults_{os.getpid()}"
    schema = engine.info["schema"]  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        conn.exec_driver_sql(f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}")
    try:
        web_ini = d.ini.with_name("web.ini")
        web_ini.write_text(d.ini.read_text().replace(d.url, _url(engine, role)))
        web = d.start("reader", CACHEDECOR_CONFIG=str(web_ini))
        web("read", id=1)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER ROLE {role} NOLOGIN")
            conn.exec_driver_sql(_TERMINATE.format(role=role))
        d.memcached.pause()
        writer = d.start("writer")
        writer("probe")
        writer("write", id=1, owner="new")
        writer.stop()
        d.memcached.resume()
        time.sleep(1.0)  # the outage, as the web process sees it: one second more
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER ROLE {role} LOGIN")
        return _window(web, time.monotonic())
    finally:
        d.close()
        with engine.begin() as conn:
            conn.exec_driver_sql(_TERMINATE.format(role=role))
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")


FAULTS = [
    ("paused node, writer exits", paused_node_writer_exits, True),
    ("writer dies inside its commit", writer_dies_inside_commit, True),
    ("SIGKILL after commit, paused node", sigkill_after_commit, True),
    ("database unreachable for the deliverer", database_unreachable, False),
]


def main() -> int:
    engine = _schema()
    rows: list[tuple[str, str, str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, fault, both in FAULTS:
                results = {}
                for durable in (True, False) if both else (True,):
                    _reset(engine)
                    node = Memcached()
                    d = Deployment(engine, node, Path(tmp), durable)
                    try:
                        results[durable] = fault(d)
                    finally:
                        d.close()
                        node.kill()
                rows.append((name, results[True], results.get(False, "(needs the outbox)")))
    finally:
        _drop_pg(engine)
    width = max(len(r[0]) for r in rows)
    print("\nstale window after each fault: from its end to the last read of the old row")
    print(f"{'fault':<{width}}  {'with the outbox':<36}  without")
    for name, with_outbox, without in rows:
        print(f"{name:<{width}}  {with_outbox:<36}  {without}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
