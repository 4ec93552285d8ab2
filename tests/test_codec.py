"""Entries: exact round-trips of column values, compression, signing, and refusing bad bytes."""

from __future__ import annotations

import datetime
import decimal
import hashlib
import hmac
import math
import subprocess
import sys
import uuid
import zlib
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgpack
import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cachedecor
from cachedecor.codec import (
    FORMAT_VERSION,
    MAX_BODY_SIZE,
    SIG_LEN,
    BadEntry,
    Codec,
    UnencodableValue,
    pack_value,
    unpack_value,
)

ROOT = Path(__file__).resolve().parent.parent
PROPERTY = settings(max_examples=150, deadline=None)
SECRET = b"s3cret"

# flags byte of the header
NONE, ZLIB, ZSTD, SIGNED = 0, 1, 2, 4


# --------------------------------------------------------------------------------------
# exact equality: same value, same type, same time zone


def tz_identity(value: datetime.datetime | datetime.time) -> Any:
    tz = value.tzinfo
    if tz is None:
        return None
    return type(tz), getattr(tz, "key", None), value.utcoffset(), value.tzname()


def assert_same(actual: Any, expected: Any) -> None:
    """``actual`` is ``expected``'s exact twin (recursively), not merely equal to it."""
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    elif isinstance(expected, float):
        assert actual == expected or (math.isnan(actual) and math.isnan(expected))
        assert math.copysign(1.0, actual) == math.copysign(1.0, expected)
    elif isinstance(expected, decimal.Decimal):
        assert str(actual) == str(expected)
    elif isinstance(expected, (datetime.datetime, datetime.time)):
        assert actual.replace(tzinfo=None) == expected.replace(tzinfo=None)
        assert actual.fold == expected.fold
        assert tz_identity(actual) == tz_identity(expected)
    else:
        assert actual == expected


def round_trip(value: Any) -> Any:
    return unpack_value(pack_value(value))


# --------------------------------------------------------------------------------------
# strategies

folds = st.sampled_from([0, 1])
offsets = st.timedeltas(
    min_value=-datetime.timedelta(hours=23, minutes=59, seconds=59),
    max_value=datetime.timedelta(hours=23, minutes=59, seconds=59),
)
fixed_zones = st.one_of(
    st.just(datetime.timezone.utc),
    offsets.map(datetime.timezone),
    st.builds(datetime.timezone, offsets, st.text(max_size=12)),
)
named_zones = st.one_of(
    st.sampled_from(["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "UTC"]).map(ZoneInfo),
    st.timezones(),
)
zones = st.one_of(fixed_zones, named_zones)

naive_datetimes = st.builds(lambda dt, fold: dt.replace(fold=fold), st.datetimes(), folds)
aware_datetimes = st.builds(lambda dt, fold: dt.replace(fold=fold), st.datetimes(timezones=zones), folds)
times = st.builds(lambda t, fold: t.replace(fold=fold), st.times(timezones=st.none() | zones), folds)
decimals = st.decimals(allow_nan=False)
big_ints = st.one_of(st.integers(min_value=2**64), st.integers(max_value=-(2**63) - 1))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(),
    st.binary(),
    naive_datetimes,
    aware_datetimes,
    st.dates(),
    times,
    st.timedeltas(),
    decimals,
    st.uuids(),
)
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
rows = st.dictionaries(st.text(max_size=10), scalars | json_like, max_size=8)


# --------------------------------------------------------------------------------------
# pack_value / unpack_value round-trips


@PROPERTY
@given(naive_datetimes)
def test_naive_datetime_round_trips(value: datetime.datetime) -> None:
    assert_same(round_trip(value), value)


@PROPERTY
@given(aware_datetimes)
@example(datetime.datetime(2024, 10, 27, 2, 30, tzinfo=ZoneInfo("Europe/Paris"), fold=1))
@example(datetime.datetime(2024, 3, 31, 2, 30, tzinfo=ZoneInfo("Europe/Paris")))  # in the spring gap
@example(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=-5), "EST")))
@example(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(0), "GMT")))
@example(datetime.datetime(1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(minutes=-1))))
def test_aware_datetime_round_trips_with_its_time_zone(value: datetime.datetime) -> None:
    assert_same(round_trip(value), value)


