"""`millimetric dead-letters list|replay`: what the stages dead-lettered, and sending it back.

A processor's letter holds the raw record (IP redacted; enrichment takes the derived `ip_hash`
and `country` back as they are): replay puts it on the raw topic (a forget request that failed:
on the forgets topic). A sink's letter holds the
enriched row ClickHouse refused: replay puts it on the enriched topic. A letter without a record
(undecodable) cannot be replayed; its raw-topic coordinates are listed instead. A destination's
letter (an event its provider refused, on the destination's own topic) is listed, and replay
names it and sends it nowhere.

Each letter is replayed at most once: the letters sent back are kept in a ledger
(`DATA_DIR/dead-letters-replayed.json`, by dead-letter partition and offset), written after the
broker acknowledged them. A crash between the two sends a letter again on the next replay, which
stores nothing twice: the tables collapse rows by `event_id`. A replayed record that fails again
is dead-lettered again, as a new letter; replay watches for those and reports them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ingest.iso_time import epoch_ms
from ingest.records import decode, encode, record_key
from ingest.topics import DESTINATIONS, ensure_topics, topic

LEDGER_FILE = "dead-letters-replayed.json"
TARGETS = {"processor": "raw", "sink": "enriched"}  # stage -> the topic it reads


@dataclass(frozen=True, slots=True)
class Letter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    timestamp_ms: int
    stage: str
    reason: str
    record: Any  # the record to send back, or what is left of an undecodable one
    destination: str = ""  # a destination's own dead-letter topic (listed, not replayed)

    @property
    def ledger_key(self) -> str:
        """Its place on the dead-letter topic, as the ledger keeps it."""
        return f"{self.partition}:{self.offset}"

    @property
    def target(self) -> tuple[str, dict[str, Any]] | None:
        """The role of the topic to send it back to and the record, or None when it keeps no
        record a stage can take again."""
        record = self.record
        if self.stage == "processor" and self.reason.startswith("forget_failed"):
            try:  # a forget request, kept whole as the text the processor could not handle
                record = decode(record) if isinstance(record, str) else None
            except ValueError:
                return None
            return ("forgets", record) if isinstance(record, dict) else None
        if self.stage in TARGETS and isinstance(record, dict):
            return TARGETS[self.stage], record
        return None

    @property
    def event_id(self) -> str:
        """The event's (or forget's) id, or "" when the letter keeps no record."""
        found = self.target
        if found is None:
            record = self.record if self.destination else None
            return str(record.get("event_id") or "") if isinstance(record, dict) else ""
        return str(found[1].get("event_id") or found[1].get("forget_id") or "")

    @property
    def place(self) -> str:
        """Where it is: partition:offset, after the destination's name on a destination's."""
        return f"{self.destination}/{self.ledger_key}" if self.destination else self.ledger_key


def _letter(
    partition: int, offset: int, timestamp_ms: int, value: bytes | None, destination: str = ""
) -> Letter:
    try:
        body = decode(value or b"")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return Letter(partition, offset, timestamp_ms, "?", "not a dead letter", None, destination)
    return Letter(
        partition,
        offset,
        timestamp_ms,
        str(body.get("stage", "?")),
        str(body.get("reason", "")),
        body.get("record"),
        destination,
    )


@asynccontextmanager
async def _assigned(
    bootstrap: str, role: str = "dead_letter"
) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition]]]:
    """A consumer (no group) assigned every partition of the dead-letter topic (`role`)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        name = topic(role).name
        await consumer.topics()  # loads the cluster's metadata, so the partitions are known
        tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or {0})]
        consumer.assign(tps)
        yield consumer, tps
    finally:
        await consumer.stop()


async def _read(
    bootstrap: str, start: dict[int, int] | None, seconds: float, role: str = "dead_letter"
) -> list[Letter]:
    """Letters from `start` (partition -> offset; the beginning when None): up to the current end,
    or, with `seconds`, everything that arrives within that many seconds (of the dead-letter
    topic `role`)."""
    await ensure_topics(bootstrap, roles=[role])
    destination = role.removeprefix("dead_letter").removeprefix("_")
    async with _assigned(bootstrap, role) as (consumer, tps):
        for tp in tps:
            if start is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, start.get(tp.partition, 0))
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + seconds
        out: list[Letter] = []
        while True:
            behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
            if not behind and time.monotonic() >= deadline:
                return out
            for messages in (await consumer.getmany(*tps, timeout_ms=500)).values():
                out += [
                    _letter(m.partition, m.offset, m.timestamp, m.value, destination)
                    for m in messages
                ]


async def _end(bootstrap: str) -> dict[int, int]:
    """The next offset of every dead-letter partition (where letters written from now on go)."""
    async with _assigned(bootstrap) as (consumer, tps):
        for tp in tps:
            await consumer.seek_to_end(tp)
        return {tp.partition: await consumer.position(tp) for tp in tps}


