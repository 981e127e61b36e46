"""The error table: every error the API returns, with its status, message and fix.

The gateway answers from this table and the README's error table is checked against it by the
tests, so code and docs cannot drift. Each code doubles as a metric label.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One API error: HTTP status, what happened, how to fix it, and the stage that raises it."""

    status: int
    message: str
    fix: str
    stage: str


ERROR_CODES: dict[str, ErrorCode] = {
    "invalid_json": ErrorCode(
        400, "The body is not valid JSON.", "Send one JSON object, UTF-8 encoded.", "validate"
    ),
    "invalid_payload": ErrorCode(
        400,
        "The body does not match the endpoint's schema.",
        "Check `details`: each entry names the field and what is wrong.",
        "validate",
    ),
    "unsupported_media_type": ErrorCode(
        415,
        "Content-Type is not application/json.",
        "Send `Content-Type: application/json` (text/plain is accepted for sendBeacon).",
        "validate",
    ),
    "payload_too_large": ErrorCode(
        413,
        "The body is larger than the endpoint accepts.",
        "Split it: /v1/batch takes up to the configured bytes and events per call.",
        "validate",
    ),
    "invalid_gzip": ErrorCode(
        400,
        "The body says `Content-Encoding: gzip` but is not a whole, valid gzip stream.",
        "Send the complete gzip stream, or the plain body without that header.",
        "validate",
    ),
    "unsupported_encoding": ErrorCode(
        415,
        "The body's Content-Encoding is not one the gateway decodes.",
        "Send `Content-Encoding: gzip`, or no Content-Encoding. The size limit applies to the "
        "decompressed body.",
        "validate",
    ),
    "request_timeout": ErrorCode(
        408,
        "The body did not arrive in time; the connection is closed.",
        "Send the whole body at once, right after the headers.",
        "validate",
    ),
    "missing_api_key": ErrorCode(
        401,
        "No `Authorization: Bearer <key>` header.",
        "Send your key as a Bearer token.",
        "authenticate",
    ),
    "malformed_api_key": ErrorCode(
        401,
        "The key does not look like `(pk|sk|rk)_(live|test)_<secret>`.",
        "Copy the whole key as `millimetric keys create` printed it.",
        "authenticate",
    ),
    "invalid_api_key": ErrorCode(
        401,
        "The key is unknown or revoked.",
        "Create a new key with `millimetric keys create`.",
        "authenticate",
    ),
    "origin_not_allowed": ErrorCode(
        403,
        "A pk_ key was used from an Origin that is not on the project's allowlist.",
        "Add the origin (`millimetric keys create --type pk --origin ...`) or use an sk_ key "
        "server-side.",
        "authenticate",
    ),
    "secret_key_in_url": ErrorCode(
        403,
        "Only pk_ keys may be sent in the URL (`?key=`); this is an sk_ or rk_ key.",
        "Send sk_ and rk_ keys from servers only, as `Authorization: Bearer`. A secret key that "
        "was put in a URL or a page is exposed: revoke it (`millimetric keys revoke`).",
        "authenticate",
    ),
    "read_only_key": ErrorCode(
        403,
        "rk_ keys are read-only and cannot send events.",
        "Use an sk_ (or pk_) key.",
        "authenticate",
    ),
    "invalid_signature": ErrorCode(
        401,
        "The webhook's signature is missing or matches none of the hook's secrets.",
        "Give the hook the secret the provider signs with (`millimetric hooks rotate --secret`), "
        "and send the body unchanged: the signature covers the raw bytes.",
        "verify",
    ),
    "stale_timestamp": ErrorCode(
        401,
        "The webhook's signed timestamp is outside the provider scheme's tolerance (300 s).",
        "Check the sender's clock; replays of old deliveries are refused on purpose.",
        "verify",
    ),
    "unknown_hook": ErrorCode(
        404,
        "No live webhook receiver has this id (never created, or revoked).",
        "Create one with `millimetric hooks create` and use the URL it prints.",
        "verify",
    ),
    "publishable_key_cannot_read": ErrorCode(
        403,
        "pk_ keys are publishable (they sit in web pages) and cannot read.",
        "Read with an rk_ (read-only) or sk_ key, from a server.",
        "authenticate",
    ),
    "invalid_parameter": ErrorCode(
        400,
        "A query parameter is missing, malformed or out of range.",
        "Check `details`: each entry names the parameter and what is wrong.",
        "read",
    ),
    "store_unavailable": ErrorCode(
        503,
        "ClickHouse did not answer the read (down, not serving yet, or too slow).",
        "Retry after `Retry-After` seconds; narrow the range if it keeps timing out.",
        "read",
    ),
    "forget_requires_secret_key": ErrorCode(
        403, "/v1/forget needs an sk_ key.", "Call it server-side with an sk_ key.", "authenticate"
    ),
    "not_found": ErrorCode(
        404, "No such endpoint.", "See the endpoint list in the README or /openapi.json.", "route"
    ),
    "method_not_allowed": ErrorCode(
        405,
        "This endpoint does not take that method.",
        "Use POST to send (GET only for /v1/forget/<forget_id> and /v1/a.js).",
        "route",
    ),
    "rate_limited": ErrorCode(
        429,
        "Too many requests for this project and route.",
        "Back off for `Retry-After` seconds.",
        "limit",
    ),
    "keys_loading": ErrorCode(
        503,
        "This gateway is still reading the API keys; your key was not checked.",
        "Retry after `Retry-After` seconds: the key is not refused.",
        "authenticate",
    ),
    "too_many_invalid_requests": ErrorCode(
        429,
        "This key (for a pk_ key: this key from this client IP) sent too many invalid requests; "
        "this one was not read.",
        "Fix the requests (see the earlier answers' `details`), then retry after `Retry-After` "
        "seconds.",
        "limit",
    ),
    "overloaded": ErrorCode(
        503,
        "This gateway is handling as many requests as it may; this one was not read.",
        "Retry after `Retry-After` seconds; nothing was recorded.",
        "limit",
    ),
    "broker_unavailable": ErrorCode(
        503,
        "The event could not be stored durably right now; it was not accepted.",
        "Retry after `Retry-After` seconds; nothing was recorded.",
        "publish",
    ),
}


def markdown_table() -> str:
    """Render the table as the README shows it."""
    lines = ["| status | `error` | meaning | fix |", "|---|---|---|---|"]
    lines += [
        f"| {e.status} | `{code}` | {e.message} | {e.fix} |" for code, e in ERROR_CODES.items()
    ]
    return "\n".join(lines)
