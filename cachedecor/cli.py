"""The ``cachedecor`` command."""

from __future__ import annotations

import importlib
import sys
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
def demo(database: str | None, memcached: str | None, rows: int, repeat: int) -> None:
    """Run the example application: misses, hits, invalidation, rollback, timings."""
    from cachedecor.demo import run_demo

    run_demo(database=database, memcached=memcached, rows=rows, repeat=repeat)


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


@main.command()
@click.option("--config", "config_path", metavar="INI", help="INI file (default: $CACHEDECOR_CONFIG).")
@click.argument("model")
@click.argument("pks", nargs=-1, required=True)
def invalidate(config_path: str | None, model: str, pks: tuple[str, ...]) -> None:
    """Invalidate the entries of MODEL (module:Class) rows with primary keys PKS."""
    cachedecor.configure_regions(config_path)
    module_name, _, class_name = model.partition(":")
    if not class_name:
        raise click.BadParameter("expected module:Class", param_hint="MODEL")
    cls: Any = getattr(importlib.import_module(module_name), class_name)
    import sqlalchemy

    mapper = sqlalchemy.inspect(cls)
    keys: list[Any] = []
    for raw in pks:
        parts = raw.split(",")
        values = [
            col.type.python_type(p) if _simple(col) else p
            for col, p in zip(mapper.primary_key, parts, strict=False)
        ]
        keys.append(tuple(values) if len(values) > 1 else values[0])
    cachedecor.invalidate_many(cls, keys)
    click.echo(f"invalidated {len(keys)} key(s) of {cls.__name__}")


def _simple(col: Any) -> bool:
    try:
        return col.type.python_type in (int, str, float)
    except NotImplementedError:
        return False
