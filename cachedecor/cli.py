"""The ``cachedecor`` command.

Exit status, for every command: 0 when it did what was asked; 1 when the cache did
not (a server did not answer, an invalidation was not delivered); 2 for a usage or
configuration error, reported on one line before anything was done.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import importlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

import click

import cachedecor
from cachedecor.config import ENV_VAR, read_outbox_settings
from cachedecor.config.suggestions import did_you_mean

if TYPE_CHECKING:
    from cachedecor.outbox import Outbox

__all__ = ["PrimaryKeyParser", "main"]

#: Exit status when the cache did not do what was asked.
EXIT_CACHE_FAILED = 1
#: Exit status of a usage or configuration error (click's own usage errors too).
EXIT_USAGE = 2


class Refused(click.ClickException):
    """A one-line error before anything was done: printed as ``Error: ...``, exit status 2."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(line.strip() for line in message.strip().splitlines()))


_CONFIG_HELP = f"INI file of the application's regions (default: ${ENV_VAR})."


def _config_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config_path", metavar="INI", envvar=ENV_VAR, help=_CONFIG_HELP)(function)


def _configure(config_path: str | None) -> dict[str, Any]:
    """Configure the regions of ``config_path``; refuses to run on the embedded default."""
    if not config_path:
        raise Refused(
            f"no configuration: give --config FILE or set {ENV_VAR} to the application's INI file "
            f"(without one there is only an in-process memory region, which no other process shares)"
        )
    try:
        return cachedecor.configure_regions(config_path)
    except cachedecor.ConfigError as exc:
        raise Refused(f"configuration error: {exc}") from None


@contextmanager
def _cache_failures() -> Iterator[list[str]]:
    """Collects, per region, the cache failures counted while the block runs."""
    before = {name: counters["errors"] for name, counters in cachedecor.stats().items()}
    failed: list[str] = []
    yield failed
    for name, counters in cachedecor.stats().items():
        if counters["errors"] > before.get(name, 0):
            failed.append(name)


@click.group()
@click.version_option(cachedecor.__version__, prog_name="cachedecor")
def main() -> None:
    """cachedecor: a memcached cache in front of SQLAlchemy.

    Exit status: 0 done; 1 the cache failed (a server did not answer, an
    invalidation was not delivered); 2 usage or configuration error.
    """


# --------------------------------------------------------------------------------------
# demo


@main.command()
@click.option("--database", metavar="URL", help="SQLAlchemy URL (default: a temporary SQLite file).")
@click.option(
    "--memcached", metavar="HOST:PORT", help="Use this memcached server instead of the memory backend."
)
@click.option("--rows", default=100, show_default=True, type=click.IntRange(min=11), help="Rows to create.")
@click.option(
    "--repeat", default=300, show_default=True, type=click.IntRange(min=1), help="Samples for the timing."
)
@click.option("--stats-file", metavar="JSON", help="Write the demo's counters here (see 'cachedecor stats').")
def demo(database: str | None, memcached: str | None, rows: int, repeat: int, stats_file: str | None) -> None:
    """Run the example application: misses, hits, invalidation, rollback, timings.

    On --database it creates a table of its own (cachedecor_demo_<random>), touches
    no other, and drops it at the end.
    """
    from cachedecor.demo import DemoError, run_demo

    try:
        run_demo(database=database, memcached=memcached, rows=rows, repeat=repeat)
    except DemoError as exc:
        raise Refused(str(exc)) from None
    if stats_file:
        cachedecor.dump_stats(stats_file)


# --------------------------------------------------------------------------------------
# check and stats


