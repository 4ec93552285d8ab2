"""Cache keys for mapped rows.

A key reads ``<namespace>:<table>:<fingerprint>:<primary key>``, for example
``cachedecor:users:3f2a9c1e:42``. The fingerprint is a short hash of the mapped
columns (names and types) of the whole inheritance hierarchy and of the model's
own name, so that an entry written by an older version of a model is never read
by a newer one.

Every function here is pure. Keys are always valid memcached keys: printable
ASCII with no spaces or control characters, at most :data:`MAX_KEY_LENGTH`
bytes. A longer key keeps a readable prefix and ends in a hash of the whole.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import re
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import sqlalchemy
from sqlalchemy.orm import Mapper

from cachedecor.errors import ConfigError, InvalidKeyError, UsageError

__all__ = ["DEFAULT_NAMESPACE", "MAX_KEY_LENGTH", "KeyMaker", "key_for", "model_fingerprint"]

#: memcached's limit on key length, in bytes.
MAX_KEY_LENGTH = 250
#: Namespace used when a region does not set ``namespace``.
DEFAULT_NAMESPACE = "cachedecor"

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# Characters that a key component may keep as they are; everything else is %-escaped,
# so ',' (component separator), ':' (field separator) and '#' (hash marker) never
# appear unescaped inside a component.
_SAFE = "-_.~"


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is usable in keys, else raise :class:`ConfigError`."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise ConfigError(
            f"namespace {namespace!r} must be 1-64 characters of letters, digits, '_', '.' or '-'"
        )
    return namespace


def _mapper(model: Any) -> Mapper[Any]:
    try:
        mapper = sqlalchemy.inspect(model)
    except sqlalchemy.exc.NoInspectionAvailable:
        mapper = None
    if not isinstance(mapper, Mapper):
        raise UsageError(f"{model!r} is not a mapped class")
    return mapper


def model_fingerprint(model: Any) -> str:
    """Eight hex digits that change whenever the mapped columns of ``model`` change.

    Covers the model's own name and every column (key, table, type) of every
    mapper in its inheritance hierarchy, because an entry may hold any subclass.
    """
    mapper = _mapper(model)
    parts = [f"{mapper.class_.__module__}.{mapper.class_.__qualname__}"]
    for m in sorted(
        mapper.base_mapper.self_and_descendants,
        key=lambda m: f"{m.class_.__module__}.{m.class_.__qualname__}",
    ):
        parts.append(f"|{m.class_.__module__}.{m.class_.__qualname__}")
        for prop in m.column_attrs:
            for col in prop.columns:
                table = getattr(col, "table", None)
                parts.append(f";{prop.key}={getattr(table, 'name', '')}.{col.name}:{col.type!r}")
    return hashlib.blake2b("".join(parts).encode(), digest_size=4).hexdigest()


def table_label(model: Any) -> str:
    """The readable table part of a key: the model's table name (escaped)."""
    mapper = _mapper(model)
    table = mapper.local_table
    name = getattr(table, "name", None) or mapper.class_.__name__
    if mapper.inherits is not None and mapper.local_table is mapper.inherits.local_table:
        # single-table inheritance: subclasses share the table; tell them apart
        name = f"{name}.{mapper.class_.__name__}"
    return quote(name, safe=_SAFE)


def encode_component(value: Any) -> str:
    """Text form of one primary-key value; raises :class:`InvalidKeyError` if it has none."""
    tp = type(value)
    if tp is int:
        try:
            return str(value)
        except ValueError:  # more digits than Python converts to text
            raise InvalidKeyError("a primary key integer is too long for a cache key") from None
    if tp is str:
        # surrogatepass: a str with a lone surrogate still has one distinct key
        return quote(value, safe=_SAFE, errors="surrogatepass")
    if value is None:
        raise InvalidKeyError("a primary key value is None: rows without a key cannot be cached")
    if isinstance(value, enum.Enum):
        return encode_component(value.value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str):
        return quote(str(value), safe=_SAFE, errors="surrogatepass")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "x" + bytes(value).hex()
    if isinstance(value, (datetime.date, datetime.time)):
        return quote(value.isoformat(), safe=_SAFE)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise InvalidKeyError(f"primary key value {value!r} is not finite")
        return quote(str(value.normalize()), safe=_SAFE)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidKeyError(f"primary key value {value!r} is not finite")
        return repr(value)
    raise InvalidKeyError(
        f"primary key value {value!r} of type {tp.__name__} has no stable text form for a cache key"
    )


