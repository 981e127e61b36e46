"""The forgets agent, and how a forget is resolved into its erasure.

The agent only appends each request from the forgets topic to the user's identities partition
(same key as the user's links), so the devices agent (`devices_agent.py`) meets it after every
link published before it and calls `resolve_forget`: every device linked before it is erased,
through control records on the raw topic (one per device, so the events agent drops their state
in order with their events) and the erasure on the erasures topic.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import faust

from ingest.metrics import DEAD_LETTERS
from ingest.records import Erasure, ForgetControl, ForgetRequest, decode, encode
from ingest.retry import retrying
from processors.faust_app import Processor


async def dead_letter(p: Processor, value: bytes, error: Exception) -> None:
    """Dead-letter a forget that is not one (a forget request carries no IP: kept whole)."""
    DEAD_LETTERS.labels("processor", "forget_failed").inc()
    await p.dead_topic.send(
        key=b"processor",
        value=encode(
            {
                "stage": "processor",
                "reason": f"forget_failed: {type(error).__name__}: {error}",
                "record": value.decode("utf-8", "replace"),
            }
        ),
    )


async def send_delivered(topic: Any, event: Any) -> None:
    """Append `event` to `topic` under its key, delivered, not only queued."""
    await (await topic.send(key=event.key, value=event.value))


async def resolve_forget(p: Processor, key: bytes, value: bytes) -> None:
    """A forget met on the links topic: every device linked before it, erased."""
    try:
        request: ForgetRequest = decode(value)
        project, user_id = request["project"], request["user_id"]
        devices = {request["anonymous_id"]} - {None}
        if user_id is not None:
            devices.update(decode(p.user_devices.pop(key, None) or b"[]"))
        erasure: Erasure = {
            "v": 1,
            "forget_id": request["forget_id"],
            "project": project,
            "user_id": user_id,
            "anonymous_ids": sorted(devices),  # type: ignore[arg-type]
            "cutoff": request["received_at"],
            "suppress": request["suppress"],
            "requested_at": request["received_at"],
        }
    except (KeyError, TypeError) as error:  # not a whole forget: nothing to retry
        await dead_letter(p, value, error)
        return
    # A broker hiccup must not drop a forget (the event is acked after this returns).
    await retrying("forget publish", partial(publish_forget, p, key, erasure))


async def publish_forget(p: Processor, key: bytes, erasure: Erasure) -> None:
    """The control records (one per device) and the erasure, delivered, not only queued."""
    sent = []
    for anonymous_id in erasure["anonymous_ids"]:
        control: ForgetControl = {
            "v": 1,
            "type": "forget",
            "project": erasure["project"],
            "anonymous_id": anonymous_id,
            "forget_id": erasure["forget_id"],
        }
        sent.append(
            await p.raw_topic.send(
                key=f"{erasure['project']}:{anonymous_id}".encode(), value=encode(control)
            )
        )
    sent.append(await p.erasures_topic.send(key=key, value=encode(erasure)))
    await asyncio.gather(*sent)


def add_forgets_agent(p: Processor) -> None:
    """The agent that forwards forget requests onto the identities topic."""

    @p.app.agent(p.forgets_topic)
    async def forget(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                request = decode(event.value)
                if not isinstance(request, dict) or "forget_id" not in request:
                    raise TypeError("not a forget request")
            except (ValueError, TypeError) as error:  # not a forget: nothing to retry
                await dead_letter(p, event.value, error)
                continue
            # Same key as the user's links: behind them on the same partition, delivered before
            # this event is acked.
            await retrying("forget forward", partial(send_delivered, p.links_topic, event))
