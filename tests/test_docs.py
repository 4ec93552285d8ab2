"""The documentation builds with warnings as errors (its examples run as doctests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_sphinx_builds_the_docs_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "index.html").exists()


def test_every_public_name_is_documented() -> None:
    import cachedecor

    api = (ROOT / "docs" / "api.rst").read_text()
    missing = [name for name in cachedecor.__all__ if name not in api]
    assert missing == []


def test_the_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import re

    import cachedecor

    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S)
    assert example is not None
    cachedecor.reset()
    try:
        code = compile(example.group(1), "README.md", "exec", dont_inherit=True)
        exec(code, {"__name__": "readme_example"})
    finally:
        cachedecor.reset()
    out = capsys.readouterr().out
    assert out.split() == ["Ada", "Lovelace", "1"]
