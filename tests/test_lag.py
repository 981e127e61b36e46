"""Consumer lag against a real broker: exact in records where ListOffsets is not (Tansu), aged in
seconds, and readiness lost past MILLIMETRIC_READY_MAX_LAG_S."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.error
import urllib.request

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ingest.lag import CONSUMER_GROUPS, watch
from ingest.metrics import LAG_RECORDS, LAG_SECONDS, READY, set_lagging, set_serving
from ingest.ops_port import serve
from ingest.settings import Settings
from ingest.topics import ensure_topics, topic
from millimetric_app.embedded import free_port


def _gauge(gauge: object, stage_or_group: str) -> float:
    return sum(
        s.value
        for metric in gauge.collect()  # type: ignore[attr-defined]
        for s in metric.samples
        if stage_or_group in s.labels.values()
    )


async def _until(condition: object, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.1)


async def test_lag_counts_every_record_and_ready_follows_it(fresh_broker: str) -> None:
    group, topic_key = CONSUMER_GROUPS["sink"]
    enriched = topic(topic_key).name
    await ensure_topics(fresh_broker, 1, [topic_key])
    producer = AIOKafkaProducer(bootstrap_servers=fresh_broker, linger_ms=50)
    await producer.start()
    # Five records in one batch, on one partition: Tansu's ListOffsets would say 1.
    sent = [await producer.send(enriched, b"{}", partition=0) for _ in range(5)]
    await asyncio.gather(*sent)
    await producer.stop()
    settings = Settings(lag_interval_s=0.2, ready_max_lag_s=0.5)
    set_serving("sink", True)
    set_lagging("sink", False)
    task = asyncio.create_task(watch(fresh_broker, ("sink",), "sink", settings))
    try:
        await _until(lambda: _gauge(LAG_RECORDS, group) == 5)
        await _until(lambda: _gauge(READY, "sink") == 0)
        assert _gauge(LAG_SECONDS, group) > 0.5
        # The group catches up: it commits past the five records.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=fresh_broker, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        consumer.assign([TopicPartition(enriched, 0)])
        await consumer.commit({TopicPartition(enriched, 0): 5})
        await consumer.stop()
        await _until(lambda: _gauge(LAG_RECORDS, group) == 0)
        await _until(lambda: _gauge(READY, "sink") == 1)
        assert _gauge(LAG_SECONDS, group) == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_ops_port_answers_ready_from_serving_and_lag() -> None:
    port = free_port()
    serve("sink", port, "127.0.0.1")  # not ready until the stage says it serves

    def ready() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as error:
            return error.code

    assert ready() == 503
    set_serving("sink", True)
    assert ready() == 200
    set_lagging("sink", True)
    assert ready() == 503
    set_lagging("sink", False)
    assert ready() == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert b'millimetric_ready{stage="sink"} 1.0' in r.read()


def test_a_taken_metrics_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"127.0.0.1:{port} .*MILLIMETRIC_SINK_METRICS_PORT"):
            serve("sink", port, "127.0.0.1")


async def test_a_watch_started_before_its_topic_exists_measures_once_it_does(
    fresh_broker: str,
) -> None:
    # A stage may start before its topics are made: its lag must show once they are.
    group, topic_key = CONSUMER_GROUPS["processor"]
    task = asyncio.create_task(
        watch(fresh_broker, ("processor",), "processor", Settings(lag_interval_s=0.2))
    )
    try:
        await asyncio.sleep(1)  # a few failed starts: the topic is not there yet
        await ensure_topics(fresh_broker, 1, [topic_key])
        producer = AIOKafkaProducer(bootstrap_servers=fresh_broker)
        await producer.start()
        await producer.send_and_wait(topic(topic_key).name, b"{}", partition=0)
        await producer.stop()
        await _until(lambda: _gauge(LAG_RECORDS, group) == 1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
