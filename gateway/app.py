"""The gateway: HTTP -> validate -> authenticate -> limit -> publish, answering 202 after the ack.

`build_app(settings)` wires the steps; each step lives in its own module, the ingest endpoints
that run them in `endpoints.py`, and the process's state they share in `state.py`. Here: the
other routes, the ASGI app, and `run`, where the gateway's serving loop starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.auth import AuthError
from gateway.endpoints import ROUTES, IngestEndpoint
from gateway.header_timeout import with_header_timeout
from gateway.hooks import HookEndpoint
from gateway.openapi import build_openapi
from gateway.query_key import authorization
from gateway.read_api import ReadApi
from gateway.request_metrics import RequestMetrics
from gateway.responses import error_response, json_response
from gateway.snippet import build as build_snippet
from gateway.snippet import serve as serve_snippet
from gateway.state import Gateway
from ingest.forget_status import answer as forget_answer
from ingest.logs import dict_config
from ingest.ops_port import serve
from ingest.settings import Settings


async def _forget_status(request: Request) -> Response:
    """GET /v1/forget/{forget_id}: pending until a sink has carried the forget out (sk_ keys)."""
    gw: Gateway = request.app.state.gateway
    try:
        credentials = authorization(
            request.headers.get("authorization"), request.scope["query_string"]
        )
        who = gw.keys.authenticate(credentials, request.headers.get("origin"), "forget")
    except AuthError as error:
        retry = {"retry-after": error.retry_after} if error.retry_after is not None else None
        return error_response(error.code, retry)
    forget_id = request.path_params["forget_id"]
    status = gw.keys.forget_status(who.project, forget_id)
    return json_response({"ok": True, **forget_answer(forget_id, status)}, 200)


async def _health(request: Request) -> Response:
    return json_response({"ok": True}, 200)


async def _ready(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    checks = {"broker": await gw.publisher.ping(), "keys_loaded": gw.keys.loaded.is_set()}
    return json_response(
        {"ok": all(checks.values()), **checks}, 200 if all(checks.values()) else 503
    )


async def _openapi(request: Request) -> Response:
    return json_response(request.app.state.openapi, 200)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "not_found")
    return error_response(code, dict(exc.headers or {}))


class GatewayApp:
    """The ASGI app: POST/OPTIONS on the ingest routes go straight to their endpoints (the
    hot path: no router, no middleware wrapping `send`); everything else to Starlette."""

    def __init__(
        self, starlette: Starlette, ingest: dict[str, IngestEndpoint], max_in_flight: int
    ) -> None:
        self.starlette = starlette
        self.state = starlette.state
        self._ingest = ingest
        self._max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "OPTIONS"):
            endpoint = self._ingest.get(scope["path"])
            if endpoint is not None:
                if self.in_flight >= self._max_in_flight:
                    # Bounded work per process: past the cap, answer before reading anything.
                    await error_response("overloaded", {"retry-after": "1"})(scope, receive, send)
                    return
                self.in_flight += 1
                try:
                    await endpoint(scope, receive, send)
                finally:
                    self.in_flight -= 1
                return
        await self.starlette(scope, receive, send)


def build_app(settings: Settings, bootstrap: str) -> GatewayApp:
    """The gateway's ASGI app; `bootstrap` is the Kafka cluster to publish to."""
    gateway = Gateway(settings, bootstrap)
    build_snippet()  # minified at start: a broken snippet source fails the boot, not a visit

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()
            await read.close()

    ingest = {f"/v1/{name}": IngestEndpoint(gateway, name) for name in ROUTES}
    # Also routed, so that other methods on these paths get Starlette's 405.
    routes = [
        Route(path, endpoint, methods=["POST", "OPTIONS"]) for path, endpoint in ingest.items()
    ]
    routes += [Route("/v1/forget/{forget_id}", _forget_status, methods=["GET"])]
    routes += [Route("/v1/hooks/{hook_id}", HookEndpoint(gateway), methods=["POST"])]
    read = ReadApi(gateway)
    routes += read.routes()
    routes += [Route("/health", _health), Route("/ready", _ready)]
    routes += [Route("/v1/a.js", serve_snippet)]
    routes += [Route("/openapi.json", _openapi)]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
    app.state.gateway = gateway
    app.state.openapi = build_openapi(settings)
    return GatewayApp(app, ingest, settings.max_in_flight)


def run(settings: Settings, bootstrap: str) -> None:
    """Serve the gateway until SIGINT/SIGTERM (uvloop + httptools, headers timed)."""
    serve("gateway", settings.gateway_metrics_port, settings.metrics_host)
    uvicorn.run(
        RequestMetrics(build_app(settings, bootstrap)),
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        http=with_header_timeout(settings.header_timeout_s),
        log_level=settings.log_level.lower(),
        log_config=dict_config(settings.log_level),
        access_log=False,
        lifespan="on",
        # X-Forwarded-For is ours to judge (MILLIMETRIC_TRUSTED_PROXIES): uvicorn would otherwise
        # believe it from any loopback peer.
        proxy_headers=False,
    )
