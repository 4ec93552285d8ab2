"""The example application behind ``make demo`` / ``cachedecor demo``.

A small user directory on SQLite (or any database URL) with the in-process memory
backend (or a memcached server). It shows misses, hits, invalidation after
commit, a rollback that invalidates nothing, and what a hit saves.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any, TextIO

import sqlalchemy
from sqlalchemy import String, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import cachedecor
from cachedecor import cached_by_pk, invalidates

__all__ = ["run_demo"]


class DemoBase(DeclarativeBase):
    pass


class Person(DemoBase):
    __tablename__ = "cachedecor_demo_people"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200))
    city: Mapped[str] = mapped_column(String(100))


@cached_by_pk(Person, region="demo")
def get_person(session: Session, person_id: int) -> Person | None:
    """Load one person by primary key."""
    return session.get(Person, person_id)


@cached_by_pk(Person, region="demo", many=True)
def get_people(session: Session, person_ids: list[int]) -> list[Person]:
    """Load several people; called with the ids missing from the cache only."""
    return list(session.scalars(select(Person).where(Person.id.in_(person_ids))))


@invalidates(Person)
def rename_person(session: Session, person_id: int, name: str) -> None:
    """Rename a person and commit."""
    person = session.get(Person, person_id)
    assert person is not None
    person.name = name
    session.commit()


@invalidates(Person)
def rename_person_uncommitted(session: Session, person_id: int, name: str) -> None:
    """Rename a person without committing (the caller decides)."""
    person = session.get(Person, person_id)
    assert person is not None
    person.name = name
    session.flush()


class _Statements:
    def __init__(self, engine: sqlalchemy.engine.Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, *args: Any) -> None:
        self.count += 1


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
    """Run the demonstration and print what happens; returns the measured figures."""
    import sys

    stream = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=stream)

    tmpdir = None
    if database is None:
        tmpdir = tempfile.mkdtemp(prefix="cachedecor-demo-")
        database = f"sqlite:///{os.path.join(tmpdir, 'demo.sqlite')}"
    if memcached:
        region = {
            "backend": "cachedecor.pymemcache",
            "expiration_time": 300,
            "arguments": {"url": [memcached]},
        }
    else:
        region = {"backend": "dogpile.cache.memory", "expiration_time": 300}
    cachedecor.configure_regions({"regions": {"demo": region}})
    cachedecor.reset_stats()
    engine = sqlalchemy.create_engine(database)
    DemoBase.metadata.drop_all(engine)
    DemoBase.metadata.create_all(engine)
    sql = _Statements(engine)
    say(f"database: {engine.url.render_as_string(hide_password=True)}")
    say(f"cache:    {region['backend']} {memcached or '(in-process)'}")
    with Session(engine) as s:
        s.add_all(
            Person(id=i, name=f"Person {i}", email=f"p{i}@example.org", city="Lyon")
            for i in range(1, rows + 1)
        )
        s.commit()
    if memcached:
        cachedecor.invalidate_many(Person, range(1, rows + 1))  # leftovers of an earlier run

    def read(person_id: int) -> Person | None:
        with Session(engine) as s:
            return get_person(s, person_id)

    def step(title: str, fn: Callable[[], Any]) -> Any:
        before = sql.count
        result = fn()
        say(f"  {title:<48} -> {result!s:<22} SQL statements: {sql.count - before}")
        return result

    say("\n1. reads")
    step("first read of person 1 (miss)", lambda: read(1).name)  # type: ignore[union-attr]
    step("second read of person 1 (hit)", lambda: read(1).name)  # type: ignore[union-attr]

    say("\n2. a write through @invalidates, committed")
    with Session(engine) as s:
        step("rename person 1 and commit", lambda: rename_person(s, 1, "Ada"))
    step("read person 1 (invalidated: miss)", lambda: read(1).name)  # type: ignore[union-attr]
    step("read person 1 again (hit)", lambda: read(1).name)  # type: ignore[union-attr]

    say("\n3. a write that rolls back invalidates nothing")
    invalidations = cachedecor.stats("demo")["demo"]["invalidations"]
    with Session(engine) as s:
        step("rename person 1, flush, no commit", lambda: rename_person_uncommitted(s, 1, "Grace"))
        step("  same session reads its own write", lambda: get_person(s, 1).name)  # type: ignore[union-attr]
        step("  another session reads the committed row", lambda: read(1).name)  # type: ignore[union-attr]
        s.rollback()
    after = cachedecor.stats("demo")["demo"]["invalidations"]
    say(f"  invalidations before/after the rollback: {invalidations}/{after}")
    step("read person 1 (still a hit)", lambda: read(1).name)  # type: ignore[union-attr]

    say("\n4. many=True: one multi-get, one query for the missing ids")
    with Session(engine) as s:
        step("get_people([1..10]) (1 cached, 9 missing)", lambda: len(get_people(s, list(range(1, 11)))))
    with Session(engine) as s:
        step("get_people([1..10]) again (all hits)", lambda: len(get_people(s, list(range(1, 11)))))

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
    hit_samples: list[float] = []
    db_samples: list[float] = []
    for _ in range(repeat):  # alternate, so both see the same machine state
        hit_samples.append(_median_us(cached_read, 1))
        db_samples.append(_median_us(database_read, 1))
    hit_us = statistics.median(hit_samples)
    db_us = statistics.median(db_samples)
    say(f"  cached read (session + @cached_by_pk hit): {hit_us:8.1f} us")
    say(f"  database read (session + session.get):     {db_us:8.1f} us")
    say(f"  a hit takes {hit_us / db_us:.2f}x the time of a database read")

    say("\n6. region counters")
    for name, value in cachedecor.stats("demo")["demo"].items():
        say(f"  {name:<22} {value}")
    engine.dispose()
    if tmpdir is not None:
        for name in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, name))
        os.rmdir(tmpdir)
    return {"hit_us": hit_us, "db_us": db_us, "stats": cachedecor.stats("demo")["demo"]}
