"""The read side: ``@cached_by_pk``, its wrapper and the wrapper's attributes.

Everything that can be decided once is decided when the decorator is applied (the
argument positions of the session and the key) or on the first call (the mapper
plan, which needs configured mappers, and the region, which may be configured after
import). The decisions of a read (lookup, lease, wait, fill, release) live in
:mod:`cachedecor.readpath` as steps that ask for I/O; :mod:`cachedecor.drivers`
carries them out. A hit costs: format the key, one round trip, decode, attach, and
takes no step of the generator (the wrapper makes the first lookup itself).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, overload

import sqlalchemy
from dogpile.cache import CacheRegion
from sqlalchemy.orm import Session

from cachedecor import _runtime
from cachedecor.binding import NO_PK, CallBinding, require_asyncio
from cachedecor.drivers import drive, drive_async, lookup_async
from cachedecor.errors import RegionNotConfigured, SessionWarning, UsageError
from cachedecor.keys import KeyMaker, Space, key_maker
from cachedecor.readpath import (
    CACHED,
    HIT,
    NEAR_MISS,
    REFRESH,
    UNCACHED,
    check_result,
    decode,
    near_hit,
    read_many,
    read_one,
    refresh_one,
)
from cachedecor.rows import ModelPlan, model_plan
from cachedecor.stats import counters as region_counters
from cachedecor.stats import log_failure
from cachedecor.tracking import TRACKER_KEY, session_space
from cachedecor.tracking.scope import note_session
from cachedecor.write import ainvalidate_many, invalidate_many

__all__ = ["AsyncCachedFunction", "CachedFunction", "cached_by_pk"]

R = TypeVar("R")
T = TypeVar("T")


if TYPE_CHECKING:
    from cachedecor.config.regions import RegionSettings

_log = logging.getLogger("cachedecor")


class Resolved:
    """Per (function, region configuration): what a call needs, looked up once."""

    __slots__ = (
        "astore",
        "base",
        "codec",
        "counters",
        "maker",
        "name",
        "near",
        "region",
        "settings",
        "store",
        "ttl",
    )

    def __init__(self, fn: CachedFunction[Any], settings: RegionSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.region = settings.region
        self.store = settings.store
        self.astore = settings.astore
        self.near = settings.near
        self.codec = settings.codec
        self.maker: KeyMaker = key_maker(fn.model, settings.namespace)
        self.base = self.maker.model
        if settings.tables is not None and self.maker.table_name not in settings.tables:
            raise UsageError(
                f"{fn._name} caches table {self.maker.table_name!r} in region {settings.name!r}, "
                f"whose 'tables' option does not list it: writers would not invalidate it there; "
                f"add it to {settings.name}.tables"
            )
        self.counters = region_counters(settings.name)
        self.ttl = fn.expiration_time if fn.expiration_time is not None else settings.expiration_time


class CachedFunction(Generic[R]):
    """A function wrapped by :func:`cached_by_pk`.

    Calls behave like the wrapped function, served from the cache where possible.
    Attributes: :meth:`refresh` (call through and refill the entry), :meth:`uncached`
    (call through, the cache untouched), :meth:`invalidate`, :meth:`cache_key`,
    :attr:`region`, ``__wrapped__`` (the original function), ``model``,
    ``region_name``. On a decorated method, the attributes that take the function's
    arguments (:meth:`refresh`, :meth:`uncached`) are bound to the instance as the
    call is.
    """

    #: what the function is bound to on an instance (a decorated method), and the word
    #: its repr begins with: set for each class below, once the bound classes exist
    _bound: ClassVar[type[_BoundCachedFunction]]
    _kind: ClassVar[str] = ""

    def __init__(
        self,
        fn: Callable[..., R],
        model: Any,
        *,
        region: str,
        pk: str | tuple[str, ...] | None,
        many: bool,
        expiration_time: int | None,
        cache_none: bool,
        session: Any = None,
        identity_token: str | None = None,
    ) -> None:
        functools.update_wrapper(self, fn)
        self._name: str = getattr(fn, "__qualname__", repr(fn))
        self.__wrapped__ = fn
        self.model = model
        self.region_name = region
        self.many = many
        self.cache_none = cache_none
        if expiration_time is not None and (
            isinstance(expiration_time, bool) or not isinstance(expiration_time, int) or expiration_time < 0
        ):
            raise UsageError(
                f"expiration_time must be a whole number of seconds >= 0, got {expiration_time!r}"
            )
        self.expiration_time = expiration_time
        self.binding = CallBinding(fn, pk, session=session, implicit=True)
        #: whether :meth:`warn_session` has warned (once per function)
        self.session_warned = False
        if many and self.binding.composite:
            raise UsageError(
                "many=True takes one parameter holding the list of primary keys "
                "(composite keys as tuples), not several pk names"
            )
        self._token = CallBinding(fn, identity_token) if identity_token is not None else None
        self._plan: ModelPlan | None = None
        self._resolved: Resolved | None = None

    # -- public attributes --------------------------------------------------------------

    @property
    def region(self) -> CacheRegion:
        """The dogpile region currently configured under this function's region name."""
        settings = _runtime.regions.get(self.region_name)
        if settings is None:
            raise RegionNotConfigured(self.region_name, _runtime.regions)
        return settings.region

    def cache_key(self, pk: Any) -> str:
        """The cache key of the row with primary key ``pk`` in this function's region."""
        return self._resolve().maker(pk)

    def invalidate(self, pk: Any) -> None:
        """Delete the cached entry of ``pk`` in every region that may cache the model, now."""
        invalidate_many(self.model, [pk])

    def refresh(self, *args: Any, **kwargs: Any) -> R:
        """Call the function and refill the cache with its result, whatever the cache holds.

        Takes the function's arguments. The entry is deleted, then refilled under a
        fill lease as on a miss: a write committed while the function runs deletes
        the lease, and the older row it read is not stored. If another reader is
        filling the key at that moment, the refresh returns its own result and that
        reader's fill (which read the database after the delete) is the new entry.
        Inside a transaction that has written the row, the result is not stored (as
        for any read there). With ``many=True`` every requested row is refreshed.
        Returns what a call returns (rows from the function, never from the cache).
        """
        r = self._resolve()
        if self.many:
            return self._call_many(r, args, kwargs, REFRESH)  # type: ignore[no-any-return]
        session = self.binding.session(args, kwargs)
        target = self._target(r, session, args, kwargs)
        if target is None:
            return self.__wrapped__(*args, **kwargs)
        return drive(refresh_one(self, r, session, target, args, kwargs), r.store, self.__wrapped__)  # type: ignore[no-any-return]

    def uncached(self, *args: Any, **kwargs: Any) -> R:
        """Call the function without the cache: nothing is read from it or stored in it.

        Takes the function's arguments and returns what a call returns: with
        ``many=True``, the rows in the order of the requested keys, duplicates and
        missing rows left out, the function called once with every requested key.
        Nothing is counted. The function itself is ``__wrapped__``.
        """
        if not self.many:
            return self.__wrapped__(*args, **kwargs)
        return self._call_many(self._resolve(), args, kwargs, UNCACHED)  # type: ignore[no-any-return]

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return self._bound(self, obj)

    def __repr__(self) -> str:
        return (
            f"<cached_by_pk {self._kind}{self._name} of {self.model.__name__} in region {self.region_name!r}>"
        )

    # -- resolution ---------------------------------------------------------------------

    def _resolve(self) -> Resolved:
        settings = _runtime.regions.get(self.region_name)
        if settings is None:
            raise RegionNotConfigured(self.region_name, _runtime.regions)
        resolved = self._resolved
        if resolved is None or resolved.settings is not settings:
            resolved = self._resolved = Resolved(self, settings)
        if self._plan is None:
            self._plan = model_plan(self.model)
        return resolved

    def _space(self, session: Session | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """(identity token, space) of this call."""
        token = self._token.pk(args, kwargs) if self._token is not None else None
        if session is None and token is None:
            return None, None
        return token, session_space(session, self.model, token)

    def warn_session(self, owner: Session, session: Session | None) -> None:
        """Warn, once, that a miss returned a row of ``owner``, a session hits do not attach to."""
        self.session_warned = True
        model = self.model.__name__
        if session is None:
            what = "a session it was not given: cache hits come back detached (their lazy loads fail)"
        else:
            what = f"another session than the one its hits are attached to ({session!r})"
        message = (
            f"{self._name} returned a {model} row of {owner!r}, {what}. Tell the decorator where "
            f"the function's session is: @cached_by_pk({model}, session=...) with a scoped_session "
            f"(Flask-SQLAlchemy's db.session), a callable returning the session, or a parameter "
            f"path such as 'self.session'"
        )
        _log.warning(message)
        warnings.warn(message, SessionWarning, stacklevel=4)

    def _uncacheable(self, r: Resolved, why: str) -> None:
        r.counters.uncacheable += 1
        log_failure(r.name, f"caching a call of {self._name}", why)

    # -- calls --------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        r = self._resolved
        if r is None or _runtime.regions.get(self.region_name) is not r.settings:
            r = self._resolve()
        if self.many:
            return self._call_many(r, args, kwargs)  # type: ignore[no-any-return]
        value, session, target, since = self._begin(r, args, kwargs)
        if value is not NEAR_MISS:
            return value  # type: ignore[no-any-return]
        if target is None:
            result = self.__wrapped__(*args, **kwargs)
            check_result(self, result, session)
            return result
        try:
            first: Any = r.store.lookup(target[0], r.settings.lease_timeout)
        except Exception as exc:
            first = exc
            status = None
        else:
            status = None
            if first[0] is not None:  # a hit needs no more than this: no generator, no driver
                status, value = decode(self, r, target[0], first[0], session, target[2], since)
                if status is HIT:
                    r.counters.hits += 1
                    return value  # type: ignore[no-any-return]
        steps = read_one(self, r, session, target, args, kwargs, first, status, since)
        return drive(steps, r.store, self.__wrapped__)  # type: ignore[no-any-return]

    def _begin(
        self, r: Resolved, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, Session | None, tuple[str, Any, Any, Space | None] | None, Any]:
        """The steps of a call before its remote lookup, the same for sync and async
        callers: ``(value, session, target, since)``. ``value`` is the near cache's hit,
        else :data:`NEAR_MISS`; ``target`` is ``None`` when the call must go through
        (see :meth:`_target`); ``since`` the near cache's mark for a later fill."""
        session, pk = self.binding.session_and_pk(args, kwargs)
        note_session(session)  # an @invalidates function running may change what this returns
        target = self._target(r, session, args, kwargs, pk)
        near = r.near
        if target is None or near is None:
            return NEAR_MISS, session, target, None
        value = near_hit(self, r, target[0], session, target[2])
        if value is not NEAR_MISS:
            return value, session, target, None
        return NEAR_MISS, session, target, near.mark()

    def _target(
        self,
        r: Resolved,
        session: Session | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        pk: Any = NO_PK,
    ) -> tuple[str, Any, Any, Space | None] | None:
        """(key, pk, identity token, space) of a call, or ``None`` when it must call through.

        ``None`` for a row the session's transaction wrote (counted in ``bypasses``)
        and for arguments with no cache key (counted in ``uncacheable``): the function
        itself decides what such an argument means (an error, ``None``, ...).
        """
        try:
            if pk is NO_PK:
                pk = self.binding.pk(args, kwargs)
            if self._token is None:
                token = None
                space = None if session is None else session_space(session, self.model)
            else:
                token, space = self._space(session, args, kwargs)
            key = r.maker(pk, space)
            if session is not None:
                tracker = session.info.get(TRACKER_KEY)  # session_tracker(), without the call
                if (
                    tracker is not None
                    and tracker.dirty
                    and tracker.blocks(r.base, r.maker.encode_pk(pk), space)
                ):
                    r.counters.bypasses += 1
                    return None
        except (UsageError, ValueError, TypeError) as exc:
            self._uncacheable(r, f"no cache key for this call: {exc}")
            return None
        return key, pk, token, space

    # -- many=True ----------------------------------------------------------------------

    def _call_many(
        self, r: Resolved, args: tuple[Any, ...], kwargs: dict[str, Any], mode: int = CACHED
    ) -> Any:
        return drive(read_many(self, r, args, kwargs, mode), r.store, self.__wrapped__)


class AsyncCachedFunction(CachedFunction[T]):
    """An ``async def`` wrapped by :func:`cached_by_pk`: the same read, awaited.

    Calls are coroutines, as the wrapped function's are, and so are :meth:`refresh`,
    :meth:`uncached` and :meth:`invalidate`; :meth:`cache_key` and :attr:`region`
    are as for :class:`CachedFunction`. The session may be an ``AsyncSession`` (or
    an ``async_scoped_session``): a hit is attached to it, and its loaded columns
    read without I/O. Every request of the read goes to the region's asyncio store
    (:class:`~cachedecor.backends.AsyncStore`): nothing blocks the event loop.
    """

    _kind: ClassVar[str] = "async "

    def __init__(self, fn: Callable[..., Any], model: Any, **options: Any) -> None:
        super().__init__(fn, model, **options)
        # frameworks (FastAPI, Starlette) await what inspect.iscoroutinefunction or
        # asyncio.iscoroutinefunction calls a coroutine function: from Python 3.12 an
        # object says so through inspect.markcoroutinefunction (both functions check
        # it); before 3.12 the only way is asyncio's own marker, which its
        # iscoroutinefunction checks (inspect's has no way for an object then)
        if sys.version_info >= (3, 12):
            inspect.markcoroutinefunction(self)
        else:
            self._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]

    async def __call__(self, *args: Any, **kwargs: Any) -> T:  # type: ignore[override]
        r = self._resolved
        if r is None or _runtime.regions.get(self.region_name) is not r.settings:
            r = self._resolve()
        call: Any = self.__wrapped__
        if self.many:
            return await drive_async(read_many(self, r, args, kwargs), r.astore, call)
        value, session, target, since = self._begin(r, args, kwargs)
        if value is not NEAR_MISS:
            return value  # type: ignore[no-any-return]
        if target is None:
            result = await call(*args, **kwargs)
            check_result(self, result, session)
            return result  # type: ignore[no-any-return]
        try:
            first: Any = await lookup_async(r.astore, target[0], r.settings.lease_timeout)
        except Exception as exc:
            first = exc
            status = None
        else:
            status = None
            if first[0] is not None:
                status, value = decode(self, r, target[0], first[0], session, target[2], since)
                if status is HIT:
                    r.counters.hits += 1
                    return value  # type: ignore[no-any-return]
        steps = read_one(self, r, session, target, args, kwargs, first, status, since)
        return await drive_async(steps, r.astore, call)

    async def refresh(self, *args: Any, **kwargs: Any) -> T:  # type: ignore[override]
        """See :meth:`CachedFunction.refresh`; awaited."""
        r = self._resolve()
        call: Any = self.__wrapped__
        if self.many:
            return await drive_async(read_many(self, r, args, kwargs, REFRESH), r.astore, call)
        session = self.binding.session(args, kwargs)
        target = self._target(r, session, args, kwargs)
        if target is None:
            return await call(*args, **kwargs)  # type: ignore[no-any-return]
        return await drive_async(refresh_one(self, r, session, target, args, kwargs), r.astore, call)

    async def uncached(self, *args: Any, **kwargs: Any) -> T:  # type: ignore[override]
        """See :meth:`CachedFunction.uncached`; awaited."""
        call: Any = self.__wrapped__
        if not self.many:
            return await call(*args, **kwargs)  # type: ignore[no-any-return]
        r = self._resolve()
        return await drive_async(read_many(self, r, args, kwargs, UNCACHED), r.astore, call)

    async def invalidate(self, pk: Any) -> None:  # type: ignore[override]
        """Delete the cached entry of ``pk`` in every region that may cache the model, now."""
        await ainvalidate_many(self.model, [pk])


