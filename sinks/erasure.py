"""Forget, in the warehouse: every sink filters erased people out of its inserts, and one sink
deletes what was already written.

Each sink follows the erasures topic from its start and drops, before every insert attempt,
the rows of a forgotten person (their user_id, or any of their anonymous_ids) received up to the
forget's cutoff (any time, with `suppress`). In-flight events therefore never land after the
delete, whichever order they and the forget reach the sinks. The executor (consumer group
`millimetric-erasure`, so one sink carries out each forget) waits a grace period for every sink
to have seen the forget, deletes with what the server offers, waits for the deletes to finish,
checks nothing is left (deleting again if a straggler landed), and records the outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ingest.metrics import FORGETS
from ingest.records import Erasure, ForgetStatusRecord, decode, encode
from ingest.topics import topic
from sinks.batch import EventBatch
from sinks.clickhouse import ClickHouse

log = logging.getLogger(__name__)

EXECUTOR_GROUP = "millimetric-erasure"
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

    def add(self, erasure: Erasure) -> None:
        """Learn one erasure."""
        cutoff = FOREVER if erasure["suppress"] else erasure["cutoff"]
        person = self._projects.setdefault(erasure["project"], _Person())
        if erasure["user_id"] is not None:
            person.users[erasure["user_id"]] = max(cutoff, person.users.get(erasure["user_id"], 0))
        for anonymous_id in erasure["anonymous_ids"]:
            person.devices[anonymous_id] = max(cutoff, person.devices.get(anonymous_id, 0))
        self.seen.add(erasure["forget_id"])

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

    def _erased(self, project: str, user_id: str, anonymous_id: str, received_at: int) -> bool:
        person = self._projects.get(project)
        if person is None:
            return False
        return received_at <= max(
            person.users.get(user_id, -1) if user_id else -1, person.devices.get(anonymous_id, -1)
        )


async def follow(bootstrap: str, erasures: ErasureFilter, stop: asyncio.Event) -> None:
    """Keep `erasures` current from the erasures topic (all partitions, from the start)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    name = topic("erasures").name
    consumer.assign([TopicPartition(name, p) for p in range(topic("erasures").partitions)])
    await consumer.seek_to_beginning()
    try:
        while not stop.is_set():
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                for message in messages:
                    erasures.add(decode(message.value))
    finally:
        await consumer.stop()


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _in(values: list[str]) -> str:
    return "(" + ", ".join(_quote(v) for v in values) + ")" if values else "('')"