def test_zoneinfo_keeps_its_key() -> None:
    value = datetime.datetime(2024, 7, 1, 12, tzinfo=ZoneInfo("Europe/Paris"))

    result = round_trip(value)

    assert isinstance(result.tzinfo, ZoneInfo)
    assert result.tzinfo.key == "Europe/Paris"


def test_utc_stays_utc() -> None:
    assert (
        round_trip(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)).tzinfo
        is datetime.timezone.utc
    )


@PROPERTY
@given(st.dates())
def test_date_round_trips(value: datetime.date) -> None:
    assert_same(round_trip(value), value)


@PROPERTY
@given(times)
@example(datetime.time(1, 2, 3, 4, tzinfo=ZoneInfo("America/New_York"), fold=1))
def test_time_round_trips_with_and_without_time_zone(value: datetime.time) -> None:
    assert_same(round_trip(value), value)


@PROPERTY
@given(st.timedeltas())
def test_timedelta_round_trips(value: datetime.timedelta) -> None:
    assert_same(round_trip(value), value)


@PROPERTY
@given(decimals)
@example(decimal.Decimal("1E+3"))
@example(decimal.Decimal("-0.000"))
@example(decimal.Decimal("-0"))
@example(decimal.Decimal("1.000"))
@example(decimal.Decimal("1.5E-300"))
@example(decimal.Decimal("Infinity"))
@example(decimal.Decimal("-Infinity"))
@example(decimal.Decimal("123456789012345678901234567890.123456789"))
def test_decimal_round_trips_with_its_exponent_and_sign(value: decimal.Decimal) -> None:
    assert_same(round_trip(value), value)


@PROPERTY
@given(st.uuids())
def test_uuid_round_trips(value: uuid.UUID) -> None:
    assert_same(round_trip(value), value)


@PROPERTY
@given(st.binary())
def test_bytes_round_trip(value: bytes) -> None:
    assert_same(round_trip(value), value)


@PROPERTY
@given(big_ints)
@example(2**64)
@example(-(2**63) - 1)
@example(2**64 - 1)
@example(-(2**63))
def test_integers_beyond_64_bits_round_trip(value: int) -> None:
    assert_same(round_trip(value), value)


@pytest.mark.parametrize("value", [10**4300 - 1, -(10**4300 - 1)], ids=["positive", "negative"])
def test_longest_encodable_integers_round_trip(value: int) -> None:
    assert_same(round_trip(value), value)


@pytest.mark.parametrize("value", [10**4300, -(10**4300)], ids=["positive", "negative"])
def test_integers_too_long_to_read_back_are_unencodable(value: int) -> None:
    with pytest.raises(UnencodableValue):
        pack_value(value)


@PROPERTY
@given(st.floats())
@example(-0.0)
@example(float("nan"))
@example(float("inf"))
@example(5e-324)
def test_float_round_trips_bit_for_bit(value: float) -> None:
    assert_same(round_trip(value), value)


def test_none_round_trips() -> None:
    assert round_trip(None) is None


@PROPERTY
@given(json_like)
def test_json_like_structures_round_trip(value: Any) -> None:
    assert_same(round_trip(value), value)


@PROPERTY
@given(rows)
def test_rows_of_mixed_column_values_round_trip(value: dict[str, Any]) -> None:
    assert_same(round_trip(value), value)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(object(), id="object"),
        pytest.param({"column": object()}, id="object-in-dict"),
        pytest.param([1, object()], id="object-in-list"),
        pytest.param({1, 2}, id="set"),
        pytest.param(1 + 2j, id="complex"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param(ZoneInfo, id="class"),
    ],
)
def test_value_without_a_safe_encoding_is_unencodable(value: Any) -> None:
    with pytest.raises(UnencodableValue):
        pack_value(value)
    with pytest.raises(UnencodableValue):
        Codec().encode("k", value)


# --------------------------------------------------------------------------------------
# Codec: compression


