"""Did-you-mean hints: the known name closest to one the user wrote, for error messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest", "did_you_mean"]


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word``, or ``None`` when none is close.

    Close means :func:`difflib.get_close_matches` at its default cutoff (0.6), or else a
    dotted candidate whose last part is ``word`` (``"dogpile.cache.memory"`` for
    ``"memory"``). ``word`` itself is never the answer. Pure; the first match wins, so
    the order of ``candidates`` breaks ties.
    """
    names = [c for c in candidates if c != word]
    matches = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if not matches:  # "memory" for "dogpile.cache.memory"
        matches = [c for c in names if c.endswith("." + word)][:1]
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``" did you mean 'x'?"`` (with its leading space) for :func:`closest`, or ``""``.

    Meant to be appended to a message after a ``;`` or ``:``.
    """
    match = closest(word, candidates)
    return f" did you mean {match!r}?" if match else ""
