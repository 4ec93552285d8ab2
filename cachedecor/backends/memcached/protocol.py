"""memcached's protocol: building meta commands and reading replies, with no sockets.

The transport (:mod:`cachedecor.backends.memcached.cluster`) hands bytes in and out;
everything here is a pure function of them, except :func:`_exchange`, which runs
one pipelined exchange on a pymemcache connection it is given.
"""

from __future__ import annotations

import time
from typing import Any

from cachedecor.backends.base import ValueRefused

#: memcached treats an expiry above 30 days as a Unix timestamp.
_MEMCACHED_MAX_RELATIVE = 30 * 24 * 3600


class CommandRefused(Exception):
    """The server answers classic commands but refused this one.

    memcached < 1.6 answers ERROR to meta commands; twemproxy closes the connection
    on any command it does not pass (meta commands, ``lru_crawler``, ``flush_all``).
    """


class MetaUnsupported(CommandRefused):
    """The server does not take meta commands: memcached < 1.6 (it answers ERROR), or a
    proxy that closes the connection on them and answers classic commands (twemproxy)."""


_META_CODES = frozenset((b"HD", b"EN", b"NF", b"EX", b"NS", b"MN"))


def _exchange(client: Any, payload: bytes, count: int) -> list[tuple[bytes, list[bytes], bytes | None]]:
    """Write ``payload`` (``count`` meta commands) and read ``count`` replies.

    Uses pymemcache's connection (timeouts, TCP_NODELAY, TLS) and its line reader.
    A reply the protocol does not allow closes the connection, so that a stream
    out of step is never reused.
    """
    _readline, _readvalue = _readers()
    if client.sock is None:
        client._connect()
    sock = client.sock
    sock.sendall(payload)
    buf = b""
    replies: list[tuple[bytes, list[bytes], bytes | None]] = []
    for _ in range(count):
        buf, line = _readline(sock, buf)
        parts = line.split()
        code = parts[0] if parts else b""
        if code == b"VA":
            buf, value = _readvalue(sock, buf, int(parts[1]))
            replies.append((code, parts[2:], value))
        elif code in _META_CODES or code == b"SERVER_ERROR":
            replies.append((code, parts[1:], None))
        else:
            client.close()
            if line == b"ERROR":
                raise MetaUnsupported("the server does not know meta commands")
            raise ProtocolError(line.decode("ascii", "replace"))
    if buf:
        client.close()
        raise ProtocolError("unexpected bytes after the last reply")
    return replies


def _answers_classic(client: Any) -> bool:
    """Whether a new connection to ``client``'s server answers a classic ``get``.

    Any well-formed reply counts, ``SERVER_ERROR`` included (a proxy whose backend for
    the probed key is down still speaks the protocol). The connection is closed after.
    """
    _readline, _ = _readers()
    try:
        client._connect()
        client.sock.sendall(b"get cachedecor:probe\r\n")
        _, line = _readline(client.sock, b"")
        return bool(line == b"END" or line.startswith((b"VALUE ", b"SERVER_ERROR")))
    except Exception:
        return False
    finally:
        client.close()


def _readers() -> Any:
    global _READERS
    if _READERS is None:
        from pymemcache.client import base

        _READERS = (base._readline, base._readvalue)
    return _READERS


_READERS: Any = None


class _Exchange:
    """A pipelined meta exchange, as an operation for :meth:`MemcachedCluster._run`."""

    __slots__ = ("count", "payload")

    def __init__(self, payload: bytes, count: int) -> None:
        self.payload = payload
        self.count = count

    def __call__(self, client: Any) -> list[tuple[bytes, list[bytes], bytes | None]]:
        fresh = client.sock is None
        try:
            return _exchange(client, self.payload, self.count)
        except Exception as exc:
            # A new connection closed under a meta command, by a server that answers a
            # classic command on the next one: a proxy that hangs up on meta commands
            # (twemproxy). A reused connection is first retried on a new one by the caller.
            if fresh and _stale_connection(exc) and _answers_classic(client):
                raise MetaUnsupported(
                    "the server closed the connection on a meta command and answers classic "
                    "commands: a proxy without meta commands (such as twemproxy)"
                ) from exc
            raise


class ProtocolError(Exception):
    """memcached answered something the protocol does not allow here."""


def _stale_connection(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection was closed by the other side (not a timeout)."""
    from pymemcache.exceptions import MemcacheUnexpectedCloseError

    return isinstance(
        exc, (MemcacheUnexpectedCloseError, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
    )


def _answered(exc: BaseException) -> bool:
    """Whether ``exc`` is the server's answer to a request (not a failed connection)."""
    from pymemcache.exceptions import MemcacheClientError, MemcacheServerError, MemcacheUnexpectedCloseError

    return isinstance(exc, (MemcacheServerError, MemcacheClientError)) and not isinstance(
        exc, MemcacheUnexpectedCloseError
    )


def _server_spec(server: str) -> Any:
    if server.startswith("/"):
        return server  # unix socket
    host, sep, port = server.rpartition(":")
    if not sep:
        return (server, 11211)
    return (host.strip("[]"), int(port))


def _memcached_expire(ttl: int | None) -> int:
    if not ttl or ttl <= 0:
        return 0
    if ttl > _MEMCACHED_MAX_RELATIVE:
        return int(time.time()) + ttl
    return ttl


def _cas_bytes(token: Any) -> bytes:
    return token if isinstance(token, bytes) else str(int(token)).encode()


def _ms(key: str, value: bytes, token: Any, ttl: int | None) -> bytes:
    return b"ms %b %d C%b T%d\r\n%b\r\n" % (
        key.encode(),
        len(value),
        _cas_bytes(token),
        _memcached_expire(ttl),
        value,
    )


def _stored(code: bytes, flags: list[bytes]) -> bool:
    if code == b"HD":
        return True
    if code in (b"EX", b"NF", b"NS"):
        return False
    raise ValueRefused(b" ".join([code, *flags]).decode("ascii", "replace"))


def _lookup_result(code: bytes, flags: list[bytes], value: bytes | None) -> tuple[bytes | None, Any]:
    if code != b"VA":
        return None, None  # EN: nothing stored and nothing vivified; read through
    won = lost = False
    cas = None
    for flag in flags:
        if flag == b"W":
            won = True
        elif flag == b"Z":
            lost = True
        elif flag[:1] == b"c":
            cas = flag[1:]
    if won:
        return None, cas
    if lost or not value:
        return None, None
    return value, None
