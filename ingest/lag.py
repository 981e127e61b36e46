"""Consumer lag: how far a consumer group is behind on a topic, per partition, in records and in
seconds (the age of the oldest record it has not committed), as the `millimetric_consumer_lag_*`
gauges.

The committed offsets come from the group (OffsetFetch). The end of each partition and the oldest
uncommitted record come from one fetch at the committed offset: a fetch's high watermark is the
exact end on Apache Kafka and on Tansu alike, where ListOffsets(latest) answers the last batch's
base offset + 1 and would undercount. The figures are as old as one measurement
(MILLIMETRIC_LAG_INTERVAL_S); a group's commit interval (the processor's 1 s, the sink's batch)
adds to them, so "a few hundred records, a second or two" is a healthy lag under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from ingest.metrics import LAG_RECORDS, LAG_SECONDS, set_lagging
from ingest.settings import Settings
from ingest.topics import DESTINATIONS, namespaced, topic

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 5.0


# stage -> (its consumer group, the topic it consumes): the processor measures the sink's too,
# so that the sink's lag keeps growing, and shows, while no sink runs.
def destination_group(name: str) -> str:
    """The consumer group of one destination (sinks/destinations)."""
    return f"millimetric-destination-{name}"


CONSUMER_GROUPS = {
    "processor": ("millimetric-processor", "raw"),
    "sink": ("millimetric-sink", "enriched"),
    **{name: (destination_group(name), "enriched") for name in DESTINATIONS},
}


@dataclass(frozen=True, slots=True)
class Lag:
    """One partition's lag."""

    records: int
    seconds: float


class LagMonitor:
    """Measures one group's lag on one topic with a consumer of its own (no group: it never
    joins the measured group, nor moves its offsets)."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.group, self.topic = group, topic
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=200,
            max_partition_fetch_bytes=64 * 1024,
        )
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        """Connect; the topic must exist."""
        await self._admin.start()
        await self._consumer.start()
        await self._consumer.topics()  # fetches the cluster's metadata
        numbers = self._consumer.partitions_for_topic(self.topic) or set()
        if not numbers:
            raise RuntimeError(f"topic {self.topic} does not exist yet")
        self._partitions = [TopicPartition(self.topic, p) for p in sorted(numbers)]
        self._consumer.assign(self._partitions)
        self._consumer.pause(*self._partitions)

    async def stop(self) -> None:
        """Disconnect."""
        await self._consumer.stop()
        await self._admin.close()

    async def measure(self) -> dict[int, Lag]:
        """Every partition's lag now, also set on the gauges."""
        committed = await self._admin.list_consumer_group_offsets(
            self.group, partitions=self._partitions
        )
        consumer = self._consumer
        started_ms = time.time() * 1000
        for tp in self._partitions:
            meta = committed.get(tp)
            if meta is not None and meta.offset >= 0:
                consumer.seek(tp, meta.offset)
            else:  # nothing committed yet: the group starts at the earliest record
                await consumer.seek_to_beginning(tp)
        consumer.resume(*self._partitions)
        oldest: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        try:
            while time.monotonic() < deadline and not all(
                (consumer.last_poll_timestamp(tp) or 0) >= started_ms for tp in self._partitions
            ):
                for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                    if messages:
                        oldest.setdefault(tp, messages[0].timestamp)
                        consumer.pause(tp)
        finally:
            consumer.pause(*self._partitions)
        now_ms = time.time() * 1000
        lags: dict[int, Lag] = {}
        for tp in self._partitions:
            start = committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0
            records = max(0, (consumer.highwater(tp) or 0) - start)
            seconds = max(0.0, (now_ms - oldest[tp]) / 1000) if records and tp in oldest else 0.0
            lags[tp.partition] = Lag(records, seconds)
            labels = (self.group, self.topic, str(tp.partition))
            LAG_RECORDS.labels(*labels).set(records)
            LAG_SECONDS.labels(*labels).set(seconds)
        return lags

    def forget_gauges(self) -> None:
        """Drop this group's lag series (its group is no longer measured)."""
        for tp in self._partitions:
            for gauge in (LAG_RECORDS, LAG_SECONDS):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.group, self.topic, str(tp.partition))


