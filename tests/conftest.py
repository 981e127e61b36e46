"""Session services: one broker, one ClickHouse server, one Redis; fresh names per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.services import CLICKHOUSE_SERVER_BIN, ClickHouseServer
from tests.redis_service import RedisServer, running_redis
from tests.services import clickhouse_server, kafka_broker

# How much of each stage log a failure report shows (the end is where the error is).
LOG_TAIL = 8000


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap servers of the session's broker."""
    with kafka_broker() as bootstrap:
        yield bootstrap


@pytest.fixture
def fresh_broker() -> Iterator[str]:
    """A broker of this test's own (topic names are fixed, so isolation is per broker)."""
    with kafka_broker() as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def ch_server() -> Iterator[str | ClickHouseServer]:
    """Debian's clickhouse-server (or MILLIMETRIC_TEST_CLICKHOUSE_URL)."""
    if not Path(CLICKHOUSE_SERVER_BIN).exists() and not _external_ch():
        pytest.skip("clickhouse-server is not installed (the README's test command installs it)")
    with clickhouse_server() as server:
        yield server


def _external_ch() -> bool:
    return bool(os.environ.get("MILLIMETRIC_TEST_CLICKHOUSE_URL"))


@pytest.fixture
def ch_url(ch_server: str | ClickHouseServer) -> str:
    """A URL to a fresh database on the session's server."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    if isinstance(ch_server, str):
        return ch_server.rsplit("/", 1)[0] + f"/{database}"
    return ch_server.url(database)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's redis-server."""
    with running_redis() as server:
        yield server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory of this test's own (the embedded chdb store and stage logs live here)."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """On a failure, attach the tail of every stage log in the test's data dir to the report."""
    report = yield
    data = item.funcargs.get("data_dir") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(data, Path):
        for log in sorted(data.glob("*.log")):
            tail = log.read_text(errors="replace")[-LOG_TAIL:]
            report.sections.append((f"stage log {log.name} ({report.when})", tail))
    return report
