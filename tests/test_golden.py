"""Golden files: this release makes the keys, and reads the entries, of the release that wrote them.

``tests/data/golden/keys.json`` and ``entries.json`` were written once, by
``tools/make_golden.py`` with the code of the day, and are never regenerated to make
this module pass: they pin what a process of the previous release and one of this
release must agree on while both run during a rolling deploy.

* every key in ``keys.json`` is made identically, by :func:`cachedecor.key_for` and by
  the decorators' ``cache_key``;
* every entry in ``entries.json``, put as it is under its key in a region configured as
  the one that wrote it (memory backend and a real memcached), is a counted hit of a
  ``@cached_by_pk`` reader returning the recorded class and column values;
* what this release writes for the same row is what the golden entry holds (see
  :class:`TestWrites` for what is byte for byte and what cannot be).

The entries hold the mapping fingerprint of the models in ``tests/models.py`` as they
were when the files were written: changing one of those models makes its golden entries
another mapping's (misses, as they must be). Copy the old model here instead of
regenerating the files.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import enum
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy
from sqlalchemy import Enum as SAEnum
from sqlalchemy import LargeBinary, Numeric
from sqlalchemy.engine import Engine
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, undefer
from sqlalchemy.types import DateTime

import cachedecor
from cachedecor import CachedFunction, cached_by_pk, key_for
from cachedecor.codec import ABSENT
from cachedecor.config import region_settings
from cachedecor.rows import mapping_fingerprint, model_plan
from tests.conftest import memcached_config
from tests.models import (
    Color,
    Employee,
    Engineer,
    Everything,
    Manager,
    Member,
    Membership,
    Note,
    Post,
    Team,
    Truck,
    User,
    Vehicle,
)
from tests.servers import Memcached

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


class GoldenBase(DeclarativeBase):
    pass


class Reading(GoldenBase):
    """A composite primary key of the types whose key text has a form of its own."""

    __tablename__ = "cd_golden_readings"
    day: Mapped[datetime.date] = mapped_column(primary_key=True)
    at: Mapped[datetime.datetime] = mapped_column(DateTime, primary_key=True)
    amount: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 4), primary_key=True)
    code: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    color: Mapped[Color] = mapped_column(SAEnum(Color), primary_key=True)
    active: Mapped[bool] = mapped_column(primary_key=True)
    value: Mapped[float]


MODELS: dict[str, Any] = {
    cls.__name__: cls
    for cls in (
        User,
        Post,
        Membership,
        Employee,
        Manager,
        Engineer,
        Vehicle,
        Truck,
        Everything,
        Team,
        Member,
        Note,
        Reading,
    )
}
ENUMS: dict[str, type[enum.Enum]] = {"Color": Color}


# --------------------------------------------------------------------------------------
# the JSON form of column and primary-key values
#
# JSON's own scalars stand for themselves; every other value is a one-key object naming
# its type ({"decimal": "1.50"}, {"datetime": ..., "tz": ..., "fold": ...}); a JSON
# document (a dict) is {"dict": {...}}, a composite primary key {"tuple": [...]} and a
# column that was not loaded {"absent": true}. Two values are the same when their JSON
# texts are: 1, 1.0 and true differ, so do two datetimes of one instant in two zones.


def tz_to_json(tz: datetime.tzinfo | None, dt: datetime.datetime | None) -> Any:
    if tz is None:
        return None
    if isinstance(tz, ZoneInfo):
        return {"zone": tz.key}
    offset = tz.utcoffset(dt)
    assert offset is not None
    return {"offset_us": offset // datetime.timedelta(microseconds=1), "name": tz.tzname(dt)}


def tz_from_json(data: Any) -> datetime.tzinfo | None:
    if data is None:
        return None
    if "zone" in data:
        return ZoneInfo(data["zone"])
    return datetime.timezone(datetime.timedelta(microseconds=data["offset_us"]), data["name"])


def to_json(value: Any) -> Any:
    """The JSON form of a column or primary-key value (see above)."""
    if value is ABSENT:
        return {"absent": True}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return {"enum": f"{type(value).__name__}.{value.name}"}
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, datetime.datetime):
        naive = value.replace(tzinfo=None, fold=0).isoformat()
        return {"datetime": naive, "tz": tz_to_json(value.tzinfo, value), "fold": value.fold}
    if isinstance(value, datetime.date):
        return {"date": value.isoformat()}
    if isinstance(value, datetime.time):
        naive = value.replace(tzinfo=None, fold=0).isoformat()
        return {"time": naive, "tz": tz_to_json(value.tzinfo, None), "fold": value.fold}
    if isinstance(value, datetime.timedelta):
        return {"timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {"decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    if isinstance(value, tuple):
        return {"tuple": [to_json(v) for v in value]}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: to_json(v) for k, v in value.items()}}
    raise TypeError(f"no JSON form for {value!r}")


def from_json(data: Any) -> Any:
    """Inverse of :func:`to_json`."""
    if isinstance(data, list):
        return [from_json(v) for v in data]
    if not isinstance(data, dict):
        return data
    ((tag, inner),) = ((k, v) for k, v in data.items() if k not in ("tz", "fold"))
    if tag == "absent":
        return ABSENT
    if tag == "enum":
        cls, name = inner.split(".")
        return ENUMS[cls][name]
    if tag == "datetime":
        return datetime.datetime.fromisoformat(inner).replace(
            tzinfo=tz_from_json(data["tz"]), fold=data["fold"]
        )
    if tag == "date":
        return datetime.date.fromisoformat(inner)
    if tag == "time":
        return datetime.time.fromisoformat(inner).replace(tzinfo=tz_from_json(data["tz"]), fold=data["fold"])
    if tag == "timedelta":
        return datetime.timedelta(days=inner[0], seconds=inner[1], microseconds=inner[2])
    if tag == "decimal":
        return decimal.Decimal(inner)
    if tag == "uuid":
        return uuid.UUID(inner)
    if tag == "bytes":
        return base64.b64decode(inner)
    if tag == "tuple":
        return tuple(from_json(v) for v in inner)
    if tag == "dict":
        return {k: from_json(v) for k, v in inner.items()}
    raise ValueError(f"unknown tag {tag!r}")


def exact(value: Any) -> str:
    """A text that two values share only when they are the same value, of the same type."""
    return json.dumps(to_json(value))


def loaded_values(obj: Any, keys: list[str]) -> dict[str, Any]:
    """The JSON form of ``obj``'s columns ``keys`` as they are, without loading any."""
    state = sqlalchemy.inspect(obj).dict
    return {k: to_json(state.get(k, ABSENT)) for k in keys}


