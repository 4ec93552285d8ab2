"""tools/check_architecture.py: cycles, private imports and module-level state, on small packages."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "check_architecture.py"


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_architecture", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


arch = _load_tool()


def package(tmp_path: Path, files: dict[str, str]) -> Path:
    """Write ``pkg/`` under tmp_path: each file dedented, every directory a package."""
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            init = root / parent / "__init__.py"
            if not init.exists() and init != path:
                init.write_text("")
        path.write_text(textwrap.dedent(text))
    return root


# Cycles


def test_an_import_inside_a_function_closes_a_cycle(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": "from pkg import b\n",
            "b.py": """\
                def late():
                    from pkg.a import thing
                    return thing
            """,
        },
    )
    report = arch.analyse(root)
    assert report.cycles == [["pkg.a", "pkg.b"]]
    assert sorted((e.source, e.target, e.line, e.in_function) for e in report.cycle_edges) == [
        ("pkg.a", "pkg.b", 1, False),
        ("pkg.b", "pkg.a", 2, True),
    ]
    assert report.counts()["cycles"] == 1
    assert report.counts()["cycle_edges"] == 2


def test_an_import_under_type_checking_is_not_an_edge(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": "from pkg import b\n",
            "b.py": """\
                from typing import TYPE_CHECKING
                import typing

                if TYPE_CHECKING:
                    from pkg.a import Thing
                if typing.TYPE_CHECKING:
                    import pkg.a
            """,
        },
    )
    report = arch.analyse(root)
    assert report.cycles == []
    assert [(e.source, e.target) for e in report.edges] == [("pkg.a", "pkg.b")]


def test_the_else_branch_of_type_checking_is_an_edge(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": "from pkg import b\n",
            "b.py": """\
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    pass
                else:
                    from pkg import a
            """,
        },
    )
    assert arch.analyse(root).cycles == [["pkg.a", "pkg.b"]]


def test_a_class_level_and_a_relative_import_are_edges(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": """\
                class Late:
                    from . import b
            """,
            "b.py": "from .a import Late\n",
        },
    )
    report = arch.analyse(root)
    assert report.cycles == [["pkg.a", "pkg.b"]]
    assert {(e.source, e.target) for e in report.cycle_edges} == {("pkg.a", "pkg.b"), ("pkg.b", "pkg.a")}


def test_from_a_package_a_submodule_is_the_edge_target_and_a_name_is_the_package(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "sub/__init__.py": "VALUE = 1\n",
            "sub/mod.py": "",
            "user.py": """\
                from pkg.sub import mod
                from pkg.sub import VALUE
                from ..pkg import sub
            """,
        },
    )
    report = arch.analyse(root)
    assert [(e.target, e.line) for e in report.edges if e.source == "pkg.user"] == [
        ("pkg.sub.mod", 1),
        ("pkg.sub", 2),
    ]


def test_a_parent_package_is_not_an_implied_edge(tmp_path: Path) -> None:
    # pkg/__init__ imports pkg.sub.mod; pkg.sub.mod names only pkg.other: no cycle with pkg.
    root = package(
        tmp_path,
        {"__init__.py": "from pkg.sub import mod\n", "sub/mod.py": "import pkg.other\n", "other.py": ""},
    )
    assert arch.analyse(root).cycles == []


def test_a_module_importing_itself_is_a_cycle(tmp_path: Path) -> None:
    root = package(tmp_path, {"a.py": "def f():\n    from pkg.a import f\n"})
    assert arch.analyse(root).cycles == [["pkg.a"]]


def test_tarjan_finds_each_component() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    components = sorted(arch.strongly_connected(graph))
    assert components == [["a", "b", "c"], ["d", "e"], ["f"]]


# Private names


def test_a_private_name_from_another_module_is_counted(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": "def _helper(): ...\ndef public(): ...\n__version__ = '1'\n",
            "b.py": """\
                from pkg.a import _helper, public, __version__
                from .a import _helper as again
            """,
        },
    )
    report = arch.analyse(root)
    assert [(u.importer, u.module, u.name, u.line) for u in report.private_imports] == [
        ("pkg.b", "pkg.a", "_helper", 1),
        ("pkg.b", "pkg.a", "_helper", 2),
    ]


def test_a_private_name_of_a_package_init_is_counted_but_not_in_the_module_itself(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "sub/__init__.py": "_lock = None\nfrom pkg.sub import _lock\n",
            "sub/mod.py": "from pkg.sub import _lock\n",
        },
    )
    report = arch.analyse(root)
    assert [(u.importer, u.module, u.name) for u in report.private_imports] == [
        ("pkg.sub.mod", "pkg.sub", "_lock")
    ]


def test_a_private_module_imported_by_name_is_allowed(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "_private.py": "def helper(): ...\n",
            "sub/_inner.py": "",
            "user.py": """\
                from pkg import _private
                from . import _private as again
                import pkg._private
                from pkg.sub import _inner
                from pkg._private import helper
            """,
        },
    )
    report = arch.analyse(root)
    assert report.private_imports == []
    assert {e.target for e in report.edges if e.source == "pkg.user"} == {"pkg._private", "pkg.sub._inner"}


def test_a_private_attribute_of_an_imported_module_is_counted(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": "_table = {}\n",
            "sub/mod.py": "_x = 1\n",
            "user.py": """\
                from pkg import a as _a
                import pkg.sub.mod

                def f():
                    return _a._table, pkg.sub.mod._x, _a.__name__, _a.public
            """,
        },
    )
    report = arch.analyse(root)
    assert sorted((u.module, u.name, u.how) for u in report.private_imports) == [
        ("pkg.a", "_table", "attribute"),
        ("pkg.sub.mod", "_x", "attribute"),
    ]


# Module-level mutable state


def test_a_module_level_dict_is_state(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": """\
                import collections
                import threading
                import weakref

                __all__ = ["f"]
                _cache: dict[str, int] = {}
                _seen = set()
                _by_key = collections.defaultdict(list)
                _weak = weakref.WeakKeyDictionary()
                _local = threading.local()
                NAMES = frozenset({"a"})
                ORDER = ("a", "b")
                try:
                    _maybe = [1]
                except ImportError:
                    pass
            """,
        },
    )
    report = arch.analyse(root)
    assert [(s.name, s.how) for s in report.mutable_state] == [
        ("_cache", "dict display"),
        ("_seen", "set()"),
        ("_by_key", "defaultdict()"),
        ("_weak", "WeakKeyDictionary()"),
        ("_local", "threading.local()"),
        ("_maybe", "list display"),
    ]


def test_a_table_marked_constant_is_reported_apart(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": """\
                TABLE = {  # constant: never mutated
                    "a": 1,
                }
                OTHER = {"b": 2}  # constants are good
            """,
        },
    )
    report = arch.analyse(root)
    assert [s.name for s in report.constants] == ["TABLE"]
    assert [s.name for s in report.mutable_state] == ["OTHER"]


def test_a_name_rebound_through_global_is_state(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": """\
                import threading

                _current = None
                _lock = threading.Lock()
                _count = 0
                _registry = {}

                def activate(value):
                    global _current
                    _current = value

                def after_fork():
                    global _lock, _count
                    _lock = threading.Lock()
                    _count += 1

                def reads_only():
                    global _registry
                    return _registry
            """,
        },
    )
    report = arch.analyse(root)
    assert [(s.name, s.how) for s in report.mutable_state] == [
        ("_registry", "dict display"),
        ("_current", "global in activate()"),
        ("_lock", "global in after_fork()"),
        ("_count", "global in after_fork()"),
    ]


def test_a_context_var_is_not_state(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": """\
                import contextvars
                from contextvars import ContextVar

                _scope = contextvars.ContextVar("scope")
                _depth: ContextVar[int] = ContextVar("depth", default=0)
            """,
        },
    )
    report = arch.analyse(root)
    assert report.mutable_state == []
    assert report.counts()["mutable_state"] == 0


def test_the_runtime_module_may_hold_state(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "_runtime.py": "_regions = {}\ndef reset():\n    global _regions\n    _regions = {}\n",
            "other.py": "_regions = {}\n",
        },
    )
    assert [s.module for s in arch.analyse(root).mutable_state] == ["pkg.other"]


# The ratchet


def test_the_baseline_is_a_ratchet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = package(tmp_path, {"a.py": "_one = {}\n"})
    baseline = tmp_path / "baseline.json"
    args = ["--package", str(root), "--baseline", str(baseline)]

    assert arch.main([*args, "--update-baseline"]) == 0
    assert json.loads(baseline.read_text()) == {
        "cycles": 0,
        "cycle_edges": 0,
        "private_imports": 0,
        "mutable_state": 1,
    }
    assert arch.main(args) == 0
    assert arch.main([*args, "--strict"]) == 1

    (root / "b.py").write_text("_two = []\n")
    assert arch.main(args) == 1
    assert arch.main([*args, "--update-baseline"]) == 1
    assert json.loads(baseline.read_text())["mutable_state"] == 1
    assert arch.main([*args, "--update-baseline", "--force"]) == 0
    assert json.loads(baseline.read_text())["mutable_state"] == 2

    (root / "a.py").write_text("")
    (root / "b.py").write_text("")
    assert arch.main(args) == 0
    assert arch.main([*args, "--update-baseline"]) == 0
    assert json.loads(baseline.read_text())["mutable_state"] == 0
    assert arch.main([*args, "--strict"]) == 0
    assert "FAIL" not in capsys.readouterr().out.split("baseline written")[-1]


def test_the_package_does_not_exceed_the_committed_baseline() -> None:
    report = arch.analyse(arch.PACKAGE)
    baseline = arch.read_baseline(arch.BASELINE)
    assert baseline is not None
    above = {key: (count, baseline[key]) for key, count in report.counts().items() if count > baseline[key]}
    assert above == {}, arch.format_report(report)