@main.command()
@_config_option
def check(config_path: str | None) -> None:
    """Validate the configuration, and ping every memcached server of every region and
    every transport of broadcast_url."""
    from cachedecor.config import region_settings

    regions = _configure(config_path)
    failed = False
    for name in sorted(regions):
        settings = region_settings(name)
        client = getattr(settings.store, "client", None)
        if client is None or not hasattr(client, "stats"):
            click.echo(f"{name:<12} {settings.backend:<24} ok (no servers to ping)")
            continue
        for server, result in sorted(client.stats().items()):
            if isinstance(result, BaseException):
                failed = True
                click.echo(f"{name:<12} {server:<24} FAILED: {type(result).__name__}: {result}")
            else:
                version = result.get(b"version", b"?")
                version = version.decode() if isinstance(version, bytes) else version
                click.echo(f"{name:<12} {server:<24} ok (memcached {version})")
    from cachedecor import broadcast

    sender = broadcast.current()
    for link in sender.links if sender is not None else []:
        where = link.url.render_as_string(hide_password=True)
        try:
            link.ping()
        except Exception as exc:
            failed = True
            click.echo(f"{'broadcast':<12} {where:<24} FAILED: {type(exc).__name__}: {exc}")
        else:
            click.echo(f"{'broadcast':<12} {where:<24} ok ({link.kind}, channel {link.channel})")
    sys.exit(EXIT_CACHE_FAILED if failed else 0)


_SERVER_COLUMNS = ("server", "version", "items", "MB used", "MB limit", "hit ratio", "evictions", "conns")


