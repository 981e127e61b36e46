"""The sink's SQL endpoint (chdb) against a real sink process: a token from a 0600 file, a
loopback Host, a bounded body, and read-only unless the caller asks for write."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sinks.sql_endpoint import ENDPOINT_FILE, MAX_QUERY_BYTES, TOKEN_FILE, read_only_refusal
from tests.services import Pipeline


@pytest.fixture(scope="module")
def sink(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A chdb sink, serving its SQL endpoint."""
    p = Pipeline(broker, None, tmp_path_factory.mktemp("sql-endpoint")).start("sink")
    try:
        deadline = time.monotonic() + 120
        while not (p.root / ENDPOINT_FILE).exists():
            assert time.monotonic() < deadline, "the sink never served its SQL endpoint"
            time.sleep(0.2)
        yield p
    finally:
        p.stop()


def _post(p: Pipeline, sql: str, token: str | None = "<file>", **headers: str) -> httpx.Response:
    url = (p.root / ENDPOINT_FILE).read_text().strip()
    if token == "<file>":
        token = (p.root / TOKEN_FILE).read_text().strip()
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return httpx.post(url, content=sql.encode(), headers=headers, timeout=30)


def _cli(p: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "millimetric_app.cli", "sql", *args],
        env=p.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_token_file_is_private_and_required(sink: Pipeline) -> None:
    mode = stat.S_IMODE((sink.root / TOKEN_FILE).stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert _post(sink, "SELECT 1").text == "1\n"
    assert _post(sink, "SELECT 1", token=None).status_code == 401  # any local process or page
    assert _post(sink, "SELECT 1", token="guessed").status_code == 401


def test_only_loopback_host_names(sink: Pipeline) -> None:
    # DNS rebinding: the browser sends the attacker's name, resolved to 127.0.0.1.
    port = (sink.root / ENDPOINT_FILE).read_text().strip().split(":")[2].split("/")[0]
    assert _post(sink, "SELECT 1", host=f"evil.example:{port}").status_code == 403
    assert _post(sink, "SELECT 1", host=f"localhost:{port}").status_code == 200


def test_the_body_is_bounded(sink: Pipeline) -> None:
    big = "SELECT 1 -- " + "x" * MAX_QUERY_BYTES
    assert _post(sink, big).status_code == 413


def test_writes_need_the_write_flag(sink: Pipeline) -> None:
    for sql in (
        "CREATE TABLE scratch (x UInt8) ENGINE = MergeTree ORDER BY x",
        "SELECT 1; DROP TABLE events",
        "SELECT 1 INTO OUTFILE '/tmp/x'",
        "DROP TABLE events",
    ):
        r = _post(sink, sql)
        assert r.status_code == 403, (sql, r.text)
    assert "only read queries" in _post(sink, "/* SELECT */ DROP TABLE events").text
    # The shared broker's enriched topic may hold other tests' rows: what counts is the table.
    assert _post(sink, "SELECT count() >= 0 FROM events;").text == "1\n"
    assert _cli(sink, "DROP TABLE events").returncode != 0
    assert _cli(sink, "SELECT count() >= 0 FROM events").stdout == "1\n"  # still there

    create = "CREATE TABLE scratch (x UInt8) ENGINE = MergeTree ORDER BY x"
    done = _cli(sink, "--write", create)
    assert done.returncode == 0, done.stderr
    assert _cli(sink, "--write", "INSERT INTO scratch VALUES (7)").returncode == 0
    assert _cli(sink, "SELECT x FROM scratch").stdout == "7\n"


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ("SELECT 1", False),
        ("  with x AS (SELECT 1) SELECT * FROM x ;  -- done", False),
        ("SELECT ';DROP TABLE t'", False),
        ('SELECT "a;b" FROM t', False),
        ("SHOW TABLES", False),
        ("INSERT INTO t VALUES (1)", True),
        ("SELECT 1; SELECT 2", True),
        ("-- SELECT\nALTER TABLE t DELETE WHERE 1", True),
        ("", True),
    ],
)
def test_read_only_classification(sql: str, refused: bool) -> None:
    assert (read_only_refusal(sql) is not None) == refused


def test_a_stale_endpoint_file_falls_back_to_the_store(tmp_path: Path) -> None:
    (tmp_path / ENDPOINT_FILE).write_text("http://127.0.0.1:9/sql\n")
    (tmp_path / TOKEN_FILE).write_text("old\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "millimetric_app.cli",
            "--data-dir",
            str(tmp_path),
            "sql",
            "SELECT 41 + 1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout == "42\n", out.stderr
