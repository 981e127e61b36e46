"""Kafka's partitioning (ingest.partitioner) and the processor's batch publisher."""

from __future__ import annotations

import asyncio
import random
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from ingest.partitioner import kafka_partitioner, murmur2, partition_for
from processors.batch_publisher import BatchPublisher


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
        await BatchPublisher(producer, topic, partitions).publish(records)
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
