"""Region configuration: INI files, nested dicts, flat dotted dicts, the environment.

Modules: :mod:`.options` (what each backend and region accepts: types, defaults,
ranges, coercion), :mod:`.sources` (every source to one flat form),
:mod:`.regions` (options to a dogpile region, its store and codec) and
:mod:`.suggestions` (did-you-mean hints); this module holds the configured regions
and the public functions. The modules share only the names in their ``__all__``.

Every source is first turned into the same flat form (``region -> option -> value``)
and validated by one parser, so an INI section ``[cachedecor.users]`` with key
``expiration_time`` is exactly the setting ``cachedecor.users.expiration_time``.
All validation happens in :func:`configure_regions`; a configuration that passes
never fails later at the first cache call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dogpile.cache
from dogpile.cache import CacheRegion

from cachedecor import _runtime, broadcast, invalidation, outbox
from cachedecor.config.options import (
    ARGUMENT_RANGES,
    BACKEND_ARGUMENTS,
    REGION_OPTIONS,
    REGION_RANGES,
    OutboxSettings,
    broadcast_settings,
    outbox_settings,
)
from cachedecor.config.regions import (
    RegionSettings,
    build_region,
    check_arguments,
    check_server,
    region_names,
)
from cachedecor.config.sources import ENV_VAR, parse
from cachedecor.errors import ConfigError, RegionNotConfigured

__all__ = [
    "ARGUMENT_RANGES",
    "BACKEND_ARGUMENTS",
    "ENV_VAR",
    "REGION_OPTIONS",
    "REGION_RANGES",
    "OutboxSettings",
    "RegionSettings",
    "aclose",
    "check_arguments",
    "check_server",
    "configure_regions",
    "configured_regions",
    "get_region",
    "read_outbox_settings",
    "region_settings",
    "reset",
    "settings_of",
]

dogpile.cache.register_backend(  # type: ignore[no-untyped-call]
    "cachedecor.pymemcache", "cachedecor.backends", "PyMemcacheBackend"
)

#: the configured regions: the runtime's dict itself, which the layers below read
_settings = _runtime.regions


def configure_regions(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    prefix: str = "cachedecor.",
) -> dict[str, CacheRegion]:
    """Configure cache regions and return every region configured so far, by name.

    ``source`` is an INI file path, a nested dict (``{"regions": {...}}``), a flat
    dotted dict (``{"cachedecor.default.backend": ...}``, keys selected by
    ``prefix``) or ``None``: the INI file named by ``$CACHEDECOR_CONFIG``, or else
    one region ``default`` on the in-process memory backend.

    Regions named in ``source`` replace earlier configurations of the same name;
    others are kept. Nothing is replaced unless the whole source is valid.

    :raises ConfigError: on any invalid setting, naming the region and option.

    >>> import cachedecor
    >>> regions = cachedecor.configure_regions(
    ...     {"regions": {"default": {"backend": "dogpile.cache.memory", "expiration_time": 60}}}
    ... )
    >>> sorted(regions)
    ['default']
    >>> cachedecor.reset()
    """
    if not prefix.endswith("."):
        prefix += "."
    parsed = parse(source, prefix)
    names = region_names(parsed, prefix)
    built = {name: build_region(name, parsed, prefix) for name in names}
    durable = outbox_settings(parsed.globals, prefix)
    heard = broadcast_settings(parsed.globals, prefix)
    near = [name for name, s in built.items() if s.near is not None]
    if near and heard is None and broadcast.current() is None:
        raise ConfigError(
            f"{prefix}{near[0]}.local_entries: a near cache needs {prefix}broadcast_url (a postgresql:// "
            f"or redis:// URL) to hear the other processes' invalidations"
        )
    box = None
    if durable is not None:
        # the deliverer delivers through the commit pipeline's loop, wired here
        box = outbox.prepare(durable, invalidation.deliver_now)  # checks the table: may raise ConfigError
    with _runtime.regions_lock:
        _settings.update(built)
        regions = {name: s.region for name, s in _settings.items()}
    if box is not None:
        outbox.activate(box)
    if heard is not None:
        broadcast.activate(broadcast.Broadcast(*heard))
    return regions


def region_settings(name: str) -> RegionSettings:
    """The :class:`RegionSettings` of a configured region."""
    try:
        return _settings[name]
    except KeyError:
        raise RegionNotConfigured(name, _settings) from None


def settings_of(name: str) -> RegionSettings | None:
    """The :class:`RegionSettings` of region ``name``, or ``None`` if it is not configured.

    For the read path, called on every cached call: one dict lookup, no lock, no
    exception. A region reconfigured later gets a new :class:`RegionSettings` object, so
    a caller holding one may compare it with ``is`` to learn whether it is still current.
    """
    return _settings.get(name)


def get_region(name: str = "default") -> CacheRegion:
    """The dogpile :class:`~dogpile.cache.region.CacheRegion` configured under ``name``.

    :raises RegionNotConfigured: if ``name`` was never configured.
    """
    return region_settings(name).region


def configured_regions() -> dict[str, RegionSettings]:
    """A snapshot of every configured region's settings."""
    return _runtime.configured_regions()


def read_outbox_settings(
    source: str | os.PathLike[str] | Mapping[str, Any] | None, *, prefix: str = "cachedecor."
) -> OutboxSettings | None:
    """The ``outbox_*`` options of ``source`` (as :func:`configure_regions` takes it), checked.

    ``None`` when ``source`` sets no ``outbox_url``. Configures nothing and connects to
    nothing; the regions of ``source`` are not checked.

    :raises ConfigError: for a source of the wrong form or an invalid ``outbox_*`` option.
    """
    if not prefix.endswith("."):
        prefix += "."
    return outbox_settings(parse(source, prefix).globals, prefix)


async def aclose() -> None:
    """Close the running event loop's cache connections, in every region.

    Call it when the loop's work is done (an ASGI application's shutdown, the end of
    an ``asyncio.run``): connections are per event loop, and those of a loop that
    ends are otherwise left to the garbage collector. A later call from this loop
    opens new ones. Sync callers' connections are not touched.
    """
    for settings in configured_regions().values():
        try:
            await settings.astore.aclose()
        except Exception:  # closing is best effort: a connection already broken is gone
            pass


def reset() -> None:
    """Return to the state of a fresh process (for tests): forget every configured
    region, zero the counters, stop the outbox's deliverer and the broadcast's listeners
    (see :func:`cachedecor._runtime.reset` for what is kept)."""
    _runtime.reset()
