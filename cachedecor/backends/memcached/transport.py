"""memcached's threaded transport: the blocking sockets of pymemcache's connections.

It sends the bytes :mod:`.protocol` builds and parses the replies with its
:class:`~cachedecor.backends.memcached.protocol.ReplyParser`, on the connections of
pymemcache clients (their timeouts, TCP_NODELAY and TLS). :class:`Exchange` is the
operation :class:`~cachedecor.backends.memcached.cluster.MemcachedCluster` runs for
meta commands; :func:`metadump` lists a node's keys on a connection of its own. The
asyncio transport is :mod:`.aio`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cachedecor.backends.memcached.protocol import (
    PROBE,
    CommandRefused,
    MetaUnsupported,
    ProtocolError,
    Reply,
    ReplyParser,
    probe_verdict,
    server_spec,
    single_meta_reply,
    stale_connection,
)

if TYPE_CHECKING:
    from cachedecor.backends.memcached.cluster import MemcachedCluster

__all__ = ["Exchange", "metadump"]


def _exchange(client: Any, payload: bytes, count: int) -> list[Reply]:
    """Write ``payload`` (``count`` meta commands) and read ``count`` replies.

    Uses pymemcache's connection (timeouts, TCP_NODELAY, TLS) and parses with
    :class:`ReplyParser`. A reply the protocol does not allow closes the connection,
    so that a stream out of step is never reused.
    """
    if client.sock is None:
        client._connect()
    sock = client.sock
    sock.sendall(payload)
    data = _recv(sock)
    if count == 1:
        reply = single_meta_reply(data)
        if reply is not None:
            return [reply]
    parser = ReplyParser(count)
    try:
        parser.feed(data)
        while not parser.done:
            parser.feed(_recv(sock))
    except (ProtocolError, MetaUnsupported):
        client.close()
        raise
    return parser.replies


def _recv(sock: Any) -> bytes:
    data: bytes = sock.recv(_RECV_SIZE)
    if not data:
        from pymemcache.exceptions import MemcacheUnexpectedCloseError

        raise MemcacheUnexpectedCloseError()
    return data


_RECV_SIZE = 4096  # pymemcache's


def _answers_classic(client: Any) -> bool:
    """Whether a new connection to ``client``'s server answers a classic ``get``
    (:func:`probe_verdict`). The connection is closed after."""
    try:
        client._connect()
        client.sock.sendall(PROBE)
        received = b""
        while (verdict := probe_verdict(received)) is None:
            received += _recv(client.sock)
        return verdict
    except Exception:
        return False
    finally:
        client.close()


class Exchange:
    """A pipelined meta exchange, as an operation for :meth:`MemcachedCluster._run`.

    Called with a pymemcache client, it connects if the client has no connection,
    writes ``payload`` (``count`` meta commands) and returns the ``count`` replies in
    command order. A reply the protocol does not allow closes the connection and
    raises :class:`ProtocolError` (or :class:`MetaUnsupported`); a new connection
    closed under the command by a server that answers a classic ``get`` on the next
    one (a proxy without meta commands, such as twemproxy) raises
    :class:`MetaUnsupported`; any other failure is raised as it came, for the caller
    to retry or count against the node.
    """

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
            if fresh and stale_connection(exc) and _answers_classic(client):
                raise MetaUnsupported(
                    "the server closed the connection on a meta command and answers classic "
                    "commands: a proxy without meta commands (such as twemproxy)"
                ) from exc
            raise


def metadump(cluster: MemcachedCluster, node: str) -> list[str]:
    """Every key stored on ``node`` (``lru_crawler metadump``), on a connection of its own.

    The connection takes its timeouts from ``cluster``'s client for ``node`` (at least
    5 seconds to answer) and is closed before returning. A proxy that closes the
    connection on ``lru_crawler`` and answers classic commands (twemproxy) raises
    :class:`CommandRefused`; a crawl refused or cut short raises
    :class:`ProtocolError`; a failed connection raises as pymemcache raised it.

    The crawler walks the hash table (``hash``): a walk of the LRUs (``all``, the
    fallback for servers without ``hash``) misses items that reads are moving between
    LRUs, which are the recently read ones (measured on memcached 1.6.18).
    """
    from urllib.parse import unquote

    from pymemcache.client.base import Client

    template = cluster.clients[node]
    client = Client(
        server_spec(node),
        connect_timeout=template.connect_timeout or 1.0,
        timeout=max(template.timeout or 0, 5.0),
        no_delay=True,
    )
    mode = b"hash"
    try:
        for attempt in range(50):
            client._connect()
            client.sock.sendall(b"lru_crawler metadump %b\r\n" % mode)
            buf = b""
            while not (buf.endswith(b"END\r\n") or buf.startswith((b"BUSY", b"ERROR", b"CLIENT_ERROR"))):
                chunk = client.sock.recv(1 << 16)
                if not chunk:
                    if not buf and _answers_classic(client):
                        raise CommandRefused(
                            f"memcached node {node} closed the connection on 'lru_crawler metadump' "
                            "and answers classic commands: a proxy (such as twemproxy), which cannot "
                            "list keys"
                        )
                    raise ProtocolError("connection closed during metadump")
                buf += chunk
                if buf.startswith((b"BUSY", b"ERROR", b"CLIENT_ERROR")) and buf.endswith(b"\r\n"):
                    break
            if buf.startswith(b"BUSY"):  # another crawl is running: wait for it
                client.close()
                time.sleep(0.02 * (attempt + 1))
                continue
            if not buf.endswith(b"END\r\n"):
                if mode == b"hash":  # a server without the hash-table walk
                    client.close()
                    mode = b"all"
                    continue
                raise ProtocolError(f"metadump refused: {buf[:80]!r}")
            keys = []
            for line in buf[:-5].split(b"\n"):
                if line.startswith(b"key="):
                    keys.append(unquote(line[4:].split(b" ", 1)[0].decode("ascii")))
            return keys
        raise ProtocolError("the LRU crawler stayed busy")
    finally:
        client.close()
