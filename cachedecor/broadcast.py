"""Invalidations broadcast to every process, which evicts them from its near cache.

``broadcast_url`` names the transport: a ``postgresql://`` URL (``LISTEN``/``NOTIFY``
on the application's database), a ``redis://`` URL (pub/sub), or one of each. Each
process runs a listener thread per transport, on a connection of its own; what it
receives is evicted from its near caches (:mod:`cachedecor.near`). While no
listener is connected (none yet, or every one lost), the near caches are emptied
and bypassed. With both transports every message is sent on both, so either
alone keeps the process hearing.

What is sent, and when:

* **Inside the writing transaction** (PostgreSQL, when the session's transaction
  holds a connection to the broadcast database): ``pg_notify`` on that connection.
  PostgreSQL delivers it only if the transaction commits, at the commit and in
  commit order, so other processes evict as early as the database allows.
* **After the remote deletes** (every transport, every invalidation): the keys
  again, sent by the committing thread before its commit returns, so that a process
  that refilled its near cache from the remote cache between the commit and the
  remote delete (which follows the commit) evicts that copy too. A publisher thread
  sends them instead for asyncio callers (never on an event loop's thread), and for
  every caller once a send has failed or timed out, until it has sent one again: a
  silent server costs commits one socket timeout in all, not one each.

A message holds the keys by region, as JSON; one larger than PostgreSQL's 8000-byte
``NOTIFY`` limit is sent as "flush these regions".
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Any

import sqlalchemy

from cachedecor import _runtime, near
from cachedecor._sa import same_database
from cachedecor.backends.base import register_fork_aware
from cachedecor.keys import Plan, decode_plan, encode_plan
from cachedecor.near import HEARD_FOR, evict_everywhere, flush_everywhere
from cachedecor.stats import log_failure

__all__ = ["Broadcast", "Link", "activate", "current"]

log = logging.getLogger("cachedecor")

CHANNEL = "cachedecor_invalidations"
#: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
_PG_LIMIT = 7900
#: seconds between two attempts to reconnect the listener
_RETRY = 0.2
#: seconds between two keep-alives of the listener (well within near.HEARD_FOR)
_KEEPALIVE = HEARD_FOR / 3


def _message(keys: Plan) -> str:
    text = encode_plan(keys)
    if len(text) > _PG_LIMIT:
        return json.dumps({"*": sorted(keys)})
    return text


def _receive(text: str) -> None:
    data = json.loads(text)
    if "*" in data:  # too many keys to name: everything of those regions
        flush_everywhere()
        return
    evict_everywhere(decode_plan(text))


class Link:
    """One transport of this process's broadcast: a listener thread and a publisher
    thread, each on a connection of its own."""

    def __init__(self, url: Any, channel: str = CHANNEL) -> None:
        self.url = url
        self.channel = channel
        self.kind = "redis" if url.get_backend_name() in ("redis", "rediss") else "postgresql"
        # imported now: the publisher may have to connect while the interpreter exits,
        # when imports no longer work
        self._client_module: Any = importlib.import_module("redis" if self.kind == "redis" else "psycopg")
        self._outgoing: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connected = threading.Event()
        self._cut: Any = None  # shuts the listener's socket down (from another thread)
        self._heard_at = 0.0  # when the PostgreSQL listener last heard from its server
        self._inline = threading.Lock()  # the connection threads publish on themselves
        self._inline_conn: Any = None
        #: a send failed or timed out, and the publisher thread has not sent one since:
        #: committing threads hand their messages to it instead of waiting on the server
        self.failing = False
        self.ear = near.Ear()  # what this listener tells the near reads
        self.changed: Any = lambda: None  # called when it connects or loses its connection
        self.received = 0
        self.sent = 0
        self.lost = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self.ear.attach()
        self._threads = [
            threading.Thread(target=self._listen, name="cachedecor-broadcast-listener", daemon=True),
            threading.Thread(target=self._publish_loop, name="cachedecor-broadcast-publisher", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, wait: float = 5.0) -> None:
        """Stop listening; send what is queued first (for up to ``wait`` seconds)."""
        self._stop.set()
        self._outgoing.put(None)
        deadline = time.monotonic() + wait
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        self.connected.clear()
        self.ear.detach()
        self.changed()
        with self._inline:
            self._inline_conn = self._close(self._inline_conn)

    def after_fork_in_child(self) -> None:
        """Forget the parent's connections, threads and queue (not this process's)."""
        self._inline = threading.Lock()
        self._inline_conn = None  # the parent's: never written to from here
        self.failing = False
        self._outgoing = queue.SimpleQueue()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._threads = []

    # -- sending -------------------------------------------------------------------------

    def notify_in_transaction(self, conn: Any, keys: Plan) -> bool:
        """``pg_notify`` on ``conn`` (the writing transaction's), if it is on the broadcast
        database; whether it was sent."""
        if self.kind != "postgresql":
            return False
        if not same_database(conn.engine.url, self.url):
            return False
        conn.execute(
            sqlalchemy.text("SELECT pg_notify(:channel, :payload)"),
            {
                "channel": self.channel,
                "payload": _message(keys),
            },
        )
        return True

    def publish(self, text: str) -> None:
        """Send ``text`` (a message: :func:`_message`) to every process.

        A thread sends it itself, before its commit returns, on a connection shared
        by the process's threads (one round trip; the publisher thread would add its
        own scheduling delay, which under load was the longest part of the window
        other processes may be stale). The publisher thread sends it instead, and
        this returns at once: on a thread that runs an event loop (an
        ``AsyncSession``'s commit, :func:`~cachedecor.ainvalidate`: the loop must
        not block), while the shared connection is busy, and from a failed or
        timed-out send until the publisher thread has sent one again (a silent
        server then costs the commits one socket timeout in all, not one each).
        """
        if not self.failing and not _on_event_loop() and self._inline.acquire(blocking=False):
            try:
                if self._inline_conn is None:
                    self._inline_conn = self._connect()
                self._send(self._inline_conn, text)
                self.sent += 1
                return
            except Exception as exc:
                self.failing = True
                log_failure("broadcast", "publishing an invalidation (handed to the publisher thread)", exc)
                self._inline_conn = self._close(self._inline_conn)
            finally:
                self._inline.release()
        self._outgoing.put(text)

    def _publish_loop(self) -> None:
        conn: Any = None
        while True:  # until the sentinel of stop(): what was queued before it is sent
            try:
                text = self._outgoing.get(timeout=_KEEPALIVE)
            except queue.Empty:
                self._watch()
                continue
            if text is None:
                break
            try:
                if conn is None:
                    conn = self._connect()
                self._send(conn, text)
                self.sent += 1
                self.failing = False  # the committing threads may send again
            except Exception as exc:
                self.failing = True
                log_failure("broadcast", "publishing an invalidation", exc)
                conn = self._close(conn)
        self._close(conn)

    def _watch(self) -> None:
        """A listener whose server stopped answering (its hearing lapsed) is cut off: the
        process is deaf at once, and the listener reconnects."""
        if self.connected.is_set() and not self.ear.hearing():
            self.connected.clear()
            self.ear.down()
            self.changed()
            cut = self._cut
            if cut is not None:
                cut()

    def _send(self, conn: Any, text: str) -> None:
        if self.kind == "redis":
            conn.publish(self.channel, text)
        else:
            conn.execute("SELECT pg_notify(%s, %s)", (self.channel, text))

    def ping(self) -> None:
        """One round trip to this transport's server on a connection of its own
        (``cachedecor check``); raises what connecting or asking raised."""
        conn = self._connect()
        try:
            if self.kind == "redis":
                conn.ping()
            else:
                conn.execute("SELECT 1")
        finally:
            self._close(conn)

    # -- receiving -----------------------------------------------------------------------

    def _connect(self, listener: bool = False) -> Any:
        if self.kind == "redis":
            module = self._client_module
            options: dict[str, Any] = {}
            if listener:
                # no automatic retry: redis-py's would reconnect the subscription on a
                # new socket by itself (on a failed read or ping, e.g. a LOADING reply
                # from a server that restarts with a dataset), out of sight of the
                # listener's Ear, its cutter and the reads' epoll set; the listener
                # reconnects through its own path instead (every 0.2 s)
                options["retry"] = module.retry.Retry(module.backoff.NoBackoff(), 0)
            return module.Redis.from_url(
                self.url.render_as_string(hide_password=False),
                socket_connect_timeout=1,
                socket_timeout=2,
                health_check_interval=1,
                **options,
            )
        return self._client_module.connect(_libpq_url(self.url), autocommit=True, connect_timeout=2)

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
                conn = self._connect(listener=True)
                if self.kind == "redis":
                    self._listen_redis(conn)
                else:
                    self._listen_pg(conn)
            except Exception as exc:
                if not self._stop.is_set():
                    self.lost += 1
                    log_failure("broadcast", "listening for invalidations (near caches bypassed)", exc)
            finally:
                self._cut = None
                self.connected.clear()
                self.ear.down()
                self.changed()
                self._close(conn)
            self._stop.wait(_RETRY)

    def _up(self, fd: int) -> None:
        self.ear.up(fd)
        self.connected.set()
        self.changed()

    def _listen_pg(self, conn: Any) -> None:
        fd = conn.pgconn.socket
        self._cut = _cutter(fd)
        conn.execute(f'LISTEN "{self.channel}"')
        ear = self.ear
        self._up(fd)
        self._heard_at = time.monotonic()
        while not self._stop.is_set():
            if ear.wait(_KEEPALIVE):  # the interpreter is free meanwhile
                try:
                    self._take_pg(conn)
                finally:
                    ear.taking = False  # (set by the wait when something arrived)
            if time.monotonic() - self._heard_at >= _KEEPALIVE:
                # nothing heard for a while: ask. The server's answer renews the process's
                # hearing; a connection that died raises here, and one whose server stopped
                # answering blocks here, letting the hearing lapse (near.HEARD_FOR) until it
                # answers again. (While notifications keep coming, they are the answer: no
                # query then.) Meanwhile reads do not wait for what arrives (most likely
                # the answer), as with Redis's pong; psycopg keeps aside a notification
                # that comes with it, out of the reads' sight: from the answer on, reads
                # go to the remote cache until it is taken.
                ear.answer_due = True
                try:
                    conn.execute("SELECT 1")
                    ear.taking = True
                finally:
                    ear.answer_due = False
                try:
                    ear.heard()
                    self._heard_at = time.monotonic()
                    self._take_pg(conn)  # what arrived during it
                finally:
                    ear.taking = False

    def _take_pg(self, conn: Any) -> None:
        ear = self.ear
        held = ear.taking
        ear.taking = True  # near reads go to the remote cache until this is done
        try:
            for notify in conn.notifies(timeout=0):
                self.received += 1
                _receive(notify.payload)
                self._heard_at = time.monotonic()
                ear.heard()  # the server is delivering
        finally:
            ear.taking = held

    def _listen_redis(self, client: Any) -> None:
        pubsub = client.pubsub()
        pubsub.subscribe(self.channel)
        sock = getattr(pubsub.connection, "_sock", None)
        if sock is None:
            raise ConnectionError("no socket under the Redis subscription")
        fd = sock.fileno()
        self._cut = _cutter(fd)
        # the subscription is confirmed before anything it should hear is sent
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
            _same_socket(pubsub, sock)
            if message is not None and message["type"] == "subscribe":
                break
        else:
            raise TimeoutError("no subscription confirmation from Redis")
        ear = self.ear
        self._up(fd)
        pinged = heard_at = time.monotonic()
        while not self._stop.is_set():
            # every call into the client may have reconnected it (can_read() connects
            # a connection whose socket is gone): the listener must not go on with a
            # socket nobody reads any more (its fd closed, or reused by another file)
            _same_socket(pubsub, sock)
            # everything on the socket or in the client's buffer: messages, and answers
            # to keep-alives. Near reads go to the remote cache from before the client
            # reads the socket (can_read() moves what is there into its buffer, where
            # the reads cannot see it) until everything it read is handled.
            ear.taking = True
            try:
                while pubsub.connection.can_read(timeout=0):
                    _same_socket(pubsub, sock)
                    message = pubsub.get_message(timeout=_KEEPALIVE)
                    _same_socket(pubsub, sock)
                    if message is not None:  # (None: the client's own health check)
                        ear.heard()  # the server answered
                        heard_at = time.monotonic()
                        if message["type"] == "pong":
                            ear.answer_due = False
                        elif message["type"] == "message":
                            self.received += 1
                            data = message["data"]
                            _receive(data.decode() if isinstance(data, bytes) else data)
            finally:
                ear.taking = False
            now = time.monotonic()
            if now - heard_at >= _KEEPALIVE and now - pinged >= _KEEPALIVE:
                # nothing heard for a while: ask. While messages keep coming they are
                # the answer: no ping then, whose answer (awaited, not looked for by the
                # reads) would hide what arrives with it
                ear.answer_due = True
                pubsub.ping()  # answered by a "pong" message, which renews the hearing
                _same_socket(pubsub, sock)
                pinged = now
            ear.wait(_KEEPALIVE)  # the interpreter is free meanwhile (taking: reset above)


class Broadcast:
    """This process's broadcast: a :class:`Link` per transport of ``broadcast_url``.

    Every message goes out on every link; the process hears while any link's
    listener is connected (:attr:`connected`).
    """

    def __init__(self, urls: Any, channel: str = CHANNEL) -> None:
        if not isinstance(urls, (list, tuple)):
            urls = [urls]
        self.channel = channel
        self.links = [Link(url, channel) for url in urls]
        #: set while at least one listener is connected
        self.connected = threading.Event()
        self._lock = threading.Lock()
        for link in self.links:
            link.changed = self._changed
        register_fork_aware(self)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The transports, ``"postgresql"`` and/or ``"redis"``."""
        return tuple(link.kind for link in self.links)

    @property
    def received(self) -> int:
        """Messages received, over every link (a message sent on two links counts twice)."""
        return sum(link.received for link in self.links)

    @property
    def sent(self) -> int:
        """Messages sent after the remote deletes (by committing threads, or by the
        publisher threads), over every link."""
        return sum(link.sent for link in self.links)

    @property
    def lost(self) -> int:
        """Listener connections lost, over every link."""
        return sum(link.lost for link in self.links)

    def _changed(self) -> None:
        with self._lock:
            if any(link.connected.is_set() for link in self.links):
                self.connected.set()
            else:
                self.connected.clear()

    def start(self) -> None:
        for link in self.links:
            link.start()

    def stop(self, wait: float = 5.0) -> None:
        """Stop listening; send what is queued first (for up to ``wait`` seconds in all)."""
        deadline = time.monotonic() + wait
        for link in self.links:
            link.stop(max(0.0, deadline - time.monotonic()))

    def _after_fork_in_child(self) -> None:
        near.after_fork()  # before a listener of this process can connect
        self._lock = threading.Lock()
        self.connected = threading.Event()
        for link in self.links:
            link.after_fork_in_child()
        if _runtime.current_broadcast is self:
            self.start()

    def notify_in_transaction(self, conn: Any, keys: Plan) -> bool:
        """``pg_notify`` of ``keys`` on ``conn`` (a writing transaction's), if a link is
        PostgreSQL on that database; whether it was sent."""
        return any(link.notify_in_transaction(conn, keys) for link in self.links)

    def publish(self, keys: Plan) -> None:
        """Send ``keys`` to every process, on every link (see :meth:`Link.publish`)."""
        if not keys:
            return
        text = _message(keys)  # once for every link
        for link in self.links:
            link.publish(text)


