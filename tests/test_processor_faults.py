"""The processor as a process against the real broker: records it cannot forward, dead letters,
identity links it cannot publish, the devices-per-user cap, and its tables across a restart.

Raw records are produced straight onto the raw topic (as a foreign or buggy writer could), one
producer batch per step under test, so the processor takes them as one step."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.services import Proc, stage
from ingest.dev import EmbeddedBroker
from ingest.partitioner import partition_for
from ingest.records import decode, encode
from ingest.topics import ensure_topics, topic
from tests.services import stage_env

RAW, ENRICHED, DEAD = topic("raw"), topic("enriched"), topic("dead_letter")
IP = "198.51.100.23"
TABLES_DIR = "processor-tables"  # under MILLIMETRIC_DATA_DIR, as the README says


def raw_event(anonymous_id: str, **fields: Any) -> dict[str, Any]:
    """A raw track event as the gateway publishes it."""
    now = int(time.time() * 1000)
    return {
        "v": 1,
        "type": "track",
        "project": "demo",
        "event_id": uuid.uuid4().hex,
        "event": "page",
        "timestamp": now,
        "received_at": now,
        "anonymous_id": anonymous_id,
        "user_id": None,
        "session_id": None,
        "url": "https://example.com/",
        "path": "/",
        "referrer": None,
        "properties": {},
        "context": {"ip": IP, "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0"},
        **fields,
    }


def key(anonymous_id: str) -> bytes:
    return f"demo:{anonymous_id}".encode()


async def produce(bootstrap: str, anonymous_id: str, values: list[bytes]) -> None:
    """`values` under one visitor's key, as one producer batch (so one processor step)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False,
        max_request_size=8 << 20, max_batch_size=8 << 20,
    )  # fmt: skip
    await producer.start()
    try:
        batch = producer.create_batch()
        for value in values:
            assert batch.append(key=key(anonymous_id), value=value, timestamp=None) is not None
        partition = partition_for(key(anonymous_id), RAW.partitions)
        await (await producer.send_batch(batch, RAW.name, partition=partition))
    finally:
        await producer.stop()


async def wait_for(
    bootstrap: str, name: str, found: Callable[[list[dict[str, Any]]], bool], timeout: float = 90
) -> list[dict[str, Any]]:
    """Read `name` from the start until `found(records)` holds; the records read."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_bytes=16 << 20,
        max_partition_fetch_bytes=8 << 20,
    )  # fmt: skip
    await consumer.start()
    partitions = await consumer._client._wait_on_metadata(name)
    consumer.assign([TopicPartition(name, p) for p in partitions])
    records: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while not found(records):
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    records += [decode(m.value) for m in messages]
    finally:
        await consumer.stop()
    return records


def ids(records: list[dict[str, Any]]) -> set[str]:
    return {r["event_id"] for r in records if "event_id" in r}


def letters_about(event_id: str) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """The dead letters that mention `event_id`."""
    return lambda records: [r for r in records if event_id in encode(r).decode()]


class Processor:
    """A broker of its own and a `millimetric processor` on it."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root, self.env = root, env
        self.broker, self.proc = self.start()

    def start(self) -> tuple[EmbeddedBroker, Proc]:
        broker = EmbeddedBroker().start()
        asyncio.run(ensure_topics(broker.bootstrap))  # as the table says, before any write
        env = stage_env(
            {
                "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                "MILLIMETRIC_KAFKA_IDEMPOTENCE": "false",
                "MILLIMETRIC_IP_SALT": "test-salt",
                "MILLIMETRIC_DATA_DIR": str(self.root),
                "MILLIMETRIC_LOG_LEVEL": "WARNING",
                **self.env,
            }
        )
        return broker, stage("processor", env, self.root).start()

    def restart_on_a_fresh_broker(self) -> None:
        """Stop both; start the processor again, on the same data dir, with a broker that has
        none of the changelogs (as `dev`'s in-memory broker after a restart)."""
        self.stop()
        self.broker, self.proc = self.start()

    def stop(self) -> None:
        self.proc.stop()
        self.broker.stop()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run(coroutine)

    def log(self) -> str:
        return (self.root / "processor.log").read_text()


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processor]:
    p = Processor(tmp_path_factory.mktemp("processor"))
    yield p
    p.stop()


