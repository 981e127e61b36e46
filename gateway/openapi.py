"""GET /openapi.json: generated from the pydantic models and the error table, never hand-written.

Request bodies are the models of `models.py` (which `validate.py` parses with); answers are the
models in `responses.py`; every error response lists the codes of `ingest.errors` a route can
give (which keys a route refuses comes from `auth.ROUTE_KINDS`). Limits that are settings (batch
size, body bytes) are filled in from the running gateway's settings.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.auth import ROUTE_KINDS, SEGMENT_ROUTES
from gateway.models import (
    BatchBody,
    ForgetBody,
    IdentifyBody,
    TrackBody,
)
from gateway.read_api import (
    ANSWERS,
    EVENT_NAME_MAX,
    PARAMETER_HELP,
    PARAMETERS,
    READ_EARLIEST,
    READ_LATEST,
    TIME_ZONES,
)
from gateway.read_queries import BUCKETS, GROUP_COLUMNS
from gateway.responses import (
    BatchAccepted,
    ErrorBody,
    EventsAnswer,
    ForgetAccepted,
    ForgetStatus,
    Health,
    Ready,
    SourcesAnswer,
    StatsAnswer,
    TrackAccepted,
)
from gateway.segment import FIELDS as SEGMENT_FIELDS
from gateway.segment import REQUIRED as SEGMENT_REQUIRED
from gateway.segment import SAFE_INTEGER
from gateway.validate import INT64
from ingest.errors import ERROR_CODES
from ingest.settings import Settings

REF = "#/components/schemas/{model}"

# route -> (summary, request model (None: a Segment body, `segment_body`), 202 model)
OPERATIONS: dict[str, tuple[str, type[BaseModel] | None, type[BaseModel]]] = {
    "track": ("Track one event.", TrackBody, TrackAccepted),
    "identify": (
        "Link an anonymous visitor to a user; flows as a `$identify` event.",
        IdentifyBody,
        TrackAccepted,
    ),
    "batch": ("Track many events, all or nothing.", BatchBody, BatchAccepted),
    "forget": ("Request erasure of a user's events (sk_ keys only).", ForgetBody, ForgetAccepted),
} | {
    route: (f"Segment's `{route}` call (HTTP Basic or Bearer key).", None, TrackAccepted)
    for route in SEGMENT_ROUTES
}
HOOK_ERRORS = [
    "invalid_json",
    "invalid_payload",
    "unsupported_media_type",
    "payload_too_large",
    "invalid_gzip",
    "unsupported_encoding",
    "invalid_signature",
    "stale_timestamp",
    "unknown_hook",
    "rate_limited",
    "broker_unavailable",
]
READ_ANSWERS: dict[str, tuple[str, type[BaseModel]]] = {
    "stats": ("Events, visitors and users per day or hour.", StatsAnswer),
    "sources": ("Sessions, visitors and conversions by entry source.", SourcesAnswer),
    "events": ("Raw events, a page at a time, for export.", EventsAnswer),
}
READ_ERRORS = [
    "missing_api_key",
    "malformed_api_key",
    "secret_key_in_url",
    "invalid_api_key",
    "publishable_key_cannot_read",
    "invalid_parameter",
    "rate_limited",
    "keys_loading",
    "store_unavailable",
]
SEGMENT_BODIES = {"track", "identify", "batch", *SEGMENT_ROUTES}  # they answer Segment's with 200
PER_REQUEST_STAGES = ("validate", "authenticate", "limit", "publish")
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}


def route_errors(route: str) -> list[str]:
    """The error codes a POST to /v1/{route} can answer with, in table order."""
    kinds, refusal = ROUTE_KINDS[route]
    refusals = {r for _, r in ROUTE_KINDS.values()}
    codes = []
    for code, entry in ERROR_CODES.items():
        if entry.stage not in PER_REQUEST_STAGES:
            continue
        if code in refusals and code != refusal:
            continue
        if code == "origin_not_allowed" and "pk" not in kinds:
            continue
        codes.append(code)
    return [*codes, "method_not_allowed"]


def _error_responses(codes: list[str]) -> dict[str, Any]:
    by_status: dict[int, list[str]] = defaultdict(list)
    for code in codes:
        by_status[ERROR_CODES[code].status].append(code)
    out: dict[str, Any] = {}
    for status, group in sorted(by_status.items()):
        schema = {
            "allOf": [{"$ref": REF.format(model="ErrorBody")}],
            "properties": {"error": {"enum": group}},
        }
        response: dict[str, Any] = {
            "description": " ".join(f"`{c}`: {ERROR_CODES[c].message}" for c in group),
            "content": {"application/json": {"schema": schema}},
        }
        if status in (429, 503):
            response["headers"] = RETRY_AFTER
        out[str(status)] = response
    return out


def _json(model: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=model)}}}


JSON_VALUE_REF = REF.format(model="JsonValue")
# A value inside properties and traits, as `validate.py` checks it. JSON Schema counts 2.0 and 1e30
# as integers, so the integer branch bounds every number without a fraction.
JSON_VALUE = {
    "description": "Any JSON value; numbers finite, integers within 64 bits.",
    "anyOf": [
        {"type": ["string", "boolean", "null"]},
        {"type": "integer", "minimum": INT64[0], "maximum": INT64[1]},
        {"type": "number", "not": {"type": "integer"}},
        {"type": "array", "items": {"$ref": JSON_VALUE_REF}},
        {"type": "object", "additionalProperties": {"$ref": JSON_VALUE_REF}},
    ],
}

# The free-form objects of each body, whose values are JsonValue (the models say only "object":
# a reference there would break each model's own model_json_schema()).
FREE_FORM = {"TrackBody": "properties", "TrackEvent": "properties", "IdentifyBody": "traits"}
# Bodies with a client `timestamp`, which the gateway takes only within a window of its clock.
TIMESTAMPED = ("TrackBody", "TrackEvent", "IdentifyBody")


def express_rules(name: str, schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A model's schema with the rules the gateway checks beyond the model: the timestamp window
    (`x-max-age-days`, `x-max-future-s`: JSON Schema has no time relative to now), and a forget
    naming a user_id, an anonymous_id or both; free-form values as JsonValue."""
    if name in FREE_FORM:
        schema["properties"][FREE_FORM[name]]["additionalProperties"] = {"$ref": JSON_VALUE_REF}
    if name in TIMESTAMPED:
        timestamp = schema["properties"]["timestamp"]
        timestamp["anyOf"] = [
            branch
            | {"x-max-age-days": settings.timestamp_max_age_days}
            | {"x-max-future-s": settings.timestamp_max_future_s}
            if branch.get("format") == "date-time"
            else branch
            for branch in timestamp["anyOf"]
        ]
    if name == "ForgetBody":
        schema["anyOf"] = [
            {"required": [field], "properties": {field: {"type": "string"}}}
            for field in ("user_id", "anonymous_id")
        ]
    return schema


