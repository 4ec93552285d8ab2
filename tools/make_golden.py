"""Write the golden files of tests/test_golden.py: today's cache keys and stored entries.

Run once, with the release whose keys and entries later releases must keep reading::

    .venv/bin/python tools/make_golden.py [--force]

It writes ``tests/data/golden/keys.json`` (keys made by :func:`cachedecor.key_for`) and
``tests/data/golden/entries.json`` (entries as the region's store holds them, base64,
with the column values of the row each holds). The files are a fixed artifact: the
test never runs this script, and regenerating them to make the test pass defeats it
(hence ``--force`` to overwrite).

The entries are written by the real read path: rows are put in SQLite (with two
attached databases as the tenant schemas ``tenant_a`` and ``tenant_b``), a
``@cached_by_pk`` reader misses and fills a memory-backend region configured as the
entry says, and the stored bytes are read back. Each entry therefore embeds the time
of that read (its write time), recorded beside it as ``written_at``. SQLite returns
naive datetimes and times, so the time-zone-aware values of ``Everything`` are set on
the loaded row as committed values (what PostgreSQL would have returned); those columns
are listed in the entry's ``overrides``.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import decimal
import json
import sys
import tempfile
import uuid
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import sqlalchemy  # noqa: E402
from sqlalchemy import event  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402
from sqlalchemy.orm.attributes import set_committed_value  # noqa: E402

import cachedecor  # noqa: E402
from cachedecor import key_for  # noqa: E402
from cachedecor.codec import ABSENT  # noqa: E402
from cachedecor.config import region_settings  # noqa: E402
from cachedecor.rows import model_plan  # noqa: E402
from tests.models import (  # noqa: E402
    Base,
    Color,
    Employee,
    Engineer,
    Everything,
    Manager,
    Membership,
    Note,
    Post,
    Team,
    Truck,
    User,
    Vehicle,
)
from tests.test_golden import (  # noqa: E402
    GOLDEN,
    MODELS,
    GoldenBase,
    Reading,
    database_load,
    make_reader,
    reader_session,
    to_json,
)

TENANTS = ("tenant_a", "tenant_b")

# -- rows ------------------------------------------------------------------------------

LONG_BIO = " ".join(f"paragraph {i}: the analytical engine weaves algebraic patterns." for i in range(18))
LONG_TEXT = "".join(f"{i:04d}:{'abcdefghij'[i % 10] * (i % 7)};" for i in range(130))
E_FULL = uuid.UUID("6f1c6a4e-0d5b-4c8e-9a37-2f0b8f1d2c01")
E_NULLS = uuid.UUID("00000000-0000-0000-0000-000000000002")
E_OFFSETS = uuid.UUID("ffffffff-ffff-4fff-bfff-fffffffffff3")
READING_PK = (
    datetime.date(2024, 1, 31),
    datetime.datetime(2024, 1, 31, 23, 59, 59, 500000),
    decimal.Decimal("1.5000"),
    b"\x00\xffAB",
    Color.RED,
    True,
)

#: values SQLite cannot return (aware datetimes and times), set on the loaded row
OVERRIDES: dict[uuid.UUID, dict[str, Any]] = {
    E_FULL: {
        # the second 02:30 of the night summer time ends
        "at_aware": datetime.datetime(
            2023, 10, 29, 2, 30, 15, 250000, tzinfo=ZoneInfo("Europe/Paris"), fold=1
        ),
        "clock": datetime.time(
            23, 59, 59, 999999, tzinfo=datetime.timezone(datetime.timedelta(hours=-5), "EST")
        ),
    },
    E_OFFSETS: {
        "at_aware": datetime.datetime(2000, 2, 29, 12, 0, tzinfo=datetime.timezone.utc),
        "at_naive": datetime.datetime(1970, 1, 1),
        "clock": datetime.time(5, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
    },
}


def populate(engine: Engine) -> None:
    with Session(engine) as s:
        s.add_all(
            [
                User(id=1, name="Ada Lovelace", version=3, bio="Analyst of the engine."),
                User(id=2, name="Zoë Ünïcødé ✓ 雪 \U0001f600", version=0, bio=""),
                User(id=3, name="Long Bio", version=1, bio=LONG_BIO),
                Membership(tenant="acme corp", id=7, role="admin"),
                Membership(tenant="t" * 300, id=1, role="owner"),
                Manager(id=10, name="Grace", budget=500),
                Engineer(id=11, name="Linus", language="c"),
                Employee(id=12, name="Ken"),
                Vehicle(id=20, wheels=2),
                Truck(id=21, wheels=18, payload=40000),
                Everything(
                    id=E_FULL,
                    at_naive=datetime.datetime(2024, 2, 29, 13, 45, 30, 123456),
                    day=datetime.date(1999, 12, 31),
                    span=datetime.timedelta(days=-3, seconds=5, microseconds=7),
                    amount=decimal.Decimal("-12345.678900"),
                    blob=bytes(range(256)),
                    color=Color.GREEN,
                    doc={
                        "big": 2**70,
                        "negative": -(2**65),
                        "list": [1, 2.5, "x", None, True, {"k": "v"}],
                        "snow": "☃",
                    },
                    ratio=0.1,
                    flag=True,
                    text=LONG_TEXT,
                ),
                Everything(id=E_NULLS),
                Everything(
                    id=E_OFFSETS,
                    day=datetime.date(1, 1, 1),
                    span=datetime.timedelta(0),
                    amount=decimal.Decimal("0.000001"),
                    blob=b"",
                    color=Color.RED,
                    doc=[],
                    ratio=-2.5e-300,
                    flag=False,
                    text="",
                ),
                Reading(
                    day=READING_PK[0],
                    at=READING_PK[1],
                    amount=READING_PK[2],
                    code=READING_PK[3],
                    color=READING_PK[4],
                    active=READING_PK[5],
                    value=2.5,
                ),
            ]
        )
        s.commit()
    for tenant in TENANTS:
        translated = engine.execution_options(schema_translate_map={None: tenant})
        with Session(translated) as s:
            s.add(User(id=1, name=f"Ada of {tenant}", version=7, bio=""))
            s.commit()


# -- keys ------------------------------------------------------------------------------


def key_cases() -> list[dict[str, Any]]:
    cases: list[tuple[str, Any, Any, dict[str, Any]]] = [
        ("user", User, 42, {}),
        ("user-zero", User, 0, {}),
        ("user-negative", User, -1, {}),
        ("user-below-1e18", User, 10**18 - 1, {}),
        ("user-1e18", User, 10**18, {}),
        ("user-minus-1e18", User, -(10**18), {}),
        ("user-2-63", User, 2**63, {}),
        ("user-1e30", User, 10**30, {}),
        ("user-300-digits-hashed", User, 10**300 + 7, {}),
        ("user-bool", User, True, {}),
        ("user-one-tuple", User, (42,), {}),
        ("post", Post, 5, {}),
        ("note", Note, 9, {}),
        ("team", Team, 3, {}),
        ("membership", Membership, ("acme", 7), {}),
        ("membership-list", Membership, ["acme", 7], {}),
        ("membership-space", Membership, ("a b", 1), {}),
        ("membership-separators", Membership, ("a,1:2#3%4/5", 2), {}),
        ("membership-safe-chars", Membership, ("A-z_0.9~", 3), {}),
        ("membership-accent", Membership, ("é", 1), {}),
        ("membership-decomposed", Membership, ("e\u0301", 1), {}),
        ("membership-emoji", Membership, ("\U0001f600", 5), {}),
        ("membership-lone-surrogate", Membership, ("\ud800", 1), {}),
        ("membership-control", Membership, ("tab\tnl\n\x00", 1), {}),
        ("membership-250-chars", Membership, ("t" * 222, 1), {}),
        ("membership-251-chars-hashed", Membership, ("t" * 223, 1), {}),
        ("membership-hashed", Membership, ("t" * 300, 1), {}),
        ("membership-hashed-unicode", Membership, ("雪" * 100, 2), {}),
        ("membership-negative-id", Membership, ("acme", -7), {}),
        ("everything-uuid", Everything, E_FULL, {}),
        ("employee", Employee, 1, {}),
        ("manager", Manager, 1, {}),
        ("engineer", Engineer, 1, {}),
        ("vehicle", Vehicle, 1, {}),
        ("truck", Truck, 1, {}),
        ("reading-every-type", Reading, READING_PK, {}),
        (
            "reading-negative-decimal",
            Reading,
            (*READING_PK[:2], decimal.Decimal("-0.10"), *READING_PK[3:]),
            {},
        ),
        (
            "reading-aware-datetime",
            Reading,
            (
                READING_PK[0],
                datetime.datetime(2024, 1, 31, 8, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=-8))),
                *READING_PK[2:5],
                False,
            ),
            {},
        ),
        ("namespace-app", User, 1, {"namespace": "app"}),
        ("namespace-dotted", User, 1, {"namespace": "app.v2"}),
        ("namespace-dash", Membership, ("acme", 7), {"namespace": "my-app_3"}),
        ("namespace-64", User, 1, {"namespace": "x" * 64}),
        ("namespace-64-hashed", Membership, ("t" * 200, 1), {"namespace": "x" * 64}),
        ("schema", User, 42, {"schema": "tenant_1"}),
        ("schema-dotted", User, 42, {"schema": "a.b"}),
        ("schema-escaped", User, 42, {"schema": "tenant 7/ü"}),
        ("schema-default", User, 42, {"schema": None}),
        ("schema-composite", Membership, ("acme", 7), {"schema": "tenant_1"}),
        ("schema-subclass", Manager, 1, {"schema": "tenant_1"}),
        ("schema-namespace", User, 1, {"schema": "tenant_1", "namespace": "app"}),
        ("schema-hashed", Membership, ("t" * 300, 1), {"schema": "tenant_1"}),
        ("token", User, 42, {"identity_token": "east"}),
        ("token-int", User, 42, {"identity_token": 3}),
        ("token-escaped", User, 42, {"identity_token": "we st:1"}),
        ("schema-and-token", User, 42, {"schema": "tenant_1", "identity_token": "east"}),
        ("schema-default-and-token", User, 42, {"schema": None, "identity_token": "east"}),
    ]
    out = []
    for name, model, pk, options in cases:
        case: dict[str, Any] = {"name": name, "model": model.__name__, "pk": to_json(pk), **options}
        case["key"] = key_for(model, pk, **options)
        out.append(case)
    return out


# -- entries ---------------------------------------------------------------------------

PLAIN = {"compression": "none"}
DEFAULT: dict[str, Any] = {}  # zlib above 1024 bytes (the defaults)
ZLIB_LOW = {"compress_threshold": 64, "compress_level": 9}
ZSTD = {"compression": "zstd", "compress_threshold": 64}
SIGNED = {"secret": "golden-secret"}
SIGNED_ZSTD = {"compression": "zstd", "compress_threshold": 64, "secret": "golden-secret"}
NAMESPACED = {"namespace": "shop.v2", "compression": "none"}


def spec(
    name: str,
    region: dict[str, Any],
    model: Any,
    pk: Any,
    *,
    undefer: tuple[str, ...] = (),
    cache_none: bool = False,
    schema: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    reader = {
        "model": model.__name__,
        "cache_none": cache_none,
        "shard": token is not None,
        "undefer": undefer,
    }
    space = None if schema is None and token is None else {"schema": schema, "identity_token": token}
    return {"name": name, "region": region, "reader": reader, "pk": pk, "space": space}


ENTRY_SPECS = [
    spec("user-plain", PLAIN, User, 1),
    spec("user-unicode", PLAIN, User, 2),
    spec("user-long-bio", PLAIN, User, 3, undefer=("bio",)),
    spec("user-bio-loaded", PLAIN, User, 1, undefer=("bio",)),
    spec("user-zlib-below-threshold", DEFAULT, User, 1),
    spec("user-long-bio-zlib", DEFAULT, User, 3, undefer=("bio",)),
    spec("user-long-bio-zlib-level-9", ZLIB_LOW, User, 3, undefer=("bio",)),
    spec("user-long-bio-zstd", ZSTD, User, 3, undefer=("bio",)),
    spec("user-signed", SIGNED, User, 1),
    spec("user-long-bio-signed", SIGNED, User, 3, undefer=("bio",)),
    spec("user-no-such-row", PLAIN, User, 404, cache_none=True),
    spec("user-no-such-row-signed", SIGNED, User, 404, cache_none=True),
    spec("membership", PLAIN, Membership, ("acme corp", 7)),
    spec("membership-hashed-key", PLAIN, Membership, ("t" * 300, 1)),
    spec("employee-reads-manager", PLAIN, Employee, 10),
    spec("employee-reads-engineer", SIGNED, Employee, 11),
    spec("employee-reads-employee", PLAIN, Employee, 12),
    spec("manager-reads-manager", PLAIN, Manager, 10),
    spec("vehicle-reads-vehicle", PLAIN, Vehicle, 20),
    spec("vehicle-reads-truck", PLAIN, Vehicle, 21),
    spec("truck-reads-truck", ZLIB_LOW, Truck, 21),
    spec("everything-full", PLAIN, Everything, E_FULL),
    spec("everything-full-zlib", DEFAULT, Everything, E_FULL),
    spec("everything-full-zstd", ZSTD, Everything, E_FULL),
    spec("everything-full-signed-zstd", SIGNED_ZSTD, Everything, E_FULL),
    spec("everything-nulls", PLAIN, Everything, E_NULLS),
    spec("everything-offsets", ZLIB_LOW, Everything, E_OFFSETS),
    spec("reading-every-key-type", PLAIN, Reading, READING_PK),
    spec("tenant-a", PLAIN, User, 1, schema="tenant_a"),
    spec("tenant-b-signed", SIGNED, User, 1, schema="tenant_b"),
    spec("shard-east", PLAIN, User, 1, token="east"),
    spec("shard-west-in-tenant-b", PLAIN, User, 1, schema="tenant_b", token="west"),
    spec("namespaced", NAMESPACED, User, 1),
]


def layout(data: bytes) -> dict[str, Any]:
    """The entry's header in words (format version 1: flags 0x03 compression, 0x04
    signed, 0x10 write time), for readers of the file."""
    flags = data[1]
    return {
        "version": data[0],
        "compression": {0: "none", 1: "zlib", 2: "zstd"}[flags & 0x03],
        "signed": bool(flags & 0x04),
        "timed": bool(flags & 0x10),
        "size": len(data),
    }


def with_overrides(load: Callable[[Session, Any, Any], Any]) -> Callable[[Session, Any, Any], Any]:
    def load_and_override(session: Session, pk: Any, shard: Any) -> Any:
        obj = load(session, pk, shard)
        for attr, value in OVERRIDES.get(pk, {}).items() if obj is not None else ():
            set_committed_value(obj, attr, value)
        return obj

    return load_and_override


def make_entry(engine: Engine, s: dict[str, Any]) -> dict[str, Any]:
    region = s["region"]
    cachedecor.configure_regions(
        {"regions": {"default": {"backend": "dogpile.cache.memory", "expiration_time": 300, **region}}}
    )
    reader = make_reader(s["reader"], with_overrides(database_load(s["reader"])))
    model = MODELS[s["reader"]["model"]]
    pk = s["pk"]
    space = s["space"]
    if space is None:
        key = reader.cache_key(pk)
    else:
        key = key_for(
            model,
            pk,
            namespace=region.get("namespace", "cachedecor"),
            schema=space["schema"],
            identity_token=space["identity_token"],
        )
    cachedecor.reset_stats()
    with reader_session(engine, space) as session:
        obj = reader(session, pk, space["identity_token"]) if s["reader"]["shard"] else reader(session, pk)
        counted = cachedecor.stats("default")["default"]
        assert counted["misses"] == 1 and counted["fills"] == 1, (s["name"], counted)
        data = region_settings("default").store.get(key)
        assert data is not None, (s["name"], key)
        payload, written_at = region_settings("default").codec.decode_timed(key, data)
        if obj is None:
            cls = values = None
        else:
            cls = type(obj).__name__
            state = sqlalchemy.inspect(obj).dict
            keys = model_plan(type(obj)).by_class[type(obj)].keys
            values = {k: to_json(state.get(k, ABSENT)) for k in keys}
    return {
        "name": s["name"],
        "region": region,
        "reader": s["reader"],
        "pk": to_json(pk),
        "space": space,
        "key": key,
        "class": cls,
        "tag": payload[1],
        "fingerprint": payload[2],
        "written_at": written_at,
        "layout": layout(data),
        "overrides": sorted(OVERRIDES.get(pk, {})) if isinstance(pk, uuid.UUID) else [],
        "values": values,
        "entry": base64.b64encode(data).decode(),
    }


def sqlite_with_tenants(directory: str) -> Engine:
    engine = sqlalchemy.create_engine(f"sqlite:///{directory}/main.sqlite")

    @event.listens_for(engine, "connect")
    def attach(dbapi_connection: Any, record: Any) -> None:
        for tenant in TENANTS:
            dbapi_connection.execute(f"ATTACH DATABASE '{directory}/{tenant}.sqlite' AS {tenant}")

    Base.metadata.create_all(engine)
    GoldenBase.metadata.create_all(engine)
    for tenant in TENANTS:
        translated = engine.execution_options(schema_translate_map={None: tenant})
        Base.metadata.create_all(translated, tables=[User.__table__])
    return engine


def versions() -> dict[str, str]:
    import dogpile
    import zstandard

    return {
        "cachedecor": cachedecor.__version__,
        "python": sys.version.split()[0],
        "sqlalchemy": sqlalchemy.__version__,
        "dogpile.cache": dogpile.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "zstandard": zstandard.__version__,
    }


ABOUT = (
    "Written once by tools/make_golden.py; checked by tests/test_golden.py. Never regenerate "
    "these files to make that test pass: they pin what an older release wrote."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--force", action="store_true", help="overwrite existing golden files")
    args = parser.parse_args(argv)
    targets = [GOLDEN / "keys.json", GOLDEN / "entries.json"]
    if any(t.exists() for t in targets) and not args.force:
        print(f"{GOLDEN} already holds golden files; they are never regenerated (--force)", file=sys.stderr)
        return 1
    warnings.simplefilter("ignore", sqlalchemy.exc.SAWarning)  # SQLite's Decimal via float
    cachedecor.reset()
    with tempfile.TemporaryDirectory() as directory:
        engine = sqlite_with_tenants(directory)
        populate(engine)
        entries = [make_entry(engine, s) for s in ENTRY_SPECS]
        engine.dispose()
    cachedecor.reset()
    made_with = versions()
    GOLDEN.mkdir(parents=True, exist_ok=True)
    documents = (
        {"about": ABOUT, "made_with": made_with, "keys": key_cases()},
        {"about": ABOUT, "made_with": made_with, "entries": entries},
    )
    for target, document in zip(targets, documents, strict=True):
        target.write_text(json.dumps(document, indent=1, ensure_ascii=True) + "\n")
        print(f"wrote {target.relative_to(ROOT)} ({target.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
