"""What invalidation adds to a committing transaction on PostgreSQL, with and without the outbox.

Starts its own memcached (``-t 1``), uses PostgreSQL at 127.0.0.1:5432 in a schema
of its own, and times, alternating the variants in one run, a transaction that
updates one row and commits:

* ``plain``: no cachedecor;
* ``@invalidates``: the row's key deleted after the commit (one memcached round trip);
* ``@invalidates + outbox``: also one INSERT into the outbox table inside the
  transaction (the row is removed later, in the background, off the write path).

PostgreSQL runs with ``synchronous_commit = off`` for these connections, so that
the commit's WAL flush (milliseconds, varying with the disk) does not hide the
rest. Prints medians (µs per transaction), and the time of the outbox's own work
inside each transaction (encoding the keys and its ``INSERT``), timed directly.

    python benchmarks/writes.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sqlalchemy
from sqlalchemy import String, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import cachedecor
from cachedecor import _runtime, outbox
from tests.servers import PG_URL, Memcached


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_write_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


@cachedecor.invalidates(Item)
def rename(session: Session, item_id: int, name: str) -> None:
    session.execute(update(Item).where(Item.id == item_id).values(name=name))
    session.commit()


def plain(session: Session, item_id: int, name: str) -> None:
    session.execute(update(Item).where(Item.id == item_id).values(name=name))
    session.commit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--database", default=PG_URL)
    opts = parser.parse_args(argv)
    rounds = 300 if opts.quick else 2000

    schema = f"bench_writes_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(opts.database)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    # synchronous_commit off: a commit does not wait for the WAL flush, whose time
    # (milliseconds, varying with the disk) would hide what is measured here
    url = sqlalchemy.make_url(opts.database).set(
        query={"options": f"-csearch_path={schema} -csynchronous_commit=off"}
    )
    engine = sqlalchemy.create_engine(url)
    memcached = Memcached()
    try:
        Base.metadata.create_all(engine)
        outbox.outbox_table().create(engine)
        with Session(engine) as s:
            s.add_all([Item(id=i, name="x") for i in range(10)])
            s.commit()
        config = {
            "regions": {
                "default": {"backend": "cachedecor.pymemcache", "arguments": {"url": [memcached.url]}}
            },
            "outbox_url": url.render_as_string(hide_password=False),
        }
        cachedecor.configure_regions(config)
        box = outbox.current()
        assert box is not None
        writes: list[float] = []
        write = box.write

        def timed_write(conn: Any, keys: Any) -> Any:  # what the outbox adds inside the transaction
            start = time.perf_counter()
            try:
                return write(conn, keys)
            finally:
                writes.append((time.perf_counter() - start) * 1e6)

        box.write = timed_write  # type: ignore[method-assign]

        def with_outbox(on: bool) -> None:
            _runtime.current_outbox = box if on else None  # the same region, with or without the outbox

        variants: dict[str, Callable[[Session, int], None]] = {
            "plain": lambda s, i: (with_outbox(False), plain(s, i % 10, f"n{i}"))[-1],
            "@invalidates": lambda s, i: (with_outbox(False), rename(s, i % 10, f"n{i}"))[-1],
            "@invalidates + outbox": lambda s, i: (with_outbox(True), rename(s, i % 10, f"n{i}"))[-1],
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        with Session(engine) as session:
            for i in range(rounds + 50):
                for name, run in variants.items():  # alternated: each sees the same machine
                    start = time.perf_counter()
                    run(session, i)
                    elapsed = (time.perf_counter() - start) * 1e6
                    if i >= 50:
                        samples[name].append(elapsed)
        with_outbox(True)
        medians = {name: statistics.median(values) for name, values in samples.items()}
        print(f"committing transaction, PostgreSQL, {rounds} alternated rounds (median µs)")
        for name, value in medians.items():
            print(f"  {name:<24} {value:8.1f}")
        added = medians["@invalidates + outbox"] - medians["@invalidates"]
        print(f"  difference of the medians: {added:+.1f} µs per committing transaction")
        print(
            f"  the outbox's own work inside the transaction (keys to JSON, one INSERT): "
            f"median {statistics.median(writes):.1f} µs, p99 {sorted(writes)[int(len(writes) * 0.99)]:.1f} µs"
        )
        print(f"  outbox rows written {box.written}; pending now {box.status()['pending']}")
    finally:
        cachedecor.reset()
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
        memcached.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
