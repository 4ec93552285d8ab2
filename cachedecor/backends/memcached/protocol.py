"""memcached's protocol: building commands and reading replies, with no sockets.

Both transports, the threaded one (:mod:`cachedecor.backends.memcached.transport`)
and the asyncio one (:mod:`cachedecor.backends.memcached.aio`), send the bytes built
here and parse what they receive with :class:`ReplyParser`. Everything here is a pure
function of its arguments (bytes, a server string, an exception): no socket, no I/O.
Also here: the errors of the protocol and what a failed exchange means
(:func:`stale_connection`, :func:`answered`), which both transports and the cluster
decide by.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cachedecor.backends.base import LEASE_PREFIX, ValueRefused

__all__ = [
    "PROBE",
    "CommandRefused",
    "ConnectionClosed",
    "ErrorReply",
    "MetaUnsupported",
    "ProtocolError",
    "Reply",
    "ReplyParser",
    "answered",
    "classic_delete",
    "classic_get",
    "classic_store",
    "fill_outcomes",
    "fill_result",
    "lookup_result",
    "md_release",
    "memcached_expire",
    "mg_lookup",
    "mg_peek",
    "ms_fill",
    "peek_result",
    "probe_verdict",
    "server_spec",
    "single_meta_reply",
    "stale_connection",
]

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

#: Classic replies that end the reply to one command (``VALUE`` lines come before an ``END``).
_CLASSIC_FINAL = frozenset(
    (
        b"END",
        b"STORED",
        b"NOT_STORED",
        b"EXISTS",
        b"NOT_FOUND",
        b"DELETED",
        b"TOUCHED",
        b"OK",
        b"ERROR",
        b"CLIENT_ERROR",
        b"SERVER_ERROR",
    )
)

#: One reply: its code, the tokens after the code, and the data block of ``VA``/``VALUE``.
Reply = tuple[bytes, list[bytes], bytes | None]


def single_meta_reply(data: bytes) -> Reply | None:
    """``data`` as one meta reply if it is exactly one complete, well-formed reply.

    The common case of a single lookup, parsed without :class:`ReplyParser`; any
    other input (incomplete, several replies, an error) gives ``None``, and the
    caller feeds the parser, which decides.
    """
    eol = data.find(b"\r\n")
    if eol < 0:
        return None
    parts = data[:eol].split()
    if not parts:
        return None
    code = parts[0]
    if code == b"VA":
        if len(parts) < 2 or not parts[1].isdigit():
            return None
        end = eol + 2 + int(parts[1])
        if len(data) != end + 2 or data[end:] != b"\r\n":
            return None
        return (code, parts[2:], data[eol + 2 : end])
    if code in _META_CODES and len(data) == eol + 2:
        return (code, parts[1:], None)
    return None


class ReplyParser:
    """The replies to ``count`` pipelined commands, parsed from bytes fed as they arrive.

    No I/O: a transport (threads or asyncio) reads from its socket and calls
    :meth:`feed` until it returns ``True``; :attr:`replies` then holds the replies
    in command order. A stream the protocol does not allow raises
    :class:`ProtocolError` (or :class:`MetaUnsupported` for ``ERROR`` to a meta
    command): the connection is out of step and must be closed.

    Meta replies (the default) are ``(code, flags, value)``: ``VA`` with its data,
    ``HD``/``EN``/``NF``/``EX``/``NS``/``MN`` and ``SERVER_ERROR`` without.
    With ``classic=True`` a retrieval gives one ``(b"VALUE", [key, flags(, cas)],
    data)`` per item before its ``(b"END", [], None)``; every other classic reply is
    one line, the error lines (``ERROR``, ``CLIENT_ERROR``, ``SERVER_ERROR``)
    included: they are the server's answer, not a broken stream. Only the line
    that ends a command's reply counts towards ``count``.
    """

    __slots__ = ("_buf", "_classic", "_left", "_value", "replies")

    def __init__(self, count: int, *, classic: bool = False) -> None:
        self.replies: list[Reply] = []
        self._buf = bytearray()
        self._left = count
        self._classic = classic
        self._value: tuple[bytes, list[bytes], int] | None = None  # header of a data block

    @property
    def done(self) -> bool:
        """Whether every reply has arrived."""
        return self._left == 0

    def feed(self, data: bytes) -> bool:
        """Take received bytes; return whether every reply has arrived."""
        buf = self._buf
        buf += data
        pos = 0
        try:
            while self._left:
                if self._value is not None:
                    code, tokens, size = self._value
                    end = pos + size
                    if len(buf) < end + 2:
                        break
                    if buf[end : end + 2] != b"\r\n":
                        raise ProtocolError("a data block is not followed by \\r\\n")
                    self._value = None
                    self._reply(code, tokens, bytes(buf[pos:end]))
                    pos = end + 2
                    continue
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                line = bytes(buf[pos:eol])
                pos = eol + 2
                self._line(line)
        finally:
            del buf[:pos]
        if not self._left and buf:
            raise ProtocolError("unexpected bytes after the last reply")
        return not self._left

    def _line(self, line: bytes) -> None:
        parts = line.split()
        code = parts[0] if parts else b""
        if self._classic:
            if code == b"VALUE" and len(parts) in (4, 5):
                self._value = (code, [parts[1], parts[2], *parts[4:]], _size(parts[3]))
            elif code in _CLASSIC_FINAL:
                self._reply(code, parts[1:], None)
            else:
                raise ProtocolError(line.decode("ascii", "replace"))
        elif code == b"VA" and len(parts) > 1:
            self._value = (code, parts[2:], _size(parts[1]))
        elif code in _META_CODES or code == b"SERVER_ERROR":
            self._reply(code, parts[1:], None)
        elif line == b"ERROR":
            raise MetaUnsupported("the server does not know meta commands")
        else:
            raise ProtocolError(line.decode("ascii", "replace"))

    def _reply(self, code: bytes, tokens: list[bytes], value: bytes | None) -> None:
        self.replies.append((code, tokens, value))
        if code != b"VALUE":
            self._left -= 1


def _size(token: bytes) -> int:
    if not token.isdigit():
        raise ProtocolError(f"not a data block length: {token!r}")
    return int(token)


#: The request that tells a server that speaks classic commands from one that does not.
PROBE = b"get cachedecor:probe\r\n"


def probe_verdict(received: bytes) -> bool | None:
    """Whether ``received`` (the start of the answer to :data:`PROBE`) shows a server
    speaking classic commands; ``None`` while its first line is incomplete.

    Any well-formed reply counts, ``SERVER_ERROR`` included (a proxy whose backend for
    the probed key is down still speaks the protocol).
    """
    eol = received.find(b"\r\n")
    if eol < 0:
        return None
    line = received[:eol]
    return bool(line == b"END" or line.startswith((b"VALUE ", b"SERVER_ERROR")))


class ProtocolError(Exception):
    """memcached answered something the protocol does not allow here."""


class ConnectionClosed(ConnectionError):
    """The server closed the connection before it had answered."""


class ErrorReply(Exception):
    """The server answered ``ERROR``, ``CLIENT_ERROR`` or ``SERVER_ERROR`` to a classic
    command: it refused this request, and the connection stays usable."""


def stale_connection(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection was closed by the other side (not a timeout).

    True for :class:`ConnectionClosed` (the asyncio transport), pymemcache's
    ``MemcacheUnexpectedCloseError`` (the threaded one), and a broken, reset or aborted
    connection; false for anything else, timeouts included. A caller may retry such a
    failure once on a new connection when the closed one had been reused.
    """
    from pymemcache.exceptions import MemcacheUnexpectedCloseError

    return isinstance(
        exc,
        (
            ConnectionClosed,
            MemcacheUnexpectedCloseError,
            BrokenPipeError,
            ConnectionResetError,
            ConnectionAbortedError,
        ),
    )


