"""The per-project destinations' runners: this follows the keys topic and starts a runner for
each live destination record (its own consumer group, only its project's events), and a forget
forwarder when the record has deletion credentials (only its project's forgets, outcomes named by
the destination's id), and stops them when the record is removed, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from cryptography.fernet import InvalidToken

from ingest.lag import destination_group, follow_group, unfollow_group
from ingest.records import DestinationRecord, decode
from ingest.settings import Settings
from ingest.topics import namespaced, topic
from sinks.destinations.forgets import ForgetForwarder
from sinks.destinations.project_destinations import build, cipher, deletion
from sinks.destinations.runner import Runner
from sinks.erasure_filter import ErasureFilter

log = logging.getLogger(__name__)


@dataclass
class _Running:
    group: str
    workers: list[Runner | ForgetForwarder]
    stop: asyncio.Event
    tasks: list[asyncio.Future[None]]


class ProjectRunners:
    """Every per-project destination on the keys topic, each delivered by its own runner."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        security: dict[str, Any],
        grouped: dict[str, Any],
        client: httpx.AsyncClient,
        producer: AIOKafkaProducer,
        erasures: ErasureFilter,
    ) -> None:
        self.settings, self.bootstrap = settings, bootstrap
        self.security, self.grouped = security, grouped
        self.client, self.producer, self.erasures = client, producer, erasures
        self.fernet = cipher(settings)
        self.running: dict[str, _Running] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the keys topic until `stop`; then stop every runner (each flushes first)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, **self.security, enable_auto_commit=False
        )
        await consumer.start()
        tp = TopicPartition(topic("keys").name, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        try:
            while not stop.is_set():
                # Only a fetch's last record of each destination: at start, one added and
                # removed long ago is never started.
                latest: dict[str, DestinationRecord] = {}
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    for m in messages:
                        record = decode(m.value)
                        if isinstance(record, dict) and record.get("record") == "destination":
                            latest[record["destination_id"]] = record  # type: ignore[assignment]
                for record in latest.values():
                    await self.apply(record)
        finally:
            await consumer.stop()
            for destination_id in list(self.running):
                await self._stop(destination_id)

    async def apply(self, record: DestinationRecord) -> None:
        """Start, or stop, the record's runner."""
        destination_id = record["destination_id"]
        if destination_id in self.running:
            await self._stop(destination_id)
        if record["removed_at"] is not None:
            return
        try:
            destination, deletes = build(record, self.fernet), deletion(record, self.fernet)
        except (InvalidToken, KeyError, ValueError) as error:
            log.error(
                "destination %s of %s not started: its credentials do not decrypt with this "
                "MILLIMETRIC_DESTINATIONS_SECRET_KEY or are invalid (%r)",
                destination_id,
                record["project"],
                error,
            )
            return
        group = namespaced(destination_group(f"{record['type']}-{destination_id}"))
        runner = Runner(
            destination,
            self.settings,
            self.bootstrap,
            self.grouped,
            self.client,
            self.producer,
            self.erasures,
            group_id=group,
            project=record["project"],
            label=destination_id,
        )
        workers: list[Runner | ForgetForwarder] = [runner]
        if deletes is not None:
            workers.append(
                ForgetForwarder(
                    deletes,
                    self.settings,
                    self.bootstrap,
                    self.grouped,
                    self.client,
                    self.producer,
                    group_id=f"{group}-forgets",
                    project=record["project"],
                    label=destination_id,
                )
            )
        for worker in workers:
            await worker.start()
        halt = asyncio.Event()
        tasks = [asyncio.ensure_future(worker.run(halt)) for worker in workers]
        self.running[destination_id] = _Running(group, workers, halt, tasks)
        follow_group(group, "enriched")  # its lag in metrics and `status`, as the settings' ones
        log.info(
            "destination %s (%s) of %s started", destination_id, record["type"], record["project"]
        )

    async def _stop(self, destination_id: str) -> None:
        running = self.running.pop(destination_id)
        unfollow_group(running.group)
        running.stop.set()
        await asyncio.gather(*running.tasks, return_exceptions=True)
        for worker in running.workers:
            await worker.stop()
        log.info("destination %s stopped", destination_id)
