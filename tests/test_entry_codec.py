"""The entry codec: exact round trips, compression, signing, and garbage that stays harmless."""

from __future__ import annotations

import datetime
import decimal
import zlib
import zoneinfo
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachedecor import Codec, ConfigError
from cachedecor.codec import (
    ABSENT,
    FORMAT_VERSION,
    MAX_BODY_SIZE,
    BadEntry,
    UnencodableValue,
    pack_value,
    unpack_value,
)

SETTINGS = settings(max_examples=150, deadline=None)

ZONES = ["Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "UTC"]

fixed_offsets = st.builds(
    lambda minutes, name: (
        datetime.timezone(datetime.timedelta(minutes=minutes), name)
        if name
        else datetime.timezone(datetime.timedelta(minutes=minutes))
    ),
    st.integers(min_value=-23 * 60, max_value=23 * 60),
    st.one_of(st.none(), st.sampled_from(["EST", "CET", "X"])),
)
timezones = st.one_of(st.none(), fixed_offsets, st.sampled_from(ZONES).map(zoneinfo.ZoneInfo))
datetimes = st.builds(
    lambda dt, tz, fold: dt.replace(tzinfo=tz, fold=fold),
    st.datetimes(),
    timezones,
    st.integers(0, 1),
)
times = st.builds(lambda t, tz: t.replace(tzinfo=tz), st.times(), st.one_of(st.none(), fixed_offsets))
decimals = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False),
    st.sampled_from([decimal.Decimal("1E+3"), decimal.Decimal("-0.000"), decimal.Decimal("12345.678900")]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    datetimes,
    st.dates(),
    times,
    st.timedeltas(),
    decimals,
    st.uuids(),
)
json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**60), 2**60), st.floats(allow_nan=False), st.text()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equal, of the same type, and for times with the same time zone."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, (datetime.datetime, datetime.time)):
        if a != b or a.fold != b.fold or (a.tzinfo is None) != (b.tzinfo is None):
            return False
        if isinstance(a.tzinfo, zoneinfo.ZoneInfo):
            return isinstance(b.tzinfo, zoneinfo.ZoneInfo) and a.tzinfo.key == b.tzinfo.key
        probe = a if isinstance(a, datetime.datetime) else None
        return a.tzinfo is None or (
            a.tzinfo.utcoffset(probe) == b.tzinfo.utcoffset(probe)
            and a.tzinfo.tzname(probe) == b.tzinfo.tzname(probe)
        )
    return bool(a == b)


@SETTINGS
@given(scalars)
def test_every_column_value_round_trips_exactly(value: Any) -> None:
    assert same(unpack_value(pack_value(value)), value)


@SETTINGS
@given(st.lists(scalars, max_size=12))
def test_rows_of_values_round_trip(values: list[Any]) -> None:
    assert same(unpack_value(pack_value(values)), values)


@SETTINGS
@given(json_like)
def test_json_documents_round_trip(doc: Any) -> None:
    assert same(unpack_value(pack_value(doc)), doc)


def test_unloaded_marker_round_trips() -> None:
    assert unpack_value(pack_value([1, ABSENT])) == [1, ABSENT]


def test_unencodable_values_raise() -> None:
    with pytest.raises(UnencodableValue):
        pack_value(object())
    with pytest.raises(UnencodableValue):
        pack_value({1, 2})


class TestCompression:
    def test_small_bodies_are_not_compressed(self) -> None:
        entry = Codec(compress_threshold=100).encode("k", "x" * 50)
        assert entry[:2] == bytes((FORMAT_VERSION, 0))

    @pytest.mark.parametrize(("compression", "flag"), [("zlib", 1), ("zstd", 2)])
    def test_large_bodies_are_compressed_and_round_trip(self, compression: str, flag: int) -> None:
        codec = Codec(compress_threshold=100, compression=compression)
        entry = codec.encode("k", "x" * 5000)
        assert entry[1] == flag
        assert len(entry) < 500
        assert codec.decode("k", entry) == "x" * 5000

    def test_incompressible_bodies_are_stored_plain(self) -> None:
        import os

        data = os.urandom(4000)
        entry = Codec(compress_threshold=100).encode("k", data)
        assert entry[1] == 0

    def test_a_zstd_entry_is_read_by_a_zlib_region(self) -> None:
        entry = Codec(compress_threshold=10, compression="zstd").encode("k", "y" * 1000)
        assert Codec().decode("k", entry) == "y" * 1000

    def test_a_decompression_bomb_is_refused(self) -> None:
        body = zlib.compress(b"\x00" * (MAX_BODY_SIZE + 10))
        with pytest.raises(BadEntry):
            Codec().decode("k", bytes((FORMAT_VERSION, 1)) + body)

    @pytest.mark.parametrize(
        "options",
        [
            {"compression": "lz4"},
            {"compress_threshold": -1},
            {"compress_level": 10},
            {"compression": "zstd", "compress_level": 23},
        ],
    )
    def test_bad_settings_are_config_errors(self, options: dict[str, Any]) -> None:
        with pytest.raises(ConfigError):
            Codec(**options)


class TestSigning:
    def test_signed_entries_round_trip(self) -> None:
        codec = Codec(secret=b"s3cret")
        entry = codec.encode("k", [1, "a"])
        assert entry[1] & 0x04
        assert codec.decode("k", entry) == [1, "a"]

    def test_a_wrong_secret_is_refused(self) -> None:
        entry = Codec(secret=b"one").encode("k", 1)
        with pytest.raises(BadEntry, match="signature"):
            Codec(secret=b"two").decode("k", entry)

    def test_an_entry_moved_to_another_key_is_refused(self) -> None:
        codec = Codec(secret=b"s")
        with pytest.raises(BadEntry, match="signature"):
            codec.decode("other", codec.encode("k", 1))

    def test_an_unsigned_entry_is_refused_when_a_secret_is_set(self) -> None:
        with pytest.raises(BadEntry, match="unsigned"):
            Codec(secret=b"s").decode("k", Codec().encode("k", 1))

    def test_a_signed_entry_is_refused_without_a_secret(self) -> None:
        with pytest.raises(BadEntry, match="no secret"):
            Codec().decode("k", Codec(secret=b"s").encode("k", 1))

    def test_a_tampered_body_is_refused(self) -> None:
        codec = Codec(secret=b"s")
        entry = bytearray(codec.encode("k", "value"))
        entry[-1] ^= 1
        with pytest.raises(BadEntry):
            codec.decode("k", bytes(entry))


class TestGarbage:
    @SETTINGS
    @given(st.binary(max_size=300))
    def test_random_bytes_only_ever_raise_bad_entry(self, data: bytes) -> None:
        for codec in (Codec(), Codec(secret=b"s")):
            try:
                codec.decode("k", data)
            except BadEntry:
                pass

    @SETTINGS
    @given(st.binary(max_size=300))
    def test_random_bodies_behind_a_valid_header_only_raise_bad_entry(self, body: bytes) -> None:
        for flags in (0, 1, 2):
            try:
                Codec().decode("k", bytes((FORMAT_VERSION, flags)) + body)
            except BadEntry:
                pass

    @pytest.mark.parametrize(
        "data",
        [b"", b"\x01", b"\x02\x00abc", b"\x01\x80abc", b"\x01\x00\xc1", b"\x01\x00\xd4\x63\x00"],
        ids=["empty", "header only", "future version", "unknown flags", "reserved byte", "unknown ext type"],
    )
    def test_known_bad_shapes_are_bad_entries(self, data: bytes) -> None:
        with pytest.raises(BadEntry):
            Codec().decode("k", data)