class _BoundCachedFunction:
    """A :class:`CachedFunction` bound to an instance (a decorated method), as a method is."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, fn: CachedFunction[Any], obj: Any) -> None:
        self.__func__ = fn
        self.__self__ = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__.refresh(self.__self__, *args, **kwargs)

    def uncached(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__.uncached(self.__self__, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__func__, name)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.__func__.__doc__

    @property
    def __signature__(self) -> inspect.Signature:
        """The method's signature without ``self``, as for a bound method."""
        sig = inspect.signature(self.__func__.__wrapped__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __repr__(self) -> str:
        return f"<bound {self.__func__!r} of {self.__self__!r}>"


class _AsyncBoundCachedFunction(_BoundCachedFunction):
    """An :class:`AsyncCachedFunction` bound to an instance; its call is a coroutine function."""

    __slots__ = ()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self.__func__(self.__self__, *args, **kwargs)

    async def refresh(self, *args: Any, **kwargs: Any) -> Any:
        return await self.__func__.refresh(self.__self__, *args, **kwargs)

    async def uncached(self, *args: Any, **kwargs: Any) -> Any:
        return await self.__func__.uncached(self.__self__, *args, **kwargs)


CachedFunction._bound = _BoundCachedFunction
AsyncCachedFunction._bound = _AsyncBoundCachedFunction


class _Decorator(Protocol):
    """What :func:`cached_by_pk` returns: sync functions become :class:`CachedFunction`,
    coroutine functions :class:`AsyncCachedFunction`."""

    @overload
    def __call__(self, fn: Callable[..., Coroutine[Any, Any, T]]) -> AsyncCachedFunction[T]: ...
    @overload
    def __call__(self, fn: Callable[..., R]) -> CachedFunction[R]: ...


def cached_by_pk(
    model: Any,
    *,
    region: str = "default",
    pk: str | tuple[str, ...] | None = None,
    many: bool = False,
    expiration_time: int | None = None,
    cache_none: bool = False,
    session: Any = None,
    identity_token: str | None = None,
) -> _Decorator:
    """Cache the rows a function loads by primary key.

    The function may be an ``async def`` (the session an ``AsyncSession``): the
    wrapper is then an :class:`AsyncCachedFunction`, awaited as the function is.

    :param model: the mapped class the function returns.
    :param region: name of the region to cache in (looked up at call time).
    :param pk: ``None`` (the first parameter that is not the session, nor a method's
        ``self``/``cls``), the name of the parameter holding the key, or a tuple of
        names forming a composite key.
    :param many: the function takes a list of keys and returns a list of rows; it is
        called once, with the keys missing from the cache only.
    :param expiration_time: seconds; overrides the region's ``expiration_time``.
    :param cache_none: also cache a ``None`` result (a row that does not exist).
    :param session: where the session is when it is not an argument: a
        ``scoped_session`` (Flask-SQLAlchemy's ``db.session``), a callable returning
        the session, or a parameter path such as ``"self.session"``. Without it, the
        session is the argument that is a ``Session`` (or ``scoped_session``), else a
        method's ``self.session``. Hits are attached to it.
    :param identity_token: with horizontal sharding, the parameter holding the shard
        (the identity token) the row is read from; it becomes part of the key.

    >>> from cachedecor import cached_by_pk
    >>> from sqlalchemy import Integer
    >>> from sqlalchemy.orm import DeclarativeBase, mapped_column
    >>> class Base(DeclarativeBase): pass
    >>> class Note(Base):
    ...     __tablename__ = "notes"
    ...     id = mapped_column(Integer, primary_key=True)
    >>> @cached_by_pk(Note)
    ... def get_note(session, note_id):
    ...     "Load a note."
    ...     return session.get(Note, note_id)
    >>> get_note.__name__, get_note.__doc__
    ('get_note', 'Load a note.')
    """
    mapper = sqlalchemy.inspect(model, raiseerr=False)
    if mapper is None or not isinstance(mapper, sqlalchemy.orm.Mapper):
        raise UsageError(f"@cached_by_pk needs a mapped class, got {model!r}")
    if not isinstance(region, str) or not region:
        raise UsageError(f"region must be a region name, got {region!r}")

    def decorate(fn: Callable[..., Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            require_asyncio(f"@cached_by_pk on the async function {getattr(fn, '__qualname__', fn)}")
            kind: type[CachedFunction[Any]] = AsyncCachedFunction
        else:
            kind = CachedFunction
        return kind(
            fn,
            mapper.class_,
            region=region,
            pk=pk,
            many=many,
            expiration_time=expiration_time,
            cache_none=cache_none,
            session=session,
            identity_token=identity_token,
        )

    return decorate
