"""Measure three architectural properties of the ``cachedecor`` package (STYLE.md, habits 12 and 13).

Run from anywhere: ``python tools/check_architecture.py``. It prints a report and compares the
counts with ``tools/architecture-baseline.json``, a ratchet: it fails (exit 1) when a count rises
above the baseline, and ``--update-baseline`` lowers the baseline once a count has gone down.
``--strict`` fails unless every count is 0, the target of the redesign (LAYOUT.md).

What is measured, and the rules, kept simple on purpose:

1. **Import cycles** among the package's own modules. Every ``import`` counts wherever it is
   written -- at module level, in a class body or inside a function -- except under
   ``if TYPE_CHECKING:`` (the ``else:`` branch of such an ``if`` does count). An edge goes from
   the importing module to the module the statement names, as written:

   - ``import pkg.a.b`` -> ``pkg.a.b``;
   - ``from pkg.a import b`` -> ``pkg.a.b`` when ``b`` is a submodule, otherwise ``pkg.a``
     (for a package, its ``__init__``); relative imports are resolved the same way;
   - the parent packages Python also imports on the way (``pkg.a`` for ``pkg.a.b``) are *not*
     edges: an edge is what the code says it needs.

   A cycle is a strongly connected component (Tarjan) of more than one module, or a module
   that imports itself. ``cycles`` counts the components, ``cycle_edges`` the import
   statements (one per named target module) whose two ends are in the same component; each
   is reported with file:line and whether it is written inside a function.

2. **Private names imported across modules**: ``from pkg.x import _name`` in a module other
   than ``pkg.x``, and ``alias._name`` where ``alias`` is bound by an import of a package
   module in the same file (``import pkg.x as alias``, ``from pkg import x as alias``,
   ``import pkg.x`` then ``pkg.x._name``). Not counted: a private *module* imported by name
   (``from pkg import _runtime``, ``import pkg._sa``): the module is private to the package,
   which is allowed; dunder names (``__version__``); private names of other libraries.
   Imports under ``TYPE_CHECKING`` count here: a private name used in an annotation is still an
   interface nobody declared. Aliases are collected per file, not per scope. Each import
   (statement, name) and each attribute use (line, module, name) counts once.

3. **Module-level mutable state** outside ``pkg/_runtime.py`` (the one home of process-wide
   state). A *state object* is a module-level name (assignments at module level, also inside
   module-level ``if``/``try``/``with``/``for``/``while``; plain, annotated or augmented) whose
   value is a mutable container -- a list, dict or set display or comprehension, or a call of
   ``list``, ``dict``, ``set``, ``bytearray``, ``sorted``, ``defaultdict``, ``OrderedDict``,
   ``Counter``, ``ChainMap``, ``deque``, ``WeakKeyDictionary``, ``WeakValueDictionary``,
   ``WeakSet`` or ``threading.local`` -- and every name rebound in a function through a
   ``global`` statement (whatever its value: a lock, a pid, a "current" object). Each
   (module, name) counts once, even when it is both. Not counted: ``__all__`` and other dunder
   names; a ``ContextVar`` (the variable itself is never mutated; its values belong to the
   context, not to the module); locks and instances of other classes (their mutability cannot
   be told from the source; they count once rebound through ``global``); class attributes.
   A table that is never mutated may say so with a ``# constant`` comment on the first line
   of its assignment: it is then reported apart (``constant tables``), not counted as state,
   unless it is also rebound through ``global``.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cachedecor"
BASELINE = Path(__file__).resolve().parent / "architecture-baseline.json"
KEYS = ("cycles", "cycle_edges", "private_imports", "mutable_state")

MUTABLE_CALLS = frozenset(
    {
        "list",
        "dict",
        "set",
        "bytearray",
        "sorted",
        "defaultdict",
        "OrderedDict",
        "Counter",
        "ChainMap",
        "deque",
        "WeakKeyDictionary",
        "WeakValueDictionary",
        "WeakSet",
    }
)
MUTABLE_DISPLAYS = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: Path
    line: int
    in_function: bool


@dataclass(frozen=True)
class PrivateUse:
    importer: str
    module: str
    name: str
    path: Path
    line: int
    how: str  # "from-import" or "attribute"


@dataclass(frozen=True)
class State:
    module: str
    name: str
    path: Path
    line: int
    how: str  # what makes it state: "dict display", "defaultdict()", "global in f()", ...


@dataclass
class Report:
    modules: dict[str, Module]
    edges: list[Edge] = field(default_factory=list)
    cycles: list[list[str]] = field(default_factory=list)
    cycle_edges: list[Edge] = field(default_factory=list)
    private_imports: list[PrivateUse] = field(default_factory=list)
    mutable_state: list[State] = field(default_factory=list)
    constants: list[State] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "cycles": len(self.cycles),
            "cycle_edges": len(self.cycle_edges),
            "private_imports": len(self.private_imports),
            "mutable_state": len(self.mutable_state),
        }


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def discover(package_dir: Path) -> dict[str, Module]:
    """Every ``.py`` file under ``package_dir``, by dotted module name."""
    package_dir = package_dir.resolve()
    base = package_dir.parent
    modules: dict[str, Module] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        modules[name] = Module(name, path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


@dataclass(frozen=True)
class _Import:
    node: ast.Import | ast.ImportFrom
    in_function: bool
    type_checking: bool


def _imports(tree: ast.Module) -> list[_Import]:
    """Every import statement with where it is written."""
    found: list[_Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(_Import(node, in_function, type_checking))
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            visit(node.test, in_function, type_checking)
            for statement in node.body:
                visit(statement, in_function, True)
            for statement in node.orelse:
                visit(statement, in_function, type_checking)
            return
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_checking)

    visit(tree, False, False)
    return found


def _base_of(module: Module, node: ast.ImportFrom) -> str | None:
    """The absolute module an ``ImportFrom`` names before its imported names."""
    if node.level == 0:
        return node.module
    parts = module.name.split(".")
    if not module.is_package:
        parts.pop()
    up = node.level - 1
    if up > len(parts) - 1:
        return None
    if up:
        parts = parts[:-up]
    if node.module:
        parts.append(node.module)
    return ".".join(parts)


def _known(name: str, modules: dict[str, Module]) -> str | None:
    """``name`` itself when it is a module of the package, else its longest known prefix."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _constant_lines(source: str) -> set[int]:
    lines: set[int] = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            words = token.string.lstrip("#").split() if token.type == tokenize.COMMENT else []
            if words and words[0].rstrip(":;,.") == "constant":
                lines.add(token.start[0])
    except (tokenize.TokenError, SyntaxError):
        pass
    return lines


