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

import datetime
import decimal
import enum
import sys
import uuid
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import sqlalchemy
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state

from cachedecor import _runtime
from cachedecor._sa import (
    ADD_UNPRESENT,
    COMMIT_ATTRIBUTES,
    EXPIRE_ATTRIBUTES,
    STATE_ATTR,
    identity_dict,
    state_constructor,
)
from cachedecor.codec import ABSENT, BadEntry

__all__ = [
    "EntryMismatch",
    "ModelPlan",
    "OtherClass",
    "Row",
    "class_tag",
    "mapping_fingerprint",
    "model_plan",
]


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
        "immutable",
        "keys",
        "manager",
        "new_state",
        "owner",
        "pk_positions",
        "readable",
        "tag",
    )

    def __init__(self, mapper: Mapper[Any], owner: ModelPlan) -> None:
        self.cls = mapper.class_
        #: the model plan this class plan belongs to
        self.owner = owner
        #: whether the owner's model reads rows of this class (not a sibling subclass)
        self.readable = issubclass(self.cls, owner.model)
        self.manager = mapper.class_manager
        # what ClassManager.new_instance() does, taken apart once so that building an
        # instance costs one call less; only for the default instrumentation
        self.new_state = state_constructor(self.manager)
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
        decoders: list[tuple[int, dict[Any, Any], type[enum.Enum]]] = []
        immutable = set(_IMMUTABLE)
        for i, prop in enumerate(props):
            enum_cls = _enum_class(prop.columns[0])
            if enum_cls is not None:
                encoders.append((i, _enum_encoder))
                decoders.append((i, _enum_members(enum_cls), enum_cls))
                immutable.add(enum_cls)
        self.encoders = tuple(encoders)
        self.decoders = tuple(decoders)
        #: the types of the values that instances of a shared row may share
        self.immutable = frozenset(immutable)


def _enum_encoder(value: Any) -> Any:
    return value.name if isinstance(value, enum.Enum) else value


def _enum_members(enum_cls: type[enum.Enum]) -> dict[Any, Any]:
    """What a stored enum value (a member's name, ``None``, :data:`ABSENT`) decodes to."""
    members: dict[Any, Any] = dict(enum_cls.__members__)
    members[None] = None
    members[ABSENT] = ABSENT
    return members


