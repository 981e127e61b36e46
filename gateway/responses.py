"""Responses: every error body comes from the error table in `ingest.errors`."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from ingest.errors import ERROR_CODES


def json_response(
    payload: dict[str, Any], status: int = 202, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response serialized with orjson."""
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


def error_response(code: str, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    """`{"ok": false, "error": code, "message": ..., **extra}` with the table's status."""
    entry = ERROR_CODES[code]
    body = {"ok": False, "error": code, "message": entry.message, **extra}
    return json_response(body, entry.status, headers)
