"""Publishing what one step of the raw agent produced, so the step may be acked.

Faust's `take_events` acks a step's events once the agent body returns, and also when it leaves
by an exception; so everything a step sends goes through `StepPublisher` on the agent's own
producer, awaits the broker's acks, and nothing raises out of it: a fault that heals (broker
outage, leader change) is retried with the shared policy (`ingest.retry`) for as long as it
lasts, holding the step; a record the broker refuses for good (too large) is dead-lettered
with the reason, and the rest of the step flows on. So a step is acked only once every record
in it is forwarded or dead-lettered. A retried publish repeats records an earlier attempt
delivered (the sink deduplicates events; links and dead letters are idempotent to repeat).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from aiokafka import AIOKafkaProducer

from ingest.metrics import DEAD_LETTERS
from ingest.partitioner import partition_for
from ingest.records import decode, encode, envelopes
from ingest.retry import retrying
from processors.batch_publisher import PERMANENT_ERRORS, RECORD_OVERHEAD, BatchPublisher

log = logging.getLogger(__name__)

Record = tuple[bytes, bytes]
DEAD_LETTER_KEY = b"processor"


def permanent(error: BaseException) -> bool:
    """Whether the broker refused a record for good (retrying it cannot succeed)."""
    return isinstance(error, PERMANENT_ERRORS)


@dataclass
class DeadLetters:
    """A step's dead letters: their values and reasons (the metric label) in step order."""

    values: list[bytes] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str, value: bytes) -> None:
        """Dead-letter `value` (already redacted) for `reason`."""
        self.values.append(value)
        self.reasons.append(reason)


class StepPublisher:
    """Publishes a step's identity links, enriched records and dead letters on one producer."""

    def __init__(
        self, producer: AIOKafkaProducer, limit: int, enriched: str, links: str, dead_letter: str
    ) -> None:
        """`limit`: the producer's `max_request_size` (the largest record to send)."""
        self.limit = limit
        self.enriched = BatchPublisher(producer, enriched, limit)
        self.links = BatchPublisher(producer, links, limit)
        self.dead_letter = BatchPublisher(producer, dead_letter, limit)

    async def publish(
        self,
        publisher: BatchPublisher,
        records: Sequence[Record],
        refused: Callable[[int, Exception], None],
    ) -> None:
        """Publish `records` until the broker acked them all; `refused(index, error)` is called
        for each record it refuses for good (found by sending them one by one, a rare path)."""
        if not records:
            return
        try:
            await retrying(
                "processor publish", partial(publisher.publish, records), permanent=permanent
            )
            return
        except PERMANENT_ERRORS:
            pass
        for index, record in enumerate(records):
            try:
                await retrying(
                    "processor publish",
                    partial(publisher.publish, [record]),
                    permanent=permanent,
                )
            except PERMANENT_ERRORS as error:
                refused(index, error)

    async def publish_envelopes(
        self,
        publisher: BatchPublisher,
        records: Sequence[Record],
        refused: Callable[[int, Exception], None],
    ) -> None:
        """Publish the events `records` as envelopes, one per partition (more when one would
        pass the record limit); `refused(index, error)` is called for each event of an envelope
        the broker refuses for good: only an event too large on its own is alone in one."""
        if not records:
            return
        partitions = await publisher.partitions()
        limit = self.limit - RECORD_OVERHEAD
        packed = envelopes(records, lambda key: partition_for(key, partitions), limit)

        def envelope_refused(index: int, error: Exception) -> None:
            for member in packed[index].members:
                refused(member, error)

        await self.publish(publisher, [(e.key, e.value) for e in packed], envelope_refused)

    async def publish_dead_letters(self, dead: DeadLetters) -> None:
        """Put the step's dead letters on the dead-letter topic, acked, and count them. One the
        broker refuses (its record is too large) goes out again without its record."""
        stubs: list[Record] = []

        def without_record(index: int, error: Exception) -> None:
            letter = decode(dead.values[index])
            letter["reason"] += f" (record dropped, too large: {error})"
            # The event_id stays, to find the raw record (by the source) and tell whom it was.
            event_id = (letter.get("record") or {}).get("event_id")
            stubs.append(
                (DEAD_LETTER_KEY, encode({**letter, "record": None, "event_id": event_id}))
            )

        await self.publish(
            self.dead_letter, [(DEAD_LETTER_KEY, value) for value in dead.values], without_record
        )
        await self.publish(self.dead_letter, stubs, _log_refused)
        for reason in dead.reasons:
            DEAD_LETTERS.labels("processor", reason).inc()
        if dead.values:
            log.warning("dead-lettered %d records: %s", len(dead.values), sorted(set(dead.reasons)))


def _log_refused(index: int, error: Exception) -> None:
    log.error("the broker refused a dead letter without its record: %r", error)
