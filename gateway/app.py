"""The gateway: HTTP -> validate -> authenticate -> limit -> publish, answering 202 after the ack.

`build_app(settings)` wires the steps; each step lives in its own module.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.auth import ROUTE_KINDS, AuthError, KeyStore, Principal
from gateway.client_context import ClientContext
from gateway.openapi import build_openapi
from gateway.publish import BrokerUnavailable, Publisher
from gateway.rate_limit import (
    Limit,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    load_default_limits,
)
from gateway.responses import error_response, json_response, send_json
from gateway.validate import InvalidBody, Validator
from ingest.records import Context, encode, record_key
from ingest.settings import Settings
from ingest.topics import ensure_topics, require

Headers = dict[str, str]  # lower-case names, as ASGI servers pass them
JSON_TYPES = ("application/json", "text/plain")  # text/plain: navigator.sendBeacon's default
CORS_HEADERS = "authorization, content-type"


class Gateway:
    """The state one gateway process holds: key store, limiter, producer."""

    def __init__(self, settings: Settings, bootstrap: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.keys = KeyStore(bootstrap)
        self.publisher = Publisher(
            bootstrap,
            idempotence=settings.kafka_idempotence,
            linger_ms=settings.kafka_linger_ms,
            compression=settings.kafka_compression,
            timeout_s=settings.publish_timeout_s,
        )
        self.validator = Validator(settings.properties_max_bytes, settings.batch_max_events)
        self.context = ClientContext(settings.trusted_proxies, settings.edge_country_header)
        self.limits: dict[str, Limit] = load_default_limits()
        self.limiter: RateLimiter = (
            RedisRateLimiter(settings.redis_url, fail_open=settings.rate_limit_fail_open)
            if settings.redis_url
            else MemoryRateLimiter()
        )
        raw, forgets = require("raw", "forgets")
        self.raw_topic, self.forget_topic = raw.name, forgets.name
        self.retry_after = str(max(1, round(settings.publish_timeout_s)))

    def limit_for(self, route: str, project: str) -> Limit:
        """The project's limit on `route`: its override from the keys topic, else the default."""
        return self.keys.limit_override(project, route) or self.limits[route]

    async def start(self) -> None:
        """Create missing topics, connect the producer, start following the keys topic."""
        await ensure_topics(self.bootstrap, self.settings.kafka_replication_factor)
        await self.publisher.start()
        await self.keys.start()

    async def stop(self) -> None:
        """Stop in reverse order."""
        await self.keys.stop()
        await self.publisher.stop()
        await self.limiter.close()

    async def read_body(self, headers: Headers, receive: Receive, limit: int) -> bytes:
        """Check the content type and size (before reading it all) and return the body."""
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES:
            raise InvalidBody("unsupported_media_type")
        declared = headers.get("content-length")
        if declared is not None and not (declared.isascii() and declared.isdigit()):
            raise InvalidBody(
                "invalid_json", [{"field": "(body)", "message": "bad Content-Length"}]
            )
        if declared is not None and int(declared) > limit:
            raise InvalidBody("payload_too_large")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # Nobody reads this answer; it only must not be a traceback.
                raise InvalidBody("invalid_json", [{"field": "(body)", "message": "cut short"}])
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise InvalidBody("payload_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def cors(self, origin: str | None, principal: Principal | None) -> dict[str, str]:
        """CORS headers for browser callers: only Origins some pk_ key allows, and never for
        answers to another kind of key (so a browser page cannot read an sk_ key's answers)."""
        if origin is None or (principal is not None and principal.kind != "pk"):
            return {}
        if not self.keys.origin_known(origin):
            return {}
        return {"access-control-allow-origin": origin, "vary": "Origin"}


@dataclass(frozen=True, slots=True)
class Accepted:
    """A validated request: what to publish where, and what to answer once it is acknowledged."""

    topic: str
    records: list[tuple[bytes, bytes]]  # (key, encoded value): encoding fails here, not later
    answer: dict[str, Any]


Parser = Callable[[Gateway, Context, bytes, Principal, int], Accepted]


def _key(record: Any) -> bytes:
    return record_key(
        record["project"], record["anonymous_id"], record["user_id"] or record["event_id"]
    )


def _encoded(records: list[Any], key: Callable[[Any], bytes] = _key) -> list[tuple[bytes, bytes]]:
    try:
        return [(key(r), encode(r)) for r in records]
    except TypeError as error:  # orjson.JSONEncodeError; validation should have caught it
        raise InvalidBody("invalid_payload", [{"field": "(body)", "message": str(error)}]) from None


def _track(gw: Gateway, ctx: Context, body: bytes, who: Principal, now: int) -> Accepted:
    record = gw.validator.track(body, who.project, ctx, now, who.kind == "sk")
    return Accepted(gw.raw_topic, _encoded([record]), {"ok": True, "event_id": record["event_id"]})


def _identify(gw: Gateway, ctx: Context, body: bytes, who: Principal, now: int) -> Accepted:
    record = gw.validator.identify(body, who.project, ctx, now, who.kind == "sk")
    return Accepted(gw.raw_topic, _encoded([record]), {"ok": True, "event_id": record["event_id"]})


def _batch(gw: Gateway, ctx: Context, body: bytes, who: Principal, now: int) -> Accepted:
    records = gw.validator.batch(body, who.project, ctx, now, who.kind == "sk")
    return Accepted(
        gw.raw_topic,
        _encoded(records),
        {"ok": True, "event_ids": [r["event_id"] for r in records]},
    )


def _forget(gw: Gateway, ctx: Context, body: bytes, who: Principal, now: int) -> Accepted:
    record = gw.validator.forget(body, who.project, now)
    subject = record["user_id"] or record["anonymous_id"]
    return Accepted(
        gw.forget_topic,
        _encoded([record], lambda r: f"{who.project}:{subject}".encode()),
        {"ok": True, "forget_id": record["forget_id"]},
    )


# route -> (parser, settings field holding its body limit)
ROUTES: dict[str, tuple[Parser, str]] = {
    "track": (_track, "track_max_bytes"),
    "identify": (_identify, "track_max_bytes"),
    "batch": (_batch, "batch_max_bytes"),
    "forget": (_forget, "track_max_bytes"),
}


def _headers(scope: Scope) -> Headers:
    # One pass over the raw list; reversed so the first of repeated headers wins, as in Starlette.
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}


