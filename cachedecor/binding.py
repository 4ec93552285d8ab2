"""Finding the session and the primary key of a call to a decorated function.

Resolved once per decorated function from its signature, so a call only indexes
into ``args``/``kwargs``. A method's ``self`` or ``cls`` is never taken for the
primary key. Where the session is not an argument, the decorator can be told where
it is (``session=``): a ``scoped_session`` such as Flask-SQLAlchemy's ``db.session``,
a callable returning the session, or the name of an attribute path starting at a
parameter (``"self.session"``). A method whose object has a ``session`` attribute
holding a session finds it without being told.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, scoped_session

from cachedecor._sa import (
    greenlet_missing,
    registry_types,
    session_classes,
    session_factories,
    session_types,
    sync_session_of,
)
from cachedecor.errors import UsageError, missing_extra

__all__ = ["CallBinding", "as_session", "registry_in_code", "require_asyncio"]

_SESSION_NAMES = frozenset({"session", "db", "db_session", "dbsession", "sess"})
_SELF_NAMES = frozenset({"self", "cls"})
_EMPTY = inspect.Parameter.empty
#: :meth:`CallBinding.session_and_pk`'s "take the key with pk()"
NO_PK: Any = object()


class _Param:
    __slots__ = ("default", "name", "pos")

    def __init__(self, param: inspect.Parameter, pos: int | None) -> None:
        self.name = param.name
        self.pos = pos
        self.default = param.default

    def get(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        pos = self.pos
        if pos is not None and pos < len(args):
            return args[pos]
        try:
            return kwargs[self.name]
        except KeyError:
            if self.default is _EMPTY:
                raise UsageError(f"missing required argument {self.name!r}") from None
            return self.default


def _is_session_annotation(annotation: Any) -> bool:
    if annotation is _EMPTY:
        return False
    if isinstance(annotation, str):
        return "Session" in annotation
    try:
        return isinstance(annotation, type) and issubclass(annotation, session_types())
    except TypeError:
        return False


def require_asyncio(what: str) -> None:
    """Raise :class:`~cachedecor.errors.MissingExtra` (an ``ImportError`` naming the
    ``asyncio`` extra) when SQLAlchemy's asyncio extension cannot be imported."""
    if greenlet_missing():
        raise missing_extra(what, "greenlet")


def as_session(value: Any) -> Session | None:
    """``value`` as a :class:`Session`, or ``None``.

    A ``scoped_session`` is resolved to its current session; an ``AsyncSession``
    (or ``async_scoped_session``) to the ``Session`` it runs on, its
    ``sync_session``: the one that holds its identity map, its transaction and its
    events, which reads and writes can use without I/O.
    """
    if isinstance(value, Session):
        return value
    if isinstance(value, scoped_session):
        return value()  # type: ignore[no-any-return]
    return sync_session_of(value)


def registry_in_code(fn: Callable[..., Any]) -> Any:
    """The one ``scoped_session`` (or ``async_scoped_session``) that ``fn``'s code names,
    or ``None`` when it names none or several.

    A registry counts when the code uses it as a global or a free variable, directly
    (``Session.get(...)``) or as the ``session`` attribute of one (Flask-SQLAlchemy's
    ``db.session``). Read once, at decoration: the names a function uses are in its
    code object, and the registry itself lasts as long as the module that holds it.
    """
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    namespace = getattr(fn, "__globals__", {})
    values = [namespace[name] for name in code.co_names if name in namespace]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # a free variable not yet bound
            continue
    kinds = registry_types()
    found: dict[int, Any] = {}
    for value in values:
        for candidate in (value, _attribute(value, "session")):
            try:
                if candidate is not None and isinstance(candidate, kinds):
                    found[id(candidate)] = candidate
            except Exception:  # a proxy whose class needs a context (Flask's request proxies)
                continue
    return next(iter(found.values())) if len(found) == 1 else None


def _attribute(value: Any, name: str) -> Any:
    try:
        return getattr(value, name, None)
    except Exception:  # a proxy or a property that needs a context
        return None