class ModelPlan:
    """Resolved once per decorated model: how its rows are stored and rebuilt."""

    def __init__(self, model: Any) -> None:
        mapper: Mapper[Any] = sqlalchemy.inspect(model)
        self.model = mapper.class_
        self.mapper = mapper
        plans = [ClassPlan(m, self) for m in mapper.base_mapper.self_and_descendants]
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

    def prepare(self, payload: Any, key: str, token: Any = None, written_at: float = 0.0) -> Row:
        """Check a payload read under ``key`` and turn it into a :class:`Row`.

        Raises :class:`EntryMismatch` for an entry of another row or mapping and
        :class:`BadEntry` for a malformed payload. The row may be of a class outside
        this model (a sibling subclass): :meth:`instantiate` tells.
        """
        if type(payload) is not list or len(payload) != 4:
            raise BadEntry("payload is not [key, class, fingerprint, values]")
        entry_key, tag, fingerprint, values = payload
        if entry_key != key:
            raise EntryMismatch(f"the entry under {key!r} holds the row of {entry_key!r}")
        if tag is None and values is None:
            return Row(None, None, _NO_VALUES, (), written_at)  # a row that does not exist (cache_none=True)
        try:
            plan = self.by_tag.get(tag)
        except TypeError:  # an unhashable tag
            plan = None
        if plan is None or plan is _AMBIGUOUS or plan.fingerprint != fingerprint:
            raise OtherMapping(f"the entry under {key!r} was written under another mapping")
        if type(values) is not list or len(values) != len(plan.keys):
            raise BadEntry("payload does not match the mapped columns")
        for i, members, enum_cls in plan.decoders:
            try:
                values[i] = members[values[i]]
            except (KeyError, TypeError):
                raise BadEntry(f"{values[i]!r} is not a member of {enum_cls.__name__}") from None
        positions = plan.pk_positions
        pk = (values[positions[0]],) if len(positions) == 1 else tuple([values[i] for i in positions])
        ident = (self.identity_class, pk, token)
        values_by_key = dict(zip(plan.keys, values, strict=False))  # lengths checked above
        expire = plan.derived
        for value in values:
            if value is ABSENT:
                absent = [k for k, v in values_by_key.items() if v is ABSENT]
                for k in absent:
                    del values_by_key[k]
                # a deferred column loads on access by itself; any other column that
                # was not loaded is expired, so that it loads like an expired attribute
                expire = tuple(k for k in absent if k in plan.eager) + plan.derived
                break
        return Row(plan, ident, values_by_key, expire, written_at)

    def instantiate(self, row: Row, session: Session | None, token: Any = None) -> Any:
        """The instance of ``row``, attached to ``session``.

        An instance already in the session's identity map is returned instead (its
        pending changes untouched; attributes that had been expired are filled from
        the row). Raises :class:`OtherClass` for a row outside this model (a sibling
        subclass). A row shared by several reads (:meth:`Row.share`) gives each its
        own copies of its mutable values (JSON documents).
        """
        plan = row.plan
        if plan is None:
            return None
        if plan.owner is not self:
            plan = self._adopt(plan)
        if not plan.readable:
            raise OtherClass(plan.cls.__name__)
        ident = row.ident
        if token is not ident[2]:
            ident = (ident[0], ident[1], token)
        if session is not None:
            identity_map = session.identity_map
            # (the dictionary first: the identity map's get() is a call the usual,
            # absent case can do without)
            existing = identity_map.get(ident) if ident in identity_dict(identity_map) else None
            if existing is not None:
                _refresh_expired(existing, plan, row)
                return existing
        obj, state = _build(plan, row, ident, token)
        if session is not None:
            if _attach is _attach_loaded:  # the same, without the call: the hottest path
                state.session_id = session.hash_key
                ADD_UNPRESENT(session.identity_map, state, ident)  # type: ignore[misc]
                dispatch = session.dispatch
                if dispatch.loaded_as_persistent:
                    dispatch.loaded_as_persistent(session, state)
            else:
                _attach(session, state, obj)
        return obj

    def instantiate_many(
        self, rows: dict[str, Row], session: Session | None, token: Any = None
    ) -> tuple[dict[str, Any], dict[str, Exception]]:
        """:meth:`instantiate` for many rows by key: (instances by key, in order; what
        each row that could not be instantiated raised, by key).

        The same steps as one :meth:`instantiate` per row, with what is the same for
        every row (the session's identity map, its events) read once, and the usual
        row taken in line: a row whose plan, token or session needs more goes through
        :meth:`instantiate`. (One :meth:`instantiate` per row made a near-cache batch
        of 1,000 rows 12% slower: 3.6 against 3.2 ms, ``make bench``'s near rows.)
        """
        built: dict[str, Any] = {}
        failed: dict[str, Exception] = {}
        attached = session is not None and _attach is _attach_loaded
        if session is not None:
            identity_map = session.identity_map
            present = identity_map.get
            held = identity_dict(identity_map)  # looked in first, as instantiate() does
            hash_key = session.hash_key
            loaded = session.dispatch.loaded_as_persistent
        for key, row in rows.items():
            plan = row.plan
            ident = row.ident
            if (
                plan is None
                or plan.owner is not self
                or not plan.readable
                or ident[2] is not token
                or (session is not None and (not attached or (ident in held and present(ident) is not None)))
            ):
                try:
                    built[key] = self.instantiate(row, session, token)
                except Exception as exc:
                    failed[key] = exc
                continue
            obj, state = _build(plan, row, ident, token)
            if attached:
                state.session_id = hash_key
                ADD_UNPRESENT(identity_map, state, ident)  # type: ignore[misc]
                if loaded:
                    loaded(session, state)
            built[key] = obj
        return built, failed

    def _adopt(self, plan: ClassPlan) -> ClassPlan:
        """This model's plan for a row another model of the hierarchy prepared."""
        mine = self.by_class.get(plan.cls)
        if mine is None or mine.fingerprint != plan.fingerprint:
            raise OtherMapping(f"a row of {plan.cls.__name__} prepared under another mapping")
        return mine


class Row:
    """A checked, decoded entry, ready to become instances (:meth:`ModelPlan.instantiate`).

    What the near cache keeps: its values are never handed out themselves once it is
    shared (:meth:`share`): mutable ones (lists and dicts of JSON columns) are copied
    for each instance, so that changing one instance's document changes no other.
    """

    __slots__ = ("copies", "expire", "ident", "plan", "size", "values", "written_at")

    def __init__(
        self,
        plan: ClassPlan | None,
        ident: Any,
        values: dict[str, Any] | MappingProxyType[str, Any],
        expire: tuple[str, ...],
        written_at: float,
    ) -> None:
        self.plan = plan
        self.ident = ident
        #: the loaded columns' values by attribute name
        self.values = values
        #: attributes to expire on each instance (unloaded columns, derived columns)
        self.expire = expire
        #: the entry's write time (``0.0`` if unknown), for ``region.invalidate()``
        self.written_at = written_at
        #: (attribute, how to copy its value) for the values each instance gets a copy
        #: of (set by :meth:`share`)
        self.copies: tuple[tuple[str, Callable[[Any], Any]], ...] = ()
        #: an estimate of the memory the row holds, in bytes (set by :meth:`share`)
        self.size = 0

    def share(self) -> Row:
        """Make the row fit to be kept and instantiated many times (mutable values are
        copied per instance), and count its size. Returns the row."""
        plan = self.plan
        if plan is None:
            self.size = _ROW_SIZE
            return self
        immutable = plan.immutable
        self.copies = tuple((k, _copier(v)) for k, v in self.values.items() if type(v) not in immutable)
        size = _ROW_SIZE + sys.getsizeof(self.values) + sys.getsizeof(self.ident[1])
        for v in self.values.values():
            size += _deep_size(v)
        self.size = size
        return self


