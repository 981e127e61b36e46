"""Forget bench: forgets carried out per minute by one sink (chdb), default grace period.

N people each get one event in ClickHouse; then N resolved erasures go on the erasures topic at
once (as the processor publishes them) and the bench counts `done` statuses on the keys topic
until all N are there. The rate runs from the moment the erasures were published. There is no
same-run baseline: the figure is compared with the rate limit of /v1/forget (1/s per project).
`python -m bench.forget N` runs it alone.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.services import produce, sink_sql, stage, stage_env
from bench.table import Row
from ingest.records import decode, encode
from ingest.topics import ensure_topics, topic
from millimetric_app.embedded import EmbeddedBroker
from sinks.batch import EVENT_FIELDS


def _event(person: str, now: int) -> bytes:
    record: dict[str, object] = dict.fromkeys(EVENT_FIELDS, "")
    record |= {"project": "bench", "event_id": uuid.uuid4().hex, "type": "track",
               "event": "page", "timestamp": now, "received_at": now, "anonymous_id": person,
               "user_id": person, "session_id": person, "properties": "{}",
               "source_confidence": 1.0, "is_bot": False}  # fmt: skip
    return encode(record)


def _erasure(person: str, now: int) -> bytes:
    return encode({"v": 1, "forget_id": f"fgt_{uuid.uuid4().hex}", "project": "bench",
                   "user_id": person, "anonymous_ids": [person], "cutoff": now,
                   "suppress": False, "requested_at": now})  # fmt: skip


async def _count_done(bootstrap: str, target: int, timeout: float) -> float:
    """Seconds until `target` forgets are reported done on the keys topic."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    consumer.assign([TopicPartition(topic("keys").name, 0)])
    done: set[str] = set()
    start = time.monotonic()
    try:
        while len(done) < target:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{len(done)} of {target} forgets done in {timeout}s")
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for message in messages:
                    status = decode(message.value)
                    if status.get("record") == "forget_status" and status["status"] == "done":
                        done.add(status["forget_id"])
        return time.monotonic() - start
    finally:
        await consumer.stop()


def forgets_per_minute(root: Path, count: int) -> float:
    """Run one sink on a fresh broker and store; return forgets carried out per minute."""
    broker = EmbeddedBroker().start()
    data_dir = root / f"forget-{uuid.uuid4().hex[:6]}"
    try:
        asyncio.run(ensure_topics(broker.bootstrap))
        people = [f"person-{i}" for i in range(count)]
        now = int(time.time() * 1000)
        events = [(f"bench:{p}".encode(), _event(p, now)) for p in people]
        asyncio.run(produce(broker.bootstrap, topic("enriched").name, events))
        sink = stage("sink", stage_env(broker.bootstrap, data_dir), root).start()
        try:
            deadline = time.monotonic() + 120
            while sink_sql(data_dir, "SELECT count() FROM events").strip() != str(count):
                if time.monotonic() > deadline:
                    raise TimeoutError("the sink did not insert the people's events")
                time.sleep(0.5)
            erasures = [(f"bench:{p}".encode(), _erasure(p, now + 1)) for p in people]
            asyncio.run(produce(broker.bootstrap, topic("erasures").name, erasures))
            seconds = asyncio.run(_count_done(broker.bootstrap, count, 60 + count * 15))
            return count / seconds * 60
        finally:
            sink.stop()
    finally:
        broker.stop()


def run(root: Path, count: int) -> list[Row]:
    """The forget bench's row."""
    root.mkdir(parents=True, exist_ok=True)
    rate = forgets_per_minute(root, count)
    print(f"forget: {count} forgets at {rate:.1f}/min")
    return [Row("sink", "forgets carried out (chdb)", rate, None, "≥ 60/min", "forgets/min")]


if __name__ == "__main__":
    import tempfile

    print(run(Path(tempfile.mkdtemp(prefix="millimetric-forget-")), int(sys.argv[1])))
