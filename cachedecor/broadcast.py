"""Invalidations broadcast to every process, which evicts them from its near cache.

``broadcast_url`` names the transport: a ``postgresql://`` URL (``LISTEN``/``NOTIFY``
on the application's database) or a ``redis://`` URL (pub/sub). Each process runs a
listener thread on a connection of its own; what it receives is evicted from its
near caches (:mod:`cachedecor.near`). While that connection is down, or not yet
up, the near caches are emptied and bypassed.

What is sent, and when:

* **Inside the writing transaction** (PostgreSQL, when the session's transaction
  holds a connection to the broadcast database): ``pg_notify`` on that connection.
  PostgreSQL delivers it only if the transaction commits, at the commit and in
  commit order, so other processes evict as early as the database allows.
* **After the remote deletes** (both transports, every invalidation): the keys
  again, from a background publisher thread, so that a process that refilled its
  near cache from the remote cache between the commit and the remote delete
  (which follows the commit) evicts that copy too.

A message holds the keys by region, as JSON; one larger than PostgreSQL's 8000-byte
``NOTIFY`` limit is sent as "flush these regions".
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

from cachedecor.backends.base import register_fork_aware
from cachedecor.invalidation import Plan, decode_plan, encode_plan
from cachedecor.near import evict_everywhere, set_listening
from cachedecor.stats import log_failure

__all__ = ["Broadcast", "activate", "current"]

log = logging.getLogger("cachedecor")

CHANNEL = "cachedecor_invalidations"
#: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
_PG_LIMIT = 7900
#: seconds between two attempts to reconnect the listener
_RETRY = 0.2


def _message(keys: Plan) -> str:
    text = encode_plan(keys)
    if len(text) > _PG_LIMIT:
        return json.dumps({"*": sorted(keys)})
    return text


def _receive(text: str) -> None:
    data = json.loads(text)
    if "*" in data:  # too many keys to name: everything of those regions
        from cachedecor.near import flush_everywhere

        flush_everywhere()
        return
    evict_everywhere(decode_plan(text))


class Broadcast:
    """This process's broadcast: a listener thread and a publisher thread."""

    def __init__(self, url: Any, channel: str = CHANNEL) -> None:
        self.url = url
        self.channel = channel
        self.kind = "redis" if url.get_backend_name() in ("redis", "rediss") else "postgresql"
        self._outgoing: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connected = threading.Event()
        self.received = 0
        self.sent = 0
        self.lost = 0
        register_fork_aware(self)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._listen, name="cachedecor-broadcast-listener", daemon=True),
            threading.Thread(target=self._publish_loop, name="cachedecor-broadcast-publisher", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._outgoing.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(5)
        self._threads = []
        self.connected.clear()
        set_listening(False)

    def _after_fork_in_child(self) -> None:
        self._outgoing = queue.SimpleQueue()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._threads = []
        if _current is self:
            self.start()

    # -- sending -------------------------------------------------------------------------

    def notify_in_transaction(self, conn: Any, keys: Plan) -> bool:
        """``pg_notify`` on ``conn`` (the writing transaction's), if it is on the broadcast
        database; whether it was sent."""
        if self.kind != "postgresql":
            return False
        from cachedecor.outbox import _same_database

        if not _same_database(conn.engine.url, self.url):
            return False
        import sqlalchemy

        conn.execute(
            sqlalchemy.text("SELECT pg_notify(:channel, :payload)"),
            {
                "channel": self.channel,
                "payload": _message(keys),
            },
        )
        return True

    def publish(self, keys: Plan) -> None:
        """Send ``keys`` to every process, from the publisher thread (never blocks)."""
        if keys:
            self._outgoing.put(_message(keys))

    def _publish_loop(self) -> None:
        conn: Any = None
        while not self._stop.is_set():
            text = self._outgoing.get()
            if text is None:
                break
            try:
                if conn is None:
                    conn = self._connect()
                self._send(conn, text)
                self.sent += 1
            except Exception as exc:
                log_failure("broadcast", "publishing an invalidation", exc)
                conn = self._close(conn)
        self._close(conn)

    def _send(self, conn: Any, text: str) -> None:
        if self.kind == "redis":
            conn.publish(self.channel, text)
        else:
            conn.execute("SELECT pg_notify(%s, %s)", (self.channel, text))

    # -- receiving -----------------------------------------------------------------------

    def _connect(self) -> Any:
        if self.kind == "redis":
            import redis

            return redis.Redis.from_url(
                self.url.render_as_string(hide_password=False),
                socket_connect_timeout=1,
                socket_timeout=2,
                health_check_interval=1,
            )
        import psycopg

        return psycopg.connect(_libpq_url(self.url), autocommit=True, connect_timeout=2)

    @staticmethod
    def _close(conn: Any) -> None:
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        return None

    def _listen(self) -> None:
        while not self._stop.is_set():
            conn: Any = None
            try:
                conn = self._connect()
                if self.kind == "redis":
                    self._listen_redis(conn)
                else:
                    self._listen_pg(conn)
            except Exception as exc:
                if not self._stop.is_set():
                    self.lost += 1
                    log_failure("broadcast", "listening for invalidations (near caches bypassed)", exc)
            finally:
                self.connected.clear()
                set_listening(False)
                self._close(conn)
            self._stop.wait(_RETRY)

    def _up(self) -> None:
        set_listening(True)
        self.connected.set()

    def _listen_pg(self, conn: Any) -> None:
        conn.execute(f'LISTEN "{self.channel}"')
        self._up()
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=0.5, stop_after=1000):
                self.received += 1
                _receive(notify.payload)
            conn.execute("SELECT 1")  # a connection that died quietly raises here

    def _listen_redis(self, client: Any) -> None:
        pubsub = client.pubsub()
        pubsub.subscribe(self.channel)
        # the subscription is confirmed before anything it should hear is sent
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
            if message is not None and message["type"] == "subscribe":
                break
        else:
            raise TimeoutError("no subscription confirmation from Redis")
        self._up()
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=0.5)
            if message is None:
                pubsub.ping()
                continue
            if message["type"] == "message":
                self.received += 1
                data = message["data"]
                _receive(data.decode() if isinstance(data, bytes) else data)


def _libpq_url(url: Any) -> str:
    """``url`` as libpq takes it (no SQLAlchemy driver name)."""
    return str(url.set(drivername="postgresql").render_as_string(hide_password=False))


# --------------------------------------------------------------------------------------

_current: Broadcast | None = None


def current() -> Broadcast | None:
    return _current


def activate(new: Broadcast | None) -> None:
    """Make ``new`` this process's broadcast (``None``: none) and start its threads."""
    global _current
    old, _current = _current, new
    if old is not None and old is not new:
        old.stop()
    if new is not None:
        new.start()