def answered(exc: BaseException) -> bool:
    """Whether ``exc`` is the server's answer to a request (not a failed connection).

    True for :class:`ErrorReply` and pymemcache's client and server errors (an
    unexpectedly closed connection excepted): the server is up and the connection
    usable, so the failure is not counted against the node.
    """
    from pymemcache.exceptions import MemcacheClientError, MemcacheServerError, MemcacheUnexpectedCloseError

    if isinstance(exc, ErrorReply):
        return True
    return isinstance(exc, (MemcacheServerError, MemcacheClientError)) and not isinstance(
        exc, MemcacheUnexpectedCloseError
    )


def server_spec(server: str) -> Any:
    """The address of a configured server, as pymemcache's ``Client`` takes it.

    A path (``/...``) is a unix socket and returned as is; ``host:port`` (an IPv6 host
    in brackets or not) gives ``(host, port)``; a host alone gives ``(host, 11211)``.
    """
    if server.startswith("/"):
        return server  # unix socket
    host, sep, port = server.rpartition(":")
    if not sep:
        return (server, 11211)
    return (host.strip("[]"), int(port))


def memcached_expire(ttl: int | None) -> int:
    """The exptime memcached takes for a ``ttl`` in seconds.

    ``None``, 0 or a negative ttl gives 0 (no expiry); a ttl above 30 days, which
    memcached would read as a Unix timestamp, gives ``now + ttl``; any other is as given.
    """
    if not ttl or ttl <= 0:
        return 0
    if ttl > _MEMCACHED_MAX_RELATIVE:
        return int(time.time()) + ttl
    return ttl