#: the values of a row that does not exist (never read: such a row has no plan)
_NO_VALUES: MappingProxyType[str, Any] = MappingProxyType({})
#: the row object, its identity tuple and the near cache's slot for it
_ROW_SIZE = 200
#: types whose values several instances may share: nothing can change them in place
_IMMUTABLE = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        decimal.Decimal,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        uuid.UUID,
    }
)


def _deep_size(value: Any) -> int:
    size = sys.getsizeof(value)
    if type(value) is list:
        for item in value:
            size += _deep_size(item)
    elif type(value) is dict:
        for k, item in value.items():
            size += sys.getsizeof(k) + _deep_size(item)
    return size


def _copier(value: Any) -> Callable[[Any], Any]:
    """How to copy ``value`` for each instance: a shallow copy for a list or dictionary of
    values that cannot change in place (the usual JSON document), else all the way down."""
    if type(value) is list and all(type(v) in _IMMUTABLE for v in value):
        return list.copy
    if type(value) is dict and all(type(v) in _IMMUTABLE for v in value.values()):
        return dict.copy
    return _copy_tree


def _copy_tree(value: Any) -> Any:
    """A copy of a value decoded from an entry: lists and dicts are copied all the way down."""
    if type(value) is list:
        return [v if type(v) in _IMMUTABLE else _copy_tree(v) for v in value]
    if type(value) is dict:
        return {k: v if type(v) in _IMMUTABLE else _copy_tree(v) for k, v in value.items()}
    return value


_AMBIGUOUS: Any = object()


def _attach_public(session: Session, state: Any, obj: Any) -> None:
    session.add(obj)


def _attach_loaded(session: Session, state: Any, obj: Any) -> None:
    # What the ORM's loader does with an instance it has just built from a row:
    # join the identity map under its key (known to be absent: checked by build())
    # and announce it as loaded, not as a detached instance being re-attached.
    state.session_id = session.hash_key
    ADD_UNPRESENT(session.identity_map, state, state.key)  # type: ignore[misc]
    dispatch = session.dispatch
    if dispatch.loaded_as_persistent:
        dispatch.loaded_as_persistent(session, state)


_attach = _attach_loaded if ADD_UNPRESENT is not None else _attach_public


def _build(plan: ClassPlan, row: Row, ident: tuple[Any, ...], token: Any) -> tuple[Any, Any]:
    """A new instance of ``row`` and its state, persistent with identity ``ident``,
    not yet in any session: what the ORM's loader makes of a row it has just read
    (all its values committed). The same for a single hit and each row of a batch."""
    cls: Any = plan.cls
    new_state = plan.new_state
    if new_state is not None:
        obj = cls.__new__(cls)
        obj.__dict__ = d = row.values.copy()  # at its size at once, not grown key by key
        d[STATE_ATTR] = state = new_state(obj, plan.manager)
    else:
        obj = plan.manager.new_instance()
        state = instance_state(obj)
        d = obj.__dict__  # what state.dict is, without the weak reference's call
        d.update(row.values)
    for k, copy in row.copies:
        d[k] = copy(d[k])
    if row.expire:
        EXPIRE_ATTRIBUTES(state, d, row.expire)
    state.key = ident
    if token is not None:
        state.identity_token = token
    return obj, state


def _refresh_expired(obj: Any, plan: ClassPlan, row: Row) -> None:
    """Fill expired, unmodified attributes of an identity-map instance from the cache."""
    state = instance_state(obj)
    expired = state.expired_attributes
    if not expired or type(obj) is not plan.cls:
        return
    d = state.dict
    filled = []
    for key, value in row.values.items():
        if key in expired and key not in d:
            d[key] = _copy_tree(value) if any(k == key for k, _ in row.copies) else value
            filled.append(key)
    if filled:
        COMMIT_ATTRIBUTES(state, d, filled)


def model_plan(model: Any) -> ModelPlan:
    """The shared :class:`ModelPlan` of ``model``."""
    plan = _runtime.model_plans.get(model)
    if plan is None:
        plan = _runtime.model_plans[model] = ModelPlan(model)
    return plan
