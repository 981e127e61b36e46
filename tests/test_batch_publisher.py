"""The processor's batch publisher: Kafka's partitioning, order per partition, all acked."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner

from processors.batch_publisher import BatchPublisher, partition_of


def test_partition_of_is_kafkas_default_partitioner() -> None:
    partitions = list(range(12))
    for i in range(2_000):
        key = f"demo:{uuid.uuid4()}:{i}".encode()
        assert partition_of(key, 12) == DefaultPartitioner()(key, partitions, partitions)


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
        expected = [r for r in records if partition_of(r[0], partitions) == p]
        assert seen[p] == expected  # all there, on Kafka's partition, in publishing order


def test_every_record_lands_in_order_on_its_partition(broker: str) -> None:
    asyncio.run(_publish_and_read(broker, max_batch_size=2_048))


def test_one_record_batches(broker: str) -> None:
    asyncio.run(_publish_and_read(broker, max_batch_size=1))