def test_a_dead_letter_the_broker_refuses_does_not_ack_its_step(processor: Processor) -> None:
    """Item: a step is acked only once every record is forwarded or dead-lettered. The poison
    record's dead letter (its text, JSON-escaped, past the broker's 1 MiB) used to raise out of
    the agent, and Faust acked the whole step: both good events were lost."""
    bootstrap = processor.broker.bootstrap
    before, after = raw_event("a1"), raw_event("a1")
    poison = b'"' * 700_000 + IP.encode()
    values = [encode(before), poison, encode(after)]
    processor.run(produce(bootstrap, "a1", values))
    wanted = {before["event_id"], after["event_id"]}
    processor.run(wait_for(bootstrap, ENRICHED.name, lambda rs: wanted <= ids(rs)))
    letters = processor.run(
        wait_for(bootstrap, DEAD.name, lambda rs: any("undecodable" in r["reason"] for r in rs))
    )
    letter = next(r for r in letters if "undecodable" in r["reason"])
    assert letter["record"] is None and letter["source"]["topic"] == RAW.name


def test_a_dead_lettered_record_carries_no_ip(processor: Processor) -> None:
    """Dead letters outlive the raw topic: the IP is replaced by what enrichment derives."""
    bootstrap = processor.broker.bootstrap
    broken = raw_event("b1")
    del broken["timestamp"]  # enrichment raises on it
    processor.run(produce(bootstrap, "b1", [encode(broken)]))

    about = letters_about(broken["event_id"])
    letter = about(processor.run(wait_for(bootstrap, DEAD.name, about)))[0]
    assert IP not in encode(letter).decode()
    assert letter["reason"].startswith("enrich_failed: KeyError")
    context = letter["record"]["context"]
    assert "ip" not in context and len(context["ip_hash"]) == 32
    assert context["user_agent"] == broken["context"]["user_agent"]


def test_a_record_too_large_for_the_broker_is_dead_lettered_and_the_step_flows_on(
    processor: Processor,
) -> None:
    """An enriched record past the broker's limit (its properties' quotes, escaped twice, grow
    it past 1 MiB) cannot heal: dead-lettered with the reason, not retried forever."""
    bootstrap = processor.broker.bootstrap
    big = raw_event("c1", properties={"q": '"' * 300_000})
    good = raw_event("c1")
    processor.run(produce(bootstrap, "c1", [encode(big), encode(good)]))
    processor.run(wait_for(bootstrap, ENRICHED.name, lambda rs: good["event_id"] in ids(rs)))

    about = letters_about(big["event_id"])
    letter = about(processor.run(wait_for(bootstrap, DEAD.name, about)))[0]
    assert letter["reason"].startswith("record_too_large: MessageSizeTooLargeError")
    assert "ip" not in letter["record"]["context"]


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processor]:
    """A processor with a 2 KiB record limit and at most 2 devices per user."""
    p = Processor(
        tmp_path_factory.mktemp("capped"),
        MILLIMETRIC_PROCESSOR_MAX_RECORD_BYTES="2048",
        MILLIMETRIC_PROCESSOR_MAX_DEVICES_PER_USER="2",
    )
    yield p
    p.stop()


def test_an_identify_whose_link_is_refused_links_nothing(capped: Processor) -> None:
    """The identities table takes a link only once the links topic has it: an identify whose
    link the broker refuses is dead-lettered and stitches no later event (it used to stitch
    them while a forget of the user, which reads the links, would not find the device)."""
    bootstrap = capped.broker.bootstrap
    identify = raw_event("d1", type="identify", event="$identify", user_id="u" * 2100)
    later = raw_event("d1")
    capped.run(produce(bootstrap, "d1", [encode(identify), encode(later)]))
    enriched = capped.run(
        wait_for(bootstrap, ENRICHED.name, lambda rs: later["event_id"] in ids(rs))
    )
    assert next(r for r in enriched if r["event_id"] == later["event_id"])["user_id"] == ""
    assert identify["event_id"] not in ids(enriched)
    about = letters_about(identify["event_id"])
    letter = about(capped.run(wait_for(bootstrap, DEAD.name, about)))[0]
    assert letter["reason"].startswith("link_refused: MessageSizeTooLargeError")
    # A later step too: the table never took the link.
    again = raw_event("d1")
    capped.run(produce(bootstrap, "d1", [encode(again)]))
    enriched = capped.run(
        wait_for(bootstrap, ENRICHED.name, lambda rs: again["event_id"] in ids(rs))
    )
    assert next(r for r in enriched if r["event_id"] == again["event_id"])["user_id"] == ""


