"""Serialization of cache entries: value codec, compression and signing.

An entry is ``header + [signature] + body``:

* ``header`` is two bytes: the format version (:data:`FORMAT_VERSION`) and a flags
  byte naming the compression (none, zlib, zstd), whether a write time follows and
  whether a signature follows;
* ``written_at`` (entries written by ``@cached_by_pk``) is 8 bytes, a big-endian
  float of Unix time: when the row it holds was read from the database. Reads
  compare it with the region's invalidation time (dogpile's ``region.invalidate()``);
* ``signature`` (with a ``secret``) is 16 bytes of HMAC-SHA256 over the cache key,
  the header (write time included) and the body, so an entry can neither be forged,
  nor moved to another key, nor given another write time;
* ``body`` is the MessagePack encoding of the payload, compressed when it is larger
  than the region's ``compress_threshold`` and compression saves space.

Nothing here unpickles or imports by name: decoding untrusted bytes can only
produce plain values or raise :class:`BadEntry`. Values that MessagePack has no
type for (datetimes, ``Decimal``, ``UUID``, ...) travel as extension types that
round-trip exactly.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import hashlib
import hmac
import struct
import threading
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import msgpack

from cachedecor.errors import CacheError, ConfigError, missing_extra

__all__ = ["FORMAT_VERSION", "BadEntry", "Codec", "UnencodableValue", "pack_value", "unpack_value"]

#: First byte of every entry written by this version of cachedecor.
FORMAT_VERSION = 1

COMPRESS_NONE = 0
COMPRESS_ZLIB = 1
COMPRESS_ZSTD = 2
_COMPRESSION_MASK = 0x03
_SIGNED = 0x04
_TIMED = 0x10
SIG_LEN = 16
_WRITTEN_AT = struct.Struct(">d")

#: A decompressed body larger than this is refused (protects against decompression bombs).
MAX_BODY_SIZE = 16 * 1024 * 1024
#: Longest integer (in decimal digits) written and read: Python's default str/int limit.
MAX_INT_DIGITS = 4300

# Extension type codes. Never reuse a code for another meaning.
EXT_ABSENT = 0
EXT_DATETIME = 1
EXT_DATE = 2
EXT_TIME = 3
EXT_TIMEDELTA = 4
EXT_DECIMAL = 5
EXT_UUID = 6
EXT_BIGINT = 7


class BadEntry(CacheError):
    """An entry that cannot be used: corrupt, foreign, unsigned or wrongly signed."""


class UnencodableValue(CacheError, TypeError):
    """A column value has no safe encoding (for example a custom object)."""


class _Absent:
    """Marks a column that was not loaded when the entry was written."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


# Fixed layouts of the date and time extension types (big-endian).
_DATETIME = struct.Struct(">HBBBBBIB")  # year, month, day, hour, minute, second, microsecond, fold
_DATE = struct.Struct(">HBB")
_TIME = struct.Struct(">BBBIB")  # hour, minute, second, microsecond, fold
_TIMEDELTA = struct.Struct(">iII")  # days, seconds, microseconds
_OFFSET = struct.Struct(">q")  # a UTC offset in microseconds
_UTC = datetime.timezone.utc