FREE_OBJECT = {"type": ["object", "null"], "additionalProperties": {"$ref": JSON_VALUE_REF}}
# Segment's context keys that become our event's fields, whose bounds they take.
SEGMENT_CONTEXT = {
    theirs.removeprefix("context."): ours
    for theirs, ours, _ in SEGMENT_FIELDS
    if theirs.startswith("context.") and ours.isidentifier()
}


def segment_body(route: str, event: dict[str, Any]) -> dict[str, Any]:
    """A Segment-only route's body, as gateway/segment.py maps and checks it into `event` (our
    TrackEvent's schema, whose bounds its fields take): ids are strings or integers, objects
    hold JsonValues, `context` gives the page, IP and User-Agent; any other key is kept under
    properties.$segment. `timestamp` is moved by the device's clock skew (server time minus
    `sentAt`: `x-skew-of`) before its window is checked."""
    fields = event["properties"]
    text, null = fields["event_id"]["anyOf"]
    # Integral floats are ids up to 2**53 - 1 (segment.py): JSON Schema calls 7.0 an integer.
    integer = {"type": "integer", "minimum": -SAFE_INTEGER, "maximum": SAFE_INTEGER}
    required = list(SEGMENT_REQUIRED.get(route, ()))
    ids = {
        key: {"anyOf": [text, integer] if key in required else [text, integer, null]}
        for key in ("messageId", "anonymousId", "userId", "groupId", "previousId")
    }
    page = {
        key.removeprefix("page."): fields[ours]
        for key, ours in SEGMENT_CONTEXT.items()
        if key.startswith("page.")
    }
    context = {key: fields[ours] for key, ours in SEGMENT_CONTEXT.items() if "." not in key}
    return {
        "type": "object",
        "description": f"Segment's `{route}` message.",
        "properties": ids
        | {key: {"$ref": JSON_VALUE_REF} for key in ("type", "event", "name", "category")}
        | dict.fromkeys(("properties", "traits", "integrations"), FREE_OBJECT)
        | {
            "context": FREE_OBJECT
            | {
                "properties": context
                | {"page": FREE_OBJECT | {"properties": page}, "campaign": FREE_OBJECT}
            },
            "timestamp": fields["timestamp"],
            "sentAt": {
                "anyOf": [{"type": "string", "format": "date-time"}, null],
                "x-skew-of": "timestamp",
            },
        },
        "required": required,
        "additionalProperties": {"$ref": JSON_VALUE_REF},
    }


