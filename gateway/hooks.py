"""POST /v1/hooks/{hook_id}: a provider's webhook in, verified over its raw bytes, published raw.

Order: known hook (404) -> bounded body, inflated under the limit (413) -> signature and its
timestamp (401) -> JSON object (400) -> project's limit (429) -> raw topic, acks=all -> 202.
Mapping to an event happens in the processor, so a mapping bug never loses a delivery. The event
id derives from the hook and the provider's delivery id: a redelivery is the same row.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from gateway.decompress import decode_body
from gateway.endpoints import _headers, read_body
from gateway.publish import BrokerUnavailable
from gateway.responses import error_response, send_json
from gateway.state import Gateway
from gateway.validate import InvalidBody
from gateway.webhook_schemes import SCHEMES, Scheme, SignatureError, verify
from ingest.hook_sources import lookup
from ingest.metrics import WEBHOOK_DELIVERIES
from ingest.records import HookRecord, WebhookDelivery, encode, record_key

ROUTE = "hooks"  # the rate-limit table's row


def delivery_id(scheme: Scheme, headers: dict[str, str], body: Any, raw: bytes) -> str:
    """The provider's delivery id; without one, the body's SHA-256 (the same body is the same
    delivery)."""
    value = lookup(scheme.delivery_id, headers, body)
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
        return str(value)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def mapped_headers(mapping: dict[str, Any]) -> set[str]:
    """The headers a mapping reads (`header.<name>` sources), kept with the body."""
    values: list[Any] = []
    for value in mapping.values():
        values += (
            value.values()
            if isinstance(value, dict)
            else value
            if isinstance(value, list)
            else [value]
        )
    return {
        v.partition(".")[2].lower()
        for v in values
        if isinstance(v, str) and v.startswith("header.")
    }


def event_id(hook_id: str, delivery: str) -> str:
    """32 hex digits, the same for every delivery of one provider event to one hook."""
    return hashlib.sha256(f"{hook_id}:{delivery}".encode()).hexdigest()[:32]


class HookEndpoint:
    """The ASGI app behind `/v1/hooks/{hook_id}`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.limit = gateway.settings.hook_max_bytes
        self.body_timeout_s = gateway.settings.body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        headers = _headers(scope)
        hook = gw.hooks.get(scope["path_params"]["hook_id"])
        provider = hook["provider"] if hook is not None else "unknown"
        try:
            if hook is None:
                raise InvalidBody("unknown_hook")
            record = await self._accept(hook, headers, receive)
            decision = await gw.limiter.check(
                hook["project"], ROUTE, gw.limit_for(ROUTE, hook["project"])
            )
            if not decision.allowed:
                retry_after = str(max(1, math.ceil(decision.retry_after)))
                code, answer = (
                    "rate_limited",
                    error_response("rate_limited", {"retry-after": retry_after}),
                )
            else:
                key = record_key(hook["project"], None, record["event_id"])
                await gw.publisher.publish(gw.raw_topic, [(key, encode(record))])
                WEBHOOK_DELIVERIES.labels(provider, "accepted").inc()
                await send_json(send, 202, {"ok": True, "event_id": record["event_id"]}, {})
                return
        except (InvalidBody, SignatureError) as error:
            details = getattr(error, "details", None)
            code, answer = (
                error.code,
                error_response(error.code, **({"details": details} if details else {})),
            )
        except BrokerUnavailable:
            code = "broker_unavailable"
            answer = error_response(code, {"retry-after": gw.retry_after})
        WEBHOOK_DELIVERIES.labels(provider, code).inc()
        await answer(scope, receive, send)

    async def _accept(
        self, hook: HookRecord, headers: dict[str, str], receive: Receive
    ) -> WebhookDelivery:
        scheme = SCHEMES[hook["provider"]]
        raw = await read_body(headers, receive, self.limit, self.body_timeout_s)
        raw = decode_body(headers.get("content-encoding"), raw, self.limit)
        # Verified before parsing: a forged body is never read as JSON.
        signed_id = lookup(scheme.delivery_id, headers, None) or ""
        verify(
            scheme,
            hook["secrets"],
            headers,
            raw,
            str(signed_id),
            time.time(),
            hook["signature_header"],
        )
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            raise InvalidBody(
                "invalid_json", [{"field": "(body)", "message": str(error)}]
            ) from None
        if not isinstance(body, dict):
            raise InvalidBody("invalid_payload", [{"field": "(body)", "message": "not an object"}])
        delivery = delivery_id(scheme, headers, body, raw)
        mapping = {**scheme.mapping, **(hook["mapping"] or {})}
        keep = set(scheme.keep_headers) | mapped_headers(mapping)
        return {
            "v": 1,
            "type": "webhook",
            "project": hook["project"],
            "event_id": event_id(hook["hook_id"], delivery),
            "hook_id": hook["hook_id"],
            "provider": hook["provider"],
            "delivery_id": delivery,
            "received_at": int(time.time() * 1000),
            "headers": {h: headers[h] for h in sorted(keep) if h in headers},
            "body": raw.decode("utf-8", "replace"),
            "mapping": mapping,
        }
