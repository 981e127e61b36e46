"""`millimetric destinations`: every configured destination in one process, apart from the sink,
and the forwarding of forgets to their deletion APIs (sinks/destinations/forgets.py).

Each destination is its own task with its own consumer group, HTTP connections and batch, so a
slow or failing provider holds back nobody else; the process is apart from the sink, so no
provider's pace, encoding or retries ever take time from ClickHouse inserts. It follows the
erasures topic (and the `suppressions` table) as the sink does and forwards nothing before it
knows every forget.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import httpx
from aiokafka import AIOKafkaProducer

from ingest.kafka_connection import group_options, security_options
from ingest.lag import watch_in_thread
from ingest.metrics import set_serving
from ingest.ops_port import serve as serve_metrics
from ingest.retry import retrying
from ingest.settings import Settings
from ingest.topics import DESTINATIONS, ensure_topics
from sinks.clickhouse import open_configured
from sinks.destinations.configured import configured, deletions
from sinks.destinations.forgets import ForgetForwarder
from sinks.destinations.project_runners import ProjectRunners
from sinks.destinations.runner import Runner
from sinks.erasure_filter import ErasureFilter, follow
from sinks.sql_endpoint import query_endpoint

log = logging.getLogger(__name__)


class _SinkEndpoint:
    """The embedded store, read through the running sink's SQL endpoint (the sink holds it)."""

    def __init__(self, settings: Settings) -> None:
        self.data_dir = settings.data_dir

    def query_tsv(self, sql: str) -> str:
        """One read query's TSV."""
        try:
            return query_endpoint(self.data_dir, sql)
        except FileNotFoundError:
            raise OSError("no sink serves the embedded store yet: waiting for it") from None


def _load_suppressions(settings: Settings, erasures: ErasureFilter) -> int:
    if settings.clickhouse_url is None:
        return erasures.load_suppressions(_SinkEndpoint(settings))  # type: ignore[arg-type]
    ch = open_configured(settings)
    try:
        return erasures.load_suppressions(ch)
    finally:
        ch.close()


async def serve(settings: Settings, bootstrap: str) -> None:
    """Run every configured destination, and every project's own (`destinations add`), until
    SIGINT/SIGTERM."""
    destinations = configured(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serve_metrics("destinations", settings.destinations_metrics_port, settings.metrics_host)
    security = security_options(settings)
    grouped = {**security, **group_options(settings)}  # for the consumers in a group
    names = [d.name for d in destinations]
    await ensure_topics(
        bootstrap,
        settings.kafka_replication_factor,
        [
            "enriched",
            "erasures",
            "forget_destinations",
            "keys",
            *(f"dead_letter_{n}" for n in DESTINATIONS),
        ],
        min_insync_replicas=settings.kafka_min_insync_replicas,
        security=security,
    )
    erasures = ErasureFilter()

    async def suppressions() -> int:
        return await asyncio.to_thread(_load_suppressions, settings, erasures)

    # Suppressions outlive the erasures topic: nothing is forwarded before they are known.
    loading = asyncio.ensure_future(
        retrying("destinations_suppressions", suppressions, max_delay_s=2.0)
    )
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not loading.done():  # stopped while waiting for the sink's store: nothing to flush
        loading.cancel()
        return
    follower = asyncio.ensure_future(follow(bootstrap, erasures, stop, security=security))
    await asyncio.wait({follower, asyncio.ensure_future(erasures.ready.wait())},
                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        **security,
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
    )
    await producer.start()
    timeout = httpx.Timeout(settings.destinations_timeout_s)
    async with httpx.AsyncClient(timeout=timeout) as client:
        runners = [
            Runner(d, settings, bootstrap, grouped, client, producer, erasures)
            for d in destinations
        ]
        forwarders = [
            ForgetForwarder(d, settings, bootstrap, grouped, client, producer)
            for d in deletions(settings)
        ]
        projects = ProjectRunners(
            settings, bootstrap, security, grouped, client, producer, erasures
        )
        await asyncio.gather(*(x.start() for x in (*runners, *forwarders)))  # each joins apart
        set_serving("destinations", True)
        watch_in_thread(bootstrap, names, "destinations", settings)
        log.info("destinations running: %s, and every project's own", ", ".join(names) or "none")
        try:
            await asyncio.gather(
                *(x.run(stop) for x in (*runners, *forwarders, projects)), follower
            )
        finally:
            set_serving("destinations", False)
            for x in (*runners, *forwarders):
                await x.stop()
            await producer.stop()
