"""Cache keys for mapped rows.

A key reads ``<namespace>:<table>:<primary key>``, for example
``cachedecor:users:42``. It names the row, nothing else: the table is the one of
the root of the model's inheritance hierarchy (one key per row identity, as in
SQLAlchemy's identity map), and nothing in it depends on the Python module that
defines the class or on the columns a version of the application maps. Every
process and every deployed version therefore agree on the key of a row; what a
version mapped travels inside the entry (see :mod:`cachedecor.rows`).

Rows that SQLAlchemy tells apart get different keys: a table in a schema reads
``<namespace>:<schema>.<table>:<pk>`` (the schema a session's
``schema_translate_map`` selects, for one schema per tenant), and the identity
token of horizontal sharding is appended to the table part as ``@<token>``.

Every function here is pure. Keys are always valid memcached keys: printable
ASCII with no spaces or control characters, at most :data:`MAX_KEY_LENGTH`
bytes. A longer key keeps a readable prefix and ends in a hash of the whole.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import json
import re
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import sqlalchemy
from sqlalchemy.orm import Mapper

from cachedecor import _runtime
from cachedecor.errors import ConfigError, InvalidKeyError, UsageError

__all__ = [
    "DEFAULT_NAMESPACE",
    "MAX_KEY_LENGTH",
    "KeyMaker",
    "KeyPattern",
    "Plan",
    "Space",
    "decode_plan",
    "encode_plan",
    "key_for",
    "key_maker",
    "table_label",
]

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


def table_label(table_name: str, schema: str | None = None, token: Any = None) -> str:
    """The readable table part of a key: ``[schema.]table[@token]``, each part escaped.

    ``schema`` is the schema the rows are read from (after any ``schema_translate_map``)
    and ``token`` the identity token of horizontal sharding, ``None`` where none applies.
    """
    label = quote(table_name, safe=_SAFE)
    if schema is not None:
        label = f"{quote(schema, safe=_SAFE)}.{label}"
    if token is not None:
        label = f"{label}@{encode_component(token)}"
    return label


def root_table(model: Any) -> Any:
    """The table whose name keys every row of ``model``'s inheritance hierarchy."""
    return _mapper(model).base_mapper.local_table


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


#: Where a row lives besides its table: ``(schema, identity token)``. ``None`` stands
#: for the table's own schema and no token, the case of most applications.
Space = tuple[Any, Any]


class KeyPattern:
    """The keys of one table: in one space, or in every schema and shard.

    Every matching key starts with :attr:`prefix` (what a server-side scan can
    select on); :meth:`matches` is exact.
    """

    __slots__ = ("prefix", "regex")

    def __init__(self, prefix: str, regex: re.Pattern[str] | None = None) -> None:
        self.prefix = prefix
        self.regex = regex

    def matches(self, key: str) -> bool:
        return key.startswith(self.prefix) and (self.regex is None or self.regex.match(key) is not None)

    def __repr__(self) -> str:
        return f"KeyPattern({self.regex.pattern if self.regex is not None else self.prefix + '*'})"


