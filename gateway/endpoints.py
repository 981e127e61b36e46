"""The ingest endpoints: authenticate -> read and validate -> limit -> publish -> 202.

Each is a plain ASGI app (`IngestEndpoint`): the hot path builds no Request or Response objects.
`ROUTES` says, per route, how a body becomes records and which setting bounds its size.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.auth import ROUTE_KINDS, AuthError, KeyStore, Principal
from gateway.decompress import decode_body
from gateway.publish import BrokerUnavailable
from gateway.query_key import authorization
from gateway.rate_limit import limit_class
from gateway.responses import error_response, send_json
from gateway.segment import SINGLE_ROUTES, is_segment_batch, is_segment_message, parse_single
from gateway.segment import records as segment_records
from gateway.state import Gateway
from gateway.validate import InvalidBody
from ingest.metrics import ACCEPTED, RATE_LIMITED
from ingest.records import Context, encode, event_key

Headers = dict[str, str]  # lower-case names, as ASGI servers pass them
JSON_TYPES = ("application/json", "text/plain")  # text/plain: navigator.sendBeacon's default
CORS_HEADERS = "authorization, content-type"
LIST_HEADERS = frozenset({"x-forwarded-for"})  # a proxy may add its own line after the client's


async def read_body(headers: Headers, receive: Receive, limit: int, timeout_s: float) -> bytes:
    """Check the content type and size (before reading it all) and return the body, which must
    arrive within `timeout_s` (a slow client must not hold a worker)."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise InvalidBody("unsupported_media_type")
    declared = headers.get("content-length")
    if declared is not None and not (declared.isascii() and declared.isdigit()):
        raise InvalidBody("invalid_json", [{"field": "(body)", "message": "bad Content-Length"}])
    if declared is not None and int(declared) > limit:
        raise InvalidBody("payload_too_large")
    try:
        async with asyncio.timeout(timeout_s):
            return await _receive_body(receive, limit)
    except TimeoutError:
        raise InvalidBody("request_timeout") from None


async def _receive_body(receive: Receive, limit: int) -> bytes:
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


def cors(keys: KeyStore, origin: str | None, principal: Principal | None) -> dict[str, str]:
    """CORS headers for browser callers: only Origins some pk_ key allows, and never for
    answers to another kind of key (so a browser page cannot read an sk_ key's answers)."""
    if origin is None or (principal is not None and principal.kind != "pk"):
        return {}
    if not keys.origin_known(origin):
        return {}
    return {"access-control-allow-origin": origin, "vary": "Origin"}


@dataclass(frozen=True, slots=True)
class Accepted:
    """A validated request: what to publish where, and what to answer once it is acknowledged."""

    topic: str
    records: list[tuple[bytes, bytes]]  # (key, encoded value): encoding fails here, not later
    answer: dict[str, Any]
    status: int = 202  # Segment's messages: 200, the only success RudderStack's SDKs know
    events: bool = True  # raw-topic events (grouped into envelopes), not a forget request


Parser = Callable[[Gateway, Context, bytes, Principal, int], Accepted]


def _encoded(
    records: list[Any], key: Callable[[Any], bytes] = event_key
) -> list[tuple[bytes, bytes]]:
    try:
        return [(key(r), encode(r)) for r in records]
    except TypeError as error:  # orjson.JSONEncodeError; validation should have caught it
        raise InvalidBody("invalid_payload", [{"field": "(body)", "message": str(error)}]) from None


def _segment(
    gw: Gateway, ctx: Context, who: Principal, now: int, body: dict[str, Any], route: str | None
) -> Accepted:
    """Segment's messages: one (`route` gives its type) or a `{"batch": [...]}`."""
    messages, defaults = [body], {}
    if route is None:
        messages = body["batch"] if isinstance(body["batch"], list) else [None]
        defaults = {k: body[k] for k in ("context", "integrations", "sentAt") if k in body}
    args = (who.project, ctx, now, who.kind == "sk")
    records, refused = segment_records(gw.validator, messages, defaults, route, *args)
    ids = [r["event_id"] for r in records]
    answer = {"ok": True, "event_ids": ids} if route is None else {"ok": True, "event_id": ids[0]}
    return Accepted(
        gw.raw_topic, _encoded(records), answer | ({"rejected": refused} if refused else {}), 200
    )


def _segment_route(kind: str) -> Parser:
    """The parser of Segment's /v1/<kind>, which takes only Segment messages of that type."""

    def parse(gw: Gateway, ctx: Context, body: bytes, who: Principal, now: int) -> Accepted:
        return _segment(gw, ctx, who, now, parse_single(body), kind)

    return parse


def _track(gw: Gateway, ctx: Context, body: bytes, who: Principal, now: int) -> Accepted:
    if (message := is_segment_message(body)) is not None:
        return _segment(gw, ctx, who, now, message, "track")
    record = gw.validator.track(body, who.project, ctx, now, who.kind == "sk")
    return Accepted(gw.raw_topic, _encoded([record]), {"ok": True, "event_id": record["event_id"]})


