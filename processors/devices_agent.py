"""The devices agent: each user's devices (`user_devices`), from the identities topic.

Links arrive re-keyed by user (`project:user_id`); a device past
MILLIMETRIC_PROCESSOR_MAX_DEVICES_PER_USER is unlinked (an `unlink` control on the raw topic, in
order with its events), so the processor never stitches a device a forget would not find. A
forget request met on this topic is resolved here, after every link published before it
(`forgets_agent.py`).
"""

from __future__ import annotations

import logging

import faust

from ingest.metrics import DEVICES_OVER_CAP
from ingest.records import ForgetControl, IdentityLink, decode, encode
from processors.faust_app import Processor
from processors.forgets_agent import resolve_forget

log = logging.getLogger(__name__)


def add_devices_agent(p: Processor) -> None:
    """The agent that keeps `user_devices` and resolves forgets in order with the links."""

    @p.app.agent(p.links_topic)
    async def remember_devices(stream: faust.StreamT[bytes]) -> None:
        cap = p.settings.processor_max_devices_per_user
        async for event in stream.events():
            record = decode(event.value)
            if "forget_id" in record:  # put here by the forget agent, which checked it
                await resolve_forget(p, event.key, event.value)
                continue
            link: IdentityLink = record
            project, anonymous_id = link["project"], link["anonymous_id"]
            devices = set(decode(p.user_devices.get(event.key) or b"[]"))
            if anonymous_id in devices:
                continue
            if len(devices) < cap:
                p.user_devices[event.key] = encode(sorted(devices | {anonymous_id}))
                continue
            # Past the cap the device is unlinked (its identities entry dropped, in order with
            # its events), so the processor never stitches a device a forget would not find.
            DEVICES_OVER_CAP.inc()
            log.warning(
                "a user of project %s has %d devices (the cap): unlinking one", project, cap
            )
            unlink: ForgetControl = {
                "v": 1,
                "type": "unlink",
                "project": project,
                "anonymous_id": anonymous_id,
                "forget_id": "",
            }
            await p.raw_topic.send(key=f"{project}:{anonymous_id}".encode(), value=encode(unlink))