# Groups made while a stage runs (a per-project destination's): group -> the topic role it
# consumes. Written by the stage's loop, read by the watch's thread.
_followed: dict[str, str] = {}
_followed_lock = threading.Lock()


def follow_group(group: str, topic_key: str) -> None:
    """Measure `group` (a full group name) on `topic_key` too, from the watch's next round."""
    with _followed_lock:
        _followed[group] = topic_key


def unfollow_group(group: str) -> None:
    """Stop measuring `group`; its gauges go (a removed destination lags no more)."""
    with _followed_lock:
        _followed.pop(group, None)


async def _started(bootstrap: str, group: str, topic_key: str) -> LagMonitor | None:
    # A new monitor each try: aiokafka's clients cannot be started twice.
    monitor = LagMonitor(bootstrap, group, topic(topic_key).name)
    try:
        await monitor.start()
    except Exception as error:
        log.warning("lag monitor for %s cannot start yet (%r)", group, error)
        with contextlib.suppress(Exception):
            await monitor.stop()
        return None
    return monitor


async def watch(bootstrap: str, groups: Sequence[str], stage: str, settings: Settings) -> None:
    """Measure the lag of `groups` (keys of CONSUMER_GROUPS), and of those `follow_group` names
    meanwhile, every MILLIMETRIC_LAG_INTERVAL_S until cancelled; the stage's own group's lag
    decides its readiness when MILLIMETRIC_READY_MAX_LAG_S is set. A failed measurement is
    logged and tried again (the gauges keep their last values meanwhile)."""
    monitors: dict[str, LagMonitor] = {}
    own = {namespaced(CONSUMER_GROUPS[name][0]): name for name in groups}
    for name in groups:
        group, topic_key = CONSUMER_GROUPS[name]
        while (monitor := await _started(bootstrap, namespaced(group), topic_key)) is None:
            await asyncio.sleep(settings.lag_interval_s)
        monitors[monitor.group] = monitor
    try:
        while True:
            with _followed_lock:
                followed = dict(_followed)
            for group in [g for g in monitors if g not in own and g not in followed]:
                monitor = monitors.pop(group)
                monitor.forget_gauges()
                with contextlib.suppress(Exception):
                    await monitor.stop()
            for group, topic_key in followed.items():
                if group not in monitors and (
                    monitor := await _started(bootstrap, group, topic_key)
                ):
                    monitors[group] = monitor
            for monitor in monitors.values():
                try:
                    lags = await monitor.measure()
                except Exception as error:
                    log.warning("measuring the lag of %s failed (%r)", monitor.group, error)
                    continue
                if own.get(monitor.group) == stage and settings.ready_max_lag_s is not None:
                    oldest = max((lag.seconds for lag in lags.values()), default=0.0)
                    set_lagging(stage, oldest > settings.ready_max_lag_s)
            await asyncio.sleep(settings.lag_interval_s)
    finally:
        for monitor in monitors.values():
            await monitor.stop()


def watch_in_thread(bootstrap: str, groups: Sequence[str], stage: str, settings: Settings) -> None:
    """Run `watch` on a daemon thread with its own event loop, apart from the stage's loop (and
    from Faust's), so that measuring never delays the stage's work. Nobody would see the
    figures without a metrics port or a lag limit: then nothing runs."""
    if getattr(settings, f"{stage}_metrics_port") is None and settings.ready_max_lag_s is None:
        return
    threading.Thread(
        target=asyncio.run,
        args=(watch(bootstrap, groups, stage, settings),),
        name=f"lag-{stage}",
        daemon=True,
    ).start()