class IngestEndpoint:
    """POST /v1/<route> as a bare ASGI app: the hot path builds no Request or Response objects."""

    def __init__(self, gateway: Gateway, route: str) -> None:
        self.gateway = gateway
        self.route = route
        self.parse, limit_field = ROUTES[route]
        self.limit = getattr(gateway.settings, limit_field)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw, route = self.gateway, self.route
        headers = _headers(scope)
        origin = headers.get("origin")
        if scope["method"] == "OPTIONS":
            await _preflight(gw, route, origin)(scope, receive, send)
            return
        principal: Principal | None = None
        try:
            # The spec's order: authenticate, validate, limit. A caller without a valid key
            # never gets its body read.
            principal = gw.keys.authenticate(headers.get("authorization"), origin, route)
            body = await gw.read_body(headers, receive, self.limit)
            client = scope.get("client")
            ctx = gw.context.build(client[0] if client else None, headers)
            accepted = self.parse(gw, ctx, body, principal, int(time.time() * 1000))
            # Limit after validating (the spec's order): a 400 costs no token.
            decision = await gw.limiter.check(
                principal.project, route, gw.limit_for(route, principal.project)
            )
            if not decision.allowed:
                retry_after = str(max(1, math.ceil(decision.retry_after)))
                answer = error_response(
                    "rate_limited", {**gw.cors(origin, principal), "retry-after": retry_after}
                )
            else:
                await gw.publisher.publish(accepted.topic, accepted.records)
                await send_json(send, 202, accepted.answer, gw.cors(origin, principal))
                return
        except InvalidBody as error:
            extra = {"details": error.details} if error.details else {}
            answer = error_response(error.code, gw.cors(origin, principal), **extra)
        except AuthError as error:
            answer = error_response(error.code, gw.cors(origin, principal))
        except BrokerUnavailable:
            answer = error_response(
                "broker_unavailable", {**gw.cors(origin, principal), "retry-after": gw.retry_after}
            )
        await answer(scope, receive, send)


