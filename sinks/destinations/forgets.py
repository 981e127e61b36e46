"""Forgets forwarded to the providers' deletion APIs (PostHog person deletion, Mixpanel's GDPR
deletion, Amplitude's user deletion), one consumer group per provider on the erasures topic.

Each erasure (a forget resolved to the person's user id and every device) is sent to the
provider, retried like events (Retry-After honoured, never given up), and its outcome put on the
forget-destinations topic, keyed `forget_id:destination`, which `millimetric forget status`
reads: `done`, `refused` with the provider's message, or `nothing_to_delete`. The offset is
committed once the outcome is recorded, so a restart forwards again only what had no outcome yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ingest.lag import destination_group
from ingest.records import Erasure, decode, encode
from ingest.retry import retrying
from ingest.settings import Settings
from ingest.topics import namespaced, require
from sinks.destinations.contract import Deletion, message
from sinks.destinations.runner import answered

log = logging.getLogger(__name__)


class ForgetForwarder:
    """Forwards every erasure to one provider's deletion API."""

    def __init__(
        self,
        deletion: Deletion,
        settings: Settings,
        bootstrap: str,
        security: dict[str, Any],
        client: httpx.AsyncClient,
        producer: AIOKafkaProducer,
        group_id: str | None = None,
        project: str | None = None,
        label: str | None = None,
    ) -> None:
        self.deletion = deletion
        self.name = deletion.name
        self.project = project  # a per-project destination forwards only its project's forgets
        self.label = label or self.name  # names its outcomes: its id when per-project
        self.settings = settings
        self.client = client
        self.producer = producer
        self.erasures, self.outcomes = require("erasures", "forget_destinations")
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            **security,
            group_id=group_id or namespaced(f"{destination_group(self.name)}-forgets"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )

    async def start(self) -> None:
        """Join the group."""
        self.consumer.subscribe([self.erasures.name])
        await self.consumer.start()

    async def stop(self) -> None:
        """Leave the group."""
        await self.consumer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Forward erasures until `stop` is set. A stop while a provider is down leaves the
        erasure uncommitted: it is forwarded again after the restart (deletes repeat safely)."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                fetched = await self.consumer.getmany(timeout_ms=500, max_records=50)
                for tp, messages in fetched.items():
                    for m in messages:
                        erasure = decode(m.value)
                        if self.project in (None, erasure["project"]):
                            forwarding = asyncio.ensure_future(self.forward(erasure))
                            await asyncio.wait(
                                {forwarding, stopping}, return_when=asyncio.FIRST_COMPLETED
                            )
                            if not forwarding.done():
                                forwarding.cancel()
                                await asyncio.gather(forwarding, return_exceptions=True)
                                return
                            forwarding.result()
                        await self.consumer.commit({tp: m.offset + 1})
        finally:
            stopping.cancel()

    async def forward(self, erasure: Erasure) -> dict[str, Any]:
        """Send one erasure and record its outcome."""
        request = self.deletion.request(erasure)
        if request is None:
            status, detail = "nothing_to_delete", "no id this provider deletes by"
        else:

            def read(response: httpx.Response) -> tuple[str, str]:
                if response.is_success:
                    return "done", ""
                return "refused", message(response)

            status, detail = await answered(
                self.label, self.client, lambda: request, read, self.settings
            )
        outcome = {
            "v": 1,
            "forget_id": erasure["forget_id"],
            "project": erasure["project"],
            "destination": self.label,
            "status": status,
            "detail": detail,
            "at": int(time.time() * 1000),
        }
        key = f"{erasure['forget_id']}:{self.label}".encode()

        async def send() -> None:
            await self.producer.send_and_wait(self.outcomes.name, key=key, value=encode(outcome))

        await retrying("destination_forget_outcome", send, max_delay_s=30.0)
        if status == "refused":
            log.warning("%s refused forget %s: %s", self.label, erasure["forget_id"], detail)
        return outcome


async def outcomes(
    bootstrap: str, forget_id: str, security: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Each destination's latest outcome of one forget, read from the forget-destinations topic."""
    from aiokafka import TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, **(security or {}), enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(require("forget_destinations")[0].name, 0)
        if tp.topic not in await consumer.topics():
            return {}
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        # Tansu's end offset may undercount by a batch: read until a poll brings nothing more.
        end = (await consumer.end_offsets([tp]))[tp]
        found: dict[str, dict[str, Any]] = {}
        while True:
            batch = (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
            for m in batch:
                record = decode(m.value)
                if record["forget_id"] == forget_id:
                    found[record["destination"]] = record
            if not batch and await consumer.position(tp) >= end:
                return found
    finally:
        await consumer.stop()