# --------------------------------------------------------------------------------------
# readers


def make_reader(spec: Mapping[str, Any], load: Callable[[Session, Any, Any], Any]) -> CachedFunction[Any]:
    """A ``@cached_by_pk`` reader as ``spec`` describes it (model, cache_none, shard),
    whose misses call ``load(session, pk, shard)``."""
    model = MODELS[spec["model"]]
    if spec["shard"]:

        def read_on_shard(session: Session, pk: Any, shard: str) -> Any:
            return load(session, pk, shard)

        return cached_by_pk(model, cache_none=spec["cache_none"], identity_token="shard")(read_on_shard)

    def read(session: Session, pk: Any) -> Any:
        return load(session, pk, None)

    return cached_by_pk(model, cache_none=spec["cache_none"])(read)


def database_load(spec: Mapping[str, Any]) -> Callable[[Session, Any, Any], Any]:
    """What the readers that wrote the golden entries did on a miss."""
    model = MODELS[spec["model"]]
    options = [undefer(getattr(model, name)) for name in spec["undefer"]]

    def load(session: Session, pk: Any, shard: Any) -> Any:
        return session.get(model, pk, options=options, identity_token=shard)

    return load


@contextmanager
def reader_session(engine: Engine, space: Mapping[str, Any] | None) -> Iterator[Session]:
    """A session whose reads land in ``space`` (schema, identity token) of ``engine``.

    With a token, a ``ShardedSession`` whose shard of that name translates the mapped
    tables to the schema, if any; with a schema only, an engine that translates them.
    """
    schema = None if space is None else space["schema"]
    token = None if space is None else space["identity_token"]
    bind = engine if schema is None else engine.execution_options(schema_translate_map={None: schema})
    if token is None:
        with Session(bind) as session:
            yield session
        return
    every = [token]
    sharded = ShardedSession(
        shards={token: bind},
        shard_chooser=lambda mapper, instance, **kw: token,
        identity_chooser=lambda mapper, primary_key, **kw: every,
        execute_chooser=lambda context: every,
    )
    with sharded:
        yield sharded


# --------------------------------------------------------------------------------------
# the golden files


def load_golden(name: str) -> Any:
    """A golden file's data; none (no cases) before ``tools/make_golden.py`` wrote it, which
    :meth:`TestGoldenFiles.test_the_files_cover_what_a_rolling_deploy_meets` reports."""
    path = GOLDEN / name
    return json.loads(path.read_text()) if path.exists() else {"keys": [], "entries": []}


