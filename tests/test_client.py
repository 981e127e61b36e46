"""millimetric.client against a running pipeline (real broker, gateway, processor, sink, chdb):
exactly once from many threads, 413 splits, 429 honoured, refusals reported, full queue, fork,
asyncio, and the gateway down mid-run (slow)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import millimetric
from gateway.key_admin import create_key, set_project_limit
from gateway.rate_limit import Limit
from millimetric.aio import AsyncClient
from millimetric.client import Client
from millimetric.messages import Failure
from millimetric_app.embedded import free_port
from tests.services import Pipeline, kafka_broker

UNLIMITED = Limit(1_000_000.0, 1_000_000)


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    """One pipeline for the module; each test sends to a project of its own."""
    root = Path(tempfile.mkdtemp(prefix="mm-client-"))
    with kafka_broker() as bootstrap:
        p = Pipeline(bootstrap, None, root).start()
        try:
            yield p
        finally:
            p.stop()
            shutil.rmtree(root, ignore_errors=True)


def project_key(p: Pipeline, limit: Limit | None = UNLIMITED) -> tuple[str, str]:
    """A new project and its sk_ key, known to the gateway; its batch limit set to `limit`."""
    project = f"c{uuid.uuid4().hex[:10]}"
    key = asyncio.run(create_key(p.bootstrap, project, "sk", "live", []))
    if limit is not None:
        asyncio.run(set_project_limit(p.bootstrap, project, "batch", limit))
    deadline = time.monotonic() + 30
    while p.post("/v1/track", {}, key).json().get("error") == "invalid_api_key":
        assert time.monotonic() < deadline, "the gateway did not learn the key"
        time.sleep(0.1)
    return project, key


def counts(p: Pipeline, project: str) -> str:
    """Rows, rows after FINAL and distinct event_ids of a project, tab-separated."""
    return p.sql(
        f"SELECT (SELECT count() FROM events WHERE project = '{project}'), "
        f"(SELECT count() FROM events FINAL WHERE project = '{project}'), "
        f"(SELECT uniqExact(event_id) FROM events WHERE project = '{project}')"
    )


def exactly(p: Pipeline, project: str, n: int, timeout: float = 120) -> None:
    """Wait until the project holds exactly n events, counted with and without FINAL."""
    p.wait_for(f"SELECT count() FROM events FINAL WHERE project = '{project}'", f"{n}\n", timeout)
    assert counts(p, project) == f"{n}\t{n}\t{n}\n"


class Failures:
    """An on_error that keeps what it was given."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[Failure] = []

    def __call__(self, failure: Failure) -> None:
        with self.lock:
            self.seen.append(failure)

    def ids(self, reason: str | None = None) -> list[str]:
        with self.lock:
            return [
                e["event_id"]
                for f in self.seen
                if reason is None or f.reason == reason
                for e in f.events
            ]


