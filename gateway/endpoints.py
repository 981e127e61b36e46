"""The four ingest endpoints: authenticate -> read and validate -> limit -> publish -> 202.

Each is a plain ASGI app (`IngestEndpoint`): the hot path builds no Request or Response objects.
`ROUTES` says, per route, how a body becomes records and which setting bounds its size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.auth import ROUTE_KINDS, AuthError, KeyStore, Principal
from gateway.decompress import decode_body
from gateway.publish import BrokerUnavailable
from gateway.query_key import authorization
from gateway.rate_limit import limit_class
from gateway.responses import error_response, send_json
from gateway.validate import InvalidBody
from ingest.records import Context, encode, record_key

if TYPE_CHECKING:
    from gateway.app import Gateway

Headers = dict[str, str]  # lower-case names, as ASGI servers pass them
JSON_TYPES = ("application/json", "text/plain")  # text/plain: navigator.sendBeacon's default
CORS_HEADERS = "authorization, content-type"


async def read_body(headers: Headers, receive: Receive, limit: int) -> bytes:
    """Check the content type and size (before reading it all) and return the body."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise InvalidBody("unsupported_media_type")
    declared = headers.get("content-length")
    if declared is not None and not (declared.isascii() and declared.isdigit()):
        raise InvalidBody("invalid_json", [{"field": "(body)", "message": "bad Content-Length"}])
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


Parser = Callable[["Gateway", Context, bytes, Principal, int], Accepted]


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
            credentials = authorization(headers.get("authorization"), scope["query_string"])
            principal = gw.keys.authenticate(credentials, origin, route)
            body = await read_body(headers, receive, self.limit)
            body = decode_body(headers.get("content-encoding"), body, self.limit)
            client = scope.get("client")
            ctx = gw.context.build(client[0] if client else None, headers)
            accepted = self.parse(gw, ctx, body, principal, int(time.time() * 1000))
            # Limit after validating (the spec's order): a 400 costs no token.
            bucket = limit_class(route, headers, principal.kind)
            decision = await gw.limiter.check(
                principal.project, bucket, gw.limit_for(bucket, principal.project)
            )
            if not decision.allowed:
                retry_after = str(max(1, math.ceil(decision.retry_after)))
                answer = error_response(
                    "rate_limited", {**cors(gw.keys, origin, principal), "retry-after": retry_after}
                )
            else:
                await gw.publisher.publish(accepted.topic, accepted.records)
                await send_json(send, 202, accepted.answer, cors(gw.keys, origin, principal))
                return
        except InvalidBody as error:
            extra = {"details": error.details} if error.details else {}
            answer = error_response(error.code, cors(gw.keys, origin, principal), **extra)
        except AuthError as error:
            answer = error_response(error.code, cors(gw.keys, origin, principal))
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
