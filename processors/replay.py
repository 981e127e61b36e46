"""`millimetric replay`: re-derive a window of the raw topic beside live processing.

The raw topic is read from the offsets its records' times give for `--since` (and `--until`, else
its end when the replay started), in a consumer group of its own (`millimetric-replay-<version>`,
whose committed offsets show its progress; the live processor's never move). A replay run again
starts over, which is harmless: each run's rows carry a higher version. Each event goes through
the live agent's enrichment (the configured classifier and project rules: after a rule fix, the
fixed one) and on to the enriched topic, keyed as live, with `version` = the replay's start in ms;
the events table keeps the highest version (sinks/migrations/0005), so the sink's insert replaces
the old row, and its erasure filter drops a forgotten person's rows as it does live ones.

Stitching is re-derived, never re-published: the replay starts from the identities the live
processor had at `--since` (its changelog up to then) and follows the window's identifies and
forget/unlink controls in order per visitor, as the live agent did; it sends no identity link,
so a replayed identify never links a device to a (forgotten) person again.

Tansu answers ListOffsets by time with offset 0 and no timestamp: an answer without a timestamp
is read as "from the start", and each record's own time decides whether it is in the window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from ingest.kafka_connection import security_options
from ingest.lag import CONSUMER_GROUPS
from ingest.partitioner import kafka_partitioner
from ingest.progress import Progress
from ingest.records import encode, event_key, raw_records
from ingest.settings import Settings
from ingest.topics import namespaced, topic
from processors.enrich import Enricher
from processors.events_agent import configured_enricher
from processors.geo import CountryLookup
from processors.hook_mapping import map_delivery
from processors.step import StepPublisher

log = logging.getLogger(__name__)

GROUP_PREFIX = "millimetric-replay-"
# The live processor's identities table, as Faust names its changelog topic.
IDENTITIES_CHANGELOG = "millimetric-processor-identities-changelog"
STEP_RECORDS = 1000
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Window:
    """What to replay: raw records appended in [since_ms, until_ms), of one project or all."""

    since_ms: int
    until_ms: int | None
    project: str | None

    def holds(self, appended_ms: int) -> bool:
        """Whether a record appended at `appended_ms` is in the window."""
        return appended_ms >= self.since_ms and (
            self.until_ms is None or appended_ms < self.until_ms
        )


@dataclass(slots=True)
class Outcome:
    """What a replay did."""

    version: int
    events: int = 0
    failed: int = 0
    days: dict[str, set[str]] = field(default_factory=dict)  # project -> days (YYYY-MM-DD)


def _day(millis: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(millis // 1000))


class Replayer:
    """Enriches raw records as the live agent does, with identities of its own."""

    def __init__(self, enricher: Enricher, settings: Settings, window: Window, version: int):
        self._enricher = enricher
        self._settings = settings
        self._window = window
        self.identities: dict[bytes, str] = {}
        self.outcome = Outcome(version)

    def seed(self, key: bytes, user_id: bytes | None) -> None:
        """Learn one changelog record of the live identities table (None: dropped)."""
        if user_id:
            self.identities[key] = user_id.decode()
        else:
            self.identities.pop(key, None)

    def step(self, records: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The enriched records (key, value) for raw records (key, value), in order."""
        out: list[tuple[bytes, bytes]] = []
        project = self._window.project
        for key, value in records:
            try:
                decoded = raw_records(value)
            except Exception as error:  # the live agent dead-lettered it already
                self._failed(error)
                continue
            for index, record in enumerate(decoded):
                try:
                    if project is not None and record.get("project") != project:
                        continue
                    # An envelope is keyed by its first event: the others carry their own key.
                    own_key = event_key(record) if index else key
                    enriched = self._enrich(own_key, record)
                except Exception as error:  # as above: one bad record, the rest flows on
                    self._failed(error)
                    continue
                if enriched is not None:
                    out.append((own_key, encode(enriched)))
        return out

    def _failed(self, error: Exception) -> None:
        self.outcome.failed += 1
        log.warning("replay: a raw record failed again: %r", error)

    def _enrich(self, key: bytes, record: dict[str, Any]) -> dict[str, Any] | None:
        kind = record.get("type")
        if kind == "heartbeat":  # a sink's probe, not an event
            return None
        if kind in ("forget", "unlink"):
            self.identities.pop(key, None)
            return None
        if kind == "webhook":
            record = dict(map_delivery(record, self._settings.properties_max_bytes))
        if record["type"] == "identify":
            self.identities[key] = record["user_id"]
        known = self.identities.get(key) if record["user_id"] is None else None
        enriched: dict[str, Any] = dict(self._enricher.enrich(record, known))  # type: ignore[arg-type]
        if enriched["is_bot"] and self._settings.drop_bots:
            return None
        enriched["version"] = self.outcome.version
        self.outcome.events += 1
        self.outcome.days.setdefault(enriched["project"], set()).add(_day(enriched["timestamp"]))
        return enriched


async def _partitions(consumer: AIOKafkaConsumer, name: str) -> list[TopicPartition]:
    await consumer.topics()  # loads the cluster's metadata
    return [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]


async def _offsets_at(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], millis: int
) -> dict[TopicPartition, int | None]:
    """The first offset at or after `millis` per partition: 0 where the broker gives no time
    (Tansu), None where nothing is that late."""
    found = await consumer.offsets_for_times(dict.fromkeys(tps, millis))
    out: dict[TopicPartition, int | None] = {}
    for tp in tps:
        answer = found.get(tp)
        out[tp] = None if answer is None else (answer.offset if answer.timestamp >= 0 else 0)
    return out