def _tz_tail(tz: datetime.tzinfo | None, dt: datetime.datetime | None) -> bytes:
    """The time zone after the fixed fields: nothing (naive), Z (UTC), O/N (a fixed
    offset, without/with its own name) or K (a zoneinfo key)."""
    if tz is None:
        return b""
    if isinstance(tz, ZoneInfo) and tz.key is not None:
        return b"K" + tz.key.encode()
    offset = tz.utcoffset(dt)
    if offset is None:
        return b""
    name = tz.tzname(dt) if isinstance(tz, datetime.timezone) else None
    if name == datetime.timezone(offset).tzname(None):
        name = None
    if not offset and name is None:
        return b"Z"
    micros = _OFFSET.pack(offset // datetime.timedelta(microseconds=1))
    return b"O" + micros if name is None else b"N" + micros + name.encode()


@functools.lru_cache(maxsize=256)
def _fixed_zone(micros: int, name: str | None) -> datetime.timezone:
    offset = datetime.timedelta(microseconds=micros)
    return datetime.timezone(offset) if name is None else datetime.timezone(offset, name)


def _tz_from_tail(tail: bytes) -> datetime.tzinfo | None:
    if not tail:
        return None
    kind = tail[:1]
    if kind == b"Z":
        return _UTC
    if kind == b"K":
        return ZoneInfo(tail[1:].decode())
    (micros,) = _OFFSET.unpack_from(tail, 1)
    if kind == b"O" and len(tail) == 9:
        return _fixed_zone(micros, None)
    if kind == b"N":
        return _fixed_zone(micros, tail[9:].decode())
    raise BadEntry("bad time zone")


def _default(value: Any) -> msgpack.ExtType:
    if value is ABSENT:
        return msgpack.ExtType(EXT_ABSENT, b"")
    if isinstance(value, datetime.datetime):
        fields = _DATETIME.pack(
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
            value.fold,
        )
        return msgpack.ExtType(EXT_DATETIME, fields + _tz_tail(value.tzinfo, value))
    if isinstance(value, datetime.date):
        return msgpack.ExtType(EXT_DATE, _DATE.pack(value.year, value.month, value.day))
    if isinstance(value, datetime.time):
        fields = _TIME.pack(value.hour, value.minute, value.second, value.microsecond, value.fold)
        return msgpack.ExtType(EXT_TIME, fields + _tz_tail(value.tzinfo, None))
    if isinstance(value, datetime.timedelta):
        return msgpack.ExtType(EXT_TIMEDELTA, _TIMEDELTA.pack(value.days, value.seconds, value.microseconds))
    if isinstance(value, decimal.Decimal):
        return msgpack.ExtType(EXT_DECIMAL, str(value).encode())
    if isinstance(value, uuid.UUID):
        return msgpack.ExtType(EXT_UUID, value.bytes)
    if isinstance(value, int):  # beyond 64 bits (smaller ints never reach here)
        text = str(int(value))
        if len(text.lstrip("-")) > MAX_INT_DIGITS:
            raise UnencodableValue(f"cannot cache an integer of more than {MAX_INT_DIGITS} digits")
        return msgpack.ExtType(EXT_BIGINT, text.encode())
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, tuple):
        return list(value)
    raise UnencodableValue(f"cannot cache a value of type {type(value).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_ABSENT:
        return ABSENT
    if code == EXT_DATETIME:
        y, mo, d, h, mi, sec, us, fold = _DATETIME.unpack_from(data)
        tz = _tz_from_tail(data[_DATETIME.size :])
        return datetime.datetime(y, mo, d, h, mi, sec, us, tzinfo=tz, fold=fold)
    if code == EXT_DATE:
        return datetime.date(*_DATE.unpack(data))
    if code == EXT_TIME:
        h, mi, sec, us, fold = _TIME.unpack_from(data)
        return datetime.time(h, mi, sec, us, tzinfo=_tz_from_tail(data[_TIME.size :]), fold=fold)
    if code == EXT_TIMEDELTA:
        days, seconds, micros = _TIMEDELTA.unpack(data)
        return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)
    if code == EXT_DECIMAL:
        return decimal.Decimal(data.decode("ascii"))
    if code == EXT_UUID:
        return uuid.UUID(bytes=data)
    if code == EXT_BIGINT:
        if len(data) > MAX_INT_DIGITS + 1:  # digits and a sign
            raise BadEntry("integer too long")
        return int(data.decode("ascii"))
    raise BadEntry(f"unknown extension type {code}")


def pack_value(value: Any) -> bytes:
    """MessagePack ``value`` with cachedecor's extension types.

    Raises :class:`UnencodableValue` for a value with no safe encoding, and for one
    that packs but would not be read back (a dict with keys other than strings,
    which the reader refuses): nothing is stored that every later read would drop.
    """
    try:
        packed: bytes = msgpack.packb(value, default=_default, use_bin_type=True, datetime=False)
    except UnencodableValue:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnencodableValue(str(exc)) from exc
    try:
        unpack_value(packed)
    except BadEntry as exc:
        raise UnencodableValue(f"the value would not be read back: {exc}") from exc
    return packed


