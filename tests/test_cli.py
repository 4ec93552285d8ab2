"""The ``cachedecor`` command and the demo application."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from pymemcache.client.base import Client

from cachedecor.cli import main
from cachedecor.demo import run_demo
from tests.servers import free_port


def write_ini(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "cache.ini"
    path.write_text(
        "[cachedecor]\nregions = default\n\n"
        f"[cachedecor.default]\nbackend = dogpile.cache.pymemcache\narguments.url = {url}\n"
        "arguments.timeout = 0.2\narguments.connect_timeout = 0.2\n"
    )
    return path


class TestDemo:
    def test_demo_shows_miss_hit_invalidation_and_rollback(self) -> None:
        out = io.StringIO()
        result = run_demo(rows=20, repeat=5, out=out)
        text = out.getvalue()
        assert "first read of person 1 (miss)" in text
        assert "invalidations before/after the rollback: 1/1" in text
        assert result["stats"]["invalidations"] == 1
        assert result["stats"]["bypasses"] == 1
        assert result["stats"]["hits"] > 0
        assert result["hit_us"] > 0 and result["db_us"] > 0

    def test_demo_on_memcached(self, memcached: Any) -> None:
        out = io.StringIO()
        result = run_demo(memcached=memcached.url, rows=20, repeat=5, out=out)
        assert "cachedecor.pymemcache" in out.getvalue()
        assert result["stats"]["errors"] == 0
        assert result["stats"]["fills"] > 0

    def test_demo_command_runs(self) -> None:
        result = CliRunner().invoke(main, ["demo", "--rows", "5", "--repeat", "3"])
        assert result.exit_code == 0, result.output
        assert "region counters" in result.output


class TestCheck:
    def test_check_pings_every_server(self, tmp_path: Path, memcached: Any) -> None:
        result = CliRunner().invoke(main, ["check", "--config", str(write_ini(tmp_path, memcached.url))])
        assert result.exit_code == 0, result.output
        assert f"{memcached.url}" in result.output and "ok (memcached" in result.output

    def test_check_fails_for_a_closed_port(self, tmp_path: Path) -> None:
        url = f"127.0.0.1:{free_port()}"
        result = CliRunner().invoke(main, ["check", "--config", str(write_ini(tmp_path, url))])
        assert result.exit_code == 1
        assert f"{url}" in result.output and "FAILED" in result.output

    def test_check_reports_configuration_errors(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.ini"
        path.write_text("[cachedecor.default]\nbackend = nope\n")
        result = CliRunner().invoke(main, ["check", "--config", str(path)])
        assert result.exit_code == 2
        assert "unknown backend 'nope'" in result.output


class TestStats:
    def test_stats_shows_server_statistics_and_client_counters(self, tmp_path: Path, memcached: Any) -> None:
        counters = tmp_path / "counters.json"
        demo = CliRunner().invoke(
            main,
            [
                "demo",
                "--rows",
                "5",
                "--repeat",
                "3",
                "--memcached",
                memcached.url,
                "--stats-file",
                str(counters),
            ],
        )
        assert demo.exit_code == 0, demo.output
        ini = write_ini(tmp_path, memcached.url)
        result = CliRunner().invoke(main, ["stats", "--config", str(ini), "--counters", str(counters)])
        assert result.exit_code == 0, result.output
        assert "hit ratio" in result.output and memcached.url in result.output
        demo_line = next(line for line in result.output.splitlines() if line.startswith("demo "))
        assert demo_line.split()[1:] != ["0"] * len(demo_line.split()[1:])

    def test_stats_reports_an_unreachable_server(self, tmp_path: Path) -> None:
        result = CliRunner().invoke(
            main, ["stats", "--config", str(write_ini(tmp_path, f"127.0.0.1:{free_port()}"))]
        )
        assert result.exit_code == 1
        assert "FAILED" in result.output


class TestInvalidate:
    def test_invalidate_deletes_the_keys(self, tmp_path: Path, memcached: Any) -> None:
        import cachedecor
        from tests.models import User
        from tests.test_read import get_user

        cachedecor.configure_regions(str(write_ini(tmp_path, memcached.url)))
        key = get_user.cache_key(7)
        client = Client(("127.0.0.1", memcached.port))
        client.set(key, b"x", noreply=False)
        result = CliRunner().invoke(
            main,
            ["invalidate", "--config", str(write_ini(tmp_path, memcached.url)), "tests.models:User", "7"],
        )
        assert result.exit_code == 0, result.output
        assert client.get(key) is None
        assert User.__name__ in result.output