class KeyMaker:
    """Builds the keys of one inheritance hierarchy in one namespace.

    Resolved once, called per lookup: ``KeyMaker(User)(42) == "cachedecor:users:42"``.
    A composite key takes a tuple (or list) with one value per primary-key column,
    in mapper order. Every class of a hierarchy has the same maker, so a row has one
    key whichever class reads or writes it.
    """

    __slots__ = ("_spaces", "arity", "model", "namespace", "prefix", "schema", "table_name")

    def __init__(self, model: Any, namespace: str = DEFAULT_NAMESPACE) -> None:
        mapper = _mapper(model)
        table = mapper.base_mapper.local_table
        self.model = mapper.base_mapper.class_
        self.namespace = check_namespace(namespace)
        self.arity = len(mapper.primary_key)
        self.table_name: str = getattr(table, "name", None) or self.model.__name__
        self.schema: str | None = getattr(table, "schema", None)
        self.prefix = f"{namespace}:{table_label(self.table_name, self.schema)}:"
        self._spaces: dict[Space, str] = {}

    def __call__(self, pk: Any, space: Space | None = None) -> str:
        if space is None and type(pk) is int and self.arity == 1 and -(10**18) < pk < 10**18:
            key = self.prefix + str(pk)  # the common case, without the general path's calls
            if len(key) <= MAX_KEY_LENGTH:
                return key
        prefix = self.prefix if space is None else self.space_prefix(space)
        return finish_key(prefix + self.encode_pk(pk))

    def keys_for(self, pks: Iterable[Any], space: Space | None = None) -> dict[str, Any]:
        """``{key: pk}`` for many primary keys, in order; a key asked for twice once
        (with its first ``pk``). The same keys as one call per ``pk``."""
        found: dict[str, Any] = {}
        add = found.setdefault
        if space is None and self.arity == 1:
            prefix = self.prefix
            for pk in pks:
                if type(pk) is int and -(10**18) < pk < 10**18:
                    key = prefix + str(pk)
                    if len(key) <= MAX_KEY_LENGTH:
                        add(key, pk)
                        continue
                add(self(pk, space), pk)
            return found
        for pk in pks:
            add(self(pk, space), pk)
        return found

    def space_prefix(self, space: Space) -> str:
        """The key prefix of rows read from schema ``space[0]`` with identity token ``space[1]``."""
        prefix = self._spaces.get(space)
        if prefix is None:
            schema, token = space
            prefix = f"{self.namespace}:{table_label(self.table_name, schema, token)}:"
            if len(self._spaces) < 10_000:
                self._spaces[space] = prefix
        return prefix

    def pattern(self, space: Space | None = None) -> KeyPattern:
        """The keys of every row of the hierarchy in ``space`` (``None``: the default one)."""
        return KeyPattern(self.prefix if space is None else self.space_prefix(space))

    def every_space(self) -> KeyPattern:
        """The keys of every row of the hierarchy, in every schema and every shard."""
        table = re.escape(quote(self.table_name, safe=_SAFE))
        regex = re.compile(rf"{re.escape(self.namespace)}:(?:[^:]*\.)?{table}(?:@[^:]*)?:")
        return KeyPattern(f"{self.namespace}:", regex)

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


def key_maker(model: Any, namespace: str = DEFAULT_NAMESPACE) -> KeyMaker:
    """The shared :class:`KeyMaker` of ``model``'s hierarchy in ``namespace``."""
    cls = _mapper(model).base_mapper.class_
    maker = _runtime.key_makers.get((cls, namespace))
    if maker is None:
        maker = _runtime.key_makers[(cls, namespace)] = KeyMaker(cls, namespace)
    return maker


_OWN_SCHEMA: Any = object()


def key_for(
    model: Any,
    pk: Any,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    schema: Any = _OWN_SCHEMA,
    identity_token: Any = None,
) -> str:
    """The cache key that :func:`cached_by_pk` uses for the row of ``model`` with ``pk``.

    ``schema`` is the schema the row is read from when a ``schema_translate_map``
    moves the table (``None`` for the default schema); by default the table's own.
    ``identity_token`` is the horizontal-sharding token of the row, if any. The key
    is the same for every class of an inheritance hierarchy.

    >>> from sqlalchemy import Integer
    >>> from sqlalchemy.orm import DeclarativeBase, mapped_column
    >>> class Base(DeclarativeBase): pass
    >>> class Item(Base):
    ...     __tablename__ = "items"
    ...     id = mapped_column(Integer, primary_key=True)
    >>> key_for(Item, 42)
    'cachedecor:items:42'
    >>> key_for(Item, 42, schema="tenant_7")
    'cachedecor:tenant_7.items:42'
    """
    maker = key_maker(model, namespace)
    if schema is _OWN_SCHEMA and identity_token is None:
        return maker(pk)
    return maker(pk, (maker.schema if schema is _OWN_SCHEMA else schema, identity_token))


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


# --------------------------------------------------------------------------------------
# plans: the keys to delete, by region, and their JSON (what the outbox stores and
# broadcasts carry)

#: What to delete, by region name: (keys, patterns of model-wide invalidations).
Plan = dict[str, tuple[list[str], list[KeyPattern]]]


def encode_plan(keys: Plan) -> str:
    """The JSON of a :data:`Plan` (region -> keys, patterns)."""
    out: dict[str, Any] = {}
    for region, (names, patterns) in keys.items():
        entry: dict[str, Any] = {}
        if names:
            entry["k"] = names
        if patterns:
            entry["p"] = [[p.prefix, p.regex.pattern if p.regex is not None else None] for p in patterns]
        out[region] = entry
    return json.dumps(out, separators=(",", ":"))


def decode_plan(payload: str) -> Plan:
    """The :data:`Plan` of :func:`encode_plan`'s JSON."""
    out: Plan = {}
    for region, entry in json.loads(payload).items():
        patterns = [
            KeyPattern(prefix, re.compile(rx) if rx is not None else None)
            for prefix, rx in entry.get("p", [])
        ]
        out[region] = (list(entry.get("k", [])), patterns)
    return out