def _mutable_kind(value: ast.expr | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, MUTABLE_DISPLAYS):
        return {
            ast.List: "list display",
            ast.Dict: "dict display",
            ast.Set: "set display",
            ast.ListComp: "list comprehension",
            ast.DictComp: "dict comprehension",
            ast.SetComp: "set comprehension",
        }[type(value)]
    if isinstance(value, ast.Call):
        func = value.func
        if isinstance(func, ast.Name) and func.id in MUTABLE_CALLS:
            return f"{func.id}()"
        if isinstance(func, ast.Attribute) and func.attr in MUTABLE_CALLS:
            return f"{func.attr}()"
        if isinstance(func, ast.Attribute) and func.attr == "local" and isinstance(func.value, ast.Name):
            return "threading.local()" if func.value.id == "threading" else None
    return None


def _module_level_assignments(tree: ast.Module) -> list[tuple[str, ast.expr | None, ast.stmt]]:
    """(name, value, statement) for each name bound by an assignment at module level."""
    found: list[tuple[str, ast.expr | None, ast.stmt]] = []

    def targets(target: ast.expr, value: ast.expr | None, stmt: ast.stmt) -> None:
        if isinstance(target, ast.Name):
            found.append((target.id, value, stmt))
        elif isinstance(target, ast.Tuple | ast.List):
            values = value.elts if isinstance(value, ast.Tuple | ast.List) else None
            if values is not None and len(values) != len(target.elts):
                values = None
            for i, element in enumerate(target.elts):
                targets(element, values[i] if values is not None else None, stmt)

    def walk(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    targets(target, stmt.value, stmt)
            elif isinstance(stmt, ast.AnnAssign | ast.AugAssign):
                targets(stmt.target, stmt.value, stmt)
            elif isinstance(stmt, ast.If | ast.For | ast.AsyncFor | ast.While):
                walk(stmt.body)
                walk(stmt.orelse)
            elif isinstance(stmt, ast.With | ast.AsyncWith):
                walk(stmt.body)
            elif isinstance(stmt, ast.Try):
                walk(stmt.body)
                for handler in stmt.handlers:
                    walk(handler.body)
                walk(stmt.orelse)
                walk(stmt.finalbody)

    walk(tree.body)
    return found


def _stored_names(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names a function binds or deletes in its own scope (nested functions excluded)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(child.name)
                continue
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store | ast.Del):
                names.add(child.id)
            elif isinstance(child, ast.alias):
                names.add((child.asname or child.name).split(".")[0])
            visit(child)

    visit(function)
    return names


def _global_statements(node: ast.AST) -> list[tuple[str, int]]:
    """(name, line) for each name in the ``global`` statements of a scope (nested ones excluded)."""
    declared: list[tuple[str, int]] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if isinstance(child, ast.Global):
            declared.extend((name, child.lineno) for name in child.names)
        declared.extend(_global_statements(child))
    return declared


def _global_rebindings(tree: ast.Module) -> list[tuple[str, int, str]]:
    """(name, line, function) for each name a function declares global and rebinds."""
    found: list[tuple[str, int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        declared = _global_statements(node)
        if not declared:
            continue
        stored = _stored_names(node)
        found.extend((name, line, node.name) for name, line in declared if name in stored)
    return found


def analyse(package_dir: Path) -> Report:
    """Measure the package whose directory is ``package_dir`` (its name is the directory's)."""
    modules = discover(package_dir)
    root = Path(package_dir).resolve().name
    runtime = f"{root}._runtime"
    report = Report(modules)
    for module in modules.values():
        source = module.path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(module.path))
        aliases = _analyse_imports(module, tree, modules, root, report)
        _analyse_attributes(module, tree, modules, aliases, report)
        if module.name != runtime:
            _analyse_state(module, tree, source, report)
    _find_cycles(report)
    return report


def _analyse_imports(
    module: Module, tree: ast.Module, modules: dict[str, Module], root: str, report: Report
) -> dict[str, str]:
    """Record the edges and private imports of one module; return its module aliases."""
    aliases: dict[str, str] = {}
    for found in _imports(tree):
        node = found.node
        targets: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != root:
                    continue
                target = _known(alias.name, modules)
                if target is None:
                    continue
                targets.append(target)
                if alias.asname:
                    aliases[alias.asname] = target
                else:
                    aliases[root] = root
        else:
            base = _base_of(module, node)
            if base is None or base.split(".")[0] != root:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    targets.append(submodule)
                    aliases[alias.asname or alias.name] = submodule
                    continue
                target = _known(base, modules)
                if target is None:
                    continue
                targets.append(target)
                if is_private(alias.name) and target != module.name:
                    report.private_imports.append(
                        PrivateUse(module.name, target, alias.name, module.path, node.lineno, "from-import")
                    )
        if found.type_checking:
            continue
        for target in dict.fromkeys(targets):
            report.edges.append(Edge(module.name, target, module.path, node.lineno, found.in_function))
    return aliases


def _analyse_attributes(
    module: Module, tree: ast.Module, modules: dict[str, Module], aliases: dict[str, str], report: Report
) -> None:
    if not aliases:
        return
    seen: set[tuple[int, str, str]] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain: list[str] = []
        base: ast.expr = node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if not isinstance(base, ast.Name) or base.id not in aliases:
            continue
        chain.reverse()
        current = aliases[base.id]
        # Only the outermost attribute that is not a module matters; inner nodes are
        # visited too, so look at the first step past the modules and stop there.
        for i, attr in enumerate(chain):
            if f"{current}.{attr}" in modules:
                current = f"{current}.{attr}"
                continue
            if i == len(chain) - 1 and is_private(attr) and current != module.name:
                key = (node.lineno, current, attr)
                if key not in seen:
                    seen.add(key)
                    report.private_imports.append(
                        PrivateUse(module.name, current, attr, module.path, node.lineno, "attribute")
                    )
            break


def _analyse_state(module: Module, tree: ast.Module, source: str, report: Report) -> None:
    constant_lines = _constant_lines(source)
    state: dict[str, State] = {}
    constants: dict[str, State] = {}
    for name, value, stmt in _module_level_assignments(tree):
        if is_dunder(name) or name in state or name in constants:
            continue
        kind = _mutable_kind(value)
        if kind is None:
            continue
        found = State(module.name, name, module.path, stmt.lineno, kind)
        if stmt.lineno in constant_lines:
            constants[name] = found
        else:
            state[name] = found
    for name, line, function in _global_rebindings(tree):
        if is_dunder(name) or name in state:
            continue
        constants.pop(name, None)
        state[name] = State(module.name, name, module.path, line, f"global in {function}()")
    report.mutable_state.extend(state.values())
    report.constants.extend(constants.values())


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in discovery order, members sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            if successors:
                successor = successors.pop(0)
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, sorted(graph.get(successor, ()))))
                elif successor in on_stack:
                    low[node] = min(low[node], index[successor])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _find_cycles(report: Report) -> None:
    graph: dict[str, set[str]] = {name: set() for name in report.modules}
    for edge in report.edges:
        graph[edge.source].add(edge.target)
    member_of: dict[str, int] = {}
    for component in strongly_connected(graph):
        if len(component) > 1 or component[0] in graph[component[0]]:
            for name in component:
                member_of[name] = len(report.cycles)
            report.cycles.append(component)
    report.cycle_edges = [
        edge
        for edge in report.edges
        if edge.source in member_of and member_of[edge.source] == member_of.get(edge.target)
    ]


