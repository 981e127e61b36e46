"""The gateway as real processes (`python -m millimetric_app.cli gateway`), against the real
broker and a real redis-server: one rate limit shared by two gateways, revocation reaching both,
oversized bodies refused before they are read, and the broker stopped and restarted mid-run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import pytest

from bench.services import stage, wait_http_ok
from gateway.key_admin import create_key, revoke_key, set_project_limit
from gateway.rate_limit import Limit
from ingest.topics import ensure_topics
from millimetric_app.embedded import EmbeddedBroker, free_port
from tests.redis_service import RedisServer
from tests.services import stage_env
from tests.test_gateway import raw_records

PUBLISH_TIMEOUT_S = 1.0


class GatewayProcess:
    """`millimetric gateway` in a child process on a free port."""

    def __init__(self, bootstrap: str, log_dir: Path, **env: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stage = stage(
            "gateway",
            stage_env(
                {
                    "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                    "MILLIMETRIC_KAFKA_IDEMPOTENCE": "false",
                    "MILLIMETRIC_GATEWAY_PORT": str(self.port),
                    "MILLIMETRIC_LOG_LEVEL": "WARNING",
                    **{f"MILLIMETRIC_{k.upper()}": v for k, v in env.items()},
                }
            ),
            log_dir,
        )

    def start(self) -> GatewayProcess:
        self.stage.start()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        wait_http_ok(f"{self.url}/ready", timeout)

    def track(self, key: str, body: object = None) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/track",
            json={"event": "e"} if body is None else body,
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )

    def knows(self, key: str) -> bool:
        """Whether this gateway accepts the key (an empty body publishes nothing)."""
        return self.track(key, {}).json()["error"] not in ("invalid_api_key", "keys_loading")


def wait(check, timeout: float = 10.0) -> float:
    """Poll until `check()` holds; return how long it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def two_gateways(
    broker: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two gateway processes sharing the session broker and one Redis."""
    root = tmp_path_factory.mktemp("gateways")
    gws = tuple(
        GatewayProcess(broker, root / name, redis_url=redis_server.url).start()
        for name in ("a", "b")
    )
    try:
        for g in gws:
            g.wait_ready()
        yield gws  # type: ignore[misc]
    finally:
        for g in gws:
            g.stage.stop()


def test_two_gateways_share_one_limit_through_redis(
    broker: str, two_gateways: tuple[GatewayProcess, GatewayProcess]
) -> None:
    a, b = two_gateways
    project = f"shared-{uuid.uuid4().hex[:8]}"
    # The keys topic is ordered: once a gateway knows the key, it has the override too.
    asyncio.run(set_project_limit(broker, project, "track", Limit(rate=0.5, burst=10)))
    key = asyncio.run(create_key(broker, project, "sk", "live", []))
    wait(lambda: a.knows(key) and b.knows(key))
    started = time.monotonic()
    answers = [(g, g.track(key)) for _ in range(10) for g in (a, b)]
    elapsed = time.monotonic() - started
    accepted = [g for g, r in answers if r.status_code == 202]
    # Separate buckets would accept 20; one shared bucket accepts its burst plus the refill.
    assert 10 <= len(accepted) <= 10 + 0.5 * elapsed + 1
    assert a in accepted and b in accepted
    refused = [r for _, r in answers if r.status_code != 202]
    assert {r.json()["error"] for r in refused} == {"rate_limited"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)


def test_revocation_reaches_every_gateway_within_seconds(
    broker: str, two_gateways: tuple[GatewayProcess, GatewayProcess]
) -> None:
    a, b = two_gateways
    key = asyncio.run(create_key(broker, f"rev-{uuid.uuid4().hex[:8]}", "sk", "live", []))
    wait(lambda: a.knows(key) and b.knows(key))
    assert a.track(key).status_code == 202 and b.track(key).status_code == 202
    assert asyncio.run(revoke_key(broker, key)) == 1
    took = wait(lambda: not a.knows(key) and not b.knows(key), timeout=5)
    assert took < 5
    assert b.track(key).json()["error"] == "invalid_api_key"


def _raw_http(port: int, head: bytes, chunks: list[bytes]) -> bytes:
    """Send a request head and some body chunks (never finishing the body); return the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        with suppress(OSError):  # the gateway may answer and close before we are done
            for chunk in chunks:
                s.sendall(chunk)
        answer = b""
        with suppress(OSError):
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        return answer


def test_oversized_bodies_are_refused_before_they_are_read(
    broker: str, two_gateways: tuple[GatewayProcess, GatewayProcess]
) -> None:
    gw = two_gateways[0]
    key = asyncio.run(create_key(broker, f"big-{uuid.uuid4().hex[:8]}", "sk", "live", []))
    wait(lambda: gw.knows(key))
    head = (
        f"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\n"
    )
    # Declared too large: answered without a single body byte sent.
    started = time.monotonic()
    answer = _raw_http(gw.port, (head + "Content-Length: 50000000\r\n\r\n").encode(), [])
    assert answer.startswith(b"HTTP/1.1 413") and b'"payload_too_large"' in answer
    assert time.monotonic() - started < 5
    # Streamed (chunked, no length): answered once past 1 MiB, though the body never ends.
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    answer = _raw_http(
        gw.port, (head + "Transfer-Encoding: chunked\r\n\r\n").encode(), [chunk] * 20
    )
    assert answer.startswith(b"HTTP/1.1 413") and b'"payload_too_large"' in answer


def test_broker_outage_gives_bounded_503s_and_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    if os.environ.get("MILLIMETRIC_TEST_KAFKA"):
        pytest.skip("stops and restarts its own broker")
    broker = EmbeddedBroker().start()
    gw = GatewayProcess(broker.bootstrap, tmp_path, publish_timeout_s=str(PUBLISH_TIMEOUT_S))
    try:
        asyncio.run(ensure_topics(broker.bootstrap))
        key = asyncio.run(create_key(broker.bootstrap, "outage", "sk", "live", []))
        gw.start().wait_ready()
        wait(lambda: gw.knows(key))
        before = [gw.track(key) for _ in range(10)]
        assert [r.status_code for r in before] == [202] * 10
        ids = [r.json()["event_id"] for r in before]
        asyncio.run(raw_records(broker.bootstrap, ids))  # acked by this incarnation: all there

        broker.stop()
        acked_later: list[str] = []
        for _ in range(3):
            started = time.monotonic()
            r = gw.track(key)
            took = time.monotonic() - started
            assert r.status_code == 503, r.text  # never a 202 the broker did not ack
            assert r.json()["error"] == "broker_unavailable"
            assert int(r.headers["retry-after"]) >= 1
            assert took < PUBLISH_TIMEOUT_S + 2, f"503 took {took:.1f}s"
        ready = httpx.get(f"{gw.url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["broker"] is False

        # Same port, empty memory: the topics are recreated as a real cluster would have kept them.
        broker = EmbeddedBroker(port=broker.port).start()
        asyncio.run(ensure_topics(broker.bootstrap))

        def recovered() -> bool:
            r = gw.track(key)
            if r.status_code == 202:
                acked_later.append(r.json()["event_id"])
            else:
                assert r.status_code == 503, r.text
            return r.status_code == 202

        wait(recovered, timeout=30)
        for _ in range(10):
            r = gw.track(key)
            assert r.status_code == 202, r.text
            acked_later.append(r.json()["event_id"])
        asyncio.run(raw_records(broker.bootstrap, acked_later))
    finally:
        gw.stage.stop()
        broker.stop()


def test_keys_limits_command(broker: str) -> None:
    env = {**os.environ, "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": broker}
    env["MILLIMETRIC_KAFKA_IDEMPOTENCE"] = "false"  # Tansu
    project = f"cli-{uuid.uuid4().hex[:8]}"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "millimetric_app.cli", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = cli(
        "limits", "--project", project, "--route", "track", "--rate", "100", "--burst", "400"
    )
    assert done.returncode == 0, done.stderr
    assert f"{project}\ttrack\t100\t400" in cli("list", "--project", project).stdout
    assert cli("limits", "--project", project, "--route", "track", "--reset").returncode == 0
    assert f"{project}\ttrack" not in cli("list", "--project", project).stdout
    bad = cli("limits", "--project", project, "--route", "nope", "--rate", "1", "--burst", "1")
    assert bad.returncode != 0 and "unknown route" in bad.stderr
    bad = cli("limits", "--project", project, "--route", "track", "--rate", "0", "--burst", "1")
    assert bad.returncode != 0 and "invalid limit" in bad.stderr


@pytest.mark.parametrize("trusted", [False, True])
def test_x_forwarded_for_is_believed_only_from_configured_proxies(
    broker: str, tmp_path: Path, trusted: bool
) -> None:
    env = {"trusted_proxies": '["127.0.0.1/32"]'} if trusted else {}
    gw = GatewayProcess(broker, tmp_path / "gw", **env).start()
    try:
        gw.wait_ready()
        key = asyncio.run(create_key(broker, f"xff-{uuid.uuid4().hex[:8]}", "sk", "live", []))
        wait(lambda: gw.knows(key))
        # The test client connects from 127.0.0.1, like a proxy on the same host would.
        r = httpx.post(
            f"{gw.url}/v1/track",
            json={"event": "e"},
            headers={"authorization": f"Bearer {key}", "x-forwarded-for": "203.0.113.50"},
            timeout=30,
        )
        assert r.status_code == 202, r.text
        event_id = r.json()["event_id"]
        record = asyncio.run(raw_records(broker, [event_id]))[event_id]
        assert record["context"]["ip"] == ("203.0.113.50" if trusted else "127.0.0.1")
    finally:
        gw.stage.stop()
