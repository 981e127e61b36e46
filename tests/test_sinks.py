"""The sink against a real broker and real ClickHouse (chdb and the 18.16 server): exactly-once
counts under redelivery, crashes and outages; refused rows to the dead-letter topic."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from clickhouse_driver.errors import NetworkError, ServerException

from bench.services import ClickHouseServer
from ingest.records import decode, encode, envelope
from ingest.topics import ensure_topics, topic
from sinks.clickhouse import refusal
from tests.services import Pipeline, not_ready

T0 = 1_795_000_000_000  # a fixed instant, so rollup days are deterministic
MONTH_MS = 31 * 86_400_000


def enriched(i: int, **overrides: Any) -> dict[str, Any]:
    """An enriched record as the processor emits it; 10 visitors, 3 days, 2 channels."""
    visitor = f"a{i % 10}"
    ts = T0 + (i % 3) * 86_400_000 + i * 1000
    record = {
        "v": 1,
        "type": "track",
        "project": "demo",
        "event_id": f"e{i}",
        "event": "signup" if i % 4 == 0 else "$pageview",
        "timestamp": ts,
        "received_at": ts,
        "anonymous_id": visitor,
        "user_id": f"u{i % 5}" if i % 2 else "",
        "session_id": f"{visitor}-{ts // 1_800_000}",
        "url": f"https://s.example/p{i % 7}",
        "path": f"/p{i % 7}",
        "referrer": "",
        "properties": "{}",
        "source": "google" if i % 2 else "(direct)",
        "medium": "organic" if i % 2 else "(none)",
        "campaign": "",
        "channel": "Organic Search" if i % 2 else "Direct",
        "source_confidence": 0.9,
        "source_rule_id": "r",
        "click_id": "",
        "click_id_network": "",
        "classifier_version": "t",
        "country": "DE",
        "device_type": "desktop",
        "browser": "Chrome",
        "os": "Linux",
        "is_bot": False,
        "ip_hash": "h",
    }
    return record | overrides


async def _produce(bootstrap: str, values: list[bytes]) -> None:
    await ensure_topics(bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic("enriched").name, v, key=str(i % 12).encode())
            for i, v in enumerate(values)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def produce(bootstrap: str, records: list[Any]) -> None:
    """Put records (dicts, or raw bytes for poison) on the enriched topic."""
    values = [r if isinstance(r, bytes) else encode(r) for r in records]
    asyncio.run(_produce(bootstrap, values))


def dead_letters(bootstrap: str, expected: int, timeout: float = 30) -> list[bytes]:
    """Read the dead-letter topic until `expected` records arrived."""

    async def read() -> list[bytes]:
        consumer = AIOKafkaConsumer(
            topic("dead_letter").name, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < expected and time.monotonic() < deadline:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(m.value for m in messages)
        finally:
            await consumer.stop()
        return out

    return asyncio.run(read())


@pytest.fixture(params=["chdb", "server"])
def sink_url(request: pytest.FixtureRequest) -> str | None:
    """Each ClickHouse a sink writes to: chdb (None) and the 18.16 server (its URL)."""
    return request.getfixturevalue("ch_url") if request.param == "server" else None


@contextmanager
def running_sink(
    bootstrap: str, url: str | None, data_dir: Path, env: dict[str, str] | None = None
) -> Iterator[Pipeline]:
    """A sink process (no gateway or processor), stopped on exit."""
    pipeline = Pipeline(bootstrap, url, data_dir, env).start("sink")
    try:
        yield pipeline
    finally:
        pipeline.stop()


@pytest.fixture
def sink_only(sink_url: str | None, fresh_broker: str, data_dir: Path) -> Iterator[Pipeline]:
    """A sink process on each ClickHouse."""
    with running_sink(fresh_broker, sink_url, data_dir) as pipeline:
        yield pipeline


def wait_counts(pipeline: Pipeline, n: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    counts: tuple[int, ...] = ()
    while time.monotonic() < deadline:
        try:
            counts = pipeline.counts()
        except RuntimeError as error:  # only "not there yet" is polled through
            if not not_ready(str(error)):
                raise
            counts = ()
        if counts == (n, n, n):
            return
        time.sleep(0.5)
    raise AssertionError(f"counts {counts}, expected {n} in events, daily_rollup, sessions")


def test_redelivered_batch_changes_no_count(sink_only: Pipeline) -> None:
    records = [enriched(i) for i in range(300)]
    produce(sink_only.bootstrap, records)
    wait_counts(sink_only, 300)
    produce(sink_only.bootstrap, records[100:200])  # the same batch again, by hand
    produce(sink_only.bootstrap, [enriched(300)])  # lands after the redelivery: a marker
    sink_only.wait_for("SELECT count() FROM events WHERE event_id = 'e300'", "1\n")
    wait_counts(sink_only, 301)
    sessions = sink_only.sql(
        "SELECT count() FROM (SELECT session_id FROM sessions GROUP BY session_id)"
    )
    assert int(sessions) == len({r["session_id"] for r in [*records, enriched(300)]})


def test_refused_and_undecodable_rows_go_to_dead_letter(sink_only: Pipeline) -> None:
    """Single-event records and envelopes on one topic (a rolling upgrade): a poison record or
    event is dead-lettered alone; its envelope-mates land."""
    records: list[Any] = [enriched(i) for i in range(20)]
    records.insert(5, enriched(1000, source_confidence="not a number"))
    records.insert(9, b"\xff{not json")
    records.insert(12, encode({"event_id": "missing fields"}))
    produce(sink_only.bootstrap, records)
    mates: list[Any] = [enriched(i) for i in range(20, 40)]
    mates.insert(3, enriched(1001, source_confidence="not a number"))
    mates.insert(8, {"event_id": "missing fields in an envelope"})
    produce(sink_only.bootstrap, [envelope([encode(r) for r in mates])])  # flows on
    wait_counts(sink_only, 40)
    letters = dead_letters(sink_only.bootstrap, 5)
    assert len(letters) == 5
    text = b"\n".join(letters).decode()
    assert "clickhouse refused" in text and '"event_id":"e1000"' in text
    assert '"event_id":"e1001"' in text
    assert text.count("undecodable") == 3 and "missing fields in an envelope" in text


def test_batch_spanning_more_months_than_one_insert_may_touch_lands(
    sink_url: str | None, fresh_broker: str, data_dir: Path
) -> None:
    """130 months in one batch: ClickHouse (since 19.x; not 18.16) refuses an insert creating
    more than 100 partitions, which is not the rows' fault; the batch still lands, and flows on."""
    spanning = [enriched(i, timestamp=T0 - i * MONTH_MS) for i in range(130)]
    env = {"MILLIMETRIC_SINK_BATCH_SECONDS": "3"}  # so the 130 rows share one insert
    with running_sink(fresh_broker, sink_url, data_dir, env) as sink:
        produce(fresh_broker, spanning)
        produce(fresh_broker, [enriched(i) for i in range(130, 150)])
        wait_counts(sink, 150)
        months = sink.sql("SELECT uniqExact(toYYYYMM(timestamp)) FROM events")
        assert int(months) >= 130


