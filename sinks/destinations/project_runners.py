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
from aiokafka import AIOKafkaProducer
from cryptography.fernet import InvalidToken

from ingest.keys_topic import KeysReader
from ingest.lag import destination_group, follow_group, unfollow_group
from ingest.records import DestinationRecord
from ingest.retry import retrying
from ingest.settings import Settings
from ingest.topics import namespaced
from sinks.destinations.forgets import ForgetForwarder
from sinks.destinations.project_destinations import build, cipher, deletion
from sinks.destinations.runner import Runner
from sinks.erasure_filter import ErasureFilter

log = logging.getLogger(__name__)


RESTART_MAX_S = 60.0  # the longest wait between restarts of a destination that keeps crashing
STOP_WAIT_S = 30.0  # a runner told to stop delivers no more (an undelivered batch is sent again)


class _Unusable(Exception):
    """A record no restart will mend: its credentials do not decrypt, a setting is missing."""


@dataclass
class _Running:
    group: str
    stop: asyncio.Event
    task: asyncio.Future[None]


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
        self.serving: set[str] = set()  # ids whose workers are up (not waiting for a restart)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the keys topic until `stop`; then stop every runner (each flushes first)."""
        reader = KeysReader({"bootstrap_servers": self.bootstrap, **self.security})
        fetches = reader.fetches()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                fetched = asyncio.ensure_future(anext(fetches))
                await asyncio.wait({fetched, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetched.done():  # stopped while connecting or waiting out an outage
                    fetched.cancel()
                    await asyncio.gather(fetched, return_exceptions=True)
                    break
                # Only a fetch's last record of each destination: at start, one added and
                # removed long ago is never started.
                latest: dict[str, DestinationRecord] = {
                    r["destination_id"]: r  # type: ignore[misc]
                    for r in fetched.result()
                    if r.get("record") == "destination"
                }
                for record in latest.values():
                    await self.apply(record)
        finally:
            stopping.cancel()
            await fetches.aclose()
            await reader.stop()
            # Side by side: one provider slow to answer must not hold back the others' stops.
            await asyncio.gather(*(self._stop(d) for d in list(self.running)))

    async def apply(self, record: DestinationRecord) -> None:
        """Start, or stop, the record's runner."""
        destination_id = record["destination_id"]
        if destination_id in self.running:
            await self._stop(destination_id)
        if record["removed_at"] is not None:
            return
        group = namespaced(destination_group(f"{record['type']}-{destination_id}"))
        halt = asyncio.Event()
        supervised = asyncio.ensure_future(self._supervise(record, group, halt))
        self.running[destination_id] = _Running(group, halt, supervised)
        follow_group(group, "enriched")  # its lag in metrics and `status`, as the settings' ones

    async def _supervise(self, record: DestinationRecord, group: str, halt: asyncio.Event) -> None:
        """Serve the destination until `halt`; a crash of it (a provider's odd answer, a record
        the runner cannot use, the broker) is logged and it restarts with backoff, apart from
        every other destination."""
        destination_id = record["destination_id"]
        try:
            await retrying(
                f"destination_{destination_id}_run",
                lambda: self._serve(record, group, halt),
                permanent=lambda e: isinstance(e, _Unusable),
                max_delay_s=RESTART_MAX_S,
            )
        except _Unusable as error:
            log.error(
                "destination %s of %s not started: its credentials do not decrypt with this "
                "MILLIMETRIC_DESTINATIONS_SECRET_KEY or are invalid (%r)",
                destination_id,
                record["project"],
                error.__cause__,
            )

    async def _serve(self, record: DestinationRecord, group: str, halt: asyncio.Event) -> None:
        """Run the record's runner (and forget forwarder) until `halt`; raise what stopped one
        before it, once both are stopped."""
        destination_id, project = record["destination_id"], record["project"]
        try:
            destination, deletes = build(record, self.fernet), deletion(record, self.fernet)
        except (InvalidToken, KeyError, ValueError) as error:
            raise _Unusable(repr(error)) from error
        runner = Runner(
            destination,
            self.settings,
            self.bootstrap,
            self.grouped,
            self.client,
            self.producer,
            self.erasures,
            group_id=group,
            project=project,
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
                    project=project,
                    label=destination_id,
                )
            )
        inner = asyncio.Event()  # stops both when one of them fails
        tasks: list[asyncio.Future[Any]] = []
        self.serving.add(destination_id)
        try:
            for worker in workers:
                await worker.start()
            tasks = [asyncio.ensure_future(worker.run(inner)) for worker in workers]
            log.info("destination %s (%s) of %s started", destination_id, record["type"], project)
            halted = asyncio.ensure_future(halt.wait())
            await asyncio.wait({*tasks, halted}, return_when=asyncio.FIRST_COMPLETED)
            halted.cancel()
        finally:
            self.serving.discard(destination_id)
            inner.set()
            try:
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            finally:  # also when a stop past STOP_WAIT_S cancels this: no consumer stays a member
                for worker in workers:
                    try:
                        await worker.stop()
                    except Exception as error:  # one never started: nothing of it to stop
                        log.debug(
                            "destination %s: stopping %r failed (%r)", destination_id, worker, error
                        )
        if halt.is_set():  # removed or stopping: what a worker raised meanwhile restarts nothing
            return
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                log.error("destination %s of %s crashed", destination_id, project, exc_info=outcome)
                raise outcome
        raise RuntimeError(f"destination {destination_id} stopped by itself")  # serve again

    async def _stop(self, destination_id: str) -> None:
        running = self.running.pop(destination_id)
        unfollow_group(running.group)
        running.stop.set()
        # Serving, it flushes and returns; waiting for a restart, it has nothing to deliver.
        if destination_id in self.serving:
            await asyncio.wait({running.task}, timeout=STOP_WAIT_S)
        running.task.cancel()
        await asyncio.gather(running.task, return_exceptions=True)
        log.info("destination %s stopped", destination_id)
