"""Compare ``benchmarks/bench.py`` between an earlier commit and the working tree, side by side.

Checks the earlier commit out into a git worktree of its own and runs the two
benchmarks alternately, in an order shuffled each round, with the same interpreter
and the same installed dependencies (each side's own ``cachedecor`` first on
``sys.path``), so that both meet the same machine. Prints, for every time the
benchmark reports (µs, lower is better), the median over the rounds of each side and
the ratio now/before, marking those more than ``--tolerance`` slower.

    python benchmarks/compare.py --base 268d2c1 [--rounds 3] [--full] [--pin]

Exit status 0 whatever the numbers say: a benchmark on a shared machine informs, it
does not gate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worktree(rev: str) -> str:
    """A checkout of ``rev`` beside this one (made once, kept for later runs)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=HERE, capture_output=True, text=True, check=True
    ).stdout.strip()
    path = os.path.join(tempfile.gettempdir(), f"cachedecor-base-{sha}")
    if not os.path.isdir(path):
        subprocess.run(["git", "worktree", "add", "--detach", path, sha], cwd=HERE, check=True)
    return path


def run(side: str, quick: bool, pin: bool) -> dict[str, Any]:
    """One run of ``side``'s benchmark: its JSON results."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        output = fh.name
    args = [sys.executable, os.path.join(side, "benchmarks", "bench.py"), "--output", output]
    if quick:
        args.append("--quick")
    if pin:
        args.append("--pin")
    env = {**os.environ, "PYTHONPATH": side}
    subprocess.run(args, cwd=side, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(output) as fh:
        results: dict[str, Any] = json.load(fh)
    os.unlink(output)
    return results


#: the parts of the results that are times (µs): lower is better
TIMES = ("medians_us", "many_us", "wall_us", "cpu_us")


def times(results: dict[str, Any]) -> dict[str, float]:
    """Every time in ``results``, by a path naming it."""
    found: dict[str, float] = {}

    def walk(node: Any, path: tuple[str, ...], timed: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, str(key)), timed or key in TIMES)
        elif timed and isinstance(node, (int, float)) and not isinstance(node, bool):
            found[" / ".join(p for p in path if p not in TIMES)] = float(node)

    for section in ("rows", "own_work", "many", "misses", "async", "near"):
        if section in results:
            walk(results[section], (section,), section in ("many", "misses"))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--full", action="store_true", help="full benchmark runs (default: --quick ones)")
    parser.add_argument("--pin", action="store_true", help="bench.py --pin (a quieter comparison)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="slower by more than this is marked")
    args = parser.parse_args(argv)
    sides = {"before": worktree(args.base), "now": HERE}
    samples: dict[str, dict[str, list[float]]] = {"before": {}, "now": {}}
    for round_ in range(args.rounds):
        order = list(sides)
        random.shuffle(order)
        for name in order:
            print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr)
            for label, value in times(run(sides[name], not args.full, args.pin)).items():
                samples[name].setdefault(label, []).append(value)
    print(f"{'':70} {'before':>9} {'now':>9} {'now/before':>10}")
    slower = 0
    for label in samples["now"]:
        if label not in samples["before"]:
            continue
        before = statistics.median(samples["before"][label])
        now = statistics.median(samples["now"][label])
        ratio = now / before if before else float("nan")
        mark = "  slower" if ratio > 1 + args.tolerance else ""
        slower += bool(mark)
        print(f"{label[:70]:70} {before:9.1f} {now:9.1f} {ratio:10.3f}{mark}")
    total = len(samples["now"])
    print(f"\n{slower} of {total} times more than {args.tolerance:.0%} slower ({args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
