"""Erasures carried out by a real sink process (chdb and the 18.16 server) on a real broker:
enriched events and resolved erasures are put on their topics directly, as the processor would."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.services import produce
from ingest.records import encode
from ingest.topics import TOPICS, ensure_topics, topic
from sinks.batch import EVENT_FIELDS
from tests.services import Pipeline, kafka_broker

ENV = {"MILLIMETRIC_FORGET_GRACE_S": "0.2", "MILLIMETRIC_SINK_BATCH_SECONDS": "0.2"}


@pytest.fixture(params=["chdb", "server"])
def store(request: pytest.FixtureRequest) -> str | None:
    """The sink's ClickHouse: embedded chdb (None) or a fresh database on the 18.16 server."""
    return request.getfixturevalue("ch_url") if request.param == "server" else None


@pytest.fixture
def sink(fresh_broker: str, store: str | None, data_dir: Path) -> Iterator[Pipeline]:
    asyncio.run(ensure_topics(fresh_broker))
    p = Pipeline(fresh_broker, store, data_dir, ENV).start("sink")
    p.wait_for("SELECT count() FROM forget_audit", "0\n")  # migrated and serving
    yield p
    p.stop()


def event(anonymous_id: str, user_id: str = "", session_id: str = "", at: int = 0) -> dict:
    """An enriched event as the processor publishes it."""
    record: dict[str, object] = {name: "" for name in EVENT_FIELDS}
    now = at or int(time.time() * 1000)
    record |= {
        "project": "demo",
        "event_id": uuid.uuid4().hex,
        "type": "track",
        "event": "page",
        "timestamp": now,
        "received_at": now,
        "anonymous_id": anonymous_id,
        "user_id": user_id,
        "session_id": session_id or f"{anonymous_id}-1",
        "properties": "{}",
        "source_confidence": 1.0,
        "is_bot": False,
    }
    return record


def erasure(
    user_id: str | None = None, devices: tuple[str, ...] = (), suppress: bool = False
) -> dict:
    """A resolved forget, as the processor puts it on the erasures topic."""
    now = int(time.time() * 1000)
    return {
        "v": 1,
        "forget_id": f"fgt_{uuid.uuid4().hex}",
        "project": "demo",
        "user_id": user_id,
        "anonymous_ids": sorted(devices),
        "cutoff": now,
        "suppress": suppress,
        "requested_at": now,
    }


def send(p: Pipeline, role: str, records: list[dict]) -> None:
    pairs = [
        (f"demo:{r.get('anonymous_id', r.get('forget_id'))}".encode(), encode(r)) for r in records
    ]
    asyncio.run(produce(p.bootstrap, topic(role).name, pairs))


def wait_done(p: Pipeline, forget_id: str, timeout: float = 90) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while (answer := p.forget_status(forget_id)).get("status") != "done":
        assert time.monotonic() < deadline, answer
        time.sleep(0.5)
    return answer


def test_a_forget_too_large_for_one_query_completes_and_blocks_no_other(sink: Pipeline) -> None:
    # 9,000 devices of ~40 characters: an IN list well past max_query_size (256 KiB).
    devices = tuple(f"{uuid.uuid4()}-{i}" for i in range(9_000))
    send(sink, "enriched", [event(devices[0]), event(devices[-1]), event("bystander")])
    sink.wait_for("SELECT count() FROM events", "3\n")
    big, small = erasure("many", devices), erasure("other", ("bystander",))
    send(sink, "erasures", [big, small])
    assert wait_done(sink, small["forget_id"])["events_deleted"] == 1
    assert wait_done(sink, big["forget_id"])["events_deleted"] == 2
    assert sink.sql("SELECT count() FROM events") == "0\n"