def incompressible(size: int) -> bytes:
    blocks = (hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def test_body_at_the_threshold_is_stored_uncompressed() -> None:
    body = b"a" * 100

    entry = Codec(compress_threshold=100).seal("k", body)

    assert entry == bytes((FORMAT_VERSION, NONE)) + body


@pytest.mark.parametrize(("compression", "flag"), [("zlib", ZLIB), ("zstd", ZSTD)])
def test_compressible_body_above_the_threshold_is_compressed(compression: str, flag: int) -> None:
    codec = Codec(compress_threshold=100, compression=compression)
    body = b"a" * 101

    entry = codec.seal("k", body)

    assert entry[:2] == bytes((FORMAT_VERSION, flag))
    assert len(entry) < len(body)
    assert codec.open("k", entry) == body


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_body_that_does_not_shrink_is_stored_uncompressed(compression: str) -> None:
    body = incompressible(4000)

    entry = Codec(compress_threshold=0, compression=compression).seal("k", body)

    assert entry == bytes((FORMAT_VERSION, NONE)) + body


def test_compression_none_never_compresses() -> None:
    body = b"a" * 10_000

    assert (
        Codec(compress_threshold=0, compression="none").seal("k", body)
        == bytes((FORMAT_VERSION, NONE)) + body
    )


@pytest.mark.parametrize("level", [1, 9])
def test_zlib_level_is_used(level: int) -> None:
    body = b"".join(str(i).encode() for i in range(5000))

    entry = Codec(compress_threshold=0, compress_level=level).seal("k", body)

    assert entry[2:] == zlib.compress(body, level)


@pytest.mark.parametrize(
    ("written_by", "read_by"),
    [("zstd", "zlib"), ("zlib", "zstd"), ("zlib", "none"), ("zstd", "none")],
)
def test_entries_stay_readable_after_the_compression_setting_changes(written_by: str, read_by: str) -> None:
    value = {"text": "x" * 5000}
    entry = Codec(compress_threshold=0, compression=written_by).encode("k", value)

    assert Codec(compression=read_by).decode("k", entry) == value


CODECS = [
    pytest.param(Codec(compress_threshold=16), id="zlib"),
    pytest.param(Codec(compress_threshold=16, compression="zstd"), id="zstd"),
    pytest.param(Codec(compress_threshold=16, compression="none"), id="none"),
    pytest.param(
        Codec(compress_threshold=16, compression="zstd", compress_level=19, secret=SECRET), id="signed"
    ),
]


@pytest.mark.parametrize("codec", CODECS)
@PROPERTY
@given(value=rows)
def test_codec_round_trips_rows(codec: Codec, value: dict[str, Any]) -> None:
    assert_same(codec.decode("cachedecor:t:0:1", codec.encode("cachedecor:t:0:1", value)), value)


# --------------------------------------------------------------------------------------
# Codec: entry layout


def test_entry_starts_with_the_format_version_then_the_flags() -> None:
    entry = Codec().encode("k", {"a": 1})

    assert FORMAT_VERSION == 1
    assert entry == bytes((1, NONE)) + pack_value({"a": 1})


def test_signed_entry_is_header_then_truncated_hmac_then_body() -> None:
    body = pack_value({"a": 1})
    header = bytes((FORMAT_VERSION, NONE | SIGNED))
    signature = hmac.new(SECRET, b"the key" + header + body, hashlib.sha256).digest()[:SIG_LEN]

    entry = Codec(secret=SECRET).encode("the key", {"a": 1})

    assert SIG_LEN == 16
    assert entry == header + signature + body


def test_signed_compressed_entry_sets_both_flags() -> None:
    entry = Codec(compress_threshold=0, secret=SECRET).encode("k", "x" * 1000)

    assert entry[1] == ZLIB | SIGNED


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(b"", id="empty"),
        pytest.param(bytes((FORMAT_VERSION,)), id="version-only"),
        pytest.param(bytes((0, NONE)) + pack_value(1), id="version-0"),
        pytest.param(bytes((FORMAT_VERSION + 1, NONE)) + pack_value(1), id="future-version"),
        pytest.param(bytes((FORMAT_VERSION, 0x08)) + pack_value(1), id="unknown-flag"),
        pytest.param(bytes((FORMAT_VERSION, 0x03)) + pack_value(1), id="unknown-compression"),
        pytest.param(b"\x80\x04\x95", id="a-pickle"),
    ],
)
def test_entry_with_an_unknown_header_is_a_bad_entry(entry: bytes) -> None:
    with pytest.raises(BadEntry):
        Codec().decode("k", entry)