KEYS: list[dict[str, Any]] = load_golden("keys.json")["keys"]
ENTRIES: list[dict[str, Any]] = load_golden("entries.json")["entries"]
BY_NAME = {e["name"]: e for e in ENTRIES}


def region_config(entry: Mapping[str, Any], backend: str, memcached_url: str | None) -> dict[str, Any]:
    options = {k: v for k, v in entry["region"].items() if v is not None}
    if backend == "memory":
        return {
            "regions": {"default": {"backend": "dogpile.cache.memory", "expiration_time": 300, **options}}
        }
    assert memcached_url is not None
    return memcached_config(memcached_url, **options)


def put_raw(backend: str, memcached: Memcached | None, key: str, data: bytes) -> None:
    """Store ``data`` under ``key`` as a writer of the previous release left it."""
    if backend == "memory":
        store = region_settings("default").store
        store.delete_many([key])
        token = store.lease(key, 5)
        assert store.fill(key, data, token, 300)
        return
    from pymemcache.client.base import Client

    assert memcached is not None
    client = Client(("127.0.0.1", memcached.port), connect_timeout=1, timeout=1)
    try:
        assert client.set(key, data, expire=300, noreply=False)
    finally:
        client.close()


class Read:
    """What a reader made of a golden entry."""

    def __init__(self, entry: Mapping[str, Any], result: Any, counted: dict[str, int], calls: int) -> None:
        self.result = result
        self.counted = counted
        self.calls = calls
        self.hit = counted["hits"] == 1 and calls == 0 and counted["misses"] == 0
        self.values = None if result is None else loaded_values(result, list(entry["values"] or ()))
        self.cls = None if result is None else type(result).__name__

    def matches(self, entry: Mapping[str, Any]) -> bool:
        return self.hit and self.cls == entry["class"] and self.values == entry["values"]


def read_golden(
    entry: Mapping[str, Any],
    data: bytes,
    engine: Engine,
    backend: str = "memory",
    memcached: Memcached | None = None,
) -> Read:
    """Put ``data`` under the entry's key in a region configured as the writer's, and
    read it through a ``@cached_by_pk`` reader in a session of the entry's space."""
    cachedecor.configure_regions(region_config(entry, backend, memcached.url if memcached else None))
    put_raw(backend, memcached, entry["key"], data)
    calls: list[Any] = []

    def not_the_database(session: Session, pk: Any, shard: Any) -> Any:
        calls.append(pk)  # a miss: the golden entry was not used
        return None

    reader = make_reader(entry["reader"], not_the_database)
    pk = from_json(entry["pk"])
    cachedecor.reset_stats()
    with reader_session(engine, entry["space"]) as session:
        if entry["reader"]["shard"]:
            result = reader(session, pk, entry["space"]["identity_token"])
        else:
            result = reader(session, pk)
        read = Read(entry, result, cachedecor.stats("default")["default"], len(calls))
    return read


def golden_bytes(entry: Mapping[str, Any]) -> bytes:
    return base64.b64decode(entry["entry"])


def ids(cases: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in cases]


# --------------------------------------------------------------------------------------


class TestGoldenFiles:
    def test_the_files_cover_what_a_rolling_deploy_meets(self) -> None:
        settings = {json.dumps(e["region"], sort_keys=True) for e in ENTRIES}
        compressions = {e["layout"]["compression"] for e in ENTRIES}
        assert len(KEYS) >= 40 and len(ENTRIES) >= 20 and len(settings) >= 5
        assert compressions == {"none", "zlib", "zstd"}
        assert any(e["layout"]["signed"] for e in ENTRIES)
        assert {e["space"]["schema"] for e in ENTRIES if e["space"]} >= {"tenant_a", None}
        assert any(e["space"] and e["space"]["identity_token"] for e in ENTRIES)
        assert sum((GOLDEN / n).stat().st_size for n in ("keys.json", "entries.json")) < 100_000

    ROWS = [e for e in ENTRIES if e["class"] is not None]  # a cached "no such row" names no mapping

    @pytest.mark.parametrize("entry", ROWS, ids=ids(ROWS))
    def test_the_models_map_what_the_golden_entries_were_written_under(self, entry: dict[str, Any]) -> None:
        mapper = sqlalchemy.inspect(MODELS[entry["class"]])
        assert mapping_fingerprint(mapper) == entry["fingerprint"], (
            f"the mapping of {entry['class']} (tests/models.py) is not the one its golden entries "
            f"were written under: keep a copy of the old model for this test"
        )


