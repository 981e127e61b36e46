"""How many accepted events the processor and the sink have yet to handle (dev's draining stop).

A stage's backlog on a topic is the topic's end minus its consumer group's committed offsets.
The end is read from the high watermarks of fetch responses, never from ListOffsets: the
embedded broker (Tansu) answers ListOffsets(latest) with the last batch's base offset + 1, which
undercounts by up to a batch, and a drain measured with it would stop before the last batch.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from ingest.topics import namespaced, topic

# stage -> (its consumer group, the topics it consumes that carry accepted events). The group
# names are those the stages use (the Faust app id, sinks/app.py's GROUP_ID).
CONSUMERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "processor": ("millimetric-processor", ("raw", "forgets", "identities")),
    "sink": ("millimetric-sink", ("enriched",)),
}


class Backlog:
    """Watches the topics the stages consume and the offsets their groups committed."""

    def __init__(self, bootstrap: str) -> None:
        self._tps = {
            stage: [
                TopicPartition(topic(role).name, p)
                for role in roles
                for p in range(topic(role).partitions)
            ]
            for stage, (_, roles) in CONSUMERS.items()
        }
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._ends = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=1024,
        )

    async def __aenter__(self) -> Backlog:
        await self._admin.start()
        await self._ends.start()
        self._ends.assign([tp for tps in self._tps.values() for tp in tps])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._ends.stop()
        await self._admin.close()

    async def _high_watermarks(self) -> dict[TopicPartition, int]:
        """Every partition's end, once a fetch response has given it."""
        tps = self._ends.assignment()
        await self._ends.getmany(timeout_ms=200, max_records=1)
        while any(self._ends.highwater(tp) is None for tp in tps):
            await self._ends.getmany(timeout_ms=200, max_records=1)
        ends = {}
        for tp in tps:
            ends[tp] = int(self._ends.highwater(tp) or 0)
            self._ends.seek(tp, ends[tp])  # later fetches return no records, only the watermark
        return ends

    async def remaining(self) -> dict[str, int]:
        """Events each stage has not committed yet, by stage."""
        # Offsets first: a processor commit read now implies its enriched records exist, and
        # the watermarks read after it then count them.
        committed = {
            stage: await self._admin.list_consumer_group_offsets(
                namespaced(group), partitions=self._tps[stage]
            )
            for stage, (group, _) in CONSUMERS.items()
        }
        ends = await self._high_watermarks()
        return {
            stage: sum(
                max(0, ends[tp] - max(0, done[tp].offset if tp in done else 0))
                for tp in self._tps[stage]
            )
            for stage, done in committed.items()
        }


async def wait_drained(
    bootstrap: str, timeout_s: float, hurry: asyncio.Event, every_s: float = 0.5
) -> dict[str, int]:
    """Wait until both stages have committed everything on their topics, `timeout_s` passes or
    `hurry` is set; print progress; return what was left (all zeros when drained)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    empty_polls = 0
    async with Backlog(bootstrap) as backlog:
        while True:
            left = await backlog.remaining()
            # Twice in a row: the second poll's watermarks come from fetches sent after the first
            # poll's commits, so records forwarded just before those commits are counted.
            empty_polls = 0 if any(left.values()) else empty_polls + 1
            if empty_polls == 2 or hurry.is_set() or loop.time() >= deadline:
                return left
            if any(left.values()):
                print(
                    f"millimetric dev: draining: {left['processor']} events to process, "
                    f"{left['sink']} to store (Ctrl-C again to stop now)",
                    flush=True,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), every_s)