def test_shared_session_keeps_the_other_persons_rows(sink: Pipeline) -> None:
    send(
        sink, "enriched", [event("ann-phone", "ann", "shared"), event("bob-phone", "bob", "shared")]
    )
    sink.wait_for("SELECT uniqExactMerge(events) FROM sessions GROUP BY session_id", "2\n")
    forget = erasure("ann", ("ann-phone",))
    send(sink, "erasures", [forget])
    assert wait_done(sink, forget["forget_id"])["sessions_deleted"] == 1
    assert (
        sink.sql(
            "SELECT session_id, anyMerge(anonymous_id), maxMerge(user_id), uniqExactMerge(events) "
            "FROM sessions GROUP BY session_id"
        )
        == "shared\tbob-phone\tbob\t1\n"
    )


def test_sessions_go_after_the_events_expired(sink: Pipeline) -> None:
    send(sink, "enriched", [event("cid-phone", "cid"), event("cid-tablet")])
    sink.wait_for("SELECT count() FROM sessions", "2\n")
    # Retention dropped the events; the sessions built from them are still there.
    sink.sql("ALTER TABLE events DELETE WHERE 1 = 1", write=True)
    sink.wait_for("SELECT count() FROM events", "0\n")
    forget = erasure("cid", ("cid-tablet",))
    send(sink, "erasures", [forget])
    assert wait_done(sink, forget["forget_id"])["sessions_deleted"] == 2
    assert sink.sql("SELECT count() FROM sessions") == "0\n"


def test_audit_keeps_a_keyed_hash_of_the_subject(sink: Pipeline) -> None:
    forget = erasure("dora@example.com")
    send(sink, "erasures", [forget])
    wait_done(sink, forget["forget_id"])
    columns = sink.sql("SELECT name FROM system.columns WHERE table = 'forget_audit'").split()
    assert "subject_sha256" not in columns
    kept = sink.sql(
        f"SELECT subject_hmac FROM forget_audit WHERE forget_id = '{forget['forget_id']}' LIMIT 1"
    )
    key = sink.env["MILLIMETRIC_FORGET_AUDIT_KEY"].encode()
    assert kept.strip() == hmac.new(key, b"demo:dora@example.com", hashlib.sha256).hexdigest()
    assert kept.strip() != hashlib.sha256(b"demo:dora@example.com").hexdigest()


def test_a_failing_forget_is_retried_with_its_reason_and_blocks_no_other(sink: Pipeline) -> None:
    send(sink, "enriched", [event("eve-phone", "eve"), event("fay-phone", "fay")])
    sink.wait_for("SELECT count() FROM events", "2\n")
    sink.sql("DROP TABLE suppressions", write=True)  # every suppress forget now fails in ClickHouse
    failing, fine = erasure("eve", suppress=True), erasure("fay")
    send(sink, "erasures", [failing, fine])
    assert wait_done(sink, fine["forget_id"])["events_deleted"] == 1
    deadline = time.monotonic() + 60
    while not (answer := sink.forget_status(failing["forget_id"])).get("reason"):
        assert time.monotonic() < deadline, answer
        time.sleep(0.5)
    assert answer["status"] == "pending" and "code 60" in str(answer["reason"]), answer
    sink.sql(
        "CREATE TABLE suppressions (project String, kind String, id String, forget_id String, "
        "since_ms UInt64) ENGINE = ReplacingMergeTree ORDER BY (project, kind, id)",
        write=True,
    )
    assert wait_done(sink, failing["forget_id"])["events_deleted"] == 1


def test_suppression_outlives_the_erasures_topic(store: str | None, data_dir: Path) -> None:
    with kafka_broker() as first:
        asyncio.run(ensure_topics(first))
        p = Pipeline(first, store, data_dir, ENV).start("sink")
        try:
            forget = erasure("gus", ("gus-phone",), suppress=True)
            send(p, "erasures", [forget])
            wait_done(p, forget["forget_id"])
        finally:
            p.stop()
    # A fresh broker: the erasures topic no longer holds the forget (as after its retention).
    with kafka_broker() as second:
        asyncio.run(ensure_topics(second))
        p = Pipeline(second, store, data_dir, ENV)
        send(p, "enriched", [event("gus-phone"), event("other", "gus"), event("hal-phone")])
        p.start("sink")
        try:
            p.wait_for("SELECT anonymous_id FROM events", "hal-phone\n")
            time.sleep(2)  # the sink inserts in one batch; nothing of gus's may follow
            assert p.sql("SELECT anonymous_id FROM events") == "hal-phone\n"
        finally:
            p.stop()