class TestKeys:
    @pytest.mark.parametrize("case", KEYS, ids=ids(KEYS))
    def test_key_for_makes_the_golden_key(self, case: dict[str, Any]) -> None:
        options: dict[str, Any] = {}
        for name in ("namespace", "schema", "identity_token"):
            if name in case:
                options[name] = case[name]
        assert key_for(MODELS[case["model"]], from_json(case["pk"]), **options) == case["key"]

    DEFAULT_SPACE = [c for c in KEYS if "schema" not in c and "identity_token" not in c]

    @pytest.mark.parametrize("case", DEFAULT_SPACE, ids=ids(DEFAULT_SPACE))
    def test_the_readers_cache_key_is_the_golden_key(self, case: dict[str, Any]) -> None:
        namespace = case.get("namespace")
        region: dict[str, Any] = {"backend": "dogpile.cache.memory"}
        if namespace is not None:
            region["namespace"] = namespace
        cachedecor.configure_regions({"regions": {"default": region}})
        spec = {"model": case["model"], "cache_none": False, "shard": False}
        reader = make_reader(spec, lambda session, pk, shard: None)

        assert reader.cache_key(from_json(case["pk"])) == case["key"]


BACKENDS = ["memory", "memcached"]


@pytest.fixture(params=BACKENDS)
def golden_backend(request: pytest.FixtureRequest) -> tuple[str, Memcached | None]:
    if request.param == "memcached":
        return "memcached", request.getfixturevalue("memcached")
    return "memory", None


class TestReads:
    @pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
    def test_a_golden_entry_is_a_hit_with_the_recorded_row(
        self, entry: dict[str, Any], sqlite_engine: Engine, golden_backend: tuple[str, Memcached | None]
    ) -> None:
        read = read_golden(entry, golden_bytes(entry), sqlite_engine, *golden_backend)

        assert read.hit, (read.counted, read.calls)
        assert read.cls == entry["class"]
        assert read.values == entry["values"]

    @pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
    def test_a_golden_entry_decodes_to_the_recorded_row(self, entry: dict[str, Any]) -> None:
        cachedecor.configure_regions(region_config(entry, "memory", None))
        codec = region_settings("default").codec
        model = MODELS[entry["reader"]["model"]]
        space = entry["space"]
        token = space["identity_token"] if space else None

        payload, written_at = codec.decode_timed(entry["key"], golden_bytes(entry))
        row = model_plan(model).prepare(payload, entry["key"], token, written_at)

        assert written_at == entry["written_at"]
        assert payload[:3] == [entry["key"], entry["tag"], entry["fingerprint"]]
        if entry["class"] is None:
            assert row.plan is None and entry["values"] is None
        else:
            assert row.plan is not None and row.plan.cls.__name__ == entry["class"]
            values = {k: to_json(row.values.get(k, ABSENT)) for k in row.plan.keys}
            assert values == entry["values"]

    def test_a_reader_of_many_rows_hits_every_golden_entry_in_one_call(self, sqlite_engine: Engine) -> None:
        entries = [BY_NAME[n] for n in ("user-plain", "user-unicode", "user-long-bio")]
        assert len({json.dumps(e["region"], sort_keys=True) for e in entries}) == 1
        cachedecor.configure_regions(region_config(entries[0], "memory", None))
        for e in entries:
            put_raw("memory", None, e["key"], golden_bytes(e))
        calls: list[Any] = []

        @cached_by_pk(User, many=True)
        def get_users(session: Session, user_ids: list[int]) -> list[User]:
            calls.append(user_ids)
            return []

        with Session(sqlite_engine) as session:
            users = get_users(session, [from_json(e["pk"]) for e in entries])
            assert [loaded_values(u, list(e["values"])) for u, e in zip(users, entries, strict=True)] == [
                e["values"] for e in entries
            ]
        assert calls == [] and cachedecor.stats("default")["default"]["hits"] == len(entries)