def _on_event_loop() -> bool:
    """Whether this thread is running an asyncio event loop. True too inside SQLAlchemy's
    greenlet (an ``AsyncSession``'s ``after_commit`` listeners), which runs on the loop's
    thread, and in the coroutines an ``await_only`` there drives."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _same_socket(pubsub: Any, sock: Any) -> None:
    """Raise unless ``pubsub`` still reads the socket ``sock`` it subscribed on."""
    connection = pubsub.connection
    if connection is None or getattr(connection, "_sock", None) is not sock:
        raise ConnectionError("the Redis client moved the subscription to another socket")


def _cutter(fd: int) -> Any:
    """A function that shuts down the socket ``fd`` (a blocked read then returns), unless
    the number has meanwhile been closed and given to another file (never cut that)."""
    try:
        identity = _identity(os.fstat(fd))
    except OSError:
        identity = None

    def cut() -> None:
        try:
            dup = socket.socket(fileno=os.dup(fd))
        except OSError:
            return
        try:
            if _identity(os.fstat(dup.fileno())) == identity:
                dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            dup.close()

    return cut


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _libpq_url(url: Any) -> str:
    """``url`` as libpq takes it (no SQLAlchemy driver name)."""
    return str(url.set(drivername="postgresql").render_as_string(hide_password=False))


# --------------------------------------------------------------------------------------


def current() -> Broadcast | None:
    """The broadcast of this process, or ``None`` (what it has queued is sent at
    interpreter exit by the exit hook of :mod:`cachedecor._runtime`)."""
    return _runtime.current_broadcast


def activate(new: Broadcast | None) -> None:
    """Make ``new`` this process's broadcast (``None``: none) and start its threads."""
    _runtime.activate("current_broadcast", new)