def test_a_restarted_sink_inserts_only_after_reading_every_erasure(
    fresh_broker: str, data_dir: Path
) -> None:
    asyncio.run(ensure_topics(fresh_broker))
    p = Pipeline(fresh_broker, None, data_dir, ENV)
    # Large erasures ahead of the one that matters, so reading them all takes a while.
    filler = [erasure(f"u{i}", tuple(f"{uuid.uuid4()}" for _ in range(10_000))) for i in range(150)]
    target = erasure("ivy", ("ivy-phone",))
    target["cutoff"] += 3_600_000  # events received within the hour are erased
    send(p, "erasures", [*filler, target])
    send(p, "enriched", [event("ivy-phone") for _ in range(50)] + [event("jon-phone")])
    p.start("sink")
    try:
        p.wait_for("SELECT anonymous_id FROM events", "jon-phone\n", timeout=120)
    finally:
        p.stop()


def test_only_this_forgets_mutations_are_waited_for(sink: Pipeline) -> None:
    if sink.clickhouse_url is None:
        pytest.skip("chdb runs mutations synchronously: none can be left running")
    sink.sql("CREATE TABLE stuck (x UInt8) ENGINE = MergeTree ORDER BY x", write=True)
    sink.sql("INSERT INTO stuck SELECT 1", write=True)
    sink.sql(
        "ALTER TABLE stuck DELETE WHERE throwIf(x = 1)", write=True
    )  # fails on every try: never done
    send(sink, "enriched", [event("kim-phone", "kim")])
    sink.wait_for("SELECT count() FROM events", "1\n")
    forget = erasure("kim")
    send(sink, "erasures", [forget])
    wait_done(sink, forget["forget_id"])


def test_dead_letters_are_kept_no_longer_than_raw_events() -> None:
    # A forget cannot reach records on a Kafka topic: they expire with the raw topic's IPs.
    assert TOPICS["dead_letter"].retention_ms <= TOPICS["raw"].retention_ms


def keys_records(bootstrap: str) -> list[dict]:
    """Every record on the keys topic so far."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from ingest.records import decode

    async def read() -> list[dict]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        tp = TopicPartition(topic("keys").name, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        out: list[dict] = []
        try:
            while await consumer.position(tp) < end:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    out += [decode(m.value) for m in messages]
        finally:
            await consumer.stop()
        return out

    return asyncio.run(read())


def test_a_delete_outlasting_the_timeout_is_reported_then_finished(
    fresh_broker: str, ch_url: str, data_dir: Path
) -> None:
    asyncio.run(ensure_topics(fresh_broker))
    env = {**ENV, "MILLIMETRIC_FORGET_MUTATION_TIMEOUT_S": "0"}  # the server's deletes are async
    p = Pipeline(fresh_broker, ch_url, data_dir, env).start("sink")
    try:
        send(p, "enriched", [event("lou-phone", "lou")])
        p.wait_for("SELECT count() FROM events", "1\n")
        forget = erasure("lou")
        send(p, "erasures", [forget])
        assert wait_done(p, forget["forget_id"])["events_deleted"] == 1
        reasons = [
            r["reason"]
            for r in keys_records(fresh_broker)
            if r.get("forget_id") == forget["forget_id"] and r["status"] == "pending"
        ]
        # A delete the server finishes before the executor's first look is never reported
        # pending (a race this test cannot close on a loaded machine); one that is, says why.
        assert all("still running after 0s" in r for r in reasons[:1]), reasons
        assert p.sql("SELECT count() FROM events") == "0\n"
    finally:
        p.stop()
