"""The ``cachedecor`` command: check, stats and invalidate (the demo is in test_demo.py).

``invalidate`` runs end to end as users run it: the installed console script, in a
directory holding the application's models module, against a real memcached; the
test checks that exactly ``cachedecor.key_for(Model, pk)`` was deleted and that the
keys a wrong reading of the command line would have hit are still there.
"""

from __future__ import annotations

import datetime
import decimal
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from click.testing import CliRunner, Result
from pymemcache.client.base import Client

import cachedecor
from cachedecor.cli import PrimaryKeyParser, main
from tests.servers import PG_URL, REDIS_URL, Memcached, free_port

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "cachedecor")

MODELS = '''
import datetime
import decimal
import enum
import uuid

from sqlalchemy import DateTime, LargeBinary, Numeric, String, Time
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Shade(enum.Enum):
    RED = "r"
    GREEN = "g"
    B = "RED"  # its value is another member's name


class Level(enum.Enum):
    LOW = 1
    HIGH = 2


class User(Base):
    __tablename__ = "cli_users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class Tag(Base):
    __tablename__ = "cli_tags"
    code: Mapped[str] = mapped_column(String(100), primary_key=True)


class Seat(Base):
    """Composite key: an integer and a string."""
    __tablename__ = "cli_seats"
    row: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(String(20), primary_key=True)


class Ticket(Base):
    __tablename__ = "cli_tickets"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)


class Day(Base):
    __tablename__ = "cli_days"
    day: Mapped[datetime.date] = mapped_column(primary_key=True)


class Event(Base):
    __tablename__ = "cli_events"
    at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=False), primary_key=True)


class Stamp(Base):
    __tablename__ = "cli_stamps"
    at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)


class Slot(Base):
    __tablename__ = "cli_slots"
    start: Mapped[datetime.time] = mapped_column(Time, primary_key=True)


class Price(Base):
    __tablename__ = "cli_prices"
    amount: Mapped[decimal.Decimal] = mapped_column(Numeric(20, 6), primary_key=True)


class Reading(Base):
    __tablename__ = "cli_readings"
    value: Mapped[float] = mapped_column(primary_key=True)


class Flag(Base):
    __tablename__ = "cli_flags"
    on: Mapped[bool] = mapped_column(primary_key=True)


class Paint(Base):
    __tablename__ = "cli_paints"
    shade: Mapped[Shade] = mapped_column(SAEnum(Shade), primary_key=True)


class Alarm(Base):
    __tablename__ = "cli_alarms"
    level: Mapped[Level] = mapped_column(SAEnum(Level), primary_key=True)


class Blob(Base):
    __tablename__ = "cli_blobs"
    data: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)


class Ledger(Base):
    """Composite key of every kind that has no JSON form."""
    __tablename__ = "cli_ledgers"
    tenant: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    day: Mapped[datetime.date] = mapped_column(primary_key=True)
    amount: Mapped[decimal.Decimal] = mapped_column(Numeric(20, 6), primary_key=True)
    shade: Mapped[Shade] = mapped_column(SAEnum(Shade), primary_key=True)
    on: Mapped[bool] = mapped_column(primary_key=True)


class NotMapped:
    pass


def helper():
    pass
'''


@pytest.fixture(autouse=True)
def _sys_path_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command puts the current directory on ``sys.path``; each test gets it back."""
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A directory holding a fresh models module (unique name), made the current directory.

    Returns the directory and the module's name; the module is also imported here,
    so that the test can compute keys with ``cachedecor.key_for``.
    """
    name = f"cli_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    yield tmp_path, name
    sys.modules.pop(name, None)


def module(name: str) -> Any:
    sys.path.insert(0, os.getcwd())
    return __import__(name)


