"""Request metrics: every answer the gateway gives, counted by route and status, and timed.

A pure ASGI wrapper around the whole app, so the endpoints need no hook. Paths map to a bounded
route label (`other` for anything unknown): a scanner's random paths add no series.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.metrics import REQUEST_SECONDS, REQUESTS

ROUTE_LABELS = {
    "/v1/track": "track",
    "/v1/identify": "identify",
    "/v1/batch": "batch",
    "/v1/forget": "forget",
    "/v1/a.js": "snippet",
    "/health": "health",
    "/ready": "ready",
    "/openapi.json": "openapi",
}


def route_label(path: str) -> str:
    """The bounded route label of a request path."""
    if path.startswith("/v1/forget/"):
        return "forget_status"
    return ROUTE_LABELS.get(path, "other")


class RequestMetrics:
    """Counts (`millimetric_gateway_requests_total`) and times every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Children by label values: `labels()` takes a lock and builds a key every call.
        self._counters: dict[tuple[str, int], Any] = {}
        self._timers: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before starting a response

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        route = route_label(scope["path"])
        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - started
            counter = self._counters.get((route, status))
            if counter is None:
                counter = self._counters[route, status] = REQUESTS.labels(route, str(status))
            counter.inc()
            timer = self._timers.get(route)
            if timer is None:
                timer = self._timers[route] = REQUEST_SECONDS.labels(route)
            timer.observe(elapsed)
