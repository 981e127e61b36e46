"""`AsyncClient`: the same client for asyncio code.

track() and identify() only append to the queue, so they are plain (non-async) calls that never
block the event loop; flush(), close() and forget() wait in a worker thread and are awaited.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from millimetric.client import Client
from millimetric.messages import FlushResult


class AsyncClient:
    """`Client` for asyncio: one core (queue, sender thread, retries), awaitable waits."""

    def __init__(self, host: str, key: str, **options: Any) -> None:
        self.core = Client(host, key, **options)

    def track(
        self,
        event: str,
        properties: dict[str, Any] | None = None,
        *,
        anonymous_id: str | None = None,
        user_id: str | None = None,
        url: str | None = None,
        referrer: str | None = None,
        timestamp: datetime | str | float | None = None,
    ) -> str:
        """Queue one event and return its event_id (see `Client.track`)."""
        return self.core.track(
            event,
            properties,
            anonymous_id=anonymous_id,
            user_id=user_id,
            url=url,
            referrer=referrer,
            timestamp=timestamp,
        )

    def identify(
        self, anonymous_id: str, user_id: str, traits: dict[str, Any] | None = None
    ) -> None:
        """Queue a link of an anonymous visitor to a user (see `Client.identify`)."""
        self.core.identify(anonymous_id, user_id, traits)

    async def forget(self, user_id: str | None = None, anonymous_id: str | None = None) -> str:
        """Queue an erasure and return its forget_id once the gateway accepted it."""
        return await asyncio.wrap_future(self.core.forget(user_id, anonymous_id))

    async def flush(self, timeout: float | None = None) -> FlushResult:
        """Send what is queued and return what was accepted and what was not."""
        return await asyncio.to_thread(self.core.flush, timeout)

    async def close(self, timeout: float | None = None) -> FlushResult:
        """Flush within `timeout` and stop (see `Client.close`)."""
        return await asyncio.to_thread(self.core.close, timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
