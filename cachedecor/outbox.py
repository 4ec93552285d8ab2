"""Durable invalidation: a transactional outbox of the keys a commit must delete.

Without it, the keys a transaction must invalidate live in the memory of the
process that committed: a writer that dies between its commit and its deletes,
or that exits while a cache node is unreachable, loses them, and the entries stay
stale until they expire.

With ``outbox_url`` configured, the writing session inserts **one row** holding
every key (in every region) that its transaction must delete into the outbox table,
in that transaction, just before it commits: the row commits or rolls back with the
change. After the commit the writer deletes the keys as before; when every delete
was delivered the row is removed (by this process's background thread, in
batches, off the write path). What could not be delivered stays in the table.

Every process configured with the outbox runs a *deliverer*: a daemon thread that
every ``outbox_interval`` seconds claims the rows older than ``outbox_grace``
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so that two processes never fight over a
row), deletes their keys on every node whatever the circuit breaker says, and
removes the rows it delivered. A row left by a writer that died is delivered within
``outbox_grace + outbox_interval`` plus the deletes' round trips; a row whose node
was unreachable, within ``outbox_interval`` plus ``timeout`` of the node being
reachable again. ``cachedecor outbox deliver`` does the same from the command line.

Sessions whose transaction holds no connection to the outbox's database (another
database, or no write on it) keep the in-process queue. Writes outside any
session's transaction (plain connections) are delivered at once, as before.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy
from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, Table, Text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from cachedecor import _runtime
from cachedecor._sa import root_connections, same_database
from cachedecor.backends.base import register_fork_aware
from cachedecor.errors import ConfigError
from cachedecor.keys import Plan, decode_plan, encode_plan
from cachedecor.stats import log_failure

__all__ = [
    "DEFAULT_TABLE",
    "Outbox",
    "OutboxSettings",
    "activate",
    "current",
    "outbox_table",
    "prepare",
]

log = logging.getLogger("cachedecor")

#: The outbox table's default name.
DEFAULT_TABLE = "cachedecor_outbox"
#: Rows claimed by one round of the deliverer.
BATCH = 200
#: What the role of ``outbox_url`` needs on the table: writers insert, the deliverer claims,
#: counts its attempts and removes rows.
_DELIVERER_PRIVILEGES = ("INSERT", "SELECT", "UPDATE", "DELETE")
_CURRENT_USER: Any = sqlalchemy.literal_column("current_user")
#: the role of a pooled connection, in its ``info`` (kept as long as the connection)
_ROLE = "cachedecor.outbox_role"


@dataclass(frozen=True)
class OutboxSettings:
    """The top-level ``outbox_*`` options."""

    url: Any  # sqlalchemy.URL
    table: str = "cachedecor_outbox"
    schema: str | None = None
    interval: float = 0.1
    grace: float = 0.25


def outbox_table(
    metadata: MetaData | None = None, name: str = DEFAULT_TABLE, schema: str | None = None
) -> Table:
    """The outbox table, in ``metadata`` (a new ``MetaData`` when ``None``).

    Add it to your application's metadata to create it with the rest of the schema
    (``metadata.create_all``, an Alembic migration), or run ``cachedecor outbox
    create``. Columns: ``id`` (a random 63-bit key chosen by the writer),
    ``created_at`` (seconds since the epoch, the database's clock), ``attempts``
    (failed deliveries) and ``payload`` (the keys, as JSON).

    >>> t = outbox_table()
    >>> [c.name for c in t.columns]
    ['id', 'created_at', 'attempts', 'payload']
    """
    metadata = MetaData() if metadata is None else metadata
    return Table(
        name,
        metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=False),
        Column("created_at", Float, nullable=False, index=True),
        Column("attempts", Integer, nullable=False, default=0),
        Column("payload", Text, nullable=False),
        schema=schema,
    )


# --------------------------------------------------------------------------------------
# the outbox of this process


def _epoch(dialect: Any) -> Any:
    """SQL for the database's current time in seconds since the epoch (``None``: unknown)."""
    name = dialect.name
    if name == "postgresql":
        return sqlalchemy.literal_column("extract(epoch from clock_timestamp())")
    if name == "sqlite":
        return sqlalchemy.literal_column("((julianday('now') - 2440587.5) * 86400.0)")
    if name in ("mysql", "mariadb"):
        return sqlalchemy.literal_column("unix_timestamp(now(6))")
    return None


def _sync_url(url: sqlalchemy.URL) -> sqlalchemy.URL:
    """``url`` with a blocking driver, for the deliverer's thread."""
    drivers = {
        "asyncpg": "psycopg",
        "psycopg_async": "psycopg",
        "aiosqlite": "pysqlite",
        "aiomysql": "pymysql",
    }
    driver = url.get_driver_name()
    if driver in drivers:
        return url.set(drivername=f"{url.get_backend_name()}+{drivers[driver]}")
    return url


class Outbox:
    """This process's outbox: writes rows in transactions, delivers and removes them."""

    def __init__(self, settings: OutboxSettings, deliver: Callable[[Plan], bool]) -> None:
        self.settings = settings
        self._deliver = deliver
        self.table = outbox_table(name=settings.table, schema=settings.schema)
        self.engine: Engine = sqlalchemy.create_engine(
            _sync_url(settings.url), pool_size=1, max_overflow=1, pool_pre_ping=True
        )
        self._checked: dict[Any, bool] = {}  # engine url -> the table exists there
        # (database, role) -> the role may insert into the table (PostgreSQL); see _may_insert
        self._may: dict[tuple[Any, str], bool] = {}
        self._inserts: dict[str, Any] = {}  # dialect name -> the INSERT statement, built once
        self._done: list[int] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.written = 0
        self.pending = 0
        self.errors = 0
        register_fork_aware(self)

    # -- lifecycle -----------------------------------------------------------------------

    def check(self) -> None:
        """Verify the table exists, when the database can be reached.

        :raises ConfigError: the table is missing (naming it and how to create it).
        Unreachable: logged; checked again at the first write.
        """
        missing: list[str] = []
        role = ""
        try:
            with self.engine.connect() as conn:
                exists = sqlalchemy.inspect(conn).has_table(self.settings.table, schema=self.settings.schema)
                if exists and conn.dialect.name == "postgresql":
                    role, *granted = conn.execute(
                        sqlalchemy.select(
                            _CURRENT_USER,
                            *(self._privilege(conn, p) for p in _DELIVERER_PRIVILEGES),
                        )
                    ).one()
                    missing = [p for p, ok in zip(_DELIVERER_PRIVILEGES, granted, strict=True) if not ok]
        except Exception as exc:
            log.warning(
                "outbox_url: cannot reach %s to check the outbox table (%s); checked at the first write",
                self.settings.url.render_as_string(hide_password=True),
                exc,
            )
            return
        if not exists:
            raise ConfigError(self._missing())
        if missing:
            raise ConfigError(
                f"outbox_url: its role {role!r} lacks the {', '.join(missing)} privilege(s) on the outbox "
                f"table {self._name()!r} ({self.settings.url.render_as_string(hide_password=True)}): its "
                f"writers insert into it and its deliverer reads, updates and deletes its rows; "
                f"GRANT {', '.join(_DELIVERER_PRIVILEGES)} ON {self._name()} TO {role}"
            )
        url_key = self._url_key(self.settings.url)
        self._checked[url_key] = True
        if role:
            self._may[(url_key, role)] = True

    def _name(self) -> str:
        settings = self.settings
        return f"{settings.schema}.{settings.table}" if settings.schema else settings.table

    def _privilege(self, conn: Connection, privilege: str) -> Any:
        """SQL: whether ``current_user`` has ``privilege`` on the table (PostgreSQL)."""
        name = conn.dialect.identifier_preparer.format_table(self.table)
        return sqlalchemy.func.has_table_privilege(_CURRENT_USER, name, privilege)

    def _may_insert(self, conn: Connection, url_key: Any) -> bool:
        """Whether the role of ``conn`` (a session's, in its transaction) may insert into the
        table, asked before the insert: on PostgreSQL a refused insert aborts the whole
        transaction, the user's commit with it.

        Asked once per (database, role) and remembered; the role is that of the physical
        connection (``current_user``), asked once per connection and kept with it in the
        pool. A commit after the first on a connection costs two dictionary look-ups:
        measured here (loopback PostgreSQL 15, psycopg 3), a write transaction with the
        outbox row takes a median 550-700 us; asking on each commit would add 30-150 us
        (one round trip), and a SAVEPOINT around the insert 250-400 us (two).
        """
        info = conn.connection.info
        role: str | None = info.get(_ROLE)
        known = self._may.get((url_key, role)) if role is not None else None
        if known is not None:
            return known
        role, known = conn.execute(sqlalchemy.select(_CURRENT_USER, self._privilege(conn, "INSERT"))).one()
        info[_ROLE] = role
        self._may[(url_key, role)] = bool(known)
        if not known:
            log.error(
                "outbox: role %r (a session's connection to %s) lacks the INSERT privilege on the "
                "outbox table %r; its transactions' invalidations are delivered after commit without "
                "the outbox (not durable). GRANT INSERT ON %s TO %s",
                role,
                conn.engine.url.render_as_string(hide_password=True),
                self._name(),
                self._name(),
                role,
            )
        return bool(known)

    def _missing(self) -> str:
        table = self._name()
        return (
            f"outbox_table: the table {table!r} does not exist in the database of outbox_url "
            f"({self.settings.url.render_as_string(hide_password=True)}); create it with "
            f"'cachedecor outbox create' or add cachedecor.outbox_table(metadata) to your schema"
        )

    @staticmethod
    def _url_key(url: sqlalchemy.URL) -> Any:
        return (url.get_backend_name(), url.host, url.port, url.database)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="cachedecor-outbox", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        self._thread = None
        self.engine.dispose()

    def _after_fork_in_child(self) -> None:
        # the parent's thread does not exist here, and its connections are the parent's
        self.engine.dispose(close=False)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._done = []
        self._thread = None
        if _runtime.current_outbox is self:
            self.start()

    # -- the write path (inside the writing transaction) ---------------------------------

    def connection_for(self, session: Session) -> Connection | None:
        """The connection of ``session``'s transaction to the outbox's database, if any."""
        for conn in connections(session):
            if same_database(conn.engine.url, self.settings.url):
                return conn
        return None

    def write(self, conn: Connection, keys: Plan) -> int | None:
        """Insert one row holding ``keys`` on ``conn`` (in the transaction); its id, or
        ``None`` if the table is missing there or the role of ``conn`` may not insert into it
        (logged: the caller keeps the in-process way)."""
        url_key = self._url_key(conn.engine.url)
        known = self._checked.get(url_key)
        if known is None:
            known = self._checked[url_key] = sqlalchemy.inspect(conn).has_table(
                self.settings.table, schema=self.settings.schema
            )
            if not known:
                log.error("%s; invalidations are kept in memory until it exists", self._missing())
        if not known:
            return None
        if conn.dialect.name == "postgresql" and not self._may_insert(conn, url_key):
            return None  # logged: the caller keeps the in-process way
        row_id = secrets.randbits(63)
        params: dict[str, Any] = {"id": row_id, "payload": encode_plan(keys)}
        insert = self._inserts.get(conn.dialect.name)
        if insert is None:
            now = _epoch(conn.dialect)
            clock = now if now is not None else sqlalchemy.bindparam("created_at", type_=Float)
            insert = self._inserts[conn.dialect.name] = self.table.insert().values(
                id=sqlalchemy.bindparam("id"),
                created_at=clock,
                attempts=0,
                payload=sqlalchemy.bindparam("payload"),
            )
        if _epoch(conn.dialect) is None:
            params["created_at"] = time.time()
        conn.execute(insert, params)
        self.written += 1
        return row_id

    def done(self, row_id: int) -> None:
        """The keys of row ``row_id`` were delivered: remove it (in the background)."""
        with self._lock:
            self._done.append(row_id)
        self._wake.set()

    # -- the deliverer -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.remove_done()
                self.deliver_pending()
            except Exception as exc:
                self.errors += 1
                log_failure("outbox", "delivering pending invalidations", exc)

    def remove_done(self) -> None:
        with self._lock:
            ids, self._done = self._done, []
        if not ids:
            return
        try:
            with self.engine.begin() as conn:
                for start in range(0, len(ids), 500):
                    conn.execute(self.table.delete().where(self.table.c.id.in_(ids[start : start + 500])))
        except Exception:
            with self._lock:
                self._done[:0] = ids  # again next round (the rows may be delivered twice: harmless)
            raise

    def deliver_pending(self, *, grace: float | None = None) -> tuple[int, int]:
        """Claim and deliver the rows older than ``grace`` (default: ``outbox_grace``).

        Returns (rows delivered, rows left). Deletes are idempotent: a row delivered
        twice (by its writer and by a deliverer) costs a second delete, nothing else.
        """
        grace = self.settings.grace if grace is None else grace
        table = self.table
        delivered = left = 0
        with self.engine.begin() as conn:
            now = _epoch(conn.dialect)
            cutoff = (now if now is not None else sqlalchemy.literal(time.time())) - grace
            query = (
                sqlalchemy.select(table.c.id, table.c.payload)
                .where(table.c.created_at <= cutoff)
                .order_by(table.c.created_at)
                .limit(BATCH)
            )
            if conn.dialect.name != "sqlite":
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            done: list[int] = []
            failed: list[int] = []
            for row_id, payload in rows:
                if self._deliver(decode_plan(payload)):
                    done.append(row_id)
                else:
                    failed.append(row_id)
            if done:
                conn.execute(table.delete().where(table.c.id.in_(done)))
            if failed:
                conn.execute(
                    table.update().where(table.c.id.in_(failed)).values(attempts=table.c.attempts + 1)
                )
            delivered, left = len(done), len(failed)
            self.pending = conn.execute(
                sqlalchemy.select(sqlalchemy.func.count()).select_from(table)
            ).scalar_one()
        self.delivered += delivered
        return delivered, left

    def status(self) -> dict[str, Any]:
        """Rows pending in the table: how many, the oldest's age, the most attempts."""
        table = self.table
        with self.engine.connect() as conn:
            now = _epoch(conn.dialect)
            row = conn.execute(
                sqlalchemy.select(
                    sqlalchemy.func.count(),
                    sqlalchemy.func.min(table.c.created_at),
                    sqlalchemy.func.max(table.c.attempts),
                    now if now is not None else sqlalchemy.literal(time.time()),
                ).select_from(table)
            ).one()
        count, oldest, attempts, at = row
        return {
            "pending": int(count),
            "oldest_age": (float(at) - float(oldest)) if oldest is not None else None,
            "max_attempts": int(attempts or 0),
        }


def connections(session: Session) -> list[Connection]:
    """The connections that ``session``'s transaction holds."""
    return root_connections(session)


# --------------------------------------------------------------------------------------
# the configured outbox


def current() -> Outbox | None:
    """The configured outbox of this process, or ``None``."""
    return _runtime.current_outbox


def prepare(settings: OutboxSettings, deliver: Callable[[Plan], bool]) -> Outbox:
    """An outbox for ``settings``, its table checked (:meth:`Outbox.check`), not yet running.

    ``deliver`` deletes a row's keys everywhere and says whether every delete landed
    (the commit pipeline's :func:`~cachedecor.invalidation.deliver_now`): the row is
    removed only then.
    """
    box = Outbox(settings, deliver)
    try:
        box.check()
    except BaseException:
        box.engine.dispose()
        raise
    return box


def activate(box: Outbox | None) -> None:
    """Make ``box`` this process's outbox and start its deliverer (``None``: no outbox)."""
    _runtime.activate("current_outbox", box)
