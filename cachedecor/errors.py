"""Exceptions raised by cachedecor.

Every exception derives from :class:`CacheError`. Configuration and usage
mistakes are raised early and loudly; failures of the cache infrastructure
(a server down, slow, or holding garbage) are never raised into the caller of a
decorated function: they are logged and counted instead (see :mod:`cachedecor.stats`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from types import MappingProxyType

__all__ = [
    "CacheError",
    "ConfigError",
    "InvalidKeyError",
    "MissingExtra",
    "RegionNotConfigured",
    "SessionWarning",
    "UsageError",
    "missing_extra",
]


class CacheError(Exception):
    """Root of every exception raised by cachedecor."""


class ConfigError(CacheError, ValueError):
    """The configuration is wrong.

    Raised by :func:`cachedecor.configure_regions` (never later, at the first
    cache call). The message names the region and the option, and says what was
    expected.
    """


class RegionNotConfigured(CacheError, LookupError):
    """A region was used before :func:`cachedecor.configure_regions` configured it.

    Usually the application forgot to call ``configure_regions`` at start-up, or
    the configuration does not list the region in ``regions``.
    """

    def __init__(self, name: str, configured: Iterable[str] = ()) -> None:
        self.name = name
        known = sorted(configured)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}? " if close else " "
        configured = f"(configured: {', '.join(known)})" if known else "(none is configured)"
        super().__init__(
            f"cache region {name!r} is not configured {configured}.{hint}Call "
            f"cachedecor.configure_regions() with a configuration that defines it "
            f"(e.g. an INI file with 'regions = {name}' and a [cachedecor.{name}] "
            f"section, or set CACHEDECOR_CONFIG to such a file)"
        )


class InvalidKeyError(CacheError, ValueError):
    """A primary key cannot be turned into a cache key without ambiguity.

    Raised for a ``None`` inside a primary key, a wrong number of components for
    a composite key, or a value of a type that has no stable text form. This is
    a programming error in the caller, so it is raised rather than risking two
    rows sharing one cache entry.
    """


class UsageError(CacheError, TypeError):
    """A decorated function was used in a way cachedecor cannot cache correctly.

    For example it returned an object that is not an instance of the model, or a
    row whose primary key is not the one it was asked for. Raised on the first
    call that shows the mistake, which is the first call on an empty cache.
    """


class SessionWarning(UserWarning):
    """A decorated function returned rows of a session that its cache hits are not attached to.

    Typically a reader that uses a global session (Flask-SQLAlchemy's ``db.session``,
    a module's ``scoped_session``) that cachedecor was not told of and could not find
    in the function's code: its hits come back detached. Pass ``session=``. Issued
    once per decorated function, and logged.
    """


class MissingExtra(ConfigError, ImportError):
    """A feature needs an optional extra that is not installed.

    The message names the extra and the command that installs it, such as
    ``pip install 'cachedecor[redis]'``. Raised where the feature is configured or
    first used (``configure_regions`` for a backend or a codec, decorating an
    ``async def`` for the asyncio extra, an exporter's function for the metrics
    extras); the rest of cachedecor works without it.
    """

    def __init__(self, message: str, *, extra: str) -> None:
        super().__init__(message)
        #: the extra's name, as in ``pip install 'cachedecor[EXTRA]'``
        self.extra = extra


#: the optional extra that brings each importable package
EXTRAS: Mapping[str, str] = MappingProxyType(
    {
        "redis": "redis",
        "psycopg": "postgresql",
        "zstandard": "zstd",
        "greenlet": "asyncio",
        "prometheus_client": "prometheus",
        "opentelemetry": "opentelemetry",
    }
)


def missing_extra(what: str, package: str, cause: BaseException | None = None) -> MissingExtra:
    """The :class:`MissingExtra` for ``what``, which needs the Python package ``package``."""
    extra = EXTRAS.get(package.split(".")[0], package)
    because = f" ({cause})" if cause is not None else ""
    return MissingExtra(
        f"{what} needs the Python package {package.split('.')[0]!r}, which is not installed: "
        f"install cachedecor's {extra!r} extra (pip install 'cachedecor[{extra}]'){because}",
        extra=extra,
    )
