"""Kafka's partitioning (ingest.partitioner) and the processor's batch publisher."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from ingest.metrics import RETRIES
from ingest.partitioner import kafka_partitioner, murmur2, partition_for
from ingest.records import decode, encode
from millimetric_app.embedded import EmbeddedBroker, free_port
from processors.batch_publisher import BatchPublisher
from processors.step import DeadLetters, StepPublisher


def test_murmur2_is_kafkas() -> None:
    rng = random.Random(7)
    for length in range(300):  # every tail length, keys longer than the precomputed structs
        data = rng.randbytes(length)
        assert murmur2(data) == aiokafka_murmur2(data), length
    # Known values of the Java client's Utils.murmur2 (from Kafka's UtilsTest).
    assert murmur2(b"21") == -973932308 & 0xFFFFFFFF
    assert murmur2(b"abc") == 479470107


def test_partition_for_is_kafkas_default_partitioner() -> None:
    partitions = list(range(12))
    for i in range(2_000):
        key = f"demo:{uuid.uuid4()}:{i}".encode()
        expected = DefaultPartitioner()(key, partitions, partitions)
        assert partition_for(key, 12) == expected
        assert kafka_partitioner(key, partitions, partitions[:3]) == expected


async def _publish_and_read(bootstrap: str, max_batch_size: int) -> None:
    topic, partitions = f"publisher-{uuid.uuid4().hex[:8]}", 4
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    # 40 keys, 25 records each, ~200 bytes a record: many builders fill up at 2 KiB.
    records = [(f"k{i % 40}".encode(), f"{i:06d}".encode() + b"x" * 200) for i in range(1_000)]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False,
        max_batch_size=max_batch_size,
    )  # fmt: skip
    await producer.start()
    try:
        await BatchPublisher(producer, topic, 1_048_576).publish(records)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    seen: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in range(partitions)}
    try:
        async with asyncio.timeout(30):
            while sum(map(len, seen.values())) < len(records):
                for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                    seen[tp.partition] += [(m.key, m.value) for m in messages]
    finally:
        await consumer.stop()
    for p in range(partitions):
        expected = [r for r in records if partition_for(r[0], partitions) == p]
        assert seen[p] == expected  # all there, on Kafka's partition, in publishing order


def test_every_record_lands_in_order_on_its_partition(broker: str) -> None:
    asyncio.run(_publish_and_read(broker, max_batch_size=2_048))


def test_one_record_batches(broker: str) -> None:
    asyncio.run(_publish_and_read(broker, max_batch_size=1))


class CuttableLink:
    """A TCP proxy in front of the broker: `cut()` drops every connection and refuses new
    ones (a network outage; the broker keeps its data), `restore()` lets clients back in."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port, self.target_port = port, target_port
        self.up = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.up = False
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


async def _publish_across_outage(broker: EmbeddedBroker, link: CuttableLink) -> None:
    """A step of forwarded records and dead letters, published while the link is down."""
    await link.start()
    topics = {"enriched": "outage", "links": "outage-links", "dead": "outage-dead"}
    records = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(200)]
    letters = [encode({"stage": "processor", "reason": f"poison {i}"}) for i in range(20)]
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 4, 1) for name in topics.values()])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=False,
        request_timeout_ms=1_000, retry_backoff_ms=100,
    )  # fmt: skip
    await producer.start()
    publisher = StepPublisher(producer, 1_048_576, *topics.values())
    dead = DeadLetters()
    for letter in letters:
        dead.add("undecodable", letter)

    async def step() -> None:
        # What the raw agent does after enriching a step; take_events acks once it returns.
        await publisher.publish(publisher.enriched, records, lambda i, e: None)
        await publisher.publish_dead_letters(dead)

    retries = RETRIES.labels("processor publish")._value.get()
    try:
        link.cut()
        publishing = asyncio.create_task(step())
        # Several failed attempts under the shared policy (1 s request timeout each)...
        async with asyncio.timeout(90):
            while RETRIES.labels("processor publish")._value.get() < retries + 2:
                await asyncio.sleep(0.2)
        assert not publishing.done()  # ...still holding the step: nothing acked, nothing dropped
        link.restore()
        await asyncio.wait_for(publishing, 90)
    finally:
        await producer.stop()
    got = await _read_all(broker.bootstrap, topics["enriched"], len(records))
    assert set(got) == set(records)  # every record, repeats allowed (the sink deduplicates)
    dead_got = await _read_all(broker.bootstrap, topics["dead"], len(letters))
    assert {decode(v)["reason"] for _, v in dead_got} == {f"poison {i}" for i in range(20)}
    await link.close()


async def _read_all(bootstrap: str, topic: str, count: int) -> list[tuple[bytes, bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(4)])
    got: list[tuple[bytes, bytes]] = []
    try:
        async with asyncio.timeout(30):
            while len(set(got)) < count:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    got += [(m.key, m.value) for m in messages]
    finally:
        await consumer.stop()
    return got


def test_a_step_published_during_an_outage_lands_when_the_broker_is_back() -> None:
    """Forwarded records and dead letters alike: the step is held (never acked) through the
    outage, however long, and everything lands once the broker is reachable again."""
    broker_port, link_port = free_port(), free_port()
    broker = EmbeddedBroker(broker_port, advertised_port=link_port).start()
    try:
        asyncio.run(_publish_across_outage(broker, CuttableLink(link_port, broker_port)))
    finally:
        broker.stop()
