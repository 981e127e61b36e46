"""One destination's loop: its own consumer group on the enriched topic, batches of at most
MILLIMETRIC_DESTINATIONS_BATCH_EVENTS events or MILLIMETRIC_DESTINATIONS_BATCH_SECONDS old, offsets
committed only once the provider has answered for every event of the batch.

A 429, a 5xx or no answer is retried with backoff, honouring Retry-After; past
MILLIMETRIC_DESTINATIONS_ATTEMPTS the destination pauses and tries the same batch again, so nothing
is skipped and a destination down for hours resumes from its offsets. A 4xx naming events sends
those to the destination's dead-letter topic with the provider's message; one naming none halves
the batch until the bad event is alone. Bots, test-key events (unless configured) and the events
of forgotten people are never sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError

from ingest.heartbeat import is_heartbeat
from ingest.lag import destination_group
from ingest.metrics import DEAD_LETTERS, DESTINATION_FAILED, DESTINATION_SENT, DESTINATION_SKIPPED
from ingest.records import EnrichedEvent, encode, enriched_events
from ingest.retry import retrying
from ingest.settings import Settings
from ingest.topics import namespaced, require
from sinks.destinations.contract import (
    RETRYABLE_STATUSES,
    Answer,
    Destination,
    TryLater,
    message,
    retry_after,
)
from sinks.erasure_filter import ErasureFilter

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_WHILE_SENDING_S = 5.0  # keeps the group membership (max.poll.interval.ms is 300 s)


async def answered(
    name: str,
    client: httpx.AsyncClient,
    build: Callable[[], httpx.Request],
    read: Callable[[httpx.Response], T],
    settings: Settings,
) -> T:
    """Send `build()` until the provider gives an answer that is not "later" (429, 5xx, none),
    and `read` it. Retries honour Retry-After; past MILLIMETRIC_DESTINATIONS_ATTEMPTS the
    destination pauses MILLIMETRIC_DESTINATIONS_PAUSE_S and starts again: it never gives up."""

    async def attempt() -> T:
        try:
            response = await client.send(build())
        except httpx.TransportError as error:
            raise TryLater(f"{name}: {error!r}") from error
        if response.status_code in RETRYABLE_STATUSES:
            raise TryLater(message(response), retry_after(response))
        return read(response)

    s = settings
    while True:
        try:
            return await retrying(
                f"destination_{name}",
                attempt,
                permanent=lambda e: not isinstance(e, TryLater),
                attempts=s.destinations_attempts,
                max_delay_s=s.destinations_retry_max_s,
            )
        except TryLater as error:
            log.warning(
                "%s: %d attempts failed (last: %s); pausing %.0fs, then the same request again",
                name,
                s.destinations_attempts,
                error,
                s.destinations_pause_s,
            )
            await asyncio.sleep(s.destinations_pause_s)


class _Stopped(Exception):
    """The process stops while a batch is undelivered: its offsets are not committed."""


class _Revoked(ConsumerRebalanceListener):
    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._runner.lost(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        return None


class Runner:
    """Delivers the enriched topic to one destination."""

    def __init__(
        self,
        destination: Destination,
        settings: Settings,
        bootstrap: str,
        security: dict[str, Any],
        client: httpx.AsyncClient,
        producer: AIOKafkaProducer,
        erasures: ErasureFilter,
        group_id: str | None = None,
        project: str | None = None,
        label: str | None = None,
    ) -> None:
        self.destination = destination
        self.name = destination.name
        self.project = project  # a per-project destination forwards only that project's events
        # Keys its dead letters and labels its metrics and retries: its id when per-project.
        self.label = label or self.name
        self.settings = settings
        self.client = client
        self.producer = producer
        self.erasures = erasures
        self.enriched, self.dead_letter = require("enriched", f"dead_letter_{self.name}")
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            **security,
            group_id=group_id or namespaced(destination_group(self.name)),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self.events: list[EnrichedEvent] = []
        self.offsets: dict[TopicPartition, int] = {}
        self.started = 0.0

    async def start(self) -> None:
        """Join the destination's consumer group."""
        self.consumer.subscribe([self.enriched.name], listener=_Revoked(self))
        await self.consumer.start()

    async def stop(self) -> None:
        """Leave the group."""
        await self.consumer.stop()

    def lost(self, revoked: set[TopicPartition]) -> None:
        """Partitions went to another instance: their offsets are theirs to commit now."""
        for tp in revoked:
            self.offsets.pop(tp, None)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and deliver until `stop` is set; deliver what is open before returning."""
        s = self.settings
        try:
            while not stop.is_set():
                age = time.monotonic() - self.started if self.events else 0.0
                wait = s.destinations_batch_seconds - age if self.events else 0.5
                fetched = await self.consumer.getmany(
                    timeout_ms=max(1, int(wait * 1000)),
                    max_records=max(1, s.destinations_batch_events - len(self.events)),
                )
                for tp, messages in fetched.items():
                    for m in messages:
                        self._add(m.value or b"")
                    if messages:
                        self.offsets[tp] = messages[-1].offset + 1
                age = time.monotonic() - self.started if self.events else 0.0
                if (
                    len(self.events) >= s.destinations_batch_events
                    or (self.events and age >= s.destinations_batch_seconds)
                    or (self.offsets and not self.events)
                ):
                    await self.flush(stop)
            await self.flush(stop)
        except _Stopped:
            log.warning(
                "%s: stopping with an undelivered batch; it is sent again at start", self.label
            )

    def _add(self, value: bytes) -> None:
        try:
            events = enriched_events(value)
        except Exception as error:  # the sink dead-letters it; it cannot be sent anywhere
            log.warning("%s: undecodable enriched record skipped (%r)", self.label, error)
            DESTINATION_FAILED.labels(self.label, "undecodable").inc()
            return
        for event in events:
            if is_heartbeat(event) or (self.project and event.get("project") != self.project):
                continue
            if event.get("is_bot"):
                DESTINATION_SKIPPED.labels(self.label, "bot").inc()
            elif event.get("env") == "test" and not self.settings.destinations_include_test:
                DESTINATION_SKIPPED.labels(self.label, "test").inc()
            else:
                if not self.events:
                    self.started = time.monotonic()
                self.events.append(event)

    async def flush(self, stop: asyncio.Event) -> None:
        """Deliver the open batch, then commit its offsets. While it is being delivered the
        partitions are paused and polled now and then, so the group keeps this consumer."""
        events, offsets = self.events, self.offsets
        self.events, self.offsets = [], {}
        if events:
            paused = self.consumer.assignment()
            self.consumer.pause(*paused)
            task = asyncio.ensure_future(self._deliver(events))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                while not task.done():
                    await asyncio.wait(
                        {task, stopping},
                        timeout=POLL_WHILE_SENDING_S,
                        return_when="FIRST_COMPLETED",
                    )
                    if stop.is_set() and not task.done():
                        task.cancel()
                        raise _Stopped
                    if not task.done():
                        await self.consumer.getmany(timeout_ms=0)
                await task
            finally:
                stopping.cancel()
                self.consumer.resume(*paused)
        owned = self.consumer.assignment()
        mine = {tp: offset for tp, offset in offsets.items() if tp in owned}
        if not mine:
            return
        try:
            await self.consumer.commit(mine)
        except CommitFailedError as error:  # a rebalance: the new owner sends them again
            log.warning(
                "%s: offsets not committed (%r); providers drop the repeats", self.label, error
            )

    async def _deliver(self, events: list[EnrichedEvent]) -> None:
        """Send until the provider has taken or refused every event."""
        # In requests of at most the batch size (a fetch of envelopes can hold more), in order.
        size = self.settings.destinations_batch_events
        parts = [events[i : i + size] for i in range(0, len(events), size)][::-1]
        while parts:
            part = [e for e in parts.pop() if not self._forgotten(e)]
            if not part:
                continue
            answer = await self._answered(part)
            if answer.batch_error is not None:
                if len(part) > 1:
                    half = len(part) // 2
                    parts += [part[half:], part[:half]]
                else:
                    await self._dead_letter(part[0], answer.batch_error)
                continue
            for index, text in sorted(answer.rejected.items()):
                await self._dead_letter(part[index], text)
            rest = [e for i, e in enumerate(part) if i not in answer.rejected]
            if answer.others_accepted:
                DESTINATION_SENT.labels(self.label).inc(len(rest))
            elif rest:
                parts.append(rest)

    def _forgotten(self, event: EnrichedEvent) -> bool:
        # Checked before every send: a forget may arrive while a provider is away.
        if self.erasures.erased(event):
            DESTINATION_SKIPPED.labels(self.label, "forgotten").inc()
            return True
        return False

    async def _answered(self, events: Sequence[EnrichedEvent]) -> Answer:
        """The provider's answer to `events`, retried while it fails in ways that heal."""
        destination = self.destination
        return await answered(
            self.label,
            self.client,
            lambda: destination.request(events),
            lambda response: destination.answer(response, events),
            self.settings,
        )

    async def _dead_letter(self, event: EnrichedEvent, text: str) -> None:
        letter = {"stage": f"destination:{self.label}", "reason": text, "record": event}
        value = encode(letter)

        async def send() -> None:
            await self.producer.send_and_wait(
                self.dead_letter.name, key=self.label.encode(), value=value
            )

        await retrying("destination_dead_letter", send, max_delay_s=30.0)
        DEAD_LETTERS.labels(f"destination:{self.label}", "rejected").inc()
        DESTINATION_FAILED.labels(self.label, "rejected").inc()
        log.warning("%s refused event %s: %s", self.label, event.get("event_id"), text)