def _since_ms(since: str | None) -> int:
    if since is None:
        return 0
    try:
        return epoch_ms(since)
    except ValueError:
        sys.exit(f"millimetric dead-letters: --since {since!r} is not an ISO 8601 time")


def _matches(letter: Letter, reason: str | None, since_ms: int) -> bool:
    return (reason is None or reason in letter.reason) and letter.timestamp_ms >= since_ms


def _iso(millis: int) -> str:
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="seconds")


def _ledger(data_dir: Path) -> set[str]:
    try:
        return set(json.loads((data_dir / LEDGER_FILE).read_text()))
    except (OSError, ValueError):
        return set()


def _save_ledger(data_dir: Path, keys: set[str]) -> None:
    target = data_dir / LEDGER_FILE
    temp = target.with_name(target.name + ".tmp")
    temp.write_text(json.dumps(sorted(keys)))
    os.replace(temp, target)


def list_letters(bootstrap: str, reason: str | None, since: str | None, data_dir: Path) -> int:
    """Print the letters of the stages, then of each destination (TSV: time, stage, where,
    event_id, replayed, reason; a destination's letter: `-`, replay does not send them); exit
    status 0."""
    since_ms = _since_ms(since)
    replayed = _ledger(data_dir)
    print("time\tstage\tletter\tevent_id\treplayed\treason")
    roles = ["dead_letter", *(f"dead_letter_{name}" for name in DESTINATIONS)]
    for letter in (
        found for role in roles for found in asyncio.run(_read(bootstrap, None, 0, role))
    ):
        if _matches(letter, reason, since_ms):
            done = "-" if letter.destination else "yes" if letter.ledger_key in replayed else "no"
            text = " ".join(letter.reason.split())  # one line per letter
            print(
                f"{_iso(letter.timestamp_ms)}\t{letter.stage}\t{letter.place}\t"
                f"{letter.event_id}\t{done}\t{text}"
            )
    return 0


async def _send_back(bootstrap: str, letters: list[Letter]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for letter in letters:
            role, record = letter.target or ("", {})
            project = str(record.get("project", ""))
            if role == "forgets":  # keyed by person, as the gateway keys them
                key = f"{project}:{record.get('user_id') or record.get('anonymous_id')}".encode()
            else:
                fallback = str(record.get("user_id") or record.get("event_id") or "")
                key = record_key(project, record.get("anonymous_id"), fallback)
            await producer.send(topic(role).name, encode(record), key=key)
        await producer.flush()
    finally:
        await producer.stop()


def replay(bootstrap: str, data_dir: Path, reason: str | None, wait_s: float) -> int:
    """Send the matching letters not replayed before back to their stage; watch `wait_s` seconds
    for those failing again. Destinations' letters are named and not sent. Exit status 0, or 1
    when some failed again or cannot be replayed (a destination's letter too, when `reason`
    asked for it: without one, the destinations' letters kept 7 days would fail every run)."""
    ledger = _ledger(data_dir)
    letters = [
        letter
        for letter in asyncio.run(_read(bootstrap, None, 0))
        if _matches(letter, reason, 0) and letter.ledger_key not in ledger
    ]
    # A destination's letter is an event its provider refused: no stage takes it back.
    refused = [
        letter
        for name in DESTINATIONS
        for letter in asyncio.run(_read(bootstrap, None, 0, f"dead_letter_{name}"))
        if _matches(letter, reason, 0)
    ]
    for letter in refused:
        print(f"not replayed (a destination's letter): {letter.place}\t{letter.stage}")
    if refused:
        print(
            f"{len(refused)} destinations' letters are not replayed: replay sends letters back "
            "to the pipeline's stages, and these are events a provider refused. Fix the cause, "
            "then `millimetric replay` their window: destinations forward what it puts on the "
            "enriched topic (the provider drops the events it has by insert id)."
        )
    sendable = [letter for letter in letters if letter.target is not None]
    unsendable = [letter for letter in letters if letter.target is None]
    start = asyncio.run(_end(bootstrap))
    asyncio.run(_send_back(bootstrap, sendable))
    _save_ledger(data_dir, ledger | {letter.ledger_key for letter in sendable})
    for letter in unsendable:
        print(f"not replayable (no record kept): {letter.ledger_key}\t{letter.reason}")
    sent_ids = {letter.event_id for letter in sendable}
    again = [
        letter
        for letter in (asyncio.run(_read(bootstrap, start, wait_s)) if sendable else [])
        if letter.event_id and letter.event_id in sent_ids
    ]
    for letter in again:
        print(f"failed again: {letter.event_id}\t{letter.stage}\t{letter.reason}")
    print(
        f"replayed {len(sendable)}, failed again {len(again)}, not replayable {len(unsendable)}, "
        f"skipped {len(ledger)} replayed before, destinations' letters not replayed {len(refused)}"
    )
    return 1 if again or unsendable or (refused and reason) else 0
