"""The keys topic (API keys, limits, hooks, forget outcomes, per-project destinations) read from
its start: followed (`KeysReader`, the gateway's key store and the destinations process), or
once to its end (`read_all`, the admin commands).

Its end is a fetch's high watermark, never ListOffsets(latest): Tansu answers that with the last
batch's base offset + 1, so a reader trusting it would call itself caught up a batch early (the
lag and drain measurements read ends the same way: ingest/lag.py, ingest/drain.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest.records import decode
from ingest.retry import retrying
from ingest.topics import topic

log = logging.getLogger(__name__)


class KeysReader:
    """One consumer on the keys partition, from its start; `loaded` is set once the records it
    has handed out reach the end the broker reported (a fetch's high watermark)."""

    def __init__(self, kafka: dict[str, Any]) -> None:
        self._kafka = kafka  # aiokafka connection options: bootstrap servers, TLS, SASL
        self.tp = TopicPartition(topic("keys").name, 0)
        self.consumer: AIOKafkaConsumer | None = None
        self.position = 0
        self.caught_up = False  # the last records handed out reached the end
        self.loaded = asyncio.Event()

    async def _connect(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(**self._kafka, enable_auto_commit=False, fetch_max_wait_ms=100)
        try:
            await consumer.start()
            consumer.assign([self.tp])
            await consumer.seek_to_beginning(self.tp)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def fetches(self) -> AsyncIterator[list[dict[str, Any]]]:
        """Each fetch's records, oldest first, forever (an empty list when nothing came); a
        broker outage is waited out, an undecodable record skipped."""
        consumer = await retrying("keys topic connect", self._connect, max_delay_s=5)
        self.consumer = consumer
        while True:
            # Short polls until caught up: an empty topic is known to be empty at once.
            wait_ms = 1000 if self.loaded.is_set() else 200
            batches = await retrying(
                "keys topic fetch",
                functools.partial(consumer.getmany, self.tp, timeout_ms=wait_ms),
                max_delay_s=5,
            )
            records: list[dict[str, Any]] = []
            for message in batches.get(self.tp, []):
                try:
                    record = decode(message.value)
                except ValueError:  # one bad record stops nothing
                    log.warning("skipping undecodable keys record at %s", message.offset)
                    continue
                if isinstance(record, dict):
                    records.append(record)
            self.position = await consumer.position(self.tp)
            end = consumer.highwater(self.tp)
            self.caught_up = end is not None and self.position >= end
            yield records
            if self.caught_up:  # set once the caller has applied them
                self.loaded.set()

    async def stop(self) -> None:
        """Disconnect."""
        if self.consumer is not None:
            await self.consumer.stop()


async def read_all(kafka: dict[str, Any]) -> list[dict[str, Any]]:
    """Every record on the keys topic, oldest first, up to its end."""
    reader = KeysReader(kafka)
    out: list[dict[str, Any]] = []
    fetches = reader.fetches()
    try:
        async for records in fetches:
            out += records
            if reader.caught_up:
                return out
    finally:
        await fetches.aclose()
        await reader.stop()
    return out