def _where(path: Path, line: int) -> str:
    try:
        shown = path.relative_to(Path.cwd())
    except ValueError:
        try:
            shown = path.relative_to(ROOT)
        except ValueError:
            shown = path
    return f"{shown}:{line}"


def _looks_constant(state: State) -> bool:
    """An UPPER_CASE name bound to a container: meant as a constant, yet mutable (still counted)."""
    return not state.how.startswith("global") and state.name.strip("_").isupper()


def format_report(report: Report) -> str:
    counts = report.counts()
    out: list[str] = []
    in_function = sum(edge.in_function for edge in report.cycle_edges)
    state_modules = {state.module for state in report.mutable_state}
    globals_ = [state for state in report.mutable_state if state.how.startswith("global")]
    tables = [state for state in report.mutable_state if _looks_constant(state)]
    out.append(f"architecture of {len(report.modules)} modules")
    out.append(
        f"  cycles:          {counts['cycles']} ({sum(len(c) for c in report.cycles)} modules in them)"
    )
    out.append(f"  cycle_edges:     {counts['cycle_edges']} ({in_function} inside functions)")
    out.append(
        f"  (imports of package modules inside functions: {sum(e.in_function for e in report.edges)}, "
        f"in cycles or not)"
    )
    out.append(f"  private_imports: {counts['private_imports']}")
    out.append(
        f"  mutable_state:   {counts['mutable_state']} in {len(state_modules)} modules "
        f"({len(globals_)} rebound through global, {len(tables)} mutable tables with UPPER_CASE names)"
    )
    out.append(f"  constant tables: {len(report.constants)} (marked '# constant', not counted)")

    for number, component in enumerate(report.cycles, 1):
        out.append("")
        out.append(f"cycle {number}: {', '.join(component)}")
        members = set(component)
        for edge in sorted(report.cycle_edges, key=lambda e: (e.source, e.line)):
            if edge.source in members:
                where = "in a function" if edge.in_function else "module level"
                out.append(f"  {edge.source} -> {edge.target}  {_where(edge.path, edge.line)} ({where})")

    if report.private_imports:
        out.append("")
        out.append("private names imported across modules:")
        for use in sorted(report.private_imports, key=lambda u: (u.importer, u.line)):
            where = _where(use.path, use.line)
            out.append(f"  {where}  {use.importer} uses {use.module}.{use.name} ({use.how})")

    if report.mutable_state:
        out.append("")
        out.append("module-level mutable state:")
        by_module: dict[str, list[State]] = {}
        for state in report.mutable_state:
            by_module.setdefault(state.module, []).append(state)
        for name in sorted(by_module):
            out.append(f"  {name} ({len(by_module[name])})")
            for state in sorted(by_module[name], key=lambda s: s.line):
                hint = "  (a constant? make it immutable or mark it)" if _looks_constant(state) else ""
                out.append(f"    {state.name:24} {state.how:28} {_where(state.path, state.line)}{hint}")

    if report.constants:
        out.append("")
        out.append("constant tables (# constant):")
        for state in sorted(report.constants, key=lambda s: (s.module, s.line)):
            out.append(f"  {state.module}.{state.name:24} {state.how:20} {_where(state.path, state.line)}")
    return "\n".join(out)


