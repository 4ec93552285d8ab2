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
from typing import Any

from sqlalchemy.util import greenlet_spawn

from cachedecor import _runtime
from cachedecor.backends import AsyncStore, Store
from cachedecor.readpath import (
    CALL,
    DELETE,
    FILL,
    FILL_MANY,
    LOAD,
    LOOKUP,
    LOOKUP_MANY,
    PEEK,
    RELEASE,
    SLEEP,
    Steps,
)

__all__ = ["drive", "drive_async", "lookup_async"]


def drive(steps: Steps, store: Store, call: Callable[..., Any]) -> Any:
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
            return done.value
        error = None
        op = request[0]
        try:
            if op == LOOKUP:
                answer = store.lookup(request[1], request[2])
            elif op == CALL:
                answer = call(*request[1], **request[2])
            elif op == FILL:
                answer = store.fill(request[1], request[2], request[3], request[4])
            elif op == LOOKUP_MANY:
                answer = store.lookup_many(request[1], request[2])
            elif op == FILL_MANY:
                answer = store.fill_many(request[1], request[2])
            elif op == RELEASE:
                answer = None
                store.release(request[1], request[2])
            elif op == DELETE:
                answer = None
                store.delete_many(request[1])
            elif op == PEEK:
                answer = store.peek(request[1])
            elif op == SLEEP:
                answer = None
                time.sleep(request[1])
            elif op == LOAD:
                answer = None
                _load(request[1], request[2])
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


async def drive_async(steps: Steps, store: AsyncStore, call: Callable[..., Awaitable[Any]]) -> Any:
    """Run ``steps`` to completion on the running event loop: each request awaited on
    ``store`` (or ``call``, the wrapped coroutine function). Same contract as :func:`drive`."""
    answer: Any = None
    error: BaseException | None = None
    loop = asyncio.get_running_loop()
    while True:
        try:
            request = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            return done.value
        error = None
        op = request[0]
        try:
            if op == LOOKUP:
                answer = await store.lookup(request[1], request[2])
                if answer[1] is not None:
                    _won(loop, request[1])
            elif op == CALL:
                answer = await call(*request[1], **request[2])
            elif op == FILL:
                try:
                    answer = await store.fill(request[1], request[2], request[3], request[4])
                finally:
                    _done(loop, (request[1],))
            elif op == LOOKUP_MANY:
                answer = await store.lookup_many(request[1], request[2])
                for key, (_, lease) in answer.items():
                    if lease is not None:
                        _won(loop, key)
            elif op == FILL_MANY:
                try:
                    answer = await store.fill_many(request[1], request[2])
                finally:
                    _done(loop, [item[0] for item in request[1]])
            elif op == RELEASE:
                answer = None
                try:
                    await store.release(request[1], request[2])
                finally:
                    _done(loop, (request[1],))
            elif op == DELETE:
                answer = None
                await store.delete_many(request[1])
            elif op == PEEK:
                answer = await store.peek(request[1])
            elif op == SLEEP:
                answer = None
                await _wait(loop, request[1], request[2], request[3])
            elif op == LOAD:
                answer = None
                await greenlet_spawn(_load, request[1], request[2])
            else:  # pragma: no cover - a request no driver knows is a programming error
                raise AssertionError(f"unknown request {request!r}")
        except BaseException as exc:
            answer = None
            error = exc
