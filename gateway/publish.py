"""Publishing: accepted events go to Kafka, and the gateway answers 202 only after the ack.

One producer per process; `linger_ms` lets concurrent requests share a broker round trip. A send
that the broker does not acknowledge within `publish_timeout_s` becomes `broker_unavailable`
(503): the client retries, and the event was not accepted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

from ingest.metrics import BROKER_ACK_SECONDS
from ingest.partitioner import kafka_partitioner, partition_for
from ingest.records import envelopes

# Largest envelope the gateway builds: under Kafka's default `message.max.bytes` (1 MiB + 12).
ENVELOPE_MAX_BYTES = 1_000_000

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """The broker did not acknowledge in time; nothing may be reported as accepted."""


class Publisher:
    """Produces records and waits for the broker's acknowledgement of every one."""

    def __init__(
        self,
        kafka: dict[str, Any],
        *,
        idempotence: bool,
        linger_ms: int,
        compression: str | None,
        timeout_s: float,
    ) -> None:
        self._timeout = timeout_s
        self._config: dict[str, Any] = dict(
            **kafka,  # bootstrap servers, TLS, SASL
            acks="all",
            enable_idempotence=idempotence,
            linger_ms=linger_ms,
            compression_type=compression,
            max_request_size=4 * 1024 * 1024,
            request_timeout_ms=int(timeout_s * 1000),
            partitioner=kafka_partitioner,
        )
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Connect to the broker (aiokafka clients must be made inside the running loop)."""
        self._producer = AIOKafkaProducer(**self._config)
        await self._producer.start()

    async def stop(self) -> None:
        """Flush and disconnect."""
        if self._producer is not None:
            await self._producer.stop()

    async def publish(
        self, topic: str, records: Sequence[tuple[bytes, bytes]], grouped: bool = False
    ) -> None:
        """Send encoded (key, value) pairs; return once all are acknowledged, else
        BrokerUnavailable. `grouped`: as envelopes, one record per partition (in order)."""
        assert self._producer is not None, "start() first"
        producer = self._producer
        futures: list[asyncio.Future[Any]] = []
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                if grouped and len(records) > 1:
                    count = len(await producer.partitions_for(topic))
                    for record in envelopes(
                        records, lambda k: partition_for(k, count), ENVELOPE_MAX_BYTES
                    ):
                        send = producer.send(
                            topic, record.value, key=record.key, partition=record.partition
                        )
                        futures.append(await send)
                else:
                    for key, value in records:
                        futures.append(await producer.send(topic, value, key=key))
                for future in futures:  # in turn: gather costs more than the awaits themselves
                    await future
            BROKER_ACK_SECONDS.labels(topic).observe(time.perf_counter() - started)
        except Exception as error:
            for future in futures:  # nobody will read their outcome: no "never retrieved" noise
                future.cancel()
            # Some records of a batch may have landed: the client's retry re-sends them with the
            # same event_ids, and the sink deduplicates on (project, event_id).
            log.warning("publish to %s failed: %r", topic, error)
            raise BrokerUnavailable(repr(error)) from error

    async def ping(self) -> bool:
        """Whether the broker answers a metadata request (the /ready check)."""
        if self._producer is None:
            return False
        try:
            async with asyncio.timeout(2):
                await self._producer.client.fetch_all_metadata()
            return True
        except Exception:
            return False