def _from_threads(p: Pipeline, threads: int, per_thread: int) -> None:
    project, key = project_key(p)
    failures = Failures()
    client = Client(p.base_url, key, on_error=failures)
    ids: list[list[str]] = [[] for _ in range(threads)]

    def produce(n: int) -> None:
        for i in range(per_thread):
            ids[n].append(client.track("load", {"i": i}, anonymous_id=f"t{n}-{i % 50}"))

    workers = [threading.Thread(target=produce, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    result = client.close(timeout=300)
    total = threads * per_thread
    assert (result.accepted, result.failed, result.pending) == (total, 0, 0), result
    assert not failures.seen and len({i for t in ids for i in t}) == total
    exactly(p, project, total, timeout=300)


def test_events_from_8_threads_land_exactly_once(pipeline: Pipeline) -> None:
    _from_threads(pipeline, 8, 2_500)


@pytest.mark.slow
def test_100k_events_from_8_threads_land_exactly_once(pipeline: Pipeline) -> None:
    _from_threads(pipeline, 8, 12_500)


def test_a_413_splits_the_batch(pipeline: Pipeline) -> None:
    project, key = project_key(pipeline)
    # 1000 events of ~1.6 KiB: 1.6 MiB inflated, over the gateway's 1 MiB (gzip does not help:
    # the limit is on the inflated size); the client's own byte cap is lifted to force the 413.
    client = Client(pipeline.base_url, key, max_batch=1000, max_batch_bytes=10**8)
    for i in range(1000):
        client.track("big", {"blob": f"{i:04d}" * 400})
    result = client.close(timeout=120)
    assert (result.accepted, result.failed) == (1000, 0), result
    assert client.splits >= 1
    exactly(pipeline, project, 1000)


def test_429_is_honoured(pipeline: Pipeline) -> None:
    project, key = project_key(pipeline, Limit(0.5, 1))  # a batch every 2 s
    deadline = time.monotonic() + 30
    while pipeline.post("/v1/batch", {"events": [{"event": "x"}]}, key).status_code != 429:
        assert time.monotonic() < deadline, "the limit did not apply"  # until the bucket is empty
    client = Client(pipeline.base_url, key, max_batch=10)
    for i in range(40):
        client.track("limited", {"i": i})
    started = time.monotonic()
    result = client.close(timeout=120)
    assert (result.accepted, result.failed) == (40, 0), result
    # 4 batches against an empty bucket refilling every 2 s: waiting out each Retry-After costs
    # about one 429 per batch; retrying on the backoff alone (0.1 s doubling) costs several.
    assert 1 <= client.retries["429"] <= 5, client.retries
    assert time.monotonic() - started >= 6
    query = f"SELECT count() FROM events FINAL WHERE project = '{project}' AND event = 'limited'"
    assert pipeline.wait_for(query, "40\n", 60)


def test_a_bad_event_is_reported_and_the_rest_land(pipeline: Pipeline) -> None:
    project, key = project_key(pipeline)
    failures = Failures()
    client = Client(pipeline.base_url, key, on_error=failures)
    good = [client.track("fine", {"i": i}) for i in range(99)]
    bad = client.track("x" * 200)  # event names are at most 128 characters
    nan = client.track("fine", {"ratio": float("nan")})  # not JSON: refused before sending
    result = client.flush(timeout=60)
    assert (result.accepted, result.failed, result.pending) == (99, 2, 0), result
    assert result.reasons == {"invalid_payload": 1, "unserializable": 1}
    assert failures.ids("invalid_payload") == [bad] and failures.ids("unserializable") == [nan]
    exactly(pipeline, project, len(good))
    client.close()


def test_a_full_queue_calls_on_error_with_the_events() -> None:
    failures = Failures()
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens: every send fails
    client = Client(nobody, "sk_live_" + "a" * 32, max_queue=10, on_error=failures)
    ids = [client.track("e", {"i": i}) for i in range(15)]
    assert failures.ids("queue_full") == ids[10:]
    started = time.monotonic()
    result = client.close(timeout=1)
    assert time.monotonic() - started < 10  # a bounded wait, whatever the gateway does
    assert result.accepted == 0 and result.failed + result.pending == 15
    deadline = time.monotonic() + 20
    while len(failures.ids()) < 15:  # what was in flight is reported once its attempt ends
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sorted(failures.ids()) == sorted(ids)
    assert set(client.failed) == {"queue_full", "closed"} and client.retries["network"] >= 1
    late = client.track("late")  # after close(): reported, not queued
    assert failures.ids("closed")[-1] == late and client.failed["closed"] == 11


def test_a_forked_child_gets_a_fresh_sender(pipeline: Pipeline) -> None:
    project, key = project_key(pipeline)
    client = Client(pipeline.base_url, key, flush_interval_s=60)
    parent_ids = [client.track("parent", {"i": i}) for i in range(50)]  # queued, not sent yet
    pid = os.fork()
    if pid == 0:  # the child: its own queue and sender; the parent's 50 are not its to send
        code = 1
        try:
            for i in range(20):
                client.track("child", {"i": i})
            result = client.flush(timeout=60)
            code = 0 if (result.accepted, result.failed) == (20, 0) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result = client.close(timeout=60)
    assert (result.accepted, result.failed) == (50, 0), result
    exactly(pipeline, project, 70)
    out = pipeline.sql(
        f"SELECT event, count() FROM events WHERE project = '{project}' GROUP BY event ORDER BY 1"
    )
    assert out == "child\t20\nparent\t50\n" and len(parent_ids) == 50


def test_asyncio_client_and_the_default_client(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, key = project_key(pipeline)

    async def main() -> str:
        async with AsyncClient(pipeline.base_url, key) as client:
            for i in range(30):
                client.track("async", {"i": i}, user_id=f"u{i % 3}")
            client.identify("anon-1", "u1", {"plan": "pro"})
            result = await client.flush(timeout=60)
            assert (result.accepted, result.failed) == (31, 0), result
            return await client.forget(user_id="someone-else")

    assert asyncio.run(main()).startswith("fgt_")
    monkeypatch.setenv("MILLIMETRIC_HOST", pipeline.base_url)
    monkeypatch.setenv("MILLIMETRIC_KEY", key)
    millimetric.track("default", anonymous_id="d1")
    assert millimetric.close(timeout=60).accepted == 1
    exactly(pipeline, project, 32)


@pytest.mark.slow
def test_gateway_down_30s_loses_nothing_and_doubles_nothing(pipeline: Pipeline) -> None:
    project, key = project_key(pipeline)
    failures = Failures()
    client = Client(pipeline.base_url, key, on_error=failures)
    stop = threading.Event()
    sent: list[str] = []

    def produce() -> None:
        i = 0
        while not stop.is_set():
            sent.append(client.track("steady", {"i": i}, anonymous_id=f"a{i % 100}"))
            i += 1
            time.sleep(0.002)

    worker = threading.Thread(target=produce)
    worker.start()
    try:
        time.sleep(5)
        pipeline.stages["gateway"].stop()
        time.sleep(30)
        pipeline.stages["gateway"].start()
        pipeline.wait_ready()
        time.sleep(5)
    finally:
        stop.set()
        worker.join()
    result = client.close(timeout=180)
    assert (result.failed, result.pending) == (0, 0) and not failures.seen, result
    assert client.retries["network"] >= 1
    exactly(pipeline, project, len(sent), timeout=300)
    assert httpx.get(f"{pipeline.base_url}/health", timeout=10).status_code == 200
