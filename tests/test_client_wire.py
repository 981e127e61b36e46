"""What millimetric.client puts on the wire, seen by a scripted HTTP endpoint: gzip when it helps,
plain bodies for a gateway that cannot decode gzip, and retries that resend the same bytes.

(The pipeline itself is exercised in test_client.py; here only the answers are scripted.)
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from millimetric.client import Client
from millimetric_app.embedded import free_port

KEY = "sk_live_" + "a" * 32


class Scripted:
    """Answers POSTs from a list of (status, body, headers); records (headers, raw body)."""

    def __init__(self, answers: list[tuple[int, dict[str, Any], dict[str, str]]]) -> None:
        self.answers = answers
        self.requests: list[tuple[dict[str, str], bytes]] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        script = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                script.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status, answer, headers = script.answers.pop(0) if script.answers else (202, {}, {})
                data = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@contextmanager
def serving(script: Scripted) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), script.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def events_of(request: tuple[dict[str, str], bytes]) -> list[dict[str, Any]]:
    headers, body = request
    if headers.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    events: list[dict[str, Any]] = json.loads(body)["events"]
    return events


def test_big_batches_are_gzipped_small_ones_are_not() -> None:
    script = Scripted([])
    with serving(script) as url:
        client = Client(url, KEY)
        client.track("one")
        assert client.flush(timeout=10).accepted == 1
        ids = [client.track("many", {"i": i, "plan": "pro"}) for i in range(200)]
        assert client.close(timeout=10).accepted == 200
    (small, _), (big, body) = script.requests
    assert "content-encoding" not in small and small["authorization"] == f"Bearer {KEY}"
    assert big["content-encoding"] == "gzip"
    assert [e["event_id"] for e in events_of((big, body))] == ids
    assert len(body) < len(gzip.decompress(body)) / 4


def test_a_gateway_without_gzip_gets_plain_bodies() -> None:
    refused = (400, {"ok": False, "error": "invalid_json"}, {})
    script = Scripted([refused])
    with serving(script) as url:
        client = Client(url, KEY)
        for i in range(200):
            client.track("many", {"i": i})
        assert client.close(timeout=10).accepted == 200
    zipped, plain = script.requests
    assert zipped[0]["content-encoding"] == "gzip" and "content-encoding" not in plain[0]
    assert events_of(zipped) == events_of(plain)


def test_retries_resend_the_same_events_and_honour_retry_after() -> None:
    busy = (503, {"ok": False, "error": "broker_unavailable"}, {"Retry-After": "1"})
    limited = (429, {"ok": False, "error": "rate_limited"}, {"Retry-After": "1"})
    script = Scripted([busy, limited])
    with serving(script) as url:
        client = Client(url, KEY)
        ids = [client.track("e", {"i": i}) for i in range(10)]
        result = client.close(timeout=30)
    assert (result.accepted, result.failed) == (10, 0)
    assert client.retries == {"503": 1, "429": 1}
    bodies = [body for _, body in script.requests]
    assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]
    assert [e["event_id"] for e in events_of(script.requests[2])] == ids
    assert all("timestamp" in e for e in events_of(script.requests[0]))


def test_a_permanent_refusal_goes_to_on_error_with_the_events() -> None:
    revoked = (401, {"ok": False, "error": "invalid_api_key", "message": "revoked"}, {})
    script = Scripted([revoked])
    failures = []
    with serving(script) as url:
        client = Client(url, KEY, on_error=failures.append)
        ids = [client.track("e") for _ in range(5)]
        result = client.close(timeout=10)
    assert (result.accepted, result.failed, result.reasons) == (0, 5, {"invalid_api_key": 5})
    (failure,) = failures
    assert failure.reason == "invalid_api_key" and [e["event_id"] for e in failure.events] == ids
    assert len(script.requests) == 1  # a 401 is not retried


EXITING = """
import millimetric
print(" ".join(millimetric.track("at_exit", {"i": i}) for i in range(3)), flush=True)
"""  # exits without flush() or close(): the atexit hook must send them


def _exit_with_queued_events(host: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MILLIMETRIC_HOST": host, "MILLIMETRIC_KEY": KEY}
    return subprocess.run(
        [sys.executable, "-c", EXITING], env=env, capture_output=True, text=True, timeout=120
    )


def test_events_queued_at_exit_are_sent() -> None:
    script = Scripted([])
    with serving(script) as url:
        out = _exit_with_queued_events(url)
    assert out.returncode == 0, out.stderr
    assert [e["event_id"] for r in script.requests for e in events_of(r)] == out.stdout.split()


def test_at_exit_with_no_gateway_the_wait_is_bounded_and_the_loss_reported() -> None:
    out = _exit_with_queued_events(f"http://127.0.0.1:{free_port()}")  # nothing listens
    assert out.returncode == 0 and len(out.stdout.split()) == 3
    assert "3 events not accepted: closed" in out.stderr, out.stderr