class ErasureExecutor:
    """Carries out erasures in ClickHouse and records each in `forget_audit`."""

    def __init__(self, ch: ClickHouse, erasures: ErasureFilter, grace_s: float) -> None:
        self._ch = ch
        self._erasures = erasures
        self._grace = grace_s
        self._lightweight = ch.features.has("lightweight_delete")

    def _count(self, sql: str) -> int:
        return int(self._ch.query_tsv(sql).strip() or 0)

    def _wait_for_mutations(self) -> None:
        while self._count(
            "SELECT count() FROM system.mutations "
            "WHERE database = currentDatabase() AND is_done = 0"
        ):
            time.sleep(0.2)

    def _delete(self, table: str, where: str) -> None:
        if table == "events" and self._lightweight:
            self._ch.execute(f"DELETE FROM events WHERE {where}")
        else:
            self._ch.execute(f"ALTER TABLE {table} DELETE WHERE {where}")
        self._wait_for_mutations()

    def _audit(self, erasure: Erasure, status: str, counts: tuple[int, int, int, int]) -> None:
        subject = erasure["user_id"] or ",".join(erasure["anonymous_ids"])
        digest = hashlib.sha256(f"{erasure['project']}:{subject}".encode()).hexdigest()
        now = int(time.time() * 1000)
        devices, events, sessions, identities = counts
        columns = {
            "forget_id": [erasure["forget_id"]],
            "project": [erasure["project"]],
            "subject_sha256": [digest],
            "status": [status],
            "requested_at_ms": [erasure["requested_at"]],
            "completed_at_ms": [now if status == "done" else 0],
            "anonymous_ids": [devices],
            "events_deleted": [events],
            "sessions_deleted": [sessions],
            "identities_deleted": [identities],
            "version": [time.time_ns()],
        }
        self._ch.insert_columns(
            "forget_audit", list(columns), list(columns.values()), list(columns)
        )

    def execute(
        self, erasure: Erasure, sleep: Callable[[float], None] = time.sleep
    ) -> ForgetStatusRecord:
        """Delete everything of the person, wait, verify, record. Blocking; run in a thread."""
        self._audit(erasure, "pending", (0, 0, 0, 0))
        project = _quote(erasure["project"])
        devices = set(erasure["anonymous_ids"])
        user = erasure["user_id"]
        if user is not None:  # also devices the warehouse knows of, should processor state lag
            devices.update(
                self._ch.query_tsv(
                    f"SELECT DISTINCT anonymous_id FROM events WHERE project = {project} "
                    f"AND user_id = {_quote(user)}"
                ).split()
            )
        person = f"anonymous_id IN {_in(sorted(devices))}"
        if user is not None:
            person = f"({person} OR user_id = {_quote(user)})"
        where = f"project = {project} AND {person}"
        sleep(self._grace)  # every sink has the erasure in its filter by now
        events = sessions = identities = 0
        for _ in range(5):
            remaining = self._count(f"SELECT count() FROM events WHERE {where}")
            if not remaining:
                break
            session_ids = self._ch.query_tsv(
                f"SELECT DISTINCT session_id FROM events WHERE {where}"
            ).split()
            events += remaining
            self._delete("events", where)
            if session_ids:
                in_sessions = f"project = {project} AND session_id IN {_in(session_ids)}"
                sessions += self._count(f"SELECT count() FROM sessions WHERE {in_sessions}")
                self._delete("sessions", in_sessions)
            sleep(self._grace)  # a straggling insert from before the filter lands by now
        identities = self._count(f"SELECT count() FROM identities WHERE {where}")
        if identities:
            self._delete("identities", where)
        self._audit(erasure, "done", (len(devices), events, sessions, identities))
        log.info(
            "forget %s done: %d events, %d session rows, %d identity rows",
            erasure["forget_id"],
            events,
            sessions,
            identities,
        )
        return {
            "v": 1,
            "record": "forget_status",
            "forget_id": erasure["forget_id"],
            "project": erasure["project"],
            "status": "done",
            "anonymous_ids": len(devices),
            "events_deleted": events,
            "sessions_deleted": sessions,
            "identities_deleted": identities,
            "requested_at": erasure["requested_at"],
            "completed_at": int(time.time() * 1000),
        }


async def execute_erasures(
    bootstrap: str,
    executor: ErasureExecutor,
    erasures: ErasureFilter,
    producer: AIOKafkaProducer,
    stop: asyncio.Event,
) -> None:
    """One sink of the group carries out each erasure; its outcome goes on the keys topic (so
    every gateway can answer for it) before its offset is committed."""
    consumer = AIOKafkaConsumer(
        topic("erasures").name,
        bootstrap_servers=bootstrap,
        group_id=EXECUTOR_GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        while not stop.is_set():
            for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                for message in messages:
                    erasure: Erasure = decode(message.value)
                    FORGETS.labels("requested").inc()
                    while erasure["forget_id"] not in erasures.seen:  # our own filter first
                        await asyncio.sleep(0.1)
                    try:
                        status = await asyncio.to_thread(executor.execute, erasure)
                        await producer.send_and_wait(
                            topic("keys").name,
                            encode(status),
                            key=f"forget:{status['forget_id']}".encode(),
                        )
                    except Exception:  # ClickHouse or the broker away: this forget again, later
                        FORGETS.labels("failed").inc()
                        log.exception("forget %s failed; retrying", erasure["forget_id"])
                        consumer.seek(tp, message.offset)
                        await asyncio.sleep(5)
                        break
                    await consumer.commit({tp: message.offset + 1})
                    FORGETS.labels("done").inc()
    finally:
        await consumer.stop()
