"""The processor as a process against the real broker: records it cannot forward, dead letters,
identity links it cannot publish, the devices-per-user cap, its tables across a restart, and
forgets published through a broker outage.

Raw records are produced straight onto the raw topic (as a foreign or buggy writer could), one
producer batch per step under test, so the processor takes them as one step."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.services import Proc, stage
from ingest.partitioner import partition_for
from ingest.records import encode, envelope, raw_records
from ingest.topics import ensure_topics, topic
from millimetric_app.embedded import EmbeddedBroker, free_port
from tests.services import stage_env
from tests.test_batch_publisher import CuttableLink

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
                    records += [r for m in messages for r in raw_records(m.value)]
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
    forget = forget_of("carla")
    capped.run(produce_to(bootstrap, "forgets", b"demo:carla", encode(forget)))
    erasures = capped.run(
        wait_for(bootstrap, topic("erasures").name, lambda rs: forget["forget_id"] in str(rs))
    )
    erasure = next(r for r in erasures if r["forget_id"] == forget["forget_id"])
    assert erasure["anonymous_ids"] == ["cap-1", "cap-2"]
    assert "(the cap): unlinking one" in capped.log()


def forget_of(user_id: str) -> dict[str, Any]:
    """A forget request of `user_id`, as the gateway puts it on the forgets topic."""
    return {
        "v": 1, "forget_id": uuid.uuid4().hex, "project": "demo", "user_id": user_id,
        "anonymous_id": None, "suppress": False, "received_at": int(time.time() * 1000),
    }  # fmt: skip


def test_a_forget_just_after_an_identify_finds_its_device(processor: Processor) -> None:
    """The identifies are processed (their enriched records are out, so their links are on the
    broker) before the forgets are sent: every erasure must name the user's device, however
    soon after its link the forget comes (read from another topic, it could come first)."""
    bootstrap = processor.broker.bootstrap
    users = [f"quick-{uuid.uuid4().hex[:8]}-{i}" for i in range(6)]
    identifies = [
        raw_event(f"{user}-dev", type="identify", event="$identify", user_id=user) for user in users
    ]
    for identify in identifies:
        processor.run(produce(bootstrap, identify["anonymous_id"], [encode(identify)]))
    wanted = {identify["event_id"] for identify in identifies}
    processor.run(wait_for(bootstrap, ENRICHED.name, lambda rs: wanted <= ids(rs)))
    forgets = {user: forget_of(user) for user in users}

    async def send_forgets() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            for user, forget in forgets.items():
                name, key = topic("forgets").name, f"demo:{user}".encode()
                await producer.send(name, encode(forget), key=key)
        finally:
            await producer.stop()

    processor.run(send_forgets())
    forget_ids = {forget["forget_id"] for forget in forgets.values()}
    erasures = processor.run(
        wait_for(
            bootstrap,
            topic("erasures").name,
            lambda rs: forget_ids <= {r.get("forget_id") for r in rs},
        )
    )
    devices = {r["user_id"]: r["anonymous_ids"] for r in erasures if r["forget_id"] in forget_ids}
    assert devices == {user: [f"{user}-dev"] for user in users}


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


async def _forgets_across_an_outage(broker: EmbeddedBroker, link: CuttableLink, root: Path) -> str:
    """Forgets of unknown users (no table writes: only the forward and the erasure are sent),
    and the processor's link to the broker cut while it publishes them; its log."""
    await link.start()
    bootstrap = broker.bootstrap
    await ensure_topics(bootstrap)
    # Faust's producer waits this long for an ack before failing a send (20 min by default).
    env = stage_env(
        {
            "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "MILLIMETRIC_KAFKA_IDEMPOTENCE": "false",
            "MILLIMETRIC_IP_SALT": "test-salt",
            "MILLIMETRIC_DATA_DIR": str(root),
            "MILLIMETRIC_LOG_LEVEL": "WARNING",
            "PRODUCER_REQUEST_TIMEOUT": "2",
        }
    )
    proc = stage("processor", env, root).start()
    try:
        now = int(time.time() * 1000)
        forgets = [
            {"v": 1, "forget_id": uuid.uuid4().hex, "project": "demo", "user_id": f"u{i}",
             "anonymous_id": None, "suppress": False, "received_at": now}
            for i in range(150)
        ]  # fmt: skip
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            for forget in forgets:
                key = f"demo:{forget['user_id']}".encode()
                await producer.send(topic("forgets").name, encode(forget), key=key)
            await producer.flush()
        finally:
            await producer.stop()
        wanted = {forget["forget_id"] for forget in forgets}

        def resolved(records: list[dict[str, Any]]) -> set[str]:
            return wanted & {r["forget_id"] for r in records}

        # Cut once the first erasure is out: the rest are being forwarded and published.
        first = await wait_for(bootstrap, topic("erasures").name, lambda rs: bool(resolved(rs)))
        assert len(resolved(first)) < len(wanted), "all were published before the cut"
        link.cut()
        await asyncio.sleep(6)  # past the producer's 2 s: its sends fail
        link.restore()
        await wait_for(bootstrap, topic("erasures").name, lambda rs: resolved(rs) == wanted, 120)
    finally:
        proc.stop()
        await link.close()
    return (root / "processor.log").read_text()


