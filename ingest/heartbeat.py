"""Heartbeats: every sink puts one on the raw topic at a fixed interval; the processor passes it
on to the enriched topic as it is, and the sink that reads it records its trip time. They never
reach a table or a funnel counter, and tell how fresh the pipeline is when no traffic flows."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from ingest.metrics import HEARTBEAT_AT, HEARTBEAT_SECONDS
from ingest.records import encode
from ingest.topics import topic

HEARTBEAT = "heartbeat"


def is_heartbeat(record: Any) -> bool:
    """Whether a decoded raw or enriched record is a heartbeat."""
    return isinstance(record, dict) and record.get("type") == HEARTBEAT


def arrived(record: dict[str, Any]) -> None:
    """A sink read a heartbeat: record its trip time and when it came."""
    HEARTBEAT_SECONDS.set(max(0.0, time.time() - record["sent_at"] / 1000))
    HEARTBEAT_AT.set_to_current_time()


async def send_forever(producer: AIOKafkaProducer, interval_s: float, stop: asyncio.Event) -> None:
    """Put a heartbeat on the raw topic every `interval_s` until `stop`; keys rotate so that
    every partition (and so every processor and sink) carries them in turn."""
    raw = topic("raw").name
    for n in itertools.count():
        value = encode({"v": 1, "type": HEARTBEAT, "sent_at": int(time.time() * 1000)})
        # The broker away: the missing heartbeats are the signal.
        with contextlib.suppress(Exception):
            await producer.send_and_wait(raw, value, key=f"{HEARTBEAT}:{n}".encode())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set():
            return