def _server_row(server: str, raw: dict[bytes, Any]) -> tuple[str, ...]:
    def num(name: str) -> float:
        value = raw.get(name.encode(), 0)
        try:
            return float(value.decode() if isinstance(value, bytes) else value)
        except ValueError:
            return 0.0

    hits, misses = num("get_hits"), num("get_misses")
    ratio = f"{hits / (hits + misses):.1%}" if hits + misses else "-"
    version = raw.get(b"version", b"?")
    return (
        server,
        version.decode() if isinstance(version, bytes) else str(version),
        f"{num('curr_items'):.0f}",
        f"{num('bytes') / 1e6:.2f}",
        f"{num('limit_maxbytes') / 1e6:.0f}",
        ratio,
        f"{num('evictions'):.0f}",
        f"{num('curr_connections'):.0f}",
    )


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _read_counters(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            snapshot = json.load(fh)
        if not isinstance(snapshot, dict) or not isinstance(snapshot.get("regions"), dict):
            raise ValueError("not a file written by cachedecor.dump_stats()")
        return snapshot
    except (OSError, ValueError) as exc:
        raise Refused(f"--counters {path}: {exc}") from None


@main.command()
@_config_option
@click.option(
    "--counters",
    "counters_path",
    metavar="JSON",
    help="Also print client-side counters from a file written by cachedecor.dump_stats().",
)
def stats(config_path: str | None, counters_path: str | None) -> None:
    """Show each region's memcached servers' own statistics (and client counters)."""
    from cachedecor.config import region_settings

    regions = _configure(config_path)
    snapshot = _read_counters(counters_path) if counters_path else None
    failed = False
    for name in sorted(regions):
        settings = region_settings(name)
        client = getattr(settings.store, "client", None)
        click.echo(f"region {name} ({settings.backend})")
        if client is None or not hasattr(client, "stats"):
            click.echo("  no memcached servers\n")
            continue
        rows: list[tuple[str, ...]] = []
        for server, result in sorted(client.stats().items()):
            if isinstance(result, BaseException):
                failed = True
                rows.append((server, f"FAILED: {type(result).__name__}", "", "", "", "", "", ""))
            else:
                rows.append(_server_row(server, result))
        click.echo(_table(rows, _SERVER_COLUMNS) + "\n")
    if snapshot is not None:
        click.echo(
            f"client counters of process {snapshot.get('pid', '?')} at {time.ctime(snapshot.get('time', 0))}"
        )
        names = sorted({k for counters in snapshot["regions"].values() for k in counters})
        rows = [
            (region, *(str(c.get(k, 0)) for k in names)) for region, c in sorted(snapshot["regions"].items())
        ]
        click.echo(_table(rows, ("region", *names)))
    sys.exit(EXIT_CACHE_FAILED if failed else 0)


# --------------------------------------------------------------------------------------
# invalidate: models and primary keys from the command line


def load_model(spec: str) -> Any:
    """The mapped class named ``module:Class`` (``module:Outer.Inner`` for a nested one).

    The current directory comes first on ``sys.path``, as with ``python -m``, so an
    application's own modules import from where the command runs.

    :raises Refused: with a one-line reason when it cannot be imported or is not mapped.
    """
    import sqlalchemy
    from sqlalchemy.orm import Mapper

    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        head, dot, tail = spec.rpartition(".")
        hint = f"; did you mean {head}:{tail}?" if not colon and dot and head and tail else ""
        raise Refused(f"MODEL must be module:Class, got {spec!r}{hint}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise Refused(
                f"cannot import {module_name!r}: no module named {exc.name!r} "
                f"(looked in the current directory, {cwd}, and on sys.path)"
            ) from None
        raise Refused(
            f"cannot import {module_name!r}: it imports {exc.name!r}, which is not installed"
        ) from None
    except Exception as exc:
        raise Refused(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            mapped = [
                name
                for name, value in vars(module).items()
                if isinstance(value, type) and isinstance(sqlalchemy.inspect(value, raiseerr=False), Mapper)
            ]
            raise Refused(
                f"module {module_name!r} has no {attr!r};{did_you_mean(attr, mapped)} mapped classes "
                f"there: {', '.join(sorted(mapped)) or 'none'}"
            ) from None
    mapper = sqlalchemy.inspect(target, raiseerr=False) if isinstance(target, type) else None
    if not isinstance(mapper, Mapper):
        what = "a class SQLAlchemy does not map" if isinstance(target, type) else f"a {type(target).__name__}"
        raise Refused(f"{spec} is {what}, not a mapped class")
    try:
        sqlalchemy.orm.configure_mappers()
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise Refused(f"{spec}: the mappings cannot be configured: {str(exc).splitlines()[0]}") from None
    return target


def _python_type(column: Any) -> type | None:
    for kind in (column.type, getattr(column.type, "impl_instance", None)):
        try:
            found = kind.python_type if kind is not None else None
        except NotImplementedError:
            continue
        if isinstance(found, type) and found is not object:
            return found
    return None


_TRUE, _FALSE = ("true", "1"), ("false", "0")


class _Component:
    """Reads one primary-key column's value from its text, or from a JSON value."""

    def __init__(self, column: Any) -> None:
        self.name: str = column.key
        self.kind = _python_type(column)
        self.timezone: bool | None = getattr(column.type, "timezone", None)
        if self.kind is None:
            self.what = f"of type {column.type!r}"
        elif issubclass(self.kind, enum.Enum):
            self.what = f"an enum ({', '.join(m.name for m in self.kind)})"
        else:
            self.what = _WHAT.get(self.kind, self.kind.__name__)

    def from_text(self, text: str) -> Any:
        kind = self.kind
        if kind is None:
            raise ValueError(
                f"column {self.name} is {self.what}, whose Python type SQLAlchemy does not know; "
                f"invalidate it from Python with cachedecor.invalidate()"
            )
        try:
            if kind is str:
                return text
            if kind is bool:
                if text.lower() in _TRUE + _FALSE:
                    return text.lower() in _TRUE
                raise ValueError
            if issubclass(kind, enum.Enum):
                return self._member(kind, text)
            if kind is int:
                if not text.lstrip("+-").isdigit() or not text.isascii():
                    raise ValueError
                return int(text)
            if kind is float:
                number = float(text)
                if not math.isfinite(number):
                    raise ValueError
                return number
            if kind is decimal.Decimal:
                exact = decimal.Decimal(text)
                if not exact.is_finite():
                    raise ValueError
                return exact
            if kind is bytes:
                return bytes.fromhex(text)
            if kind is uuid.UUID:
                return uuid.UUID(text)
            if kind in (datetime.datetime, datetime.time):
                value = kind.fromisoformat(text)
                self._check_timezone(value)
                return value
            if kind is datetime.date:
                return datetime.date.fromisoformat(text)
            if kind is datetime.timedelta:
                raise ValueError(f"column {self.name} is an interval, which has no cache key")
            return cast(Any, kind)(text)
        except (ValueError, ArithmeticError, TypeError) as exc:
            detail = str(exc) if str(exc).startswith("column ") else ""
            raise ValueError(detail or f"column {self.name} is {self.what}: {text!r} is not one") from None

    def _check_timezone(self, value: datetime.datetime | datetime.time) -> None:
        if self.timezone is None:
            return
        if self.timezone and value.utcoffset() is None:
            raise ValueError(
                f"column {self.name} is {self.what} with a time zone: give the offset, e.g. +00:00"
            )
        if not self.timezone and value.utcoffset() is not None:
            raise ValueError(f"column {self.name} is {self.what} without a time zone: give no offset")

    def _member(self, kind: type[enum.Enum], text: str) -> enum.Enum:
        by_name = kind.__members__.get(text)
        by_value = [m for m in kind if str(m.value) == text]
        if by_name is not None and by_value and by_value[0] is not by_name:
            raise ValueError(
                f"column {self.name}: {text!r} is the name of {by_name} and the value of {by_value[0]}; "
                f"give {by_value[0].name!r} for {by_value[0]} or {str(by_name.value)!r} for {by_name}"
            )
        if by_name is None and not by_value:
            raise ValueError
        return by_name if by_name is not None else by_value[0]

    def from_json(self, value: Any) -> Any:
        kind = self.kind
        if value is None:
            raise ValueError(f"column {self.name}: a primary key has no null component")
        if isinstance(value, str):
            return self.from_text(value)  # every column type has a text form
        number = isinstance(value, (int, decimal.Decimal)) and not isinstance(value, bool)
        if isinstance(value, bool) and kind is bool:
            return value
        if number and kind in (float, decimal.Decimal):  # a JSON fraction is read exactly
            return kind(value)
        if number and isinstance(value, int) and kind is int:
            return value
        if number and isinstance(value, int) and kind is not None and issubclass(kind, enum.Enum):
            return self._member(kind, str(value))
        shown = str(value) if isinstance(value, decimal.Decimal) else json.dumps(value)
        raise ValueError(f"column {self.name} is {self.what}: {shown} is not one")


#: How a message names a value of each Python type a primary-key column may have.
_WHAT: Mapping[type, str] = MappingProxyType(
    {
        int: "an integer",
        str: "a string",
        bool: "a boolean (true or false)",
        float: "a number",
        decimal.Decimal: "a decimal number",
        bytes: "bytes (in hexadecimal)",
        uuid.UUID: "a UUID",
        datetime.datetime: "a date and time (ISO 8601)",
        datetime.date: "a date (ISO 8601)",
        datetime.time: "a time (ISO 8601)",
        datetime.timedelta: "an interval",
    }
)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a primary-key value")


class PrimaryKeyParser:
    """Reads the primary keys of one mapped class as the command line gives them.

    A single-column key is its value as text: ``7``, ``comma,in,key`` (a string
    column takes the text exactly as given), ``123e4567-e89b-12d3-a456-426614174000``,
    ``2024-05-01``. A composite key is a JSON array with one element per column, in
    the mapper's order: ``'[2, "1,2"]'``. Every value is converted to the Python type
    of its column, so the key is the one the application's reads use.

    >>> from sqlalchemy import Integer, String
    >>> from sqlalchemy.orm import DeclarativeBase, mapped_column
    >>> class Base(DeclarativeBase): pass
    >>> class Seat(Base):
    ...     __tablename__ = "seats"
    ...     row = mapped_column(Integer, primary_key=True)
    ...     code = mapped_column(String, primary_key=True)
    >>> PrimaryKeyParser(Seat).parse('[2, "1,2"]')
    (2, '1,2')
    >>> PrimaryKeyParser(Seat).parse("2,A")
    Traceback (most recent call last):
        ...
    ValueError: Seat has a composite primary key (row, code): give each key as a JSON array, e.g. '[2, "A"]'
    """

    def __init__(self, model: Any) -> None:
        import sqlalchemy

        self.model = model
        self.columns = [_Component(column) for column in sqlalchemy.inspect(model).primary_key]

    def parse(self, text: str) -> Any:
        """The primary key written ``text``: a value, or a tuple for a composite key.

        :raises ValueError: saying what was expected, if ``text`` is not a key of the model.
        """
        if len(self.columns) == 1:
            return self.columns[0].from_text(text)
        names = ", ".join(c.name for c in self.columns)
        try:
            values = json.loads(text, parse_float=decimal.Decimal, parse_constant=_no_constant)
        except ValueError:
            values = None
        if not isinstance(values, list):
            raise ValueError(
                f"{self.model.__name__} has a composite primary key ({names}): give each key as a "
                f"JSON array, e.g. {self._example(text)}"
            )
        if len(values) != len(self.columns):
            raise ValueError(
                f"{self.model.__name__} has {len(self.columns)} primary-key columns ({names}); "
                f"{text} has {len(values)} value(s)"
            )
        return tuple(column.from_json(value) for column, value in zip(self.columns, values, strict=True))

    def _example(self, text: str) -> str:
        """The JSON spelling of ``text`` read as comma-separated values, or of a made-up key."""
        parts = text.split(",")
        if len(parts) == len(self.columns):
            try:
                values = [column.from_text(part) for column, part in zip(self.columns, parts, strict=True)]
            except ValueError:
                pass
            else:
                return "'" + json.dumps([_jsonable(v) for v in values]) + "'"
        return "'" + json.dumps([_sample(column.kind) for column in self.columns]) + "'"


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _sample(kind: type | None) -> Any:
    if kind is int:
        return 1
    if kind is None or kind is str:
        return "a"
    samples: dict[type, Any] = {
        bool: True,
        float: 1.5,
        decimal.Decimal: "1.50",
        uuid.UUID: "123e4567-e89b-12d3-a456-426614174000",
        datetime.datetime: "2024-05-01T12:00:00",
        datetime.date: "2024-05-01",
        datetime.time: "12:00:00",
        bytes: "00ff",
    }
    if issubclass(kind, enum.Enum):
        return next(iter(kind)).name
    return samples.get(kind, "...")


@main.command()
@_config_option
@click.option("--schema", default=None, help="The schema a schema_translate_map selects (one tenant).")
@click.option("--all", "everything", is_flag=True, help="Every cached row of MODEL (its whole hierarchy).")
@click.argument("model")
@click.argument("pks", nargs=-1)
def invalidate(
    config_path: str | None, schema: str | None, everything: bool, model: str, pks: tuple[str, ...]
) -> None:
    """Invalidate the entries of MODEL (module:Class) rows with primary keys PKS, or --all.

    A single-column key is its value as text (a string column takes the text
    exactly: commas and all); a composite key is a JSON array, one element per
    column in the mapper's order: '[2, "1,2"]'. Values are converted to their
    columns' Python types. Put -- before keys that start with "-".

    Only the module that maps MODEL is imported (the current directory is on
    sys.path), and every configured region is reached.
    """
    if everything == bool(pks):
        raise click.UsageError("give primary keys or --all, not both and not neither")
    cls = load_model(model)
    parser = PrimaryKeyParser(cls)
    keys: list[Any] = []
    for text in pks:
        try:
            keys.append(parser.parse(text))
        except ValueError as exc:
            raise Refused(f"primary key {text!r} of {model}: {exc}") from None
    _configure(config_path)
    _note_in_process_regions(cls)
    if everything:
        with _cache_failures() as failed:
            cachedecor.invalidate_model(cls, schema=schema)
        _report_failures(failed, "every cached row")
        click.echo(f"invalidated every cached row of {cls.__name__}")
        return
    from cachedecor.invalidation import regions_for

    where = {"schema": schema} if schema is not None else {}
    try:
        deleted = [
            (settings.name, pk, cachedecor.key_for(cls, pk, namespace=settings.namespace, **where))
            for settings in regions_for(cls)
            for pk in keys
        ]
    except cachedecor.CacheError as exc:
        raise Refused(f"{model}: {exc}") from None
    with _cache_failures() as failed:
        cachedecor.invalidate_many(cls, keys, schema=schema)
    _report_failures(failed, f"{len(keys)} key(s)")
    for region, pk, key in deleted:
        click.echo(f"invalidated {cls.__name__} {pk!r} in region {region}: {key}")


def _note_in_process_regions(model: Any) -> None:
    from cachedecor.backends import MemoryStore
    from cachedecor.invalidation import regions_for

    for settings in regions_for(model):
        if isinstance(settings.store, MemoryStore):
            click.echo(
                f"note: region {settings.name} is in-process memory ({settings.backend}): "
                f"no other process sees what this command invalidates there",
                err=True,
            )


def _report_failures(regions: list[str], what: str) -> None:
    if regions:
        click.echo(
            f"Error: could not invalidate {what} in region(s) {', '.join(regions)}: the cache did not "
            f"answer (see the log above); entries may be stale until they expire",
            err=True,
        )
        sys.exit(EXIT_CACHE_FAILED)


# --------------------------------------------------------------------------------------
# outbox


def _outbox_settings(config_path: str | None) -> Any:
    """The outbox options of the configuration (without connecting to anything)."""
    if not config_path:
        _configure(config_path)  # refuses, with the message about --config
    try:
        durable = read_outbox_settings(config_path)
    except cachedecor.ConfigError as exc:
        raise Refused(f"configuration error: {exc}") from None
    if durable is None:
        raise Refused(f"{config_path} sets no outbox_url: there is no outbox to work on")
    return durable


def _configured_outbox(config_path: str | None, action: str) -> Outbox:
    """The outbox of the configured regions; refuses when the configuration sets none."""
    from cachedecor import outbox as durable

    _configure(config_path)
    box = durable.current()
    if box is None:
        raise Refused(f"{config_path} sets no outbox_url: there is no outbox to {action}")
    return box


@main.group()
def outbox() -> None:
    """The outbox of durable invalidation (see the outbox_url option)."""


@outbox.command("create")
@_config_option
def outbox_create(config_path: str | None) -> None:
    """Create the outbox table in the database of outbox_url (if it does not exist)."""
    import sqlalchemy

    from cachedecor.outbox import outbox_table

    durable = _outbox_settings(config_path)
    table = outbox_table(name=durable.table, schema=durable.schema)
    engine = sqlalchemy.create_engine(durable.url)
    try:
        table.create(engine, checkfirst=True)
    except Exception as exc:
        click.echo(f"could not create {table.fullname}: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_CACHE_FAILED)
    finally:
        engine.dispose()
    where = durable.url.render_as_string(hide_password=True)
    click.echo(f"outbox table {table.fullname} is ready in {where}")


@outbox.command("status")
@_config_option
def outbox_status(config_path: str | None) -> None:
    """Show the invalidations waiting in the outbox."""
    state = _configured_outbox(config_path, "show").status()
    age = state["oldest_age"]
    click.echo(
        f"pending {state['pending']}"
        + (f", oldest {age:.3f}s old, most attempts {state['max_attempts']}" if age is not None else "")
    )


@outbox.command("deliver")
@_config_option
def outbox_deliver(config_path: str | None) -> None:
    """Deliver every invalidation waiting in the outbox now; exit 1 if some could not be."""
    box = _configured_outbox(config_path, "deliver")
    total = 0
    while True:
        delivered, left = box.deliver_pending(grace=0)
        total += delivered
        if left or not delivered:
            break
    click.echo(f"delivered {total} transaction(s); {box.pending} left")
    if box.pending:
        sys.exit(EXIT_CACHE_FAILED)


@main.group()
def servers() -> None:
    """Change a memcached pool's server list or placement (see the docs' 'Growing a memcached pool')."""


def _memcached_regions(config_path: str | None, region: str | None) -> list[tuple[str, Any]]:
    """(name, memcached store) of the configured regions (or of ``region``)."""
    from cachedecor.config import region_settings

    regions = _configure(config_path)
    if region is not None and region not in regions:
        raise Refused(
            f"no region {region!r};{did_you_mean(region, regions)} configured: {', '.join(sorted(regions))}"
        )
    out = []
    for name in sorted(regions) if region is None else [region]:
        store = region_settings(name).store
        if hasattr(store, "purge_misplaced"):
            out.append((name, store))
    if not out:
        raise Refused("no memcached region in the configuration")
    return out


@servers.command("diff")
@_config_option
@click.option("--region", default=None, help="Only this region (default: every memcached region).")
@click.option(
    "--to-url",
    default=None,
    metavar="SERVERS",
    help="The new server list, comma-separated (default: the region's also_invalidate_url).",
)
@click.option(
    "--to-placement",
    type=click.Choice(["rendezvous", "slots"]),
    default=None,
    help="The new placement (default: also_invalidate_placement, else the region's placement).",
)
@click.option(
    "--keys", "sample", default=20_000, show_default=True, type=click.IntRange(min=100), help="Keys sampled."
)
def servers_diff(
    config_path: str | None, region: str | None, to_url: str | None, to_placement: str | None, sample: int
) -> None:
    """What a change of the server list or placement moves: per node, the share of the
    key space it owns under the region's url and placement and under the new ones, and
    the share of keys that change owner (estimated from a sample of keys)."""
    from cachedecor.backends.memcached.cluster import placement
    from cachedecor.config import check_server

    for name, store in _memcached_regions(config_path, region):
        routing = store.backend.routing
        before = routing.current
        also = routing.also
        new_servers = [s.strip() for s in to_url.split(",") if s.strip()] if to_url else None
        for server in new_servers or []:
            try:
                check_server(server, "--to-url")
            except cachedecor.ConfigError as exc:
                raise Refused(str(exc)) from None
        if new_servers is None and to_placement is None and also is None:
            click.echo(f"{name}: no change: give --to-url or --to-placement, or set also_invalidate_url")
            continue
        servers_after = new_servers or (also.servers if also is not None else before.servers)
        name_after = to_placement or (also.name if also is not None and new_servers is None else before.name)
        after = placement(name_after, servers_after)
        keys = [f"cachedecor-sample:{i}" for i in range(sample)]
        owned_before: dict[str, int] = {}
        owned_after: dict[str, int] = {}
        moved_out: dict[str, int] = {}
        moved = 0
        for key in keys:
            old, new = before.node_for(key), after.node_for(key)
            owned_before[old] = owned_before.get(old, 0) + 1
            owned_after[new] = owned_after.get(new, 0) + 1
            if old != new:
                moved += 1
                moved_out[old] = moved_out.get(old, 0) + 1
        click.echo(
            f"region {name}: {before.name} over {len(before.servers)} node(s) -> "
            f"{after.name} over {len(after.servers)} node(s)"
        )
        nodes = before.servers + [s for s in after.servers if s not in before.servers]
        rows: list[tuple[str, ...]] = [
            (
                node,
                f"{owned_before.get(node, 0) / sample:.1%}" if node in before.servers else "-",
                f"{owned_after.get(node, 0) / sample:.1%}" if node in after.servers else "-",
                f"{moved_out.get(node, 0) / sample:.1%}",
            )
            for node in nodes
        ]
        click.echo(_table(rows, ("server", "owns before", "owns after", "moves away")))
        ideal = _ideal_move(before.servers, after.servers) if before.name == after.name else None
        click.echo(
            f"keys that change owner: {moved / sample:.1%}"
            + (f" (the least any placement can move: {ideal:.1%})" if ideal is not None else "")
        )


def _ideal_move(before: list[str], after: list[str]) -> float:
    """The share of keys that must move when ``before`` becomes ``after`` (even shares)."""
    kept = len(set(before) & set(after))
    return 1 - kept / max(len(before), len(after))


@servers.command("purge")
@_config_option
@click.option("--region", default=None, help="Only this region (default: every memcached region).")
def servers_purge(config_path: str | None, region: str | None) -> None:
    """Delete, on every node of url and also_invalidate_url, the entries that node does
    not own under the region's url and placement (leftovers of an earlier list)."""
    failed = False
    for name, store in _memcached_regions(config_path, region):
        try:
            click.echo(f"region {name}: deleted {store.purge_misplaced()} misplaced entries")
        except Exception as exc:
            failed = True
            click.echo(f"region {name}: FAILED: {type(exc).__name__}: {exc}; run it again", err=True)
    sys.exit(EXIT_CACHE_FAILED if failed else 0)
