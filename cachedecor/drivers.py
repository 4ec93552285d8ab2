"""Drivers: they carry out the requests of :mod:`cachedecor.readpath`'s generators.

:func:`drive` does it with blocking calls, for threads; :func:`drive_async` with
coroutines, for asyncio. The decisions stay in :mod:`cachedecor.readpath`.

The async driver also knows which fill leases the coroutines of its event loop
hold. A reader that finds the lease of its key held by a coroutine of the same
loop waits for that fill itself (up to the lease's lifetime, not only
``lease_wait``) and is woken as soon as it is stored or given up: concurrent
coroutines of one process that miss the same key make one database call, however
long it takes, and get the row without polling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cachedecor import _runtime
from cachedecor._sa import greenlet_spawn
from cachedecor.backends import AsyncStore, Store
from cachedecor.readpath import (
    Call,
    Delete,
    Fill,
    FillMany,
    Load,
    Lookup,
    LookupMany,
    Peek,
    Release,
    Sleep,
    Steps,
)

__all__ = ["drive", "drive_async", "lookup_async"]

T = TypeVar("T")


def drive(steps: Steps[T], store: Store, call: Callable[..., Any]) -> T:
    """Run ``steps`` to completion: each request on ``store`` (or ``call``), in this thread.

    An exception an operation raises is thrown into the generator at its ``yield``;
    what the generator raises (the wrapped function's own exception) propagates.
    """
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            value: T = done.value
            return value
        error = None
        try:
            if type(request) is Lookup:
                answer = store.lookup(request.key, request.lease_ttl)
            elif type(request) is Call:
                answer = call(*request.args, **request.kwargs)
            elif type(request) is Fill:
                answer = store.fill(request.key, request.entry, request.lease, request.ttl)
            elif type(request) is LookupMany:
                answer = store.lookup_many(request.keys, request.lease_ttl)
            elif type(request) is FillMany:
                answer = store.fill_many(request.entries, request.ttl)
            elif type(request) is Release:
                answer = None
                store.release(request.key, request.lease)
            elif type(request) is Delete:
                answer = None
                store.delete_many(request.keys)
            elif type(request) is Peek:
                answer = store.peek(request.key)
            elif type(request) is Sleep:
                answer = None
                time.sleep(request.seconds)
            elif type(request) is Load:
                answer = None
                _load(request.instance, request.names)
            else:  # pragma: no cover - a request no driver knows is a programming error
                raise AssertionError(f"unknown request {request!r}")
        except BaseException as exc:
            answer = None
            error = exc


def _load(obj: Any, names: list[str]) -> None:
    for name in names:
        getattr(obj, name)


def _filling(loop: asyncio.AbstractEventLoop) -> dict[str, asyncio.Event]:
    filling = _runtime.fills.get(loop)
    if filling is None:
        filling = _runtime.fills[loop] = {}
    return filling


def _won(loop: asyncio.AbstractEventLoop, key: str) -> None:
    """A coroutine of ``loop`` holds the fill lease of ``key``."""
    _filling(loop).setdefault(key, asyncio.Event())


def _done(loop: asyncio.AbstractEventLoop, keys: Any) -> None:
    """This loop's fills of ``keys`` are done: wake the coroutines waiting for them."""
    filling = _runtime.fills.get(loop)
    if filling:
        for key in keys:
            event = filling.pop(key, None)
            if event is not None:
                event.set()


async def _wait(loop: asyncio.AbstractEventLoop, seconds: float, key: str, longest: float) -> None:
    """Wait ``seconds`` for another reader's fill of ``key``; when the reader is a coroutine
    of this loop, wait for its fill itself, up to ``longest``."""
    filling = _runtime.fills.get(loop)
    event = filling.get(key) if filling else None
    if event is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(event.wait(), longest)
    except asyncio.TimeoutError:
        pass


async def lookup_async(store: AsyncStore, key: str, ttl: int) -> tuple[bytes | None, Any]:
    """``store.lookup``, noting a lease won (see :func:`drive_async`)."""
    answer = await store.lookup(key, ttl)
    if answer[1] is not None:
        _won(asyncio.get_running_loop(), key)
    return answer


async def drive_async(steps: Steps[T], store: AsyncStore, call: Callable[..., Awaitable[Any]]) -> T:
    """Run ``steps`` to completion on the running event loop: each request awaited on
    ``store`` (or ``call``, the wrapped coroutine function). Same contract as :func:`drive`."""
    answer: Any = None
    error: BaseException | None = None
    loop = asyncio.get_running_loop()
    while True:
        try:
            request = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            value: T = done.value
            return value
        error = None
        try:
            if type(request) is Lookup:
                answer = await store.lookup(request.key, request.lease_ttl)
                if answer[1] is not None:
                    _won(loop, request.key)
            elif type(request) is Call:
                answer = await call(*request.args, **request.kwargs)
            elif type(request) is Fill:
                try:
                    answer = await store.fill(request.key, request.entry, request.lease, request.ttl)
                finally:
                    _done(loop, (request.key,))
            elif type(request) is LookupMany:
                answer = await store.lookup_many(request.keys, request.lease_ttl)
                for key, (_, lease) in answer.items():
                    if lease is not None:
                        _won(loop, key)
            elif type(request) is FillMany:
                try:
                    answer = await store.fill_many(request.entries, request.ttl)
                finally:
                    _done(loop, [item[0] for item in request.entries])
            elif type(request) is Release:
                answer = None
                try:
                    await store.release(request.key, request.lease)
                finally:
                    _done(loop, (request.key,))
            elif type(request) is Delete:
                answer = None
                await store.delete_many(request.keys)
            elif type(request) is Peek:
                answer = await store.peek(request.key)
            elif type(request) is Sleep:
                answer = None
                await _wait(loop, request.seconds, request.key, request.longest)
            elif type(request) is Load:
                answer = None
                await greenlet_spawn(_load, request.instance, request.names)
            else:  # pragma: no cover - a request no driver knows is a programming error
                raise AssertionError(f"unknown request {request!r}")
        except BaseException as exc:
            answer = None
            error = exc
