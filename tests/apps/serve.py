"""The command loop shared by the roles: JSON lines in, JSON lines out."""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import sqlalchemy

import cachedecor


def models() -> Any:
    """The module that maps ``Account`` in this process (``APP_MODELS``)."""
    return importlib.import_module(os.environ["APP_MODELS"])


def engine() -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(os.environ["APP_DATABASE"])


def serve(handlers: dict[str, Callable[..., Any]]) -> None:
    """Configure cachedecor from ``CACHEDECOR_CONFIG`` and answer commands until EOF."""
    cachedecor.configure_regions()
    print(json.dumps({"ready": True, "modules": sorted(m for m in sys.modules if m.startswith("tests."))}))
    sys.stdout.flush()
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer = handlers[command.pop("op")](**command)
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        answer = {**(answer or {}), "stats": cachedecor.stats().get("default", {})}
        print(json.dumps(answer, default=str))
        sys.stdout.flush()