def write_ini(directory: Path, url: str, name: str = "cache.ini") -> Path:
    path = directory / name
    path.write_text(
        "[cachedecor]\nregions = default\n\n"
        f"[cachedecor.default]\nbackend = dogpile.cache.pymemcache\narguments.url = {url}\n"
        "arguments.timeout = 0.2\narguments.connect_timeout = 0.2\n"
    )
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``cachedecor`` script, as a user runs it from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k != "CACHEDECOR_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)  # cachedecor itself; never the current directory
    return subprocess.run(
        [CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit status 2, no traceback, one line on the output, saying ``fragments``."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def raw_client(server: Memcached) -> Client:
    return Client(("127.0.0.1", server.port), connect_timeout=1, timeout=1)


# --------------------------------------------------------------------------------------
# invalidate, end to end


TENANT = uuid.UUID("123e4567-e89b-12d3-a456-426614174000")

# (class, what the user types, the primary key it means (or a function of the models module
# giving it), keys a wrong reading of the text would delete)
KEYS = [
    pytest.param("User", "7", 7, [], id="int"),
    pytest.param("Tag", "comma,in,key", "comma,in,key", ["comma"], id="string-with-commas"),
    pytest.param("Tag", "[1]", "[1]", [1], id="string-that-looks-like-json"),
    pytest.param("Seat", '[2, "1,2"]', (2, "1,2"), [(2, "1")], id="composite-with-comma"),
    pytest.param("Ticket", str(TENANT), TENANT, [], id="uuid"),
    pytest.param("Day", "2024-05-01", datetime.date(2024, 5, 1), [], id="date"),
    pytest.param(
        "Event", "2024-05-01T12:30:00", datetime.datetime(2024, 5, 1, 12, 30), [], id="naive-datetime"
    ),
    pytest.param(
        "Stamp",
        "2024-05-01T12:30:00+02:00",
        datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        ["2024-05-01T12:30:00"],
        id="aware-datetime",
    ),
    pytest.param("Slot", "08:15", datetime.time(8, 15), [], id="time"),
    pytest.param("Price", "19.90", decimal.Decimal("19.90"), ["19.90"], id="decimal"),
    pytest.param("Reading", "0.5", 0.5, ["0.5"], id="float"),
    pytest.param("Flag", "true", True, ["true"], id="bool"),
    pytest.param("Paint", "GREEN", lambda m: m.Shade.GREEN, ["GREEN"], id="enum-by-name"),
    pytest.param("Paint", "g", lambda m: m.Shade.GREEN, ["g"], id="enum-by-value"),
    pytest.param("Blob", "00ff", b"\x00\xff", ["00ff"], id="bytes-in-hex"),
    pytest.param(
        "Ledger",
        f'["{TENANT}", "2024-05-01", 19.90, "r", true]',
        lambda m: (TENANT, datetime.date(2024, 5, 1), decimal.Decimal("19.90"), m.Shade.RED, True),
        [],
        id="composite-of-every-kind",
    ),
]


@pytest.mark.parametrize(("model", "text", "pk", "decoys"), KEYS)
def test_invalidate_deletes_exactly_the_key_of_the_primary_key_given(
    app_dir: tuple[Path, str], memcached: Memcached, model: str, text: str, pk: Any, decoys: list[Any]
) -> None:
    directory, name = app_dir
    cls = getattr(module(name), model)
    pk = pk(module(name)) if callable(pk) else pk
    key = cachedecor.key_for(cls, pk)
    decoy_keys = {cachedecor.key_for(cls, d) for d in decoys} - {key}
    client = raw_client(memcached)
    for k in {key, *decoy_keys}:
        client.set(k, b"cached", noreply=False)

    done = run_cli(
        "invalidate",
        "--config",
        str(write_ini(directory, memcached.url)),
        f"{name}:{model}",
        text,
        cwd=directory,
    )

    assert done.returncode == 0, done.stderr
    assert client.get(key) is None
    assert {k: client.get(k) for k in decoy_keys} == {k: b"cached" for k in decoy_keys}
    assert done.stdout == f"invalidated {model} {pk!r} in region default: {key}\n"


def test_invalidate_imports_the_models_module_from_the_current_directory(
    app_dir: tuple[Path, str], memcached: Memcached
) -> None:
    directory, name = app_dir
    key = cachedecor.key_for(module(name).User, 3)
    client = raw_client(memcached)
    client.set(key, b"cached", noreply=False)
    other = directory / "elsewhere"
    other.mkdir()
    ini = write_ini(directory, memcached.url)

    from_elsewhere = run_cli("invalidate", "--config", str(ini), f"{name}:User", "3", cwd=other)
    from_here = run_cli("invalidate", "--config", str(ini), f"{name}:User", "3", cwd=directory)

    assert from_elsewhere.returncode == 2
    assert f"no module named {name!r}" in from_elsewhere.stderr
    assert from_here.returncode == 0, from_here.stderr
    assert client.get(key) is None


def test_invalidate_several_keys_and_keys_starting_with_a_dash(
    app_dir: tuple[Path, str], memcached: Memcached
) -> None:
    directory, name = app_dir
    keys = [cachedecor.key_for(module(name).User, pk) for pk in (-5, 6)]
    client = raw_client(memcached)
    for key in keys:
        client.set(key, b"cached", noreply=False)

    result = invoke(
        "invalidate", "--config", str(write_ini(directory, memcached.url)), f"{name}:User", "--", "-5", "6"
    )

    assert result.exit_code == 0, result.output
    assert client.get_many(keys) == {}
    assert result.output.splitlines() == [
        f"invalidated User {pk} in region default: {k}" for pk, k in zip((-5, 6), keys, strict=True)
    ]


def test_invalidate_in_a_tenant_schema_deletes_that_schemas_key(
    app_dir: tuple[Path, str], memcached: Memcached
) -> None:
    directory, name = app_dir
    cls = module(name).Seat
    tenant_key = cachedecor.key_for(cls, (1, "A"), schema="tenant_7")
    own_key = cachedecor.key_for(cls, (1, "A"))
    client = raw_client(memcached)
    client.set_many({tenant_key: b"cached", own_key: b"cached"}, noreply=False)

    result = invoke(
        "invalidate",
        "--config",
        str(write_ini(directory, memcached.url)),
        "--schema",
        "tenant_7",
        f"{name}:Seat",
        '[1, "A"]',
    )

    assert result.exit_code == 0, result.output
    assert client.get(tenant_key) is None
    assert client.get(own_key) == b"cached"
    assert tenant_key in result.output


def test_invalidate_all_deletes_every_row_of_the_model(
    app_dir: tuple[Path, str], memcached: Memcached
) -> None:
    directory, name = app_dir
    models = module(name)
    tags = [cachedecor.key_for(models.Tag, code) for code in ("a", "b,c")]
    user = cachedecor.key_for(models.User, 1)
    client = raw_client(memcached)
    client.set_many({**dict.fromkeys(tags, b"cached"), user: b"cached"}, noreply=False)

    result = invoke(
        "invalidate", "--config", str(write_ini(directory, memcached.url)), "--all", f"{name}:Tag"
    )

    assert result.exit_code == 0, result.output
    assert client.get_many(tags) == {}
    assert client.get(user) == b"cached"
    assert result.output == "invalidated every cached row of Tag\n"


def test_invalidate_on_an_unreachable_server_fails_with_status_1(app_dir: tuple[Path, str]) -> None:
    directory, name = app_dir

    result = invoke(
        "invalidate", "--config", str(write_ini(directory, f"127.0.0.1:{free_port()}")), f"{name}:User", "1"
    )

    assert result.exit_code == 1
    assert "could not invalidate 1 key(s) in region(s) default" in result.output
    assert "invalidated User" not in result.output


def test_invalidate_uses_the_configuration_named_by_the_environment(
    app_dir: tuple[Path, str], memcached: Memcached
) -> None:
    directory, name = app_dir
    key = cachedecor.key_for(module(name).User, 9)
    client = raw_client(memcached)
    client.set(key, b"cached", noreply=False)

    result = invoke(
        "invalidate", f"{name}:User", "9", env={"CACHEDECOR_CONFIG": str(write_ini(directory, memcached.url))}
    )

    assert result.exit_code == 0, result.output
    assert client.get(key) is None


# --------------------------------------------------------------------------------------
# invalidate: mistakes are one line and exit status 2


@pytest.fixture
def ini(app_dir: tuple[Path, str]) -> str:
    """A configuration whose server nothing listens on: mistakes are found before any I/O."""
    return str(write_ini(app_dir[0], f"127.0.0.1:{free_port()}"))


@pytest.mark.parametrize(
    ("model", "fragments"),
    [
        pytest.param(
            "no_such_module_xyz:User",
            ["cannot import 'no_such_module_xyz'", "no module named"],
            id="unknown-module",
        ),
        pytest.param("{name}:Usr", ["has no 'Usr'", "did you mean 'User'?"], id="unknown-class"),
        pytest.param(
            "{name}:NotMapped", ["NotMapped is a class SQLAlchemy does not map"], id="class-not-mapped"
        ),
        pytest.param("{name}:helper", ["helper is a function, not a mapped class"], id="not-a-class"),
        pytest.param(
            "{name}.User", ["MODEL must be module:Class", "did you mean {name}:User?"], id="dot-not-colon"
        ),
        pytest.param("{name}:", ["MODEL must be module:Class"], id="no-class"),
    ],
)
def test_a_model_that_cannot_be_loaded_is_a_one_line_error(
    app_dir: tuple[Path, str], ini: str, model: str, fragments: list[str]
) -> None:
    name = app_dir[1]

    result = invoke("invalidate", "--config", ini, model.format(name=name), "1")

    assert_one_line_error(result, *(f.format(name=name) for f in fragments))


def test_a_models_module_that_fails_to_import_is_a_one_line_error(
    app_dir: tuple[Path, str], ini: str
) -> None:
    directory = app_dir[0]
    (directory / "broken_models_a.py").write_text("import not_installed_dependency_xyz\n")
    (directory / "broken_models_b.py").write_text("raise RuntimeError('no database URL set\\nset DB_URL')\n")

    missing = invoke("invalidate", "--config", ini, "broken_models_a:User", "1")
    failing = invoke("invalidate", "--config", ini, "broken_models_b:User", "1")

    assert_one_line_error(missing, "it imports 'not_installed_dependency_xyz', which is not installed")
    assert_one_line_error(
        failing, "cannot import 'broken_models_b': RuntimeError: no database URL set set DB_URL"
    )


@pytest.mark.parametrize(
    ("model", "text", "fragments"),
    [
        pytest.param("User", "abc", ["column id is an integer: 'abc' is not one"], id="int-from-letters"),
        pytest.param("User", "7.5", ["column id is an integer: '7.5' is not one"], id="int-from-fraction"),
        pytest.param("User", "[7]", ["column id is an integer"], id="json-for-single-column"),
        pytest.param("Ticket", "nope", ["column id is a UUID: 'nope' is not one"], id="uuid"),
        pytest.param("Day", "2024-13-01", ["column day is a date (ISO 8601)"], id="date"),
        pytest.param(
            "Stamp", "2024-05-01T12:00:00", ["with a time zone: give the offset"], id="aware-without-offset"
        ),
        pytest.param(
            "Event",
            "2024-05-01T12:00:00+00:00",
            ["without a time zone: give no offset"],
            id="naive-with-offset",
        ),
        pytest.param("Price", "NaN", ["column amount is a decimal number"], id="decimal-nan"),
        pytest.param("Reading", "inf", ["column value is a number"], id="float-inf"),
        pytest.param("Flag", "maybe", ["column on is a boolean"], id="bool"),
        pytest.param("Paint", "BLUE", ["column shade is an enum (RED, GREEN, B)"], id="enum-unknown"),
        pytest.param(
            "Paint",
            "RED",
            ["'RED' is the name of Shade.RED and the value of Shade.B"],
            id="enum-name-and-value-differ",
        ),
        pytest.param("Blob", "xyz", ["column data is bytes (in hexadecimal)"], id="bytes"),
        pytest.param(
            "Seat",
            "2,A",
            ["composite primary key (row, code)", """as a JSON array, e.g. '[2, "A"]'"""],
            id="composite-comma-form",
        ),
        pytest.param(
            "Seat", "2,1,2", ["composite primary key", "JSON array"], id="composite-ambiguous-comma-form"
        ),
        pytest.param(
            "Seat", "[2]", ["2 primary-key columns (row, code); [2] has 1 value(s)"], id="composite-arity"
        ),
        pytest.param("Seat", '["2", 1]', ["column code is a string: 1 is not one"], id="number-for-string"),
        pytest.param("Seat", '[null, "A"]', ["column row: a primary key has no null component"], id="null"),
        pytest.param(
            "Seat", '[2.5, "A"]', ["column row is an integer: 2.5 is not one"], id="fraction-for-int"
        ),
        pytest.param("Seat", '[NaN, "A"]', ["JSON array"], id="json-nan"),
    ],
)
def test_a_key_that_does_not_convert_is_a_one_line_error(
    app_dir: tuple[Path, str], ini: str, model: str, text: str, fragments: list[str]
) -> None:
    name = app_dir[1]

    result = invoke("invalidate", "--config", ini, f"{name}:{model}", text)

    line = assert_one_line_error(result, *fragments)
    assert line.startswith(f"Error: primary key {text!r} of {name}:{model}: ")


def test_a_key_that_does_not_convert_is_reported_before_the_configuration_is_read(
    app_dir: tuple[Path, str],
) -> None:
    result = invoke("invalidate", f"{app_dir[1]}:User", "seven")

    assert_one_line_error(result, "column id is an integer: 'seven' is not one")


def test_invalidate_on_an_in_process_region_says_no_other_process_sees_it(app_dir: tuple[Path, str]) -> None:
    directory, name = app_dir
    ini = directory / "memory.ini"
    ini.write_text(
        "[cachedecor]\nregions = default\n\n[cachedecor.default]\nbackend = dogpile.cache.memory\n"
    )

    result = invoke("invalidate", "--config", str(ini), f"{name}:User", "1")

    assert result.exit_code == 0, result.output
    assert "note: region default is in-process memory (dogpile.cache.memory)" in result.output


def test_keys_and_all_together_are_a_usage_error(app_dir: tuple[Path, str], ini: str) -> None:
    result = invoke("invalidate", "--config", ini, "--all", f"{app_dir[1]}:User", "1")

    assert result.exit_code == 2
    assert "give primary keys or --all, not both and not neither" in result.output


# --------------------------------------------------------------------------------------
# primary keys from text


def test_single_column_keys_take_their_text_as_the_columns_type(app_dir: tuple[Path, str]) -> None:
    models = module(app_dir[1])

    assert PrimaryKeyParser(models.User).parse("+7") == 7
    assert PrimaryKeyParser(models.Tag).parse(" padded, kept ") == " padded, kept "
    assert PrimaryKeyParser(models.Tag).parse("") == ""
    assert PrimaryKeyParser(models.Flag).parse("0") is False
    assert PrimaryKeyParser(models.Alarm).parse("HIGH") is models.Level.HIGH
    assert PrimaryKeyParser(models.Alarm).parse("2") is models.Level.HIGH
    assert PrimaryKeyParser(models.Paint).parse("B") is models.Shade.B  # name and value of the same member


def test_composite_keys_take_json_values_of_their_columns_types(app_dir: tuple[Path, str]) -> None:
    models = module(app_dir[1])
    parser = PrimaryKeyParser(models.Ledger)

    pk = parser.parse(f'["{TENANT}", "2024-05-01", "0.1", "g", false]')

    assert pk == (TENANT, datetime.date(2024, 5, 1), decimal.Decimal("0.1"), models.Shade.GREEN, False)
    assert parser.parse(f'["{TENANT}", "2024-05-01", 0.1, "g", false]')[2] == decimal.Decimal(
        "0.1"
    )  # exactly
    assert PrimaryKeyParser(models.Seat).parse('["2", "x"]') == (2, "x")


# --------------------------------------------------------------------------------------
# check and stats


def test_check_pings_every_server(tmp_path: Path, memcached: Memcached) -> None:
    result = invoke("check", "--config", str(write_ini(tmp_path, memcached.url)))

    assert result.exit_code == 0, result.output
    assert memcached.url in result.output and "ok (memcached" in result.output


def test_check_fails_for_a_closed_port(tmp_path: Path) -> None:
    url = f"127.0.0.1:{free_port()}"

    result = invoke("check", "--config", str(write_ini(tmp_path, url)))

    assert result.exit_code == 1
    assert url in result.output and "FAILED" in result.output


def with_broadcast(path: Path, urls: str) -> Path:
    text = path.read_text().replace("[cachedecor]\n", f"[cachedecor]\nbroadcast_url = {urls}\n", 1)
    path.write_text(text + "local_entries = 100\n")
    return path


def test_check_pings_every_broadcast_transport(tmp_path: Path, memcached: Memcached) -> None:
    pg = sqlalchemy.make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    ini = with_broadcast(write_ini(tmp_path, memcached.url), f"{pg}, {REDIS_URL}")

    result = invoke("check", "--config", str(ini))

    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("broadcast")]
    assert len(lines) == 2, result.output
    assert "ok (postgresql, channel cachedecor_invalidations)" in lines[0]
    assert "ok (redis, channel cachedecor_invalidations)" in lines[1]


def test_check_fails_for_an_unreachable_broadcast(tmp_path: Path, memcached: Memcached) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    ini = with_broadcast(write_ini(tmp_path, memcached.url), url)

    result = invoke("check", "--config", str(ini))

    assert result.exit_code == 1, result.output
    assert f"broadcast    {url}" in result.output and "FAILED: ConnectionError" in result.output
    assert "ok (memcached" in result.output  # the regions are still checked


def test_check_reports_configuration_errors_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.ini"
    path.write_text("[cachedecor.default]\nbackend = nope\n")

    result = invoke("check", "--config", str(path))

    assert_one_line_error(result, "configuration error: cachedecor.default.backend: unknown backend 'nope'")


@pytest.mark.parametrize("command", [["check"], ["stats"], ["invalidate", "tests.models:User", "1"]])
def test_a_command_without_a_configuration_fails_saying_what_to_give(command: list[str]) -> None:
    assert "CACHEDECOR_CONFIG" not in os.environ

    result = invoke(*command)

    assert_one_line_error(result, "no configuration: give --config FILE or set CACHEDECOR_CONFIG")
    assert "ok" not in result.output.split()


def test_check_uses_the_configuration_named_by_the_environment(tmp_path: Path, memcached: Memcached) -> None:
    result = invoke("check", env={"CACHEDECOR_CONFIG": str(write_ini(tmp_path, memcached.url))})

    assert result.exit_code == 0, result.output
    assert "ok (memcached" in result.output


def test_stats_shows_server_statistics_and_client_counters(tmp_path: Path, memcached: Memcached) -> None:
    counters = tmp_path / "counters.json"
    demo = invoke(
        "demo", "--rows", "12", "--repeat", "3", "--memcached", memcached.url, "--stats-file", str(counters)
    )
    assert demo.exit_code == 0, demo.output

    result = invoke("stats", "--config", str(write_ini(tmp_path, memcached.url)), "--counters", str(counters))

    assert result.exit_code == 0, result.output
    assert "hit ratio" in result.output and memcached.url in result.output
    demo_line = next(line for line in result.output.splitlines() if line.startswith("demo "))
    assert demo_line.split()[1:] != ["0"] * len(demo_line.split()[1:])


def test_stats_reports_an_unreachable_server(tmp_path: Path) -> None:
    result = invoke("stats", "--config", str(write_ini(tmp_path, f"127.0.0.1:{free_port()}")))

    assert result.exit_code == 1
    assert "FAILED" in result.output


def test_stats_with_an_unreadable_counters_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "counters.json"
    bad.write_text("{not json")

    result = invoke(
        "stats", "--config", str(write_ini(tmp_path, f"127.0.0.1:{free_port()}")), "--counters", str(bad)
    )

    assert_one_line_error(result, f"--counters {bad}")


def test_the_group_help_states_the_exit_statuses() -> None:
    result = invoke("--help")

    assert result.exit_code == 0
    assert "1 the cache failed" in " ".join(result.output.split())
    assert "2 usage or configuration error" in " ".join(result.output.split())