def _preflight(gw: Gateway, route: str, origin: str | None) -> Response:
    kinds, _ = ROUTE_KINDS[route]
    if origin is None or "pk" not in kinds or not gw.keys.origin_known(origin):
        return error_response("origin_not_allowed")
    return Response(
        status_code=204,
        headers={
            "access-control-allow-origin": origin,
            "access-control-allow-methods": "POST, OPTIONS",
            "access-control-allow-headers": CORS_HEADERS,
            "access-control-max-age": "600",
            "vary": "Origin",
        },
    )


async def _forget_status(request: Request) -> Response:
    """GET /v1/forget/{forget_id}: pending until a sink has carried the forget out (sk_ keys)."""
    gw: Gateway = request.app.state.gateway
    try:
        who = gw.keys.authenticate(
            request.headers.get("authorization"), request.headers.get("origin"), "forget"
        )
    except AuthError as error:
        return error_response(error.code)
    forget_id = request.path_params["forget_id"]
    status = gw.keys.forget_status(who.project, forget_id)
    if status is None:
        return json_response({"ok": True, "forget_id": forget_id, "status": "pending"}, 200)
    counts = ("anonymous_ids", "events_deleted", "sessions_deleted", "identities_deleted")
    return json_response(
        {
            "ok": True,
            "forget_id": forget_id,
            "status": status["status"],
            **{name: status[name] for name in counts},  # type: ignore[literal-required]
            "duration_ms": status["completed_at"] - status["requested_at"],
        },
        200,
    )


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
    """The ASGI app: POST/OPTIONS on the four ingest routes go straight to their endpoints (the
    hot path: no router, no middleware wrapping `send`); everything else to Starlette."""

    def __init__(self, starlette: Starlette, ingest: dict[str, IngestEndpoint]) -> None:
        self.starlette = starlette
        self.state = starlette.state
        self._ingest = ingest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "OPTIONS"):
            endpoint = self._ingest.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.starlette(scope, receive, send)


def build_app(settings: Settings, bootstrap: str) -> GatewayApp:
    """The gateway's ASGI app; `bootstrap` is the Kafka cluster to publish to."""
    gateway = Gateway(settings, bootstrap)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    ingest = {f"/v1/{name}": IngestEndpoint(gateway, name) for name in ROUTES}
    # Also routed, so that other methods on these paths get Starlette's 405.
    routes = [
        Route(path, endpoint, methods=["POST", "OPTIONS"]) for path, endpoint in ingest.items()
    ]
    routes += [Route("/v1/forget/{forget_id}", _forget_status, methods=["GET"])]
    routes += [Route("/health", _health), Route("/ready", _ready)]
    routes += [Route("/openapi.json", _openapi)]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
    app.state.gateway = gateway
    app.state.openapi = build_openapi(settings)
    return GatewayApp(app, ingest)


def run(settings: Settings, bootstrap: str) -> None:
    """Serve the gateway until SIGINT/SIGTERM (uvloop + httptools)."""
    uvicorn.run(
        build_app(settings, bootstrap),
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="on",
        # X-Forwarded-For is ours to judge (MILLIMETRIC_TRUSTED_PROXIES): uvicorn would otherwise
        # believe it from any loopback peer.
        proxy_headers=False,
    )