def finish_key(key: str) -> str:
    """Apply the length limit: keys over :data:`MAX_KEY_LENGTH` become prefix + '#' + hash."""
    if len(key) <= MAX_KEY_LENGTH:
        return key
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    return key[: MAX_KEY_LENGTH - len(digest) - 1] + "#" + digest


class KeyMaker:
    """Builds the keys of one model in one namespace; resolved once, called per lookup.

    ``KeyMaker(User)(42) == "cachedecor:users:<fp>:42"``. A composite key takes a
    tuple (or list) with one value per primary-key column, in mapper order.
    """

    __slots__ = ("arity", "model", "namespace", "prefix")

    def __init__(self, model: Any, namespace: str = DEFAULT_NAMESPACE) -> None:
        mapper = _mapper(model)
        self.model = mapper.class_
        self.namespace = check_namespace(namespace)
        self.arity = len(mapper.primary_key)
        self.prefix = f"{namespace}:{table_label(model)}:{model_fingerprint(model)}:"

    def __call__(self, pk: Any) -> str:
        return finish_key(self.prefix + self.encode_pk(pk))

    def encode_pk(self, pk: Any) -> str:
        """The primary-key part of the key (without prefix)."""
        if type(pk) is int and self.arity == 1 and -(10**18) < pk < 10**18:
            return str(pk)
        values = self.normalize(pk)
        return ",".join(map(encode_component, values))

    def normalize(self, pk: Any) -> tuple[Any, ...]:
        """``pk`` as a tuple of one value per primary-key column; checks arity and ``None``."""
        if isinstance(pk, (tuple, list)):
            values = tuple(pk)
        elif self.arity == 1:
            values = (pk,)
        else:
            raise InvalidKeyError(
                f"{self.model.__name__} has a composite primary key of {self.arity} columns: "
                f"pass a tuple of {self.arity} values, not {pk!r}"
            )
        if len(values) != self.arity:
            raise InvalidKeyError(
                f"{self.model.__name__} has {self.arity} primary-key column(s); "
                f"got {len(values)} value(s): {pk!r}"
            )
        if None in values:
            raise InvalidKeyError(
                f"primary key {pk!r} of {self.model.__name__} contains None; "
                f"rows without a full key cannot be cached"
            )
        return values

    def many(self, pks: Iterable[Any]) -> list[str]:
        """Keys of several primary keys, in order."""
        return [self(pk) for pk in pks]


_makers: dict[tuple[type, str], KeyMaker] = {}


def key_maker(model: Any, namespace: str = DEFAULT_NAMESPACE) -> KeyMaker:
    """A shared :class:`KeyMaker` for ``(model, namespace)``."""
    cls = _mapper(model).class_
    maker = _makers.get((cls, namespace))
    if maker is None:
        maker = _makers[(cls, namespace)] = KeyMaker(cls, namespace)
    return maker


def key_for(model: Any, pk: Any, *, namespace: str = DEFAULT_NAMESPACE) -> str:
    """The cache key that :func:`cached_by_pk` uses for the row of ``model`` with ``pk``.

    >>> from sqlalchemy import Integer
    >>> from sqlalchemy.orm import DeclarativeBase, mapped_column
    >>> class Base(DeclarativeBase): pass
    >>> class Item(Base):
    ...     __tablename__ = "items"
    ...     id = mapped_column(Integer, primary_key=True)
    >>> key = key_for(Item, 42)
    >>> key.startswith("cachedecor:items:") and key.endswith(":42")
    True
    """
    return key_maker(model, namespace)(pk)


_PLAIN_KEY = re.compile(r"^[\x21-\x7e]{1,250}$")
_UNSAFE_CHAR = re.compile(r"[^\x21-\x7e]")


def mangle_key(key: str) -> str:
    """dogpile ``key_mangler`` for regions built by cachedecor.

    Keys that memcached accepts pass unchanged; any other key (spaces, control or
    non-ASCII characters, too long) becomes a readable prefix plus a hash of the
    whole. This makes dogpile's own ``cache_on_arguments`` safe on memcached.
    """
    if _PLAIN_KEY.fullmatch(key):
        return key
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    readable = _UNSAFE_CHAR.sub("_", key)[: MAX_KEY_LENGTH - len(digest) - 1]
    return readable + "#" + digest
