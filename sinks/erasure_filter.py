"""Who is forgotten: every sink drops their rows from its inserts, before every attempt.

The filter learns erasures from the erasures topic (all partitions, from the start) and
suppressions (`suppress: true`, which last forever) from the `suppressions` table, which outlives
the topic's retention. `ready` is set once both are read up to where they stood at start: the sink
inserts nothing before, so a restarted sink never writes back a forgotten person's rows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest.kafka_connection import Security
from ingest.records import EnrichedEvent, Erasure, decode
from ingest.topics import topic
from sinks.batch import EventBatch
from sinks.clickhouse import ClickHouse

FOREVER = 2**63


@dataclass
class _Person:
    users: dict[str, int] = field(default_factory=dict)  # user_id -> cutoff
    devices: dict[str, int] = field(default_factory=dict)  # anonymous_id -> cutoff


class ErasureFilter:
    """Who is forgotten, per project, with the instant up to which their events are erased."""

    def __init__(self) -> None:
        self._projects: dict[str, _Person] = {}
        self.seen: set[str] = set()
        self.ready = asyncio.Event()

    def _learn(self, project: str, kind: str, ids: list[str], cutoff: int) -> None:
        person = self._projects.setdefault(project, _Person())
        known = person.users if kind == "user" else person.devices
        for id_ in ids:
            known[id_] = max(cutoff, known.get(id_, 0))

    def add(self, erasure: Erasure) -> None:
        """Learn one erasure."""
        cutoff = FOREVER if erasure["suppress"] else erasure["cutoff"]
        if erasure["user_id"] is not None:
            self._learn(erasure["project"], "user", [erasure["user_id"]], cutoff)
        self._learn(erasure["project"], "device", erasure["anonymous_ids"], cutoff)
        self.seen.add(erasure["forget_id"])

    def load_suppressions(self, ch: ClickHouse) -> int:
        """Learn every suppression recorded in ClickHouse; returns how many."""
        rows = ch.query_tsv("SELECT DISTINCT project, kind, id FROM suppressions").splitlines()
        for row in rows:
            project, kind, id_ = row.split("\t")
            self._learn(project, kind, [id_], FOREVER)
        return len(rows)

    def apply(self, batch: EventBatch) -> EventBatch:
        """The batch without the rows of forgotten people (the same batch when none)."""
        if not self._projects:
            return batch
        c = batch.columns
        keep = [
            not self._erased(p, u, a, r)
            for p, u, a, r in zip(
                c["project"], c["user_id"], c["anonymous_id"], c["received_at"], strict=True
            )
        ]
        return batch if all(keep) else batch.keep(keep)

    def erased(self, event: EnrichedEvent) -> bool:
        """Whether one event is a forgotten person's (what `apply` drops)."""
        return self._erased(
            event["project"], event["user_id"], event["anonymous_id"], event["received_at"]
        )

    def _erased(self, project: str, user_id: str, anonymous_id: str, received_at: int) -> bool:
        person = self._projects.get(project)
        if person is None:
            return False
        return received_at <= max(
            person.users.get(user_id, -1) if user_id else -1, person.devices.get(anonymous_id, -1)
        )


async def follow(
    bootstrap: str, erasures: ErasureFilter, stop: asyncio.Event, *, security: Security = None
) -> None:
    """Keep `erasures` current from the erasures topic; set `erasures.ready` once it has read
    everything the topic held when it started."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, **(security or {}), enable_auto_commit=False
    )
    await consumer.start()
    tps = [TopicPartition(topic("erasures").name, p) for p in range(topic("erasures").partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning()
    try:
        ends = await consumer.end_offsets(tps)
        while not stop.is_set():
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                for message in messages:
                    erasures.add(decode(message.value))
            if not erasures.ready.is_set():
                positions = [await consumer.position(tp) for tp in ends]
                if all(at >= end for at, end in zip(positions, ends.values(), strict=True)):
                    erasures.ready.set()
    finally:
        await consumer.stop()
