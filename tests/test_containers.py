"""The end-to-end path on Apache Kafka and current ClickHouse, in containers (testcontainers).

Runs where a Docker engine answers; elsewhere it is skipped with that reason.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import Pipeline
from tests.test_end_to_end import SPEC_TRACK


def _docker_reason() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on this machine"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return "no Docker engine answers `docker info` on this machine"
    return None


pytestmark = [pytest.mark.containers]
REASON = _docker_reason()


@pytest.fixture(scope="module")
def containers() -> Iterator[tuple[str, str]]:
    if REASON:
        pytest.skip(REASON)
    from testcontainers.clickhouse import ClickHouseContainer
    from testcontainers.kafka import KafkaContainer

    with (
        KafkaContainer("confluentinc/cp-kafka:7.6.1") as kafka,
        ClickHouseContainer("clickhouse/clickhouse-server:24.8") as ch,
    ):
        host = ch.get_container_host_ip()
        port = ch.get_exposed_port(9000)
        url = f"clickhouse://{ch.username}:{ch.password}@{host}:{port}/millimetric"
        yield kafka.get_bootstrap_server(), url


def test_track_on_apache_kafka_and_current_clickhouse(
    containers: tuple[str, str], tmp_path: Path
) -> None:
    bootstrap, url = containers
    pipeline = Pipeline(bootstrap, url, tmp_path, {"MILLIMETRIC_KAFKA_IDEMPOTENCE": "true"}).start()
    try:
        r = pipeline.post("/v1/track", SPEC_TRACK)
        assert r.status_code == 202
        pipeline.wait_for("SELECT event, channel FROM events", "signup\tPaid Social\n")
    finally:
        pipeline.stop()