async def _read_to_end(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], stop_at: dict[TopicPartition, int]
) -> Any:
    """Yield fetched messages until every partition reached its end (the high watermark at its
    first fetch, or `stop_at`); commit nothing."""
    ends: dict[TopicPartition, int] = dict(stop_at)
    open_ = set(tps)
    while open_:
        fetched = await consumer.getmany(*open_, timeout_ms=500, max_records=STEP_RECORDS)
        for tp, messages in fetched.items():
            end = ends.get(tp)
            yield tp, [m for m in messages if end is None or m.offset < end]
        for tp in list(open_):
            if tp not in ends and consumer.last_poll_timestamp(tp):
                ends[tp] = consumer.highwater(tp) or 0
            if tp in ends and await consumer.position(tp) >= ends[tp]:
                open_.discard(tp)


async def _seed_identities(
    replayer: Replayer, bootstrap: str, settings: Settings, window: Window
) -> None:
    """The live processor's identities as they stood at `since` (from its changelog)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, **security_options(settings), enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = await _partitions(consumer, namespaced(IDENTITIES_CHANGELOG))
        if not tps:
            return  # no live processor ever ran: nobody is identified
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        prefix = f"{window.project}:".encode() if window.project else b""
        async for _, messages in _read_to_end(consumer, tps, {}):
            for m in messages:
                if m.timestamp < window.since_ms and (m.key or b"").startswith(prefix):
                    replayer.seed(m.key or b"", m.value)
    finally:
        await consumer.stop()


async def replay(settings: Settings, bootstrap: str, window: Window) -> Outcome:
    """Re-derive the window's events onto the enriched topic; return what was replayed."""
    version = int(time.time() * 1000)
    enricher = configured_enricher(settings, CountryLookup(settings.geoip_path))
    replayer = Replayer(enricher, settings, window, version)
    await _seed_identities(replayer, bootstrap, settings, window)
    security = security_options(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **security,
        group_id=namespaced(f"{GROUP_PREFIX}{version}"),
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        **security,
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        linger_ms=settings.kafka_linger_ms,
        compression_type=settings.kafka_compression,
        max_request_size=settings.processor_max_record_bytes,
        partitioner=kafka_partitioner,
    )
    await consumer.start()
    await producer.start()
    try:
        tps = await _partitions(consumer, topic("raw").name)
        consumer.assign(tps)
        starts = await _offsets_at(consumer, tps, window.since_ms)
        stops = (
            await _offsets_at(consumer, tps, window.until_ms) if window.until_ms is not None else {}
        )
        ends = await consumer.end_offsets(tps)  # for the progress bar (Tansu: about)
        # A partition with nothing that late is skipped; a known `until` offset ends one early.
        tps = [tp for tp in tps if starts[tp] is not None]
        stop_at = {tp: stop for tp in tps if (stop := stops.get(tp))}
        for tp in tps:
            consumer.seek(tp, starts[tp] or 0)
        enriched, links, dead = (topic(r).name for r in ("enriched", "identities", "dead_letter"))
        publisher = StepPublisher(
            producer, settings.processor_max_record_bytes, enriched, links, dead
        )
        total = sum(max(0, ends[tp] - (starts[tp] or 0)) for tp in tps)
        progress = Progress("replay", total, 0, "records")

        def refused(index: int, error: Exception) -> None:
            replayer.outcome.failed += 1
            log.warning("replay: the broker refused an enriched record: %r", error)

        try:
            async for tp, messages in _read_to_end(consumer, tps, stop_at):
                if not messages:
                    continue
                inside = [
                    (m.key or b"", m.value or b"") for m in messages if window.holds(m.timestamp)
                ]
                await publisher.publish(publisher.enriched, replayer.step(inside), refused)
                await consumer.commit({tp: OffsetAndMetadata(messages[-1].offset + 1, "")})
                progress.advance(len(messages))
        finally:
            progress.close()
        return replayer.outcome
    finally:
        await producer.stop()
        await consumer.stop()


async def wait_for_sink(bootstrap: str, settings: Settings, timeout_s: float) -> bool:
    """Wait until the sinks committed everything now on the enriched topic (the replay's rows are
    in ClickHouse); False when `timeout_s` passed first."""
    group, role = CONSUMER_GROUPS["sink"]
    group = namespaced(group)
    security = security_options(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **security, enable_auto_commit=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security)
    await consumer.start()
    await admin.start()
    try:
        tps = await _partitions(consumer, topic(role).name)
        consumer.assign(tps)
        for tp in tps:  # a fetch's high watermark is the exact end, on Tansu too (ingest/lag.py)
            await consumer.seek_to_end(tp)
        ends: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + timeout_s
        while len(ends) < len(tps) and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=300)
            ends = {
                tp: consumer.highwater(tp) or 0 for tp in tps if consumer.last_poll_timestamp(tp)
            }
        while time.monotonic() < deadline:
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
            if all(
                ends[tp] == 0 or (tp in committed and committed[tp].offset >= ends[tp])
                for tp in tps
            ):
                return True
            await asyncio.sleep(0.5)
        return False
    finally:
        await admin.close()
        await consumer.stop()