# --------------------------------------------------------------------------------------
# Codec: signing


def signed_entry() -> bytes:
    return Codec(secret=SECRET).encode("the key", {"a": 1})


BAD_SIGNED = [
    pytest.param(Codec(secret=b"other"), "the key", signed_entry(), id="wrong-secret"),
    pytest.param(Codec(secret=SECRET), "another key", signed_entry(), id="moved-to-another-key"),
    pytest.param(Codec(secret=SECRET), "the key", signed_entry()[:2], id="signature-missing"),
    pytest.param(
        Codec(secret=SECRET), "the key", signed_entry()[: 2 + SIG_LEN - 1], id="signature-truncated"
    ),
    pytest.param(
        Codec(secret=SECRET),
        "the key",
        bytes((FORMAT_VERSION, NONE)) + signed_entry()[2 + SIG_LEN :],
        id="signature-stripped",
    ),
    pytest.param(
        Codec(secret=SECRET), "the key", Codec().encode("the key", {"a": 1}), id="unsigned-when-secret"
    ),
    pytest.param(Codec(), "the key", signed_entry(), id="signed-when-no-secret"),
    pytest.param(Codec(secret=SECRET), "the key", signed_entry()[:-1] + b"\x02", id="body-tampered"),
    pytest.param(
        Codec(secret=SECRET),
        "the key",
        bytes((FORMAT_VERSION, ZLIB | SIGNED)) + signed_entry()[2:],
        id="header-tampered",
    ),
]


@pytest.mark.parametrize(("codec", "key", "entry"), BAD_SIGNED)
def test_entry_that_fails_signature_checks_is_a_bad_entry(codec: Codec, key: str, entry: bytes) -> None:
    with pytest.raises(BadEntry):
        codec.decode(key, entry)


def test_signed_entry_reads_back_under_its_key_with_its_secret() -> None:
    assert Codec(secret=SECRET).decode("the key", signed_entry()) == {"a": 1}


# --------------------------------------------------------------------------------------
# Codec: garbage never raises anything but BadEntry

GARBAGE_CODECS = [
    pytest.param(Codec(), id="plain"),
    pytest.param(Codec(compression="zstd"), id="zstd"),
    pytest.param(Codec(secret=SECRET), id="signed"),
]


@pytest.mark.parametrize("codec", GARBAGE_CODECS)
@PROPERTY
@given(data=st.binary(max_size=300))
def test_garbage_bytes_raise_only_bad_entry(codec: Codec, data: bytes) -> None:
    try:
        codec.decode("k", data)
    except BadEntry:
        pass


@pytest.mark.parametrize("flags", [NONE, ZLIB, ZSTD], ids=["none", "zlib", "zstd"])
@PROPERTY
@given(body=st.binary(max_size=300))
def test_garbage_body_behind_a_valid_header_raises_only_bad_entry(flags: int, body: bytes) -> None:
    try:
        Codec().decode("k", bytes((FORMAT_VERSION, flags)) + body)
    except BadEntry:
        pass


ext_payloads = st.recursive(
    st.none()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.floats(),
    lambda children: st.lists(children, max_size=10),
    max_leaves=12,
)
forged_exts = st.one_of(
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=40)),
    st.builds(msgpack.ExtType, st.integers(0, 9), ext_payloads.map(msgpack.packb)),
)


