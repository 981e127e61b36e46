"""The sink: consume enriched events, insert them in batches, commit only what ClickHouse took.

One batch is stored (inserted, then its offsets committed) in the background while the next one
fills, so consuming and decoding overlap the insert; at most one batch is in flight. While
ClickHouse is unavailable, that batch is retried with capped exponential backoff, and once the
next batch is due too (full, or as old as the batch interval) the sink pauses its partitions (it
keeps its group membership but reads nothing more: backpressure, memory bounded by two
batches). Rows ClickHouse refuses go to the dead-letter topic, so no batch is retried forever.
Offsets are committed only after an insert succeeded, in order; a crash re-reads at most the
two open batches, and the events table collapses the repeats.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from ingest.heartbeat import arrived, is_heartbeat
from ingest.heartbeat import send_forever as send_heartbeats
from ingest.kafka_connection import group_options, security_options
from ingest.lag import watch_in_thread
from ingest.metrics import DEAD_LETTERS, set_serving
from ingest.ops_port import serve as serve_metrics
from ingest.records import encode, enriched_events
from ingest.retry import retrying
from ingest.settings import Settings
from ingest.topics import ensure_topics, namespaced, require
from sinks.batch import EventBatch
from sinks.clickhouse import ClickHouse, Refusal, open_configured, refusal
from sinks.clickhouse_writer import EventWriter
from sinks.erasure_audit import ForgetAudit, audit_key
from sinks.erasure_executor import ErasureExecutor
from sinks.erasure_filter import ErasureFilter, follow
from sinks.erasure_queue import ErasureQueue
from sinks.migrate import apply_retention, migrate
from sinks.sql_endpoint import serve as serve_sql

log = logging.getLogger(__name__)

GROUP_ID = "millimetric-sink"
POLL_WHILE_STORING_S = 5.0  # well within aiokafka's default max.poll.interval.ms (300 s)


class _FlushOnRevoke(ConsumerRebalanceListener):
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._sink.flush()  # commit what we hold while the partitions are still ours

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        return None


class Sink:
    """One sink instance; several share the topic's partitions through the consumer group."""

    def __init__(
        self, settings: Settings, bootstrap: str, ch: ClickHouse, erasures: ErasureFilter
    ) -> None:
        self.settings = settings
        self.erasures = erasures
        self.bootstrap = bootstrap
        self.ch = ch
        self.writer = EventWriter(ch)
        self.enriched, self.dead_letter = require("enriched", "dead_letter")
        self.batch = EventBatch()
        self._lock = asyncio.Lock()
        self._storing: asyncio.Task[None] | None = None
        self.security = security_options(settings)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            **self.security,
            group_id=namespaced(GROUP_ID),
            **group_options(settings),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            **self.security,
            acks="all",
            enable_idempotence=settings.kafka_idempotence,
        )
        self.inserted = 0

    async def start(self) -> None:
        """Apply migrations, create topics, join the consumer group."""
        await asyncio.to_thread(migrate, self.ch)
        log.info(await asyncio.to_thread(apply_retention, self.ch, self.settings.retention_days))
        await ensure_topics(
            self.bootstrap,
            self.settings.kafka_replication_factor,
            ["enriched", "dead_letter"],
            min_insync_replicas=self.settings.kafka_min_insync_replicas,
            security=self.security,
        )
        await self.producer.start()
        self.consumer.subscribe([self.enriched.name], listener=_FlushOnRevoke(self))
        await self.consumer.start()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and insert until `stop` is set, then flush and commit the open batch."""
        s = self.settings
        per_record = 1.0  # events per record lately
        while not stop.is_set():
            wait = s.sink_batch_seconds - self.batch.age() if self.batch.rows else 0.5
            # Records, not rows, are fetched: an envelope carries several rows.
            room = (s.sink_batch_rows - self.batch.rows) / per_record
            fetched = await self.consumer.getmany(
                timeout_ms=max(1, int(wait * 1000)), max_records=max(1, int(room))
            )
            add, add_all = self.batch.add, self.batch.add_all
            records = events = 0
            for tp, messages in fetched.items():
                for message in messages:
                    try:  # one decode per record, envelope or not
                        values = enriched_events(message.value or b"")
                    except Exception as error:  # poison record: keep it, with the reason
                        await self._undecodable(tp, message.offset, message.value or b"", error)
                        continue
                    records += 1
                    events += len(values)
                    if add_all(values):  # every event a row: the common case, in bulk
                        continue
                    for index, value in enumerate(values):
                        try:
                            if is_heartbeat(value):  # its trip time, never a row
                                arrived(value)  # type: ignore[arg-type]
                                continue
                            add(value)
                        except Exception as error:  # poison event: alone, with the reason
                            await self._undecodable(tp, message.offset, value, error, index)
                if messages:
                    self.batch.consumed(tp, messages[-1].offset)
            if records:
                per_record = max(1.0, events / records)
            full = self.batch.rows >= s.sink_batch_rows
            if (
                full
                or self.batch.age() >= s.sink_batch_seconds
                or (self.batch.next_offsets and not self.batch.rows)
            ):
                await self.flush(background=True)
        await self.flush()

    async def _undecodable(
        self,
        tp: TopicPartition,
        offset: int,
        value: bytes | object,
        error: Exception,
        index: int = 0,
    ) -> None:
        """Dead-letter a record that does not decode, or one event of it (`index`: its place in
        the envelope) that is not a row; its envelope-mates go on."""
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else None
        if text is None:
            try:
                text = encode(value).decode()
            except TypeError:
                text = repr(value)
        letter = {
            "reason": f"undecodable: {error!r}",
            "topic": tp.topic,
            "partition": tp.partition,
            "offset": offset,
            "index": index,
            "record": text,
        }
        await self._send_dead_letter("undecodable", letter)

    async def _send_dead_letter(self, reason: str, letter: dict[str, Any]) -> None:
        """Put a record on the dead-letter topic, waiting out a broker outage; count it."""
        value = encode({"stage": "sink", **letter})

        async def send() -> None:  # a coroutine function: tenacity awaits only those
            await self.producer.send_and_wait(self.dead_letter.name, key=b"sink", value=value)

        await retrying("sink_dead_letter", send, max_delay_s=self.settings.sink_retry_max_s)
        DEAD_LETTERS.labels("sink", reason).inc()

    async def flush(self, background: bool = False) -> None:
        """Store the open batch: insert it (retrying while ClickHouse refuses), then commit its
        offsets. Waits for the batch stored before it first; `background`: do not wait for
        this one (the consume loop goes on filling the next batch meanwhile)."""
        async with self._lock:
            await self._settle(poll=background)
            batch, self.batch = self.batch, EventBatch()
            self._storing = asyncio.create_task(self._store(batch))
            if not background:
                await self._settle(poll=False)

    async def _settle(self, poll: bool) -> None:
        """Wait for the batch being stored; raise what storing it raised. `poll` (only from the
        consume loop): meanwhile call getmany on paused partitions now and then, since a consumer
        that stops polling for max.poll.interval.ms is dropped from the group."""
        task = self._storing
        if task is None:
            return
        while poll and not task.done():
            await asyncio.wait({task}, timeout=POLL_WHILE_STORING_S)
            if not task.done():
                paused = self.consumer.assignment()
                self.consumer.pause(*paused)
                try:
                    await self.consumer.getmany(timeout_ms=0)
                finally:
                    self.consumer.resume(*paused)
        self._storing = None
        await task

    async def _store(self, batch: EventBatch) -> None:
        if batch.rows:
            await self._write(batch)
            self.inserted += batch.rows
        owned = self.consumer.assignment()
        batch.drop_partitions({tp for tp in batch.next_offsets if tp not in owned})
        if batch.next_offsets:
            await self.consumer.commit(batch.next_offsets)

    async def _write(self, batch: EventBatch) -> None:
        """Insert a batch without ever retrying one forever.

        While ClickHouse is down, timing out or overloaded, the insert is retried until it heals
        (the partitions pause meanwhile). A batch spanning more months than one insert may
        create partitions for is split by month. Rows refused for their content, or failing
        with an unknown error `sink_insert_attempts` times, are found by halving the batch and
        go to the dead-letter topic with the reason: one bad row costs about log2(batch) extra
        inserts and never blocks the partition. Halves already inserted when a later one fails
        are harmless: the tables collapse repeats.
        """
        parts = [batch]
        while parts:
            part = parts.pop()
            try:
                await self._insert(part)
            except Exception as error:
                kind = refusal(error)
                if part.rows > 1:
                    halves = part.split_by_month() if kind == "partitions" else part.split()
                    parts.extend(reversed(halves))
                    continue
                await self._dead_letter(part.row(0), kind, error)

    async def _dead_letter(self, record: dict[str, Any], kind: Refusal, error: Exception) -> None:
        if kind == "content":
            reason, text = "clickhouse_refused", f"clickhouse refused: {error}"
        else:
            attempts = self.settings.sink_insert_attempts
            reason = "clickhouse_failed"
            text = f"clickhouse failed {attempts} times: {type(error).__name__}: {error}"
        await self._send_dead_letter(reason, {"reason": text, "record": record})
        log.warning("dead-lettered event %s: %s", record.get("event_id"), text)

    async def _insert(self, batch: EventBatch) -> None:
        """Insert, retrying transient faults until they heal and unknown errors up to
        `sink_insert_attempts` times; raise content refusals and what outlasts the attempts."""
        max_delay_s = self.settings.sink_retry_max_s

        async def attempt() -> None:
            # Filter at every attempt: a forget may have arrived while ClickHouse was away.
            await asyncio.to_thread(self.writer.insert, self.erasures.apply(batch))

        async def until_not_transient() -> None:
            await retrying(
                "clickhouse_insert",
                attempt,
                permanent=lambda e: refusal(e) != "transient",
                max_delay_s=max_delay_s,
            )

        await retrying(
            "sink_insert_failing",
            until_not_transient,
            permanent=lambda e: refusal(e) in ("content", "partitions"),
            attempts=self.settings.sink_insert_attempts,
            max_delay_s=max_delay_s,
        )

    async def stop(self) -> None:
        """Leave the group and disconnect."""
        await self.consumer.stop()
        await self.producer.stop()


async def _connect(settings: Settings) -> ClickHouse:
    """Connect, waiting while the server is down or another process briefly holds the store."""

    async def attempt() -> ClickHouse:  # a coroutine function: tenacity awaits only those
        return await asyncio.to_thread(open_configured, settings)

    return await retrying("clickhouse_connect", attempt, attempts=60, max_delay_s=2.0)


async def serve(settings: Settings, bootstrap: str) -> None:
    """Run one sink until SIGINT/SIGTERM; flush and commit before exiting."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serve_metrics("sink", settings.sink_metrics_port, settings.metrics_host)
    ch = await _connect(settings)
    erasures = ErasureFilter()
    sink = Sink(settings, bootstrap, ch, erasures)
    await sink.start()
    set_serving("sink", True)
    watch_in_thread(bootstrap, ("sink",), "sink", settings)
    log.info("sink writing to %s", ch.description)
    audit = ForgetAudit(ch, audit_key(settings))
    executor = ErasureExecutor(
        ch, audit, settings.forget_grace_s, settings.forget_mutation_timeout_s
    )
    await ensure_topics(
        bootstrap,
        settings.kafka_replication_factor,
        ["erasures", "keys"],
        min_insync_replicas=settings.kafka_min_insync_replicas,
        security=sink.security,
    )
    await asyncio.to_thread(erasures.load_suppressions, ch)
    follower = asyncio.ensure_future(follow(bootstrap, erasures, stop, security=sink.security))
    # No insert before the filter knows every erasure: it could write a forgotten person back.
    await asyncio.wait({follower, asyncio.ensure_future(erasures.ready.wait())},
                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    queue = ErasureQueue(settings, bootstrap, executor, audit, erasures, sink.producer)
    tasks = [sink.run(stop), follower, queue.run(stop)]
    if settings.clickhouse_url is None:
        tasks.append(serve_sql(ch, settings.data_dir, stop))
    if settings.heartbeat_interval_s is not None:
        tasks.append(send_heartbeats(sink.producer, settings.heartbeat_interval_s, stop))
    try:
        await asyncio.gather(*tasks)
    finally:
        set_serving("sink", False)
        await sink.stop()
        ch.close()
