"""Turning ORM instances into cacheable payloads and back.

A payload is ``[key, class, fingerprint, [value, ...]]``:

* ``key`` is the cache key the entry was written under: an entry copied under
  another key names a different row and is refused;
* ``class`` names the instance's class without any Python module path: its
  polymorphic identity in a polymorphic hierarchy, else the class name, so that
  every version of the application reads it the same way;
* ``fingerprint`` is a number computed from the columns (attribute, table,
  column, type) that this version maps for that class: an entry written under
  another mapping (an older or newer deploy) is refused rather than misread;
* the values of the mapped table columns, in mapper order. Columns that were not
  loaded (deferred, or a joined subclass's table not yet fetched) travel as
  :data:`~cachedecor.codec.ABSENT` and stay unloaded on the rebuilt instance.
  Column properties computed from expressions or other tables (a count of related
  rows, say) are never stored: they would go stale when the other table changes,
  so on a hit they load on first access, as deferred columns do.

Everything that touches SQLAlchemy's instance state lives in this module.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import sqlalchemy
import sqlalchemy.orm.identity
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state

from cachedecor.codec import ABSENT, BadEntry

__all__ = ["EntryMismatch", "ModelPlan", "OtherClass", "class_tag", "mapping_fingerprint", "model_plan"]


def _enum_class(col: Any) -> type[enum.Enum] | None:
    type_ = col.type
    impl = getattr(type_, "impl", None)
    for t in (type_, impl):
        if isinstance(t, SAEnum) and t.enum_class is not None:
            return t.enum_class
    return None


class EntryMismatch(BadEntry):
    """An entry that holds another row, or a row written under another mapping."""

    #: whether the entry was written under another mapping (another deployed version)
    other_mapping = False


class OtherMapping(EntryMismatch):
    """An entry written under another mapping: expected while two versions are deployed."""

    other_mapping = True


class OtherClass(Exception):
    """An entry holds a row of a class outside the reader's model (a sibling subclass)."""


def _stored_props(mapper: Mapper[Any]) -> tuple[list[Any], list[Any]]:
    """(table column properties, derived column properties) of ``mapper``."""
    tables = set(mapper.tables)
    stored: list[Any] = []
    derived: list[Any] = []
    for prop in mapper.column_attrs:
        plain = all(isinstance(c, sqlalchemy.Column) and c.table in tables for c in prop.columns)
        (stored if plain else derived).append(prop)
    return stored, derived


def class_tag(mapper: Mapper[Any]) -> Any:
    """How an entry names the class of its row, the same in every version and module.

    The polymorphic identity in a polymorphic hierarchy, else the class name.
    """
    if mapper.polymorphic_on is not None and mapper.polymorphic_identity is not None:
        return mapper.polymorphic_identity
    return mapper.class_.__name__


def _type_text(type_: Any) -> str:
    name = type(type_).__name__
    enums = getattr(type_, "enums", None)
    if enums:
        name += "(" + ",".join(map(str, enums)) + ")"
    return name


