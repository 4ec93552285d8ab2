"""The ``cachedecor`` command."""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any

import click

import cachedecor

__all__ = ["main"]


@click.group()
@click.version_option(cachedecor.__version__, prog_name="cachedecor")
def main() -> None:
    """cachedecor: a memcached cache in front of SQLAlchemy."""


@main.command()
@click.option("--database", metavar="URL", help="SQLAlchemy URL (default: a temporary SQLite file).")
@click.option(
    "--memcached", metavar="HOST:PORT", help="Use this memcached server instead of the memory backend."
)
@click.option("--rows", default=100, show_default=True, help="Rows to create.")
@click.option("--repeat", default=300, show_default=True, help="Samples for the timing comparison.")
@click.option("--stats-file", metavar="JSON", help="Write the demo's counters here (see 'cachedecor stats').")
def demo(database: str | None, memcached: str | None, rows: int, repeat: int, stats_file: str | None) -> None:
    """Run the example application: misses, hits, invalidation, rollback, timings."""
    from cachedecor.demo import run_demo

    run_demo(database=database, memcached=memcached, rows=rows, repeat=repeat)
    if stats_file:
        cachedecor.dump_stats(stats_file)


@main.command()
@click.option("--config", "config_path", metavar="INI", help="INI file (default: $CACHEDECOR_CONFIG).")
def check(config_path: str | None) -> None:
    """Validate the configuration and ping every server of every region."""
    try:
        regions = cachedecor.configure_regions(config_path)
    except cachedecor.ConfigError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)
    failed = False
    from cachedecor.config import region_settings

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
    sys.exit(1 if failed else 0)


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


@main.command()
@click.option("--config", "config_path", metavar="INI", help="INI file (default: $CACHEDECOR_CONFIG).")
@click.option(
    "--counters",
    "counters_path",
    metavar="JSON",
    help="Also print client-side counters from a file written by cachedecor.dump_stats().",
)
def stats(config_path: str | None, counters_path: str | None) -> None:
    """Show each region's memcached servers' own statistics (and client counters)."""
    import json

    from cachedecor.config import region_settings

    regions = cachedecor.configure_regions(config_path)
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
    if counters_path:
        with open(counters_path) as fh:
            snapshot = json.load(fh)
        click.echo(f"client counters of process {snapshot['pid']} at {time.ctime(snapshot['time'])}")
        names = sorted({k for counters in snapshot["regions"].values() for k in counters})
        rows = [
            (region, *(str(c.get(k, 0)) for k in names)) for region, c in sorted(snapshot["regions"].items())
        ]
        click.echo(_table(rows, ("region", *names)))
    sys.exit(1 if failed else 0)


@main.command()
@click.option("--config", "config_path", metavar="INI", help="INI file (default: $CACHEDECOR_CONFIG).")
@click.option("--schema", default=None, help="The schema a schema_translate_map selects (one tenant).")
@click.option("--all", "everything", is_flag=True, help="Every cached row of MODEL (its whole hierarchy).")
@click.argument("model")
@click.argument("pks", nargs=-1)
def invalidate(
    config_path: str | None, schema: str | None, everything: bool, model: str, pks: tuple[str, ...]
) -> None:
    """Invalidate the entries of MODEL (module:Class) rows with primary keys PKS, or --all.

    Only the module that maps MODEL is imported: keys do not depend on which
    functions cache the model, and every configured region is reached.
    """
    cachedecor.configure_regions(config_path)
    module_name, _, class_name = model.partition(":")
    if not class_name:
        raise click.BadParameter("expected module:Class", param_hint="MODEL")
    if everything == bool(pks):
        raise click.UsageError("give primary keys or --all, not both and not neither")
    cls: Any = getattr(importlib.import_module(module_name), class_name)
    import sqlalchemy

    mapper = sqlalchemy.inspect(cls)
    if everything:
        cachedecor.invalidate_model(cls, schema=schema)
        click.echo(f"invalidated every cached row of {cls.__name__}")
        return
    keys: list[Any] = []
    for raw in pks:
        parts = raw.split(",")
        values = [
            col.type.python_type(p) if _simple(col) else p
            for col, p in zip(mapper.primary_key, parts, strict=False)
        ]
        keys.append(tuple(values) if len(values) > 1 else values[0])
    cachedecor.invalidate_many(cls, keys, schema=schema)
    click.echo(f"invalidated {len(keys)} key(s) of {cls.__name__}")


def _simple(col: Any) -> bool:
    try:
        return col.type.python_type in (int, str, float)
    except NotImplementedError:
        return False