@PROPERTY
@given(st.lists(forged_exts, min_size=1, max_size=3))
@example([msgpack.ExtType(1, msgpack.packb([2024, 1, 1, 0, 0, 0, 0, 0, "../../etc/passwd"]))])
@example([msgpack.ExtType(3, msgpack.packb([0, 0, 0, 0, 0, [0, 0, 0, 5]]))])
@example([msgpack.ExtType(7, b"1" * 5000)])
@example([msgpack.ExtType(6, b"short")])
def test_forged_extension_values_raise_only_bad_entry(exts: list[msgpack.ExtType]) -> None:
    try:
        Codec().decode("k", bytes((FORMAT_VERSION, NONE)) + msgpack.packb(exts))
    except BadEntry:
        pass


# --------------------------------------------------------------------------------------
# Codec: size limit on decompressed bodies


def packed_bytes(size: int) -> bytes:
    """A valid body (a MessagePack bin) that is exactly ``size`` bytes long."""
    return msgpack.packb(b"\0" * (size - 5))


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_body_of_exactly_the_size_limit_is_read(compression: str) -> None:
    codec = Codec(compress_threshold=0, compression=compression)
    body = packed_bytes(MAX_BODY_SIZE)

    assert codec.open("k", codec.seal("k", body)) == body


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_body_larger_than_the_limit_is_a_bad_entry(compression: str) -> None:
    codec = Codec(compress_threshold=0, compression=compression)
    entry = codec.seal("k", packed_bytes(MAX_BODY_SIZE + 1))
    assert len(entry) < 100_000  # a small entry ...

    with pytest.raises(BadEntry):
        codec.decode("k", entry)  # ... that would decompress past the limit


def test_zlib_decompression_bomb_is_a_bad_entry() -> None:
    bomb = zlib.compress(packed_bytes(4 * MAX_BODY_SIZE), 9)

    with pytest.raises(BadEntry):
        Codec().decode("k", bytes((FORMAT_VERSION, ZLIB)) + bomb)


@pytest.mark.parametrize("content_size_in_header", [True, False], ids=["sized-frame", "unsized-frame"])
def test_zstd_decompression_bomb_is_a_bad_entry(content_size_in_header: bool) -> None:
    compressor = zstandard.ZstdCompressor(write_content_size=content_size_in_header)
    bomb = compressor.compress(packed_bytes(4 * MAX_BODY_SIZE))

    with pytest.raises(BadEntry):
        Codec().decode("k", bytes((FORMAT_VERSION, ZSTD)) + bomb)


# --------------------------------------------------------------------------------------
# Codec: configuration and sharing


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"compression": "lz4"}, id="unknown-compression"),
        pytest.param({"compress_threshold": -1}, id="negative-threshold"),
        pytest.param({"compress_level": 10}, id="zlib-level-too-high"),
        pytest.param({"compress_level": -2}, id="zlib-level-too-low"),
        pytest.param({"compression": "zstd", "compress_level": 23}, id="zstd-level-too-high"),
    ],
)
def test_bad_codec_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(cachedecor.ConfigError):
        Codec(**options)


def test_codec_errors_are_cache_errors() -> None:
    assert issubclass(BadEntry, cachedecor.CacheError)
    assert issubclass(UnencodableValue, cachedecor.CacheError)
    assert issubclass(UnencodableValue, TypeError)


SHARED_CODEC_SCRIPT = """
import threading
from cachedecor.codec import Codec

codec = Codec(compress_threshold=0, compression="zstd")
failures = []

def work(seed):
    for i in range(150):
        value = {"seed": seed, "i": i, "text": f"{seed}-{i}-" * 3000}
        try:
            if codec.decode("k", codec.encode("k", value)) != value:
                failures.append((seed, i))
        except Exception as exc:
            failures.append(repr(exc))

threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("failures:", failures[:3])
"""


def test_zstd_codec_is_safe_to_share_between_threads() -> None:
    # In a child process: sharing zstandard's (de)compressor across threads can crash it.
    result = subprocess.run(
        [sys.executable, "-c", SHARED_CODEC_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "failures: []"


def test_a_dict_with_non_string_keys_is_refused_when_written_not_dropped_on_every_read() -> None:
    with pytest.raises(UnencodableValue, match="read back"):
        pack_value({"doc": {1: "one"}})