def mapping_fingerprint(mapper: Mapper[Any]) -> int:
    """A 32-bit number that changes when the stored columns of ``mapper`` change.

    Covers each stored column's attribute name, table, column name and type (the
    type's class, and an enum's members), in mapper order; not the Python module or
    the class name, which differ between versions and imports of the same mapping.
    """
    import hashlib

    stored, _ = _stored_props(mapper)
    parts = [repr(class_tag(mapper))]
    for prop in stored:
        for col in prop.columns:
            parts.append(f"{prop.key}={col.table.name}.{col.name}:{_type_text(col.type)}")
    digest = hashlib.blake2b("|".join(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


class ClassPlan:
    """What to store for one mapped class of a hierarchy."""

    __slots__ = (
        "cls",
        "decoders",
        "derived",
        "eager",
        "encoders",
        "fingerprint",
        "keys",
        "manager",
        "pk_positions",
        "tag",
    )

    def __init__(self, mapper: Mapper[Any]) -> None:
        self.cls = mapper.class_
        self.manager = mapper.class_manager
        self.tag = class_tag(mapper)
        self.fingerprint = mapping_fingerprint(mapper)
        props, derived = _stored_props(mapper)
        self.keys: tuple[str, ...] = tuple(p.key for p in props)
        self.eager = frozenset(p.key for p in props if not p.deferred)
        # derived columns the ORM would load with the row: expired on a hit, so
        # that they load (current) on first access
        self.derived = tuple(p.key for p in derived if not p.deferred)
        self.pk_positions = tuple(
            self.keys.index(mapper.get_property_by_column(col).key) for col in mapper.primary_key
        )
        encoders: list[tuple[int, Callable[[Any], Any]]] = []
        decoders: list[tuple[int, Callable[[Any], Any]]] = []
        for i, prop in enumerate(props):
            enum_cls = _enum_class(prop.columns[0])
            if enum_cls is not None:
                encoders.append((i, _enum_encoder))
                decoders.append((i, _enum_decoder(enum_cls)))
        self.encoders = tuple(encoders)
        self.decoders = tuple(decoders)


def _enum_encoder(value: Any) -> Any:
    return value.name if isinstance(value, enum.Enum) else value


def _enum_decoder(enum_cls: type[enum.Enum]) -> Callable[[Any], Any]:
    def decode(value: Any) -> Any:
        if value is None or value is ABSENT:
            return value
        try:
            return enum_cls[value]
        except (KeyError, TypeError):
            raise BadEntry(f"{value!r} is not a member of {enum_cls.__name__}") from None

    return decode


class ModelPlan:
    """Resolved once per decorated model: how its rows are stored and rebuilt."""

    def __init__(self, model: Any) -> None:
        mapper: Mapper[Any] = sqlalchemy.inspect(model)
        self.model = mapper.class_
        self.mapper = mapper
        plans = [ClassPlan(m) for m in mapper.base_mapper.self_and_descendants]
        self.by_class = {p.cls: p for p in plans}
        self.by_tag: dict[Any, ClassPlan] = {}
        for p in plans:
            # two classes with one tag (no polymorphic identity, same name) cannot be
            # told apart in an entry: neither is served from the cache
            self.by_tag[p.tag] = p if p.tag not in self.by_tag else _AMBIGUOUS
        self.identity_class = mapper.identity_key_from_primary_key(tuple([None] * len(mapper.primary_key)))[0]
        self.pk_getter = mapper.primary_key_from_instance
        stored, _ = _stored_props(mapper)
        # columns the decorated model itself loads (not deferred): they must be loaded
        # for an instance to be cached; a subclass's own columns may still be pending
        self.required = frozenset(p.key for p in stored if not p.deferred)

    # -- instance -> payload ------------------------------------------------------------

    def snapshot(self, obj: Any, key: str) -> list[Any] | None:
        """The payload of ``obj`` to store under ``key``, or ``None`` if it must not be cached.

        An instance with pending changes, expired attributes, no identity or of a
        class outside the model's hierarchy is not cached.
        """
        plan = self.by_class.get(type(obj))
        if plan is None or self.by_tag.get(plan.tag) is not plan:
            return None
        state = instance_state(obj)
        if state.key is None or state.modified or state.deleted:
            return None
        expired = state.expired_attributes
        if expired and not expired.isdisjoint(plan.keys):
            # expired (by a commit: its values are not known), or a joined subclass's
            # columns that the base query did not fetch and that were not loaded
            # (:meth:`unloaded`) before this snapshot
            return None
        d = state.dict
        values = [d.get(k, ABSENT) for k in plan.keys]
        for i, enc in plan.encoders:
            if values[i] is not ABSENT:
                values[i] = enc(values[i])
        return [key, plan.tag, plan.fingerprint, values]

    def unloaded(self, obj: Any) -> list[str]:
        """The stored columns of ``obj`` to load before its snapshot: those of a joined
        subclass that the base query did not fetch. Empty when it has none, or when
        columns every row has are expired too (then its values are not known at all)."""
        plan = self.by_class.get(type(obj))
        if plan is None:
            return []
        expired = instance_state(obj).expired_attributes
        if not expired or not expired.isdisjoint(self.required):
            return []
        return [k for k in plan.keys if k in expired]

    def pk_of(self, obj: Any) -> tuple[Any, ...]:
        """Primary key of an instance as a tuple."""
        return tuple(self.pk_getter(obj))

    # -- payload -> instance ------------------------------------------------------------

    def build(self, payload: Any, session: Session | None, key: str, token: Any = None) -> Any:
        """Rebuild an instance from a payload read under ``key`` and attach it to ``session``.

        An instance already in the session's identity map is returned instead (its
        pending changes untouched; attributes that had been expired are filled from
        the payload). Raises :class:`EntryMismatch` for an entry of another row or
        mapping, :class:`OtherClass` for a row outside the model (a sibling
        subclass) and :class:`BadEntry` for a malformed payload.
        """
        if type(payload) is not list or len(payload) != 4:
            raise BadEntry("payload is not [key, class, fingerprint, values]")
        entry_key, tag, fingerprint, values = payload
        if entry_key != key:
            raise EntryMismatch(f"the entry under {key!r} holds the row of {entry_key!r}")
        if tag is None and values is None:
            return None  # a row that does not exist (cache_none=True)
        try:
            plan = self.by_tag.get(tag)
        except TypeError:  # an unhashable tag
            plan = None
        if plan is None or plan is _AMBIGUOUS or plan.fingerprint != fingerprint:
            raise OtherMapping(f"the entry under {key!r} was written under another mapping")
        if type(values) is not list or len(values) != len(plan.keys):
            raise BadEntry("payload does not match the mapped columns")
        if not issubclass(plan.cls, self.model):
            raise OtherClass(plan.cls.__name__)
        for i, dec in plan.decoders:
            values[i] = dec(values[i])
        ident = (self.identity_class, tuple([values[i] for i in plan.pk_positions]), token)
        if session is not None:
            existing = session.identity_map.get(ident)
            if existing is not None:
                _refresh_expired(existing, plan, values)
                return existing
        obj = plan.manager.new_instance()
        state = instance_state(obj)
        d = state.dict
        d.update(zip(plan.keys, values, strict=True))
        if ABSENT in values:
            absent = [k for k, v in zip(plan.keys, values, strict=True) if v is ABSENT]
            for k in absent:
                del d[k]
            # a deferred column loads on access by itself; any other column that was
            # not loaded is expired, so that it loads like an expired attribute
            eager = [k for k in absent if k in plan.eager]
            if eager:
                state._expire_attributes(d, eager)
        if plan.derived:
            state._expire_attributes(d, plan.derived)
        # what the ORM's loader does for a row it has just read: the instance is
        # persistent with this identity and all its values are committed
        state.key = ident
        if token is not None:
            state.identity_token = token
        if session is not None:
            _attach(session, state, obj)
        return obj


_AMBIGUOUS: Any = object()


def _attach_public(session: Session, state: Any, obj: Any) -> None:
    session.add(obj)


def _attach_loaded(session: Session, state: Any, obj: Any) -> None:
    # What the ORM's loader does with an instance it has just built from a row:
    # join the identity map under its key (known to be absent: checked by build())
    # and announce it as loaded, not as a detached instance being re-attached.
    state.session_id = session.hash_key
    session.identity_map._add_unpresent(state, state.key)
    dispatch = session.dispatch
    if dispatch.loaded_as_persistent:
        dispatch.loaded_as_persistent(session, state)


_attach = _attach_loaded if hasattr(sqlalchemy.orm.identity.IdentityMap, "_add_unpresent") else _attach_public


def _refresh_expired(obj: Any, plan: ClassPlan, values: list[Any]) -> None:
    """Fill expired, unmodified attributes of an identity-map instance from the cache."""
    state = instance_state(obj)
    expired = state.expired_attributes
    if not expired or type(obj) is not plan.cls:
        return
    d = state.dict
    filled = []
    for key, value in zip(plan.keys, values, strict=True):
        if key in expired and value is not ABSENT and key not in d:
            d[key] = value
            filled.append(key)
    if filled:
        state._commit(d, filled)


_plans: dict[type, ModelPlan] = {}


def model_plan(model: Any) -> ModelPlan:
    """The shared :class:`ModelPlan` of ``model``."""
    plan = _plans.get(model)
    if plan is None:
        plan = _plans[model] = ModelPlan(model)
    return plan