def test_devices_per_user_stop_at_the_cap(capped: Processor) -> None:
    """Two devices (the cap) are linked; the third is unlinked, logged, and not stitched."""
    bootstrap = capped.broker.bootstrap
    for device in ("cap-1", "cap-2", "cap-3"):  # in order: the links topic sees them so
        identify = raw_event(device, type="identify", event="$identify", user_id="carla")
        capped.run(produce(bootstrap, device, [encode(identify)]))
        capped.run(
            wait_for(bootstrap, ENRICHED.name, lambda rs, i=identify: i["event_id"] in ids(rs))
        )

    def unlinked(records: list[dict[str, Any]]) -> bool:
        return any(r.get("type") == "unlink" and r["anonymous_id"] == "cap-3" for r in records)

    capped.run(wait_for(bootstrap, RAW.name, unlinked))
    tracks = {device: raw_event(device) for device in ("cap-2", "cap-3")}
    for device, event in tracks.items():
        capped.run(produce(bootstrap, device, [encode(event)]))
    wanted = {event["event_id"] for event in tracks.values()}
    enriched = capped.run(wait_for(bootstrap, ENRICHED.name, lambda rs: wanted <= ids(rs)))
    user = {r["anonymous_id"]: r["user_id"] for r in enriched if r["event_id"] in wanted}
    assert user == {"cap-2": "carla", "cap-3": ""}
    # A forget of the user finds exactly the devices the processor still stitches.
    forget = {
        "v": 1, "forget_id": uuid.uuid4().hex, "project": "demo", "user_id": "carla",
        "anonymous_id": None, "suppress": False, "received_at": int(time.time() * 1000),
    }  # fmt: skip
    capped.run(produce_to(bootstrap, "forgets", b"demo:carla", encode(forget)))
    erasures = capped.run(
        wait_for(bootstrap, topic("erasures").name, lambda rs: forget["forget_id"] in str(rs))
    )
    erasure = next(r for r in erasures if r["forget_id"] == forget["forget_id"])
    assert erasure["anonymous_ids"] == ["cap-1", "cap-2"]
    assert "(the cap): unlinking one" in capped.log()


async def produce_to(bootstrap: str, role: str, record_key: bytes, value: bytes) -> None:
    """One record onto the topic of `role`."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topic(role).name, value, key=record_key)
    finally:
        await producer.stop()


@pytest.mark.parametrize(("store", "remembered"), [("rocksdb", "rita"), ("memory", "")])
def test_tables_survive_a_restart_without_their_changelog(
    tmp_path: Path, store: str, remembered: str
) -> None:
    """RocksDB (the default) keeps the tables in files under the data dir: a restarted worker has
    them with no changelog to replay. The memory store, still there for tests, has nothing."""
    p = Processor(tmp_path, MILLIMETRIC_PROCESSOR_TABLE_STORE=store)
    try:
        identify = raw_event("r1", type="identify", event="$identify", user_id="rita")
        p.run(produce(p.broker.bootstrap, "r1", [encode(identify)]))
        p.run(
            wait_for(p.broker.bootstrap, ENRICHED.name, lambda rs: identify["event_id"] in ids(rs))
        )
        p.restart_on_a_fresh_broker()
        stores = list((tmp_path / TABLES_DIR).glob("**/identities-*.db"))
        assert len(stores) == (RAW.partitions if store == "rocksdb" else 0)
        later = raw_event("r1")
        p.run(produce(p.broker.bootstrap, "r1", [encode(later)]))
        enriched = p.run(
            wait_for(p.broker.bootstrap, ENRICHED.name, lambda rs: later["event_id"] in ids(rs))
        )
        assert [r["user_id"] for r in enriched] == [remembered]
    finally:
        p.stop()


def test_no_identify_of_a_busy_stream_is_lost(processor: Processor) -> None:
    """Tables are pointed at each event without touching the stream's `current_event`, which
    take_events pairs buffered values with: setting it per identify used to repeat one event
    of a step and lose another while the next step was filling (~0.7% of identifies)."""
    bootstrap = processor.broker.bootstrap
    events = [
        raw_event(f"busy-{i}", type="identify", event="$identify", user_id=f"busy-user-{i // 3}")
        for i in range(5_000)
    ]
    processor.run(produce_many(bootstrap, events))
    wanted = {event["event_id"] for event in events}
    # Every one arrives (repeats would be allowed: at-least-once).
    processor.run(wait_for(bootstrap, ENRICHED.name, lambda rs: wanted <= ids(rs), timeout=120))


async def produce_many(bootstrap: str, events: list[dict[str, Any]]) -> None:
    """Each event under its visitor's key, as a gateway under load would."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        sent = [
            await producer.send(RAW.name, encode(e), key=key(e["anonymous_id"])) for e in events
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
