"""Publish a step's records as one Kafka record batch per partition, not one future per record.

Faust's `Topic.send` and aiokafka's `send` each build a future and a coroutine per record, which
the profile showed was most of the processor's own work. Here records are appended to a batch
builder per partition and each full builder is handed to the producer whole; partitions come
from `ingest.partitioner` (Kafka's murmur2), so a key lands where `send` would have put it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

from ingest.partitioner import partition_for

# Refusals a record carries with it: sending the same record again can never succeed.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (MessageSizeTooLargeError, RecordListTooLargeError)
# Bytes a record adds to its key and value in a batch (header varints, attributes), at most.
RECORD_OVERHEAD = 64


class BatchPublisher:
    """Sends keyed records to one topic in per-partition batches and waits for every ack."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, max_record_bytes: int) -> None:
        self._producer = producer
        self._topic = topic
        self._max_record_bytes = max_record_bytes

    async def partitions(self) -> int:
        """The topic's partition count, as the cluster has it (cached metadata)."""
        return len(await self._producer.partitions_for(self._topic))

    async def publish(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        """Publish `records` in order per partition; return once the broker acked them all.

        Raises what the producer raises, so a caller that has not returned has not had its
        records acknowledged; a record over `max_record_bytes` (the producer's
        `max_request_size`, which `send` checks but `send_batch` does not) raises
        MessageSizeTooLargeError before any record is sent.
        """
        producer, topic, limit = self._producer, self._topic, self._max_record_bytes
        for key, value in records:
            if len(key) + len(value) + RECORD_OVERHEAD > limit:
                raise MessageSizeTooLargeError(f"a {len(value)}-byte record for {topic}")
        partitions = await self.partitions()  # as `send` would partition
        builders: dict[int, Any] = {}
        delivered: list[asyncio.Future[Any]] = []
        for key, value in records:
            partition = partition_for(key, partitions)
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                # Full: send it and start another (a builder always takes its first record).
                delivered.append(await producer.send_batch(builder, topic, partition=partition))
                builder = builders[partition] = producer.create_batch()
                builder.append(key=key, value=value, timestamp=None)
        for partition, builder in builders.items():
            delivered.append(await producer.send_batch(builder, topic, partition=partition))
        await asyncio.gather(*delivered)