def read_baseline(path: Path) -> dict[str, int] | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return {key: int(data[key]) for key in KEYS}


def write_baseline(path: Path, counts: dict[str, int]) -> None:
    path.write_text(json.dumps({key: counts[key] for key in KEYS}, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--package", type=Path, default=PACKAGE, help="package directory (%(default)s)")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="baseline file (%(default)s)")
    parser.add_argument(
        "--update-baseline", action="store_true", help="write the current counts (only lower) to the baseline"
    )
    parser.add_argument("--force", action="store_true", help="with --update-baseline: allow raising a count")
    parser.add_argument("--strict", action="store_true", help="fail unless every count is 0")
    args = parser.parse_args(argv)

    report = analyse(args.package)
    counts = report.counts()
    print(format_report(report))
    print()
    baseline = read_baseline(args.baseline)

    if args.update_baseline:
        previous = counts if baseline is None else baseline
        raised = [key for key in KEYS if counts[key] > previous[key]]
        if raised and not args.force:
            for key in raised:
                print(f"refused: {key} would rise from {previous[key]} to {counts[key]} (--force to allow)")
            return 1
        write_baseline(args.baseline, counts)
        print(f"baseline written: {args.baseline}: {json.dumps(counts)}")
        return 0

    status = 0
    if baseline is None:
        print(f"no baseline at {args.baseline}; create it with --update-baseline")
        status = 1
    else:
        for key in KEYS:
            if counts[key] > baseline[key]:
                print(f"FAIL {key}: {counts[key]} is above the baseline {baseline[key]}")
                status = 1
            elif counts[key] < baseline[key]:
                print(f"ok   {key}: {counts[key]}, below the baseline {baseline[key]} (--update-baseline)")
            else:
                print(f"ok   {key}: {counts[key]} (baseline {baseline[key]})")
    if args.strict and any(counts.values()):
        print("FAIL --strict: the target is 0 for every count")
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