def test_row_that_keeps_failing_goes_to_dead_letter(
    fresh_broker: str, ch_url: str, data_dir: Path
) -> None:
    """A decodable row with `url: null`: clickhouse-driver fails on it with an AttributeError,
    which carries no ClickHouse code. After a bounded number of attempts it is dead-lettered with
    the reason; the rest of its batch lands and later batches flow. (chdb stores that null as an
    empty string, and every refusal of chdb we found carries a content code: see the test above.)"""
    records = [enriched(i) for i in range(20)]
    records.insert(7, enriched(1000, url=None))
    env = {
        "MILLIMETRIC_SINK_BATCH_SECONDS": "2",
        "MILLIMETRIC_SINK_RETRY_MAX_S": "0.5",
        "MILLIMETRIC_SINK_INSERT_ATTEMPTS": "3",
    }
    with running_sink(fresh_broker, ch_url, data_dir, env) as sink:
        produce(fresh_broker, records)
        wait_counts(sink, 20)
        produce(fresh_broker, [enriched(i) for i in range(20, 40)])
        wait_counts(sink, 40)
    letters = [decode(v) for v in dead_letters(fresh_broker, 1)]
    assert len(letters) == 1
    assert letters[0]["stage"] == "sink" and letters[0]["record"]["event_id"] == "e1000"
    assert "NoneType" in letters[0]["reason"]