@pytest.mark.skipif(
    bool(os.environ.get("MILLIMETRIC_TEST_KAFKA")), reason="runs its own broker behind a link"
)
def test_forgets_published_during_a_broker_outage_are_retried_until_done(tmp_path: Path) -> None:
    """A forget whose forward or erasure the broker fails is published again once it is back,
    never dropped (Faust acks the forget when the agent's body raises)."""
    broker_port, link_port = free_port(), free_port()
    broker = EmbeddedBroker(broker_port, advertised_port=link_port).start()
    try:
        log = asyncio.run(
            _forgets_across_an_outage(broker, CuttableLink(link_port, broker_port), tmp_path)
        )
    finally:
        broker.stop()
    assert "forget forward failed" in log or "forget publish failed" in log  # a retry happened


def same_partition_as(anonymous_id: str) -> str:
    """Another visitor whose events share `anonymous_id`'s raw partition."""
    home = partition_for(key(anonymous_id), RAW.partitions)
    return next(
        other
        for n in range(1000)
        if partition_for(key(other := f"{anonymous_id}-mate-{n}"), RAW.partitions) == home
    )


def test_a_poison_event_in_an_envelope_is_dead_lettered_alone(processor: Processor) -> None:
    """One bad event never costs its envelope-mates: they are enriched, it is dead-lettered
    with its place in the envelope."""
    bootstrap = processor.broker.bootstrap
    first, last = raw_event("env-1"), raw_event("env-1")
    broken = raw_event("env-1")
    del broken["timestamp"]  # enrichment raises on it
    value = envelope([encode(first), encode(broken), b"42", encode(last)])
    processor.run(produce(bootstrap, "env-1", [value]))
    wanted = {first["event_id"], last["event_id"]}
    enriched = processor.run(wait_for(bootstrap, ENRICHED.name, lambda rs: wanted <= ids(rs)))
    assert broken["event_id"] not in ids(enriched)
    about = letters_about(broken["event_id"])
    letter = about(processor.run(wait_for(bootstrap, DEAD.name, about)))[0]
    assert letter["reason"].startswith("enrich_failed: KeyError")
    assert letter["source"]["index"] == 1 and "ip" not in letter["record"]["context"]

    def not_an_object(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rs if "not an object" in r.get("reason", "")]

    stub = not_an_object(processor.run(wait_for(bootstrap, DEAD.name, not_an_object)))[0]
    assert stub["source"]["index"] == 2 and stub["record"] is None


def test_a_raw_topic_holding_v1_records_and_envelopes_keeps_order_and_identities(
    processor: Processor,
) -> None:
    """A rolling upgrade: a partition holds single-event records (v1) from old gateways and
    envelopes (v2) from new ones. Each visitor's events come out in their order, and an identify
    inside an envelope keyed by another visitor stitches its own visitor's later events (the
    identities table is keyed per event, co-partitioned with the raw topic as before)."""
    bootstrap = processor.broker.bootstrap
    visitor = "mixed-1"
    mate = same_partition_as(visitor)
    events = [raw_event(visitor, event=f"step-{n}") for n in range(6)]
    identify = raw_event(visitor, type="identify", event="$identify", user_id="mixed-user")
    mate_event = raw_event(mate)
    values = [
        encode(events[0]),
        envelope([encode(events[1]), encode(events[2])]),
        envelope([encode(mate_event), encode(identify), encode(events[3])]),  # keyed by the mate
        encode(events[4]),
    ]
    processor.run(produce(bootstrap, visitor, values[:2] + values[3:]))
    processor.run(produce(bootstrap, mate, [values[2]]))
    processor.run(produce(bootstrap, visitor, [envelope([encode(events[5])])]))
    wanted = {e["event_id"] for e in events} | {mate_event["event_id"], identify["event_id"]}
    enriched = processor.run(wait_for(bootstrap, ENRICHED.name, lambda rs: wanted <= ids(rs)))
    mine = [r for r in enriched if r["anonymous_id"] == visitor and r["type"] == "track"]
    # The partition's order: 0, 1, 2, 4, then (after the identify, in the mate's envelope) 3, 5.
    assert [r["event"] for r in mine] == [f"step-{n}" for n in (0, 1, 2, 4, 3, 5)]
    by_event = {r["event"]: r["user_id"] for r in mine}
    assert by_event["step-3"] == by_event["step-5"] == "mixed-user"
    assert by_event["step-0"] == by_event["step-4"] == ""


def test_replaying_the_raw_topic_as_envelopes_yields_the_same_rows(processor: Processor) -> None:
    """Events taken first as single-event records (v1), then again as one envelope (a replay
    of the raw topic after the upgrade) enrich to the same records, which the sink collapses by
    event_id: rebuilding from the raw topic yields the same rows."""
    bootstrap = processor.broker.bootstrap
    visitor, mate = "replay-1", same_partition_as("replay-1")
    events = [raw_event(visitor if n % 2 else mate, event=f"r{n}") for n in range(6)]
    wanted = {e["event_id"] for e in events}

    def twice(records: list[dict[str, Any]]) -> bool:
        return all(sum(r.get("event_id") == i for r in records) == 2 for i in wanted)

    processor.run(produce(bootstrap, visitor, [encode(e) for e in events]))
    processor.run(wait_for(bootstrap, ENRICHED.name, lambda rs: wanted <= ids(rs)))
    processor.run(produce(bootstrap, mate, [envelope([encode(e) for e in events])]))
    enriched = processor.run(wait_for(bootstrap, ENRICHED.name, twice))
    for event_id in wanted:
        first, again = [r for r in enriched if r.get("event_id") == event_id]
        assert first == again
