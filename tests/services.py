"""Real services for tests, started on free loopback ports in temp dirs (never mocks).

Each can be replaced by an external one through an env var:
MILLIMETRIC_TEST_KAFKA (bootstrap servers), MILLIMETRIC_TEST_CLICKHOUSE_URL (clickhouse://...),
MILLIMETRIC_TEST_REDIS_URL (see redis_service.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

from ingest.dev import EmbeddedBroker, free_port, wait_for_port

CLICKHOUSE_SERVER_BIN = "/usr/sbin/clickhouse-server"

CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <tcp_port>{tcp}</tcp_port>
  <http_port>{http}</http_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{root}/data/</path>
  <tmp_path>{root}/tmp/</tmp_path>
  <user_files_path>{root}/user_files/</user_files_path>
  <format_schema_path>{root}/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mark_cache_size>104857600</mark_cache_size>
  <mlock_executable>false</mlock_executable>
</yandex>
"""

CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
  </interval></default></quotas>
</yandex>
"""


class ClickHouseServer:
    """Debian's clickhouse-server with its own config and data dir; can be stopped and restarted."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tcp, self.http = free_port(), free_port()
        (root / "config.xml").write_text(
            CLICKHOUSE_CONFIG.format(tcp=self.tcp, http=self.http, root=root)
        )
        (root / "users.xml").write_text(CLICKHOUSE_USERS)
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        """A clickhouse:// URL for one database on this server."""
        return f"clickhouse://default:@127.0.0.1:{self.tcp}/{database}"

    def start(self) -> None:
        """Start the server and wait until it accepts native connections."""
        self._proc = subprocess.Popen(
            [CLICKHOUSE_SERVER_BIN, f"--config-file={self.root / 'config.xml'}"],
            cwd=self.root,
            stdout=(self.root / "server.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.tcp, 60)

    def stop(self) -> None:
        """Stop the server (its data stays)."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(30)
            self._proc = None


@contextmanager
def clickhouse_server() -> Iterator[str | ClickHouseServer]:
    """The external server's URL base, or a managed ClickHouseServer."""
    external = os.environ.get("MILLIMETRIC_TEST_CLICKHOUSE_URL")
    if external:
        yield external
        return
    root = Path(tempfile.mkdtemp(prefix="mm-clickhouse-"))
    server = ClickHouseServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def kafka_broker() -> Iterator[str]:
    """Bootstrap servers of an external broker, or of a fresh embedded Tansu."""
    external = os.environ.get("MILLIMETRIC_TEST_KAFKA")
    if external:
        yield external
        return
    broker = EmbeddedBroker().start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


class Stage:
    """One pipeline stage (`millimetric gateway|processor|sink`) as a child process."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Stage:
        """Start the stage."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest.cli", self.name],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        return self

    def stop(self, kill: bool = False, timeout: float = 30) -> None:
        """SIGTERM (graceful) or SIGKILL the stage and wait for it."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Pipeline:
    """A broker, gateway, processor and sink wired together, with one sk_ key."""

    def __init__(
        self,
        bootstrap: str,
        clickhouse_url: str | None,
        root: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.clickhouse_url = clickhouse_url
        self.root = root
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "MILLIMETRIC_KAFKA_IDEMPOTENCE": "false",
            "MILLIMETRIC_IP_SALT": "test-salt",
            "MILLIMETRIC_DATA_DIR": str(root),
            "MILLIMETRIC_GATEWAY_PORT": str(self.port),
            "MILLIMETRIC_SINK_BATCH_SECONDS": "0.3",
            "MILLIMETRIC_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        if clickhouse_url:
            env["MILLIMETRIC_CLICKHOUSE_URL"] = clickhouse_url
        self.env = env
        self.stages = {name: Stage(name, env, root) for name in ("sink", "processor", "gateway")}
        self.key = ""

    def start(self, *names: str) -> Pipeline:
        """Start the stages (all by default); with the gateway, create a key and wait for it."""
        from gateway.key_admin import create_key

        for name in names or tuple(self.stages):
            self.stages[name].start()
        if "gateway" in (names or self.stages):
            self.key = asyncio.run(create_key(self.bootstrap, "demo", "sk", "live", []))
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the gateway's /ready says ok."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"gateway not ready; see {self.root}")

    def post(self, path: str, body: object, key: str | None = None) -> httpx.Response:
        """POST JSON to the gateway with the pipeline's key."""
        return httpx.post(
            f"{self.base_url}{path}",
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {key or self.key}"},
        )

    def sql(self, query: str) -> str:
        """Query ClickHouse as `millimetric sql` does."""
        out = subprocess.run(
            [sys.executable, "-m", "ingest.cli", "sql", query],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode:
            raise RuntimeError(out.stderr)
        return out.stdout

    def wait_for(self, query: str, expected: str, timeout: float = 60) -> str:
        """Poll a query until its output equals `expected` (or time out with the last output)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            with suppress(RuntimeError):  # the sink may still be starting
                last = self.sql(query)
            if last == expected:
                return last
            time.sleep(0.5)
        raise AssertionError(f"{query!r} gave {last!r}, expected {expected!r}")

    def stop(self) -> None:
        """Stop every stage gracefully, front to back."""
        for name in ("gateway", "processor", "sink"):
            self.stages[name].stop()

    def counts(self) -> tuple[int, int, int]:
        """Distinct events as `events`, `daily_rollup` and `sessions` each count them."""
        out = self.sql(
            "SELECT (SELECT count() FROM events FINAL), "
            "(SELECT sum(c) FROM (SELECT uniqExactMerge(events) AS c FROM daily_rollup "
            " GROUP BY project, day, event, source, medium, channel)), "
            "(SELECT sum(c) FROM (SELECT uniqExactMerge(events) AS c FROM sessions "
            " GROUP BY project, session_id))"
        )
        events, rollup, sessions = (int(v) for v in out.split())
        return events, rollup, sessions
