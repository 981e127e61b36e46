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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.services import ClickHouseServer, stage, wait_http_ok
from gateway.key_admin import read_forget_status
from ingest.records import raw_records
from ingest.topics import topic
from millimetric_app.embedded import EmbeddedBroker, free_port
from sinks.clickhouse import ServerClickHouse
from sinks.sql_endpoint import SqlRefused, query_endpoint

# What a stage subprocess inherits from the test run: the OS's basics, never a MILLIMETRIC_
# setting of the shell that runs pytest (it would change what the tests run).
INHERITED = (
    *("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ"),
    *("LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV"),
)
# Every test stage's consumer groups: a member joins Tansu's group in half the session (2 s,
# not 5 s), and a killed one is replaced after it.
TEST_SESSION = {"MILLIMETRIC_KAFKA_SESSION_TIMEOUT_S": "4"}


# The test's topic and group names, set per test on an external broker (conftest.py).
NAMESPACE = "MILLIMETRIC_KAFKA_NAMESPACE"


def stage_env(settings: dict[str, str]) -> dict[str, str]:
    """The explicit environment of a stage subprocess: the OS's basics, the test's namespace
    and `settings`."""
    inherited = {k: os.environ[k] for k in (*INHERITED, NAMESPACE) if k in os.environ}
    return inherited | TEST_SESSION | settings


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


# Errors a query meets while the sink is starting (store held, endpoint not up, no tables yet).
NOT_READY = (
    "cannot open the embedded store",
    "Connection refused",
    "doesn't exist",
    "UNKNOWN_TABLE",
    "UNKNOWN_DATABASE",
)


def not_ready(error: str) -> bool:
    """Whether a query error means "not there yet" rather than a wrong query."""
    return any(sign in error for sign in NOT_READY)


# With these, the in-process query path (plain connection, URL credentials) does not apply.
PLAIN_SERVER_ONLY = {
    f"MILLIMETRIC_CLICKHOUSE_{name}"
    for name in ("SECURE", "PASSWORD", "PASSWORD_FILE", "CA_CERTS", "CLUSTER")
}


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
            "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "MILLIMETRIC_KAFKA_IDEMPOTENCE": "false",
            "MILLIMETRIC_IP_SALT": "test-salt",
            "MILLIMETRIC_FORGET_AUDIT_KEY": "test-audit-key",
            "MILLIMETRIC_DATA_DIR": str(root),
            "MILLIMETRIC_GATEWAY_PORT": str(self.port),
            "MILLIMETRIC_SINK_BATCH_SECONDS": "0.3",
            "MILLIMETRIC_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        if clickhouse_url:
            env["MILLIMETRIC_CLICKHOUSE_URL"] = clickhouse_url
        self.env = stage_env(env)
        self.stages = {n: stage(n, self.env, root) for n in ("sink", "processor", "gateway")}
        self.key = ""
        self._server: ServerClickHouse | None = None

    def start(self, *names: str) -> Pipeline:
        """Start the stages (all by default); with the gateway, create a key and wait for it."""
        from gateway.key_admin import create_key

        try:
            for name in names or tuple(self.stages):
                self.stages[name].start()
            if "gateway" in (names or self.stages):
                self.key = asyncio.run(create_key(self.bootstrap, "demo", "sk", "live", []))
                self.wait_ready()
        except BaseException:  # a fixture that fails to start must not leak its stages
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the gateway's /ready says ok."""
        wait_http_ok(f"{self.base_url}/ready", timeout)

    def post(self, path: str, body: object, key: str | None = None) -> httpx.Response:
        """POST JSON to the gateway with the pipeline's key."""
        return httpx.post(
            f"{self.base_url}{path}",
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {key or self.key}"},
        )

    def post_accepted(self, path: str, body: object, timeout: float = 60) -> httpx.Response:
        """POST as a well-behaved client does: a 503 (a broker slow to ack on a loaded machine)
        is retried after its Retry-After, with the same body; any other answer must be 202."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.post(path, body)
            if r.status_code != 503 or time.monotonic() > deadline:
                assert r.status_code == 202, r.text
                return r
            time.sleep(float(r.headers.get("Retry-After", "1")))

    def sql(self, query: str, write: bool = False) -> str:
        """Query ClickHouse as `millimetric sql` does (`write`: its `--write`), in this process
        when it can (a poll then costs a round trip, not a Python start): RuntimeError with
        ClickHouse's message."""
        if self.clickhouse_url is None:
            try:  # a running sink holds the embedded store and serves queries
                return query_endpoint(
                    Path(self.env["MILLIMETRIC_DATA_DIR"]), query, write=write, timeout=60
                )
            except SqlRefused as error:
                raise RuntimeError(str(error)) from None
            except OSError:
                pass  # no sink serves: the command opens the store itself
        elif not PLAIN_SERVER_ONLY.intersection(self.env):
            try:
                if self._server is None:
                    self._server = ServerClickHouse(self.clickhouse_url)
                return self._server.query_tsv(query)
            except Exception as error:
                self._drop_server()  # a stopped server: reconnect at the next query
                raise RuntimeError(str(error)) from None
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "millimetric_app.cli",
                "sql",
                *(["--write"] if write else []),
                query,
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode:
            raise RuntimeError(out.stderr)
        return out.stdout

    def forget_status(self, forget_id: str) -> dict[str, Any]:
        """A forget's status as GET /v1/forget/{forget_id} and `millimetric forget status` give
        it, read in this process from the keys topic (not a CLI process per poll)."""
        return asyncio.run(read_forget_status(self.bootstrap, forget_id))

    def wait_for(self, query: str, expected: str, timeout: float = 90) -> str:
        """Poll a query until its output equals `expected` (or time out with the last output).

        Only "not there yet" errors (the sink starting, its tables not created) are polled
        through: any other query error fails at once with ClickHouse's message."""
        deadline = time.monotonic() + timeout
        last = error = ""
        while time.monotonic() < deadline:
            try:
                last, error = self.sql(query), ""
            except RuntimeError as failure:
                error = str(failure)
                if not not_ready(error):
                    raise AssertionError(f"{query!r} failed: {error}") from None
            if last == expected:
                return last
            time.sleep(0.5)
        raise AssertionError(f"{query!r} gave {last!r}, expected {expected!r}; last error: {error}")

    def stop(self) -> None:
        """Stop every stage gracefully, front to back."""
        for name in ("gateway", "processor", "sink"):
            self.stages[name].stop()
        self._drop_server()

    def _drop_server(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            with suppress(Exception):  # closing a broken connection may fail: it is gone anyway
                server.close()

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


async def read_topic(
    bootstrap: str,
    role: str,
    until: Callable[[dict[str, Any]], bool],
    timeout: float = 30,
) -> dict[str, Any]:
    """Records of a topic from its start, by event_id or forget_id, read until
    `until(records_by_id)` holds (or `timeout` passed)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        name = topic(role).name
        await consumer.topics()
        tps = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while not until(out) and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                for m in messages:
                    for record in raw_records(m.value):  # an envelope's events, or the record
                        out[record.get("event_id") or record.get("forget_id")] = record
        return out
    finally:
        await consumer.stop()
