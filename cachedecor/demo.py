"""The example application behind ``make demo`` / ``cachedecor demo``.

A small user directory on SQLite (or any database URL) with the in-process memory
backend (or a memcached server). It shows misses, hits, invalidation after
commit, a rollback that invalidates nothing, and what a hit saves.

Every label it prints ("hit", "miss, filled", "cache error") is read from the
region's counters around the call, never assumed: with an unreachable memcached
server the reads say so. On a real database it creates one table of its own, named
``cachedecor_demo_`` plus random hex digits, touches no other table, and drops it
at the end, also when the run fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TextIO

import sqlalchemy
from sqlalchemy import String, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import cachedecor
from cachedecor import cached_by_pk, invalidates
from cachedecor.errors import CacheError

__all__ = ["DemoError", "run_demo"]

REGION = "demo"


class DemoError(CacheError):
    """The demo cannot run with what it was given (database, memcached server)."""


class DemoApp:
    """The demo's model and data-access functions, on a table of its own.

    ``DemoApp("cachedecor_demo_1a2b3c4d")`` maps ``Person`` to that table. What an
    application writes once at import time is built here per run, so that each run
    has its own table name and never meets a table it did not create.
    """

    def __init__(self, table: str) -> None:
        class Base(DeclarativeBase):
            pass

        class Person(Base):
            __tablename__ = table
            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            name: Mapped[str] = mapped_column(String(100))
            email: Mapped[str] = mapped_column(String(200))
            city: Mapped[str] = mapped_column(String(100))

        @cached_by_pk(Person, region=REGION)
        def get_person(session: Session, person_id: int) -> Person | None:
            """Load one person by primary key."""
            return session.get(Person, person_id)

        @cached_by_pk(Person, region=REGION, many=True)
        def get_people(session: Session, person_ids: list[int]) -> list[Person]:
            """Load several people; called with the ids missing from the cache only."""
            return list(session.scalars(select(Person).where(Person.id.in_(person_ids))))

        @invalidates(Person)
        def rename_person(session: Session, person_id: int, name: str, commit: bool = True) -> None:
            """Rename a person and commit; with ``commit=False`` only flush (the caller decides)."""
            person = session.get(Person, person_id)
            assert person is not None
            person.name = name
            if commit:
                session.commit()
            else:
                session.flush()

        self.table = table
        self.metadata = Base.metadata
        self.Person = Person
        self.get_person = get_person
        self.get_people = get_people
        self.rename_person = rename_person


class _Statements:
    def __init__(self, engine: sqlalchemy.engine.Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, *args: Any) -> None:
        self.count += 1


def _counters() -> dict[str, int]:
    return cachedecor.stats(REGION).get(REGION, {})


def what_happened(before: dict[str, int], after: dict[str, int]) -> str:
    """What the counters say a call did: ``"hit"``, ``"miss, filled"``, ``"cache error"``...

    >>> what_happened({"hits": 0}, {"hits": 1})
    'hit'
    >>> what_happened({}, {"misses": 9, "fills": 9, "hits": 1})
    '1 hit, 9 misses, 9 filled'
    >>> what_happened({}, {"misses": 1, "errors": 1})
    'miss, cache error'
    """
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    parts: list[str] = []

    def count(name: str, one: str, many: str, alone: str) -> None:
        n = delta.get(name, 0)
        if n:
            several = sum(delta.get(k, 0) for k in ("hits", "misses", "bypasses")) > 1
            parts.append(f"{n} {one if n == 1 else many}" if several else alone)

    count("hits", "hit", "hits", "hit")
    count("misses", "miss", "misses", "miss")
    count("bypasses", "bypass", "bypasses", "bypassed: own uncommitted write")
    count("fills", "filled", "filled", "filled")
    count("lease_losses", "fill refused", "fills refused", "fill refused")
    count("invalidations", "key invalidated", "keys invalidated", "1 key invalidated")
    if delta.get("errors", 0):
        parts.append("cache error")
    return ", ".join(parts) or "cache not used"


def _median_us(fn: Callable[[], Any], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def run_demo(
    database: str | None = None,
    memcached: str | None = None,
    rows: int = 100,
    repeat: int = 300,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run the demonstration and print what happens; returns the measured figures.

    :raises DemoError: when the database or the memcached server cannot be used.
    """
    stream = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=stream)

    if rows < 11:
        raise DemoError(f"the demo needs at least 11 rows, got {rows}")
    if memcached:
        region = {
            "backend": "cachedecor.pymemcache",
            "expiration_time": 300,
            "arguments": {"url": [memcached]},
        }
    else:
        region = {"backend": "dogpile.cache.memory", "expiration_time": 300}
    try:
        cachedecor.configure_regions({"regions": {REGION: region}})
    except cachedecor.ConfigError as exc:
        raise DemoError(f"--memcached {memcached}: {exc}") from None
    cachedecor.reset_stats()

    tmpdir = None
    if database is None:
        tmpdir = tempfile.mkdtemp(prefix="cachedecor-demo-")
        database = f"sqlite:///{os.path.join(tmpdir, 'demo.sqlite')}"
    app = DemoApp(f"cachedecor_demo_{secrets.token_hex(4)}")
    try:
        engine = sqlalchemy.create_engine(database)
    except Exception as exc:
        raise DemoError(f"--database: {exc}") from None
    try:
        try:
            app.metadata.create_all(engine)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise DemoError(f"cannot create the demo's table: {str(exc).splitlines()[0]}") from None
        try:
            return _run(app, engine, region, memcached, rows, repeat, say)
        finally:
            app.metadata.drop_all(engine)
            say(f"\ndropped table {app.table}")
    finally:
        engine.dispose()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _run(
    app: DemoApp,
    engine: sqlalchemy.engine.Engine,
    region: dict[str, Any],
    memcached: str | None,
    rows: int,
    repeat: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    Person, get_person, get_people = app.Person, app.get_person, app.get_people  # noqa: N806
    sql = _Statements(engine)
    say(f"database: {engine.url.render_as_string(hide_password=True)}")
    say(
        f"          table {app.table}, created for this run and dropped at the end; no other table is touched"
    )
    say(f"cache:    {region['backend']} {memcached or '(in-process)'}")
    with Session(engine) as s:
        s.add_all(
            Person(id=i, name=f"Person {i}", email=f"p{i}@example.org", city="Lyon")
            for i in range(1, rows + 1)
        )
        s.commit()

    def read(person_id: int) -> str:
        with Session(engine) as s:
            person = get_person(s, person_id)
            return person.name if person is not None else "(none)"

    def step(title: str, fn: Callable[[], Any]) -> Any:
        before, statements = _counters(), sql.count
        result = fn()
        label = what_happened(before, _counters())
        say(f"  {title:<44} -> {result!s:<12} [{label}]  SQL statements: {sql.count - statements}")
        return result

    say("\n1. reads")
    step("read person 1", lambda: read(1))
    step("read person 1 again", lambda: read(1))

    say("\n2. a write through @invalidates, committed")
    with Session(engine) as s:
        step("rename person 1 and commit", lambda: app.rename_person(s, 1, "Ada"))
    step("read person 1", lambda: read(1))
    step("read person 1 again", lambda: read(1))

    say("\n3. a write that rolls back invalidates nothing")
    invalidations = _counters()["invalidations"]
    with Session(engine) as s:
        step("rename person 1, flush, no commit", lambda: app.rename_person(s, 1, "Grace", commit=False))
        step("  same session reads its own write", lambda: get_person(s, 1).name)  # type: ignore[union-attr]
        step("  another session reads the committed row", lambda: read(1))
        s.rollback()
    say(f"  invalidations before/after the rollback: {invalidations}/{_counters()['invalidations']}")
    step("read person 1", lambda: read(1))

    say("\n4. many=True: one multi-get, one query for the missing ids")
    with Session(engine) as s:
        step("get_people([1..10])", lambda: len(get_people(s, list(range(1, 11)))))
    with Session(engine) as s:
        step("get_people([1..10]) again", lambda: len(get_people(s, list(range(1, 11)))))

    say(f"\n5. what a hit costs against a database read (median of {repeat})")
    for i in range(2, 12):
        read(i)

    def cached_read() -> None:
        with Session(engine) as s:
            get_person(s, 5)

    def database_read() -> None:
        with Session(engine) as s:
            s.get(Person, 5)

    for _ in range(20):  # warm-up
        cached_read()
        database_read()
    hits_before = _counters()["hits"]
    hit_samples: list[float] = []
    db_samples: list[float] = []
    for _ in range(repeat):  # alternate, so both see the same machine state
        hit_samples.append(_median_us(cached_read, 1))
        db_samples.append(_median_us(database_read, 1))
    hits = _counters()["hits"] - hits_before
    hit_us = statistics.median(hit_samples)
    db_us = statistics.median(db_samples)
    say(f"  read through @cached_by_pk ({hits} of {repeat} hits): {hit_us:8.1f} us")
    say(f"  database read (session + session.get):  {db_us:8.1f} us")
    if hits == repeat:
        say(f"  a hit takes {hit_us / db_us:.2f}x the time of a database read")
    else:
        say("  not every read was a hit, so this is not the cost of a hit (see the counters)")

    say("\n6. region counters")
    final = _counters()
    for name, value in final.items():
        say(f"  {name:<22} {value}")
    if final["errors"]:
        say(f"\nthe cache failed {final['errors']} time(s) (see the log): those calls read the database")
    return {"hit_us": hit_us, "db_us": db_us, "hits_timed": hits, "stats": final, "table": app.table}
