"""Turning ORM instances into cacheable payloads and back.

A payload is ``[class_index, [value, ...]]``: the index of the instance's class in
the model's inheritance hierarchy (sorted by qualified name, the order the key
fingerprint covers) and the loaded column values in mapper order. Columns that
were not loaded (deferred, or a joined subclass's table not yet fetched) travel as
:data:`~cachedecor.codec.ABSENT` and stay unloaded on the rebuilt instance, so they
load on first access exactly as they would have without the cache.

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

__all__ = ["ModelPlan", "model_plan"]


def _qualname(m: Mapper[Any]) -> str:
    return f"{m.class_.__module__}.{m.class_.__qualname__}"


def _enum_class(col: Any) -> type[enum.Enum] | None:
    type_ = col.type
    impl = getattr(type_, "impl", None)
    for t in (type_, impl):
        if isinstance(t, SAEnum) and t.enum_class is not None:
            return t.enum_class
    return None


class ClassPlan:
    """What to store for one mapped class of a hierarchy."""

    __slots__ = ("cls", "decoders", "eager", "encoders", "keys", "manager", "pk_positions")

    def __init__(self, mapper: Mapper[Any]) -> None:
        self.cls = mapper.class_
        self.manager = mapper.class_manager
        props = list(mapper.column_attrs)
        self.keys: tuple[str, ...] = tuple(p.key for p in props)
        self.eager = frozenset(p.key for p in props if not p.deferred)
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
        mappers = sorted(mapper.base_mapper.self_and_descendants, key=_qualname)
        self.plans = tuple(ClassPlan(m) for m in mappers)
        self.index_of = {p.cls: i for i, p in enumerate(self.plans)}
        self.identity_class = mapper.identity_key_from_primary_key(tuple([None] * len(mapper.primary_key)))[0]
        self.pk_getter = mapper.primary_key_from_instance
        # columns the decorated model itself loads (not deferred): they must be loaded
        # for an instance to be cached; a subclass's own columns may still be pending
        self.required = frozenset(p.key for p in mapper.column_attrs if not p.deferred)

    # -- instance -> payload ------------------------------------------------------------

    def snapshot(self, obj: Any) -> list[Any] | None:
        """The payload of ``obj``, or ``None`` if it must not be cached.

        An instance with pending changes, expired attributes, no identity or of a
        class outside the model's hierarchy is not cached.
        """
        index = self.index_of.get(type(obj))
        if index is None:
            return None
        state = instance_state(obj)
        if state.key is None or state.modified or state.deleted:
            return None
        plan = self.plans[index]
        expired = state.expired_attributes
        if expired:
            if not expired.isdisjoint(self.required):
                return None  # expired (e.g. by a commit): its values are not known
            # a joined subclass's columns not fetched by the base query: load them now,
            # inside the lease, so that hits carry the whole row
            try:
                getattr(obj, next(iter(expired)))
            except Exception:
                return None
            if state.expired_attributes:
                return None
        d = state.dict
        values = [d.get(k, ABSENT) for k in plan.keys]
        for i, enc in plan.encoders:
            if values[i] is not ABSENT:
                values[i] = enc(values[i])
        return [index, values]

    def pk_of(self, obj: Any) -> tuple[Any, ...]:
        """Primary key of an instance as a tuple."""
        return tuple(self.pk_getter(obj))

    # -- payload -> instance ------------------------------------------------------------

    def build(self, payload: Any, session: Session | None) -> Any:
        """Rebuild an instance from a payload and attach it to ``session``.

        An instance already in the session's identity map is returned instead (its
        pending changes untouched; attributes that had been expired are filled from
        the payload). Raises :class:`BadEntry` on a malformed payload.
        """
        if type(payload) is not list or len(payload) != 2:
            raise BadEntry("payload is not [class, values]")
        index, values = payload
        if type(index) is not int or not 0 <= index < len(self.plans) or type(values) is not list:
            raise BadEntry("payload has a bad class index or values")
        plan = self.plans[index]
        if len(values) != len(plan.keys) or not issubclass(plan.cls, self.model):
            raise BadEntry("payload does not match the mapped columns")
        for i, dec in plan.decoders:
            values[i] = dec(values[i])
        ident = (self.identity_class, tuple([values[i] for i in plan.pk_positions]), None)
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
            for key in absent:
                del d[key]
            # a deferred column loads on access by itself; any other column that was
            # not loaded is expired, so that it loads like an expired attribute
            eager = [k for k in absent if k in plan.eager]
            if eager:
                state._expire_attributes(d, eager)
        # what the ORM's loader does for a row it has just read: the instance is
        # persistent with this identity and all its values are committed
        state.key = ident
        if session is not None:
            _attach(session, state, obj)
        return obj


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