def unpack_value(data: bytes) -> Any:
    """Inverse of :func:`pack_value`; any malformed input raises :class:`BadEntry`."""
    try:
        return msgpack.unpackb(
            data,
            ext_hook=_ext_hook,
            raw=False,
            strict_map_key=True,
        )
    except BadEntry:
        raise
    except Exception as exc:  # msgpack raises many types on garbage
        raise BadEntry(f"undecodable body: {type(exc).__name__}: {exc}") from exc


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:  # tested by tests/bare (an install without the extra)
        raise missing_extra("compression = zstd", "zstandard", exc) from exc
    return zstandard


def _per_thread(factory: Callable[[], Any]) -> Callable[[], Any]:
    """A getter of one ``factory()`` object per thread.

    zstandard's compressors and decompressors must never be used by two threads at
    once: that corrupts their output or crashes the interpreter.
    """
    local = threading.local()

    def get() -> Any:
        obj = getattr(local, "obj", None)
        if obj is None:
            obj = local.obj = factory()
        return obj

    return get


def _zstd_decompress(zstandard: Any, decompressor: Any, body: bytes) -> bytes:
    # decompress() trusts a content size written in the frame header over
    # max_output_size, so a forged header would make it allocate that much: check first.
    size = zstandard.frame_content_size(body)
    if size > MAX_BODY_SIZE:
        raise BadEntry(f"zstd body of {size} bytes is larger than the limit")
    out: bytes = decompressor.decompress(body, max_output_size=MAX_BODY_SIZE)
    return out