def _cas_bytes(token: Any) -> bytes:
    return token if isinstance(token, bytes) else str(int(token)).encode()


# -- requests: the bytes both transports send ---------------------------------------------


def mg_lookup(key: str, ttl: int) -> bytes:
    """Read ``key``; on a miss create its placeholder and win its lease (``N<ttl>``)."""
    return b"mg %b v c N%d\r\n" % (key.encode(), ttl)


def mg_peek(key: str) -> bytes:
    """Read ``key`` as it is stored, taking no lease (``mg <key> v``)."""
    return b"mg %b v\r\n" % key.encode()


def md_release(key: str, token: Any) -> bytes:
    """Delete ``key`` only while it is still the placeholder of lease ``token``."""
    return b"md %b C%b\r\n" % (key.encode(), _cas_bytes(token))


def ms_fill(key: str, value: bytes, token: Any, ttl: int | None) -> bytes:
    """Store ``value`` under ``key`` only while it is the placeholder of lease ``token``
    (``ms <key> C<cas>``), expiring after ``ttl`` (:func:`memcached_expire`)."""
    return b"ms %b %d C%b T%d\r\n%b\r\n" % (
        key.encode(),
        len(value),
        _cas_bytes(token),
        memcached_expire(ttl),
        value,
    )


def classic_get(keys: Sequence[str], *, cas: bool = False) -> bytes:
    """One classic ``get`` of ``keys`` (``gets``, with their cas tokens, if ``cas``)."""
    return b"%b %b\r\n" % (b"gets" if cas else b"get", b" ".join(k.encode() for k in keys))


def classic_store(command: bytes, key: str, value: bytes, flags: int, expire: int, cas: Any = None) -> bytes:
    """``set``/``add``/``cas`` as pymemcache writes them (``noreply`` off)."""
    extra = b" " + _cas_bytes(cas) if cas is not None else b""
    return b"%b %b %d %d %d%b\r\n%b\r\n" % (command, key.encode(), flags, expire, len(value), extra, value)


def classic_delete(key: str) -> bytes:
    """A classic ``delete`` of ``key``, answered ``DELETED`` or ``NOT_FOUND``."""
    return b"delete %b\r\n" % key.encode()


# -- replies: what they mean ---------------------------------------------------------------


def peek_result(code: bytes, flags: list[bytes], value: bytes | None) -> bytes | None:
    """The stored bytes a ``mg <key> v`` reply shows: an entry, a lease marker, or ``None``."""
    if code != b"VA":
        return None
    if b"W" in flags or b"Z" in flags or not value:
        return LEASE_PREFIX  # the placeholder of a reader that is filling it
    return value


def fill_result(code: bytes, flags: list[bytes]) -> bool:
    """Whether a fill (:func:`ms_fill`) with this reply stored its value: ``True``
    (``HD``), ``False`` (the lease no longer held: ``EX``, ``NF``, ``NS``); any other
    reply raises :class:`ValueRefused` (the server refused the value)."""
    if code == b"HD":
        return True
    if code in (b"EX", b"NF", b"NS"):
        return False
    raise ValueRefused(b" ".join([code, *flags]).decode("ascii", "replace"))


def fill_outcomes(
    keys: Iterable[str], replies: Mapping[str, Reply], error: BaseException | None
) -> dict[str, Any]:
    """What pipelined fills (``ms … C<cas>``) did, key by key: ``True`` (stored),
    ``False`` (the lease no longer held), or the exception: ``error`` for keys whose
    node failed, :class:`ValueRefused` for a value the server refused."""
    out: dict[str, Any] = {k: error for k in keys if k not in replies}
    for key, (code, flags, _) in replies.items():
        try:
            out[key] = fill_result(code, flags)
        except ValueRefused as exc:
            out[key] = exc
    return out


def lookup_result(code: bytes, flags: list[bytes], value: bytes | None) -> tuple[bytes | None, Any]:
    """What a :func:`mg_lookup` reply means: ``(entry, None)`` for a stored entry,
    ``(None, token)`` when this reader won the lease (``token`` is the cas to fill
    with), ``(None, None)`` when another reader holds it or nothing was stored."""
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
