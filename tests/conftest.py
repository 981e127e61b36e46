"""Session services: one broker, one ClickHouse server, one Redis; fresh names per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.services import CLICKHOUSE_SERVER_BIN, ClickHouseServer
from tests.redis_service import RedisServer, running_redis
from tests.services import NAMESPACE, clickhouse_server, kafka_broker

# How much of each stage log a failure report shows (the end is where the error is).
LOG_TAIL = 8000


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap servers of the session's broker."""
    with kafka_broker() as bootstrap:
        yield bootstrap


@pytest.fixture
def fresh_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A broker of this test's own; an external one (MILLIMETRIC_TEST_KAFKA) is shared, so
    there the test gets topic and consumer-group names of its own (a fresh namespace)."""
    if os.environ.get("MILLIMETRIC_TEST_KAFKA"):
        monkeypatch.setenv(NAMESPACE, f"t{uuid.uuid4().hex[:12]}")
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


# Tiers by what a test starts (`bash tests/run.sh -m unit` runs in seconds); a test's or module's
# own tier mark wins, `slow` is the chaos tier.
TIERS = ("unit", "service", "pipeline", "chaos")
PIPELINE_FIXTURES = {"data_dir", "pipeline"}  # stage subprocesses, their logs in data_dir
SERVICE_FIXTURES = {
    *("broker", "fresh_broker", "ch_server", "ch_url", "redis_server"),
    *("limiter", "ch"),  # they take the services through request.getfixturevalue
}
# Modules whose tests start their services themselves (not through a fixture): their tier.
MODULE_TIERS = {
    "test_batch_publisher": "service",
    "test_connections": "service",
    "test_containers": "service",
    "test_end_to_end": "pipeline",
    "test_gateway_hardening": "service",
    "test_gateway_processes": "pipeline",
    "test_processor_faults": "service",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test its tier mark."""
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        names = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("slow"):
            tier = "chaos"
        elif names & PIPELINE_FIXTURES:
            tier = "pipeline"
        elif names & SERVICE_FIXTURES:
            tier = "service"
        else:
            tier = MODULE_TIERS.get(item.path.stem, "unit")
        item.add_marker(tier)