class TestTheGoldenTestFails:
    """A changed byte of an entry is never served as the recorded row."""

    @pytest.mark.parametrize(
        ("name", "where", "outcome"),
        [
            pytest.param("user-plain", 0, "bad_entries", id="format-version"),
            pytest.param("user-plain", 1, "bad_entries", id="flags"),
            pytest.param("user-plain", "Ada", "wrong-value", id="unsigned-value"),
            pytest.param("user-plain", "fingerprint", "mismatches", id="fingerprint"),
            pytest.param("user-signed", "Ada", "bad_entries", id="signed-value"),
            pytest.param("user-signed", 2, "bad_entries", id="signed-write-time"),
            pytest.param("user-long-bio-signed", -3, "bad_entries", id="signed-compressed-body"),
            pytest.param("user-long-bio-zlib", -3, "bad_entries", id="zlib-checksum"),
            pytest.param("everything-full-zstd", 10, "bad_entries", id="zstd-frame"),
        ],
    )
    def test_a_flipped_byte_is_not_the_recorded_row(
        self, name: str, where: int | str, outcome: str, sqlite_engine: Engine
    ) -> None:
        entry = BY_NAME[name]
        data = bytearray(golden_bytes(entry))
        if where == "fingerprint":  # the payload's third item, after the class tag
            where = data.index(entry["tag"].encode()) + len(entry["tag"]) + 1
        elif isinstance(where, str):  # a byte of a column's text
            where = data.index(where.encode())
        data[where] ^= 0x01

        read = read_golden(entry, bytes(data), sqlite_engine)

        assert not read.matches(entry)
        if outcome == "wrong-value":
            assert read.hit and read.values != entry["values"]
        else:
            assert not read.hit and read.counted[outcome] == 1 and read.calls == 1

    def test_the_golden_entry_of_another_row_is_not_a_hit(self, sqlite_engine: Engine) -> None:
        entry = {**BY_NAME["user-plain"], "pk": 2, "key": key_for(User, 2)}

        read = read_golden(entry, golden_bytes(BY_NAME["user-plain"]), sqlite_engine)

        assert not read.hit and read.counted["mismatches"] == 1


# --------------------------------------------------------------------------------------
# writes
#
# Deterministic: the MessagePack body of a row (the same values give the same bytes),
# the header (format version, flags, and the write time when it is given) and the HMAC
# signature over key, header and body. Not deterministic across environments: the
# compressed body, which depends on the zlib (or zlib-ng) and zstd library versions, and
# with it the signature of a compressed entry; and the write time, which is the time of
# the read that filled the entry. Uncompressed entries are therefore compared byte for
# byte, compressed ones by header and decompressed body.


def header_of(data: bytes) -> bytes:
    """Format version, flags and, when the flags say one follows, the 8-byte write time."""
    return data[: 10 if data[1] & 0x10 else 2]


class TestWrites:
    ROWS = [e for e in ENTRIES if e["class"] is not None]  # a cached "no such row": see FILLED

    @pytest.mark.parametrize("entry", ROWS, ids=ids(ROWS))
    def test_this_release_encodes_the_golden_row_as_the_golden_entry(
        self, entry: dict[str, Any], sqlite_engine: Engine
    ) -> None:
        read = read_golden(entry, golden_bytes(entry), sqlite_engine)
        assert read.hit
        codec = region_settings("default").codec
        plan = model_plan(MODELS[entry["reader"]["model"]])
        golden = golden_bytes(entry)

        payload = plan.snapshot(read.result, entry["key"])
        written = codec.encode(entry["key"], payload, entry["written_at"])

        assert header_of(written) == header_of(golden)
        assert codec.open(entry["key"], written) == codec.open(entry["key"], golden)
        if entry["layout"]["compression"] == "none":
            assert written == golden

    FILLED = [
        e
        for e in ENTRIES
        if e["space"] is None and e["reader"]["model"] not in ("Everything", "Reading") and not e["overrides"]
    ]

    @pytest.mark.parametrize("entry", FILLED, ids=ids(FILLED))
    def test_a_miss_fills_the_body_of_the_golden_entry(
        self, entry: dict[str, Any], sqlite_engine: Engine
    ) -> None:
        golden = golden_bytes(entry)
        if entry["values"] is not None:
            with Session(sqlite_engine) as s:
                row = {k: from_json(v) for k, v in entry["values"].items() if v != {"absent": True}}
                s.add(MODELS[entry["class"]](**row))
                s.commit()
        cachedecor.configure_regions(region_config(entry, "memory", None))
        reader = make_reader(entry["reader"], database_load(entry["reader"]))

        with Session(sqlite_engine) as s:
            reader(s, from_json(entry["pk"]))
        written = region_settings("default").store.get(entry["key"])

        assert written is not None
        codec = region_settings("default").codec
        assert written[:2] == golden[:2]  # format version and flags
        assert codec.open(entry["key"], written) == codec.open(entry["key"], golden)