@dataclass(frozen=True)
class Codec:
    """How one region writes and reads entries (compression and signing).

    ``compression`` is ``"zlib"`` (default), ``"zstd"`` (needs the ``zstd`` extra) or
    ``"none"``. Bodies larger than ``compress_threshold`` bytes are compressed when
    that saves space. With ``secret``, every entry is signed and unsigned or wrongly
    signed entries are refused.
    """

    compress_threshold: int = 1024
    compress_level: int | None = None
    compression: str = "zlib"
    secret: bytes | None = None

    def __post_init__(self) -> None:
        if self.compression not in ("zlib", "zstd", "none"):
            raise ConfigError(f"compression must be one of zlib, zstd, none; got {self.compression!r}")
        if self.compress_threshold < 0:
            raise ConfigError(f"compress_threshold must be 0 or more bytes; got {self.compress_threshold}")
        level = self.compress_level
        if level is not None:
            low, high = (-1, 9) if self.compression == "zlib" else (-7, 22)
            if self.compression != "none" and not low <= level <= high:
                raise ConfigError(
                    f"compress_level for {self.compression} must be between {low} and {high}; got {level}"
                )
        compress: Callable[[bytes], bytes] | None = None
        decompress_zstd: Callable[[bytes], bytes] | None = None
        if self.compression == "zlib":
            zl = 6 if level is None else level
            compress = lambda b: zlib.compress(b, zl)  # noqa: E731
        elif self.compression == "zstd":
            zstandard = _zstd()
            zstd_level = 3 if level is None else level
            compressor = _per_thread(lambda: zstandard.ZstdCompressor(level=zstd_level))
            compress = lambda b: compressor().compress(b)  # noqa: E731
        try:
            zstd = _zstd()
            decompressor = _per_thread(zstd.ZstdDecompressor)
            decompress_zstd = lambda b: _zstd_decompress(zstd, decompressor(), b)  # noqa: E731
        except ConfigError:
            decompress_zstd = None
        object.__setattr__(self, "_compress", compress)
        object.__setattr__(self, "_decompress_zstd", decompress_zstd)
        object.__setattr__(
            self, "_compress_flag", {"zlib": COMPRESS_ZLIB, "zstd": COMPRESS_ZSTD}.get(self.compression, 0)
        )

    # -- writing -----------------------------------------------------------------------

    def seal(self, key: str, body: bytes, written_at: float | None = None) -> bytes:
        """Build the stored entry for ``body`` (a :func:`pack_value` result) under ``key``.

        ``written_at`` (Unix time) is when the value was read from its source; an
        entry without it counts as written before any region invalidation.
        """
        flags = COMPRESS_NONE
        compress = self._compress  # type: ignore[attr-defined]
        if compress is not None and len(body) > self.compress_threshold:
            packed = compress(body)
            if len(packed) < len(body):
                body = packed
                flags = self._compress_flag  # type: ignore[attr-defined]
        if written_at is None:
            header = bytes((FORMAT_VERSION, flags | (_SIGNED if self.secret is not None else 0)))
        else:
            header = bytes(
                (FORMAT_VERSION, flags | _TIMED | (_SIGNED if self.secret is not None else 0))
            ) + _WRITTEN_AT.pack(written_at)
        if self.secret is None:
            return header + body
        return header + self._sign(key, header, body) + body

    def _sign(self, key: str, header: bytes, body: bytes) -> bytes:
        assert self.secret is not None
        mac = hmac.new(self.secret, key.encode(), hashlib.sha256)
        mac.update(header)
        mac.update(body)
        return mac.digest()[:SIG_LEN]

    # -- reading -----------------------------------------------------------------------

    def open(self, key: str, data: bytes) -> bytes:
        """Verify and decompress a stored entry; return the body or raise :class:`BadEntry`."""
        return self.open_timed(key, data)[0]

    def open_timed(self, key: str, data: bytes) -> tuple[bytes, float]:
        """:meth:`open`, and the entry's write time (``0.0`` for an entry without one)."""
        if len(data) < 2 or data[0] != FORMAT_VERSION:
            raise BadEntry("not a cachedecor entry of this format version")
        flags = data[1]
        if flags & ~(_COMPRESSION_MASK | _SIGNED | _TIMED):
            raise BadEntry(f"unknown flags {flags:#x}")
        start = 2
        written_at = 0.0
        if flags & _TIMED:
            start = 2 + _WRITTEN_AT.size
            if len(data) < start:
                raise BadEntry("write time truncated")
            (written_at,) = _WRITTEN_AT.unpack_from(data, 2)
        if flags & _SIGNED:
            if self.secret is None:
                raise BadEntry("signed entry but no secret is configured")
            sig = data[start : start + SIG_LEN]
            body = data[start + SIG_LEN :]
            if len(sig) != SIG_LEN or not hmac.compare_digest(sig, self._sign(key, data[:start], body)):
                raise BadEntry("wrong signature")
        else:
            if self.secret is not None:
                raise BadEntry("unsigned entry but a secret is configured")
            body = data[start:]
        return self._decompress(flags, body), written_at

    def _decompress(self, flags: int, body: bytes) -> bytes:
        compression = flags & _COMPRESSION_MASK
        if compression == COMPRESS_NONE:
            return body
        if compression == COMPRESS_ZLIB:
            try:
                d = zlib.decompressobj()
                out = d.decompress(body, MAX_BODY_SIZE)
            except zlib.error as exc:
                raise BadEntry(f"corrupt zlib body: {exc}") from exc
            if d.unconsumed_tail or not d.eof:
                raise BadEntry("zlib body truncated or larger than the limit")
            return out
        if compression == COMPRESS_ZSTD:
            if self._decompress_zstd is None:  # type: ignore[attr-defined]
                raise BadEntry("zstd entry but the zstandard package is not installed")
            try:
                return self._decompress_zstd(body)  # type: ignore[attr-defined,no-any-return]
            except Exception as exc:
                raise BadEntry(f"corrupt zstd body: {exc}") from exc
        raise BadEntry(f"unknown compression {compression}")

    def encode(self, key: str, value: Any, written_at: float | None = None) -> bytes:
        """:func:`pack_value` then :meth:`seal`."""
        return self.seal(key, pack_value(value), written_at)

    def decode(self, key: str, data: bytes) -> Any:
        """:meth:`open` then :func:`unpack_value`."""
        return unpack_value(self.open(key, data))

    def decode_timed(self, key: str, data: bytes) -> tuple[Any, float]:
        """:meth:`decode`, and the entry's write time (``0.0`` for an entry without one)."""
        body, written_at = self.open_timed(key, data)
        return unpack_value(body), written_at