def read_parameters(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each read parameter's schema, as `read_api.Params` checks it. `from` and `to` carry their
    bounds in UTC, both included (`x-earliest`, `x-latest`), and `to` its distance from `from`
    (`x-max-range-days`): JSON Schema compares no dates."""
    instant = {
        "type": "string",
        "anyOf": [{"format": "date"}, {"format": "date-time"}],
        "x-earliest": f"{READ_EARLIEST.isoformat()}Z",
        "x-latest": f"{READ_LATEST.isoformat()}Z",
    }
    name = {"type": "string", "maxLength": EVENT_NAME_MAX}
    return {
        "from": instant,
        "to": instant | {"x-max-range-days": settings.read_max_range_days},
        "event": name,
        "conversion_event": name,
        "interval": {"type": "string", "enum": sorted(BUCKETS)},
        "group_by": {"type": "string", "enum": sorted(GROUP_COLUMNS)},
        "tz": {"type": "string", "enum": sorted(TIME_ZONES)},
        "limit": {"type": "integer", "minimum": 1, "maximum": settings.read_max_rows},
        "cursor": {"type": "string", "format": "base64url"},
    }


def build_openapi(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a gateway running with `settings`."""
    models = [m for _, req, ok in OPERATIONS.values() for m in (req, ok) if m is not None]
    models += [ErrorBody, ForgetStatus, Health, Ready, *(m for _, m in READ_ANSWERS.values())]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas = {name: express_rules(name, schema, settings) for name, schema in top["$defs"].items()}
    schemas["JsonValue"] = JSON_VALUE
    events = schemas["BatchBody"]["properties"]["events"]
    events |= {"minItems": 1, "maxItems": settings.batch_max_events}
    paths: dict[str, Any] = {}
    for route, (summary, request, accepted) in OPERATIONS.items():
        limit = settings.batch_max_bytes if route == "batch" else settings.track_max_bytes
        kinds = ", ".join(f"{k}_" for k in sorted(ROUTE_KINDS[route][0]))
        ok = {"description": "Acknowledged by the broker.", "content": _json(accepted.__name__)}
        segment_ok = ok | {"description": "A Segment body, acknowledged by the broker."}
        body_name = f"Segment{route.title()}" if request is None else request.__name__
        if request is None:
            schemas[body_name] = segment_body(route, schemas["TrackEvent"])
        post = {
            "operationId": route,
            "summary": summary,
            "description": f"Keys: {kinds}. Body at most {limit} bytes.",
            "security": [
                {"bearer": []},
                {"basic": []},
                *([{"query_key": []}] if "pk" in ROUTE_KINDS[route][0] else []),
            ],
            "requestBody": {"required": True, "content": _json(body_name)},
            "responses": {
                **({} if route in SEGMENT_ROUTES else {"202": ok}),
                **({"200": segment_ok} if route in SEGMENT_BODIES else {}),
                **_error_responses(route_errors(route)),
            },
        }
        paths[f"/v1/{route}"] = {"post": post}
        if "pk" in ROUTE_KINDS[route][0]:
            paths[f"/v1/{route}"]["options"] = {
                "operationId": f"{route}_preflight",
                "summary": "CORS preflight, answered for Origins on a pk_ key's allowlist.",
                "responses": {
                    "204": {"description": "The Origin is allowed."},
                    **_error_responses(["origin_not_allowed"]),
                },
            }
    paths["/v1/forget/{forget_id}"] = {
        "get": {
            "operationId": "forget_status",
            "summary": "Whether a forget is done, with what it deleted (sk_ keys only).",
            "security": [{"bearer": []}],
            "parameters": [
                {"name": "forget_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {"description": "Its status.", "content": _json("ForgetStatus")},
                **_error_responses(
                    [
                        "missing_api_key",
                        "malformed_api_key",
                        "invalid_api_key",
                        "forget_requires_secret_key",
                    ]
                ),
            },
        }
    }
    paths["/v1/hooks/{hook_id}"] = {
        "post": {
            "operationId": "hook",
            "summary": "A provider's webhook delivery (Stripe, GitHub, Shopify, Standard Webhooks, "
            "generic); the signature over the raw body is the credential.",
            "description": f"Body at most {settings.hook_max_bytes} bytes, decompressed.",
            "parameters": [
                {"name": "hook_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
            "responses": {
                "202": {
                    "description": "Acknowledged by the broker.",
                    "content": _json("TrackAccepted"),
                },
                **_error_responses(HOOK_ERRORS),
            },
        }
    }
    schemas_of_parameters = read_parameters(settings)
    for route in ANSWERS:
        summary, answer = READ_ANSWERS[route]
        paths[f"/v1/{route}"] = {
            "get": {
                "operationId": route,
                "summary": summary,
                "description": "Keys: rk_, sk_ (the key's project only). Ranges at most "
                f"{settings.read_max_range_days} days, at most {settings.read_max_rows} rows; "
                f"answers cached {settings.read_cache_s} s.",
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": name,
                        "in": "query",
                        "required": name in ("from", "to"),
                        "description": PARAMETER_HELP[name],
                        "schema": schemas_of_parameters[name],
                    }
                    for name in sorted(PARAMETERS[route])
                ],
                "responses": {
                    "200": {"description": "The answer.", "content": _json(answer.__name__)},
                    **_error_responses(READ_ERRORS),
                },
            }
        }
    paths["/health"] = {
        "get": {
            "operationId": "health",
            "responses": {"200": {"description": "Up.", "content": _json("Health")}},
        }
    }
    paths["/ready"] = {
        "get": {
            "operationId": "ready",
            "responses": {
                "200": {"description": "Ready.", "content": _json("Ready")},
                "503": {"description": "Not ready.", "content": _json("Ready")},
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Millimetric ingest gateway", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "The key as user name, empty password (Segment's SDKs).",
                },
                "query_key": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "key",
                    "description": "A pk_ key, for navigator.sendBeacon (it cannot set "
                    "headers); sk_ and rk_ keys here are refused (403 secret_key_in_url).",
                },
            },
        },
    }