PARTITIONS = "DB::Exception: Too many partitions for single INSERT block (more than 100)."


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ServerException(PARTITIONS, 252), "partitions"),
        (RuntimeError(f"Code: 252. {PARTITIONS}"), "partitions"),  # chdb: the code in the text
        (
            ServerException("DB::Exception: Too many parts (300). Merges are slower", 252),
            "transient",
        ),
        (NetworkError("Connection refused (127.0.0.1:9000)"), "transient"),
        (ConnectionResetError(104, "Connection reset by peer"), "transient"),
        (EOFError("Unexpected EOF while reading bytes"), "transient"),
        (ServerException("DB::Exception: Memory limit exceeded", 241), "transient"),
        (ServerException("DB::Exception: Type mismatch", 53), "content"),
        (RuntimeError("Code: 800. DB::Exception: Python data handling Error"), "content"),
        (TypeError("unsupported operand type(s)"), "content"),
        (AttributeError("'NoneType' object has no attribute 'encode'"), "unknown"),
        (ServerException("DB::Exception: Logical error", 49), "unknown"),
    ],
)
def test_what_an_insert_error_says_about_the_rows(error: Exception, kind: str) -> None:
    assert refusal(error) == kind


def test_kill_9_sink_repeatedly_while_events_flow(
    fresh_broker: str, ch_url: str, data_dir: Path
) -> None:
    """Two sinks share the partitions; one is killed -9 at random points, three times."""
    pipeline = Pipeline(
        fresh_broker, ch_url, data_dir, {"MILLIMETRIC_SINK_BATCH_ROWS": "400"}
    ).start("sink")
    (data_dir / "b").mkdir()
    second = Pipeline(fresh_broker, ch_url, data_dir / "b").start("sink")
    n = 6000

    def flow() -> None:
        for k in range(0, n, 500):
            produce(fresh_broker, [enriched(i) for i in range(k, k + 500)])
            time.sleep(0.3)

    flowing = threading.Thread(target=flow)
    flowing.start()
    rng = random.Random(7)
    try:
        for _ in range(3):
            time.sleep(rng.uniform(0.5, 2.5))
            pipeline.stages["sink"].stop(kill=True)
            pipeline.stages["sink"].start()
        flowing.join()
        wait_counts(pipeline, n, timeout=120)
    finally:
        flowing.join()
        pipeline.stop()
        second.stop()


def test_clickhouse_outage_under_load(
    fresh_broker: str, ch_server: str | ClickHouseServer, ch_url: str, data_dir: Path
) -> None:
    if not isinstance(ch_server, ClickHouseServer):
        pytest.skip("an external ClickHouse cannot be stopped by the tests")
    pipeline = Pipeline(
        fresh_broker, ch_url, data_dir, {"MILLIMETRIC_SINK_RETRY_MAX_S": "1"}
    ).start("sink")
    log = data_dir / "sink.log"
    try:
        produce(fresh_broker, [enriched(i) for i in range(1000)])
        wait_counts(pipeline, 1000)
        ch_server.stop()
        try:
            produce(fresh_broker, [enriched(i) for i in range(1000, 3000)])
            # The sink retries its insert against the stopped server (the shared policy's log).
            wait_log(log, "clickhouse_insert failed (attempt 2", timeout=90)
        finally:  # the session's server, whatever happens
            ch_server.start()
        produce(fresh_broker, [enriched(i) for i in range(3000, 4000)])
        wait_counts(pipeline, 4000, timeout=120)
    finally:
        pipeline.stop()


def wait_log(log: Path, text: str, timeout: float) -> None:
    """Wait until a stage's log holds `text`."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{log.name} never said {text!r}"
        time.sleep(0.5)


def test_envelope_added_in_bulk_as_one_by_one_or_not_at_all() -> None:
    """A batch takes an envelope's rows in one go, the same columns as event by event; one
    incomplete event (a heartbeat, a poison event) grows no column, for the per-event path."""
    from sinks.batch import EVENT_FIELDS, EventBatch

    events: list[Any] = [
        {**{name: f"{name}-{i}" for name in EVENT_FIELDS}, "version": i % 2} for i in range(5)
    ]
    del events[3]["version"]
    bulk, single = EventBatch(), EventBatch()
    assert bulk.add_all(events)
    for event in events:
        single.add(event)
    assert bulk.columns == single.columns and bulk.rows == single.rows == 5
    for poison in ({"v": 1, "type": "heartbeat", "sent_at": 1}, "not an object"):
        assert not bulk.add_all([events[0], poison])
        assert bulk.columns == single.columns and bulk.rows == 5