class CallBinding:
    """Where a function receives its session and its primary key.

    ``pk`` is ``None`` (the first parameter that is not the session), a parameter
    name, or a tuple of names whose values together form a composite key.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        pk: str | tuple[str, ...] | None,
        *,
        needs_pk: bool = True,
        session: Any = None,
        implicit: bool = False,
    ) -> None:
        sig = inspect.signature(fn)
        params: list[_Param] = []
        by_name: dict[str, _Param] = {}
        pos = 0
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            param = _Param(p, pos if positional else None)
            if positional:
                pos += 1
            params.append(param)
            by_name[p.name] = param
        self.name = getattr(fn, "__qualname__", repr(fn))
        first = params[0] if params and params[0].pos == 0 else None
        self._self_param = first if first is not None and first.name in _SELF_NAMES else None
        self._session_source = self._source(session, by_name)
        #: the registry the function's code names, where nothing else says where the
        #: session is (``implicit``): its current session is the call's
        self.implicit = registry_in_code(fn) if implicit and session is None else None
        session_param = next(
            (by_name[p.name] for p in sig.parameters.values() if _is_session_annotation(p.annotation)),
            None,
        )
        if session_param is None:
            session_param = next((p for p in params if p.name in _SESSION_NAMES), None)
        self._session_param = session_param
        self._pk_params: tuple[_Param, ...]
        if pk is None and not needs_pk:
            self._pk_params = ()
            self._pk_dynamic = False
        elif pk is None:
            candidates = [p for p in params if p is not session_param and p is not self._self_param]
            if not candidates:
                raise UsageError(f"{self.name} has no parameter that could hold the primary key")
            self._pk_params = (candidates[0],)
            self._pk_dynamic = session_param is None
        else:
            names = (pk,) if isinstance(pk, str) else tuple(pk)
            missing = [n for n in names if n not in by_name]
            if missing or not names:
                raise UsageError(
                    f"pk={pk!r}: {self.name} has no parameter named {', '.join(missing) or '(none)'}"
                )
            self._pk_params = tuple(by_name[n] for n in names)
            self._pk_dynamic = False
        self.pk_names = tuple(p.name for p in self._pk_params)
        self._params = params
        self.composite = len(self._pk_params) > 1
        #: (session position, key position, positional arguments needed) when both are
        #: plain positional parameters: what :meth:`session_and_pk` reads directly
        self._positions: tuple[int, int, int] | None = None
        if (
            self._session_source is None
            and session_param is not None
            and session_param.pos is not None
            and not self._pk_dynamic
            and len(self._pk_params) == 1
            and self._pk_params[0].pos is not None
        ):
            key_pos = self._pk_params[0].pos
            self._positions = (session_param.pos, key_pos, max(session_param.pos, key_pos) + 1)

    def _source(self, session: Any, by_name: dict[str, _Param]) -> Any:
        """What ``session=`` names, resolved once: ``None``, a callable, or (param, attrs)."""
        if session is None:
            return None
        if isinstance(session, str):
            head, *attrs = session.split(".")
            param = by_name.get(head)
            if param is None or not all(a.isidentifier() for a in attrs):
                raise UsageError(
                    f"session={session!r}: {self.name} has no parameter named {head!r} "
                    f"(expected a parameter name or a path such as 'self.session')"
                )
            return (param, tuple(attrs))
        if isinstance(session, session_factories()) or (
            isinstance(session, type) and issubclass(session, session_classes())
        ):
            raise UsageError(
                f"session={session!r} makes a new session on every call, one that the function "
                f"does not use and nothing closes: pass where the function's session is, such as "
                f"scoped_session(factory), Flask-SQLAlchemy's db.session, a callable returning the "
                f"current session, or a parameter path such as 'self.session'"
            )
        if isinstance(session, session_types()) or callable(session):
            return session
        raise UsageError(
            f"session= takes a Session, a scoped_session, a callable returning a session, "
            f"or a parameter path such as 'self.session'; got {session!r}"
        )

    def session(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Session | None:
        """The session of this call: as told by ``session=``, else an argument, else ``self.session``."""
        source = self._session_source
        if source is not None:
            return self._told(source, args, kwargs)
        param = self._session_param
        if param is not None:
            try:
                found = as_session(param.get(args, kwargs))
            except TypeError:
                found = None
            if found is not None:
                return found
        for value in args:
            found = as_session(value)
            if found is not None:
                return found
        for value in kwargs.values():
            found = as_session(value)
            if found is not None:
                return found
        if self._self_param is not None and args:
            found = as_session(getattr(args[0], "session", None))
            if found is not None:
                return found
        if self.implicit is not None:
            try:
                return as_session(self.implicit)
            except Exception:  # no scope to have a session in (Flask: outside an app context)
                return None
        return None

    @staticmethod
    def _told(source: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Session | None:
        if isinstance(source, tuple):
            param, attrs = source
            value = param.get(args, kwargs)
            for attr in attrs:
                value = getattr(value, attr, None)
        elif isinstance(source, session_types()):
            value = source
        else:
            value = source()
        return as_session(value)

    def session_and_pk(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Session | None, Any]:
        """``(self.session(...), self.pk(...))`` when both are passed positionally and the
        session is a :class:`Session` (the common call, read without the general path);
        else ``(self.session(...), NO_PK)``: the caller takes :meth:`pk` itself."""
        positions = self._positions
        if positions is not None and len(args) >= positions[2]:
            session = args[positions[0]]
            if isinstance(session, Session):
                return session, args[positions[1]]
        return self.session(args, kwargs), NO_PK

    def pk(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The primary key passed to this call (a tuple for several ``pk`` names)."""
        if self._pk_dynamic:
            for param in self._params:
                if param is self._self_param:
                    continue
                value = param.get(args, kwargs)
                if not isinstance(value, session_types()):
                    return value
            raise UsageError(f"{self.name} was called without a primary key")
        if self.composite:
            return tuple(p.get(args, kwargs) for p in self._pk_params)
        return self._pk_params[0].get(args, kwargs)

    def replace_pk(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``args``/``kwargs`` with the (single) primary-key argument set to ``value``."""
        if self._pk_dynamic:
            for param in self._params:
                if param is self._self_param:
                    continue
                current = param.get(args, kwargs)
                if not isinstance(current, session_types()):
                    return self._set(param, args, kwargs, value)
        return self._set(self._pk_params[0], args, kwargs, value)

    @staticmethod
    def _set(
        param: _Param, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if param.pos is not None and param.pos < len(args):
            new_args = list(args)
            new_args[param.pos] = value
            return tuple(new_args), kwargs
        return args, {**kwargs, param.name: value}