def _identify(gw: Gateway, ctx: Context, body: bytes, who: Principal, now: int) -> Accepted:
    if (message := is_segment_message(body)) is not None:
        return _segment(gw, ctx, who, now, message, "identify")
    record = gw.validator.identify(body, who.project, ctx, now, who.kind == "sk")
    return Accepted(gw.raw_topic, _encoded([record]), {"ok": True, "event_id": record["event_id"]})


def _batch(gw: Gateway, ctx: Context, body: bytes, who: Principal, now: int) -> Accepted:
    if (segment_body := is_segment_batch(body)) is not None:
        return _segment(gw, ctx, who, now, segment_body, None)
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
        events=False,
    )


# route -> (parser, settings field holding its body limit)
ROUTES: dict[str, tuple[Parser, str]] = {
    "track": (_track, "track_max_bytes"),
    "identify": (_identify, "track_max_bytes"),
    "batch": (_batch, "batch_max_bytes"),
    "forget": (_forget, "track_max_bytes"),
} | {route: (_segment_route(route), "track_max_bytes") for route in SINGLE_ROUTES}


def _headers(scope: Scope) -> Headers:
    """The request's headers by lower-case name: the first of repeated lines wins, as in
    Starlette, except list headers (X-Forwarded-For), whose lines are joined in order."""
    headers: Headers = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        if name not in headers:
            headers[name] = value
        elif name in LIST_HEADERS:
            headers[name] = f"{headers[name]}, {value}"
    return headers


class IngestEndpoint:
    """POST /v1/<route> as a bare ASGI app: the hot path builds no Request or Response objects."""

    def __init__(self, gateway: Gateway, route: str) -> None:
        self.gateway = gateway
        self.route = route
        self.parse, limit_field = ROUTES[route]
        # Segment's page/screen/group/alias are tracking calls: they share track's limit.
        self.limit_route = "track" if route in SINGLE_ROUTES else route
        self.limit = getattr(gateway.settings, limit_field)
        self.body_timeout_s = gateway.settings.body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw, route = self.gateway, self.route
        headers = _headers(scope)
        origin = headers.get("origin")
        if scope["method"] == "OPTIONS":
            await _preflight(gw, route, origin)(scope, receive, send)
            return
        principal: Principal | None = None
        sender = ""
        try:
            # The README's order: authenticate, the sender's invalid-request budget, validate,
            # limit. A caller without a valid key never gets its body read.
            credentials = authorization(headers.get("authorization"), scope["query_string"])
            principal = gw.keys.authenticate(credentials, origin, route)
            client = scope.get("client")
            ctx = gw.context.build(client[0] if client else None, headers)
            if principal.env == "test":  # destinations skip test traffic (README, Destinations)
                ctx["env"] = "test"
            # pk_ keys are public: one client's invalid requests must not block the others.
            sender = principal.prefix
            if principal.kind == "pk":
                sender += f":{ctx.get('ip', '')}"
            if blocked := gw.invalid_budget.blocked_for(principal.project, sender):
                wait = {"retry-after": str(max(1, math.ceil(blocked)))}
                answer = error_response(
                    "too_many_invalid_requests", {**cors(gw.keys, origin, principal), **wait}
                )
                await answer(scope, receive, send)
                return
            body = await read_body(headers, receive, self.limit, self.body_timeout_s)
            body = decode_body(headers.get("content-encoding"), body, self.limit)
            accepted = self.parse(gw, ctx, body, principal, int(time.time() * 1000))
            # The project's limit counts valid requests; invalid ones cost their sender's budget.
            bucket = limit_class(self.limit_route, headers, principal.kind)
            decision = await gw.limiter.check(
                principal.project, bucket, gw.limit_for(bucket, principal.project)
            )
            if not decision.allowed:
                RATE_LIMITED.labels(route).inc()
                retry_after = str(max(1, math.ceil(decision.retry_after)))
                answer = error_response(
                    "rate_limited", {**cors(gw.keys, origin, principal), "retry-after": retry_after}
                )
            else:
                grouped = accepted.events and gw.settings.envelopes
                await gw.publisher.publish(accepted.topic, accepted.records, grouped)
                ACCEPTED.labels(route).inc(len(accepted.records))
                await send_json(
                    send, accepted.status, accepted.answer, cors(gw.keys, origin, principal)
                )
                return
        except InvalidBody as error:
            extra = {"details": error.details} if error.details else {}
            extra_headers = cors(gw.keys, origin, principal)
            if error.code == "request_timeout":  # the rest of the body is not worth waiting for
                extra_headers["connection"] = "close"
            answer = error_response(error.code, extra_headers, **extra)
            if principal is not None:  # an invalid request costs its sender a token
                charged = await gw.invalid_budget.charge(principal.project, sender)
                if not charged.allowed:
                    extra_headers["retry-after"] = str(max(1, math.ceil(charged.retry_after)))
                    answer = error_response("too_many_invalid_requests", extra_headers)
        except AuthError as error:
            extra_headers = cors(gw.keys, origin, principal)
            if error.retry_after is not None:
                extra_headers["retry-after"] = error.retry_after
            answer = error_response(error.code, extra_headers)
        except BrokerUnavailable:
            extra_headers = {**cors(gw.keys, origin, principal), "retry-after": gw.retry_after}
            answer = error_response("broker_unavailable", extra_headers)
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
