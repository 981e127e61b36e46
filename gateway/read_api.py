"""GET /v1/stats, /v1/sources, /v1/events: dashboards and exports read with rk_ or sk_ keys.

A request is authenticated (pk_ keys are refused: they sit in web pages), rate limited per
project on the `read` route, its parameters validated (every problem named in `details`), then
answered from a short cache or one bounded query scoped to the key's project.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import math
import time
import zoneinfo
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import read_queries
from gateway.auth import AuthError
from gateway.models import MAX_TS_MS, MIN_TS_MS
from gateway.query_key import authorization
from gateway.read_store import Reader, StoreUnavailable, open_reader
from gateway.responses import error_response, json_response
from gateway.state import Gateway
from ingest.settings import Settings

log = logging.getLogger(__name__)

CACHE_MAX_ENTRIES = 1024
DEFAULT_EVENTS_LIMIT = 100
EVENTS_FIRST_WINDOW = timedelta(hours=1)  # /v1/events looks this far ahead first...
EVENTS_WINDOW_GROWTH = 4  # ...then 4 h, 16 h, 64 h...: at most 7 queries for 93 days
EVENT_NAME_MAX = 128  # the spec's bound on event names
PARAMETERS = {
    "stats": {"from", "to", "event", "interval", "tz"},
    "sources": {"from", "to", "group_by", "conversion_event"},
    "events": {"from", "to", "event", "limit", "cursor"},
}
PARAMETER_HELP = {
    "from": "Start: an ISO 8601 date or time, UTC unless it has an offset or `tz` is given.",
    "to": "End, exclusive; a date means the end of that day. At most READ_MAX_RANGE_DAYS "
    "after `from`.",
    "event": "Only events of this name.",
    "interval": "`day` (default) or `hour`.",
    "tz": "IANA time zone of the buckets and of `from`/`to` without offset (default UTC).",
    "group_by": "`channel` (default), `source`, `medium` or `campaign` of the entry.",
    "conversion_event": "The event that makes a session a conversion (none: no conversions).",
    "limit": f"Rows per page, 1 to READ_MAX_ROWS (default {DEFAULT_EVENTS_LIMIT}).",
    "cursor": "The previous page's `next_cursor`.",
}
TIME_ZONES = zoneinfo.available_timezones()
# What an event's time can be, its last second's end included (a date `to` of 2105-12-31).
READ_EARLIEST = datetime.fromtimestamp(MIN_TS_MS / 1000, UTC).replace(tzinfo=None)
READ_LATEST = datetime.fromtimestamp(MAX_TS_MS / 1000 + 1, UTC).replace(tzinfo=None)


class BadParameters(Exception):
    """The request's parameters, with one detail per bad one."""

    def __init__(self, details: list[dict[str, str]]) -> None:
        super().__init__(details)
        self.details = details


class Params:
    """A request's query parameters, read one by one, collecting what is wrong."""

    def __init__(self, route: str, query: dict[str, str], settings: Settings) -> None:
        self.query = query
        self.settings = settings
        self.details = [
            {"field": name, "message": "unknown parameter"}
            for name in sorted(set(query) - PARAMETERS[route])
        ]

    def bad(self, field: str, message: str) -> None:
        """Record a problem with `field`."""
        self.details.append({"field": field, "message": message})

    def choice(self, field: str, options: tuple[str, ...] | set[str], default: str) -> str:
        """One of `options`."""
        value = self.query.get(field, default)
        if value not in options:
            shown = ", ".join(sorted(options)) if len(options) < 10 else "an IANA time zone name"
            self.bad(field, f"must be {shown}")
            return default
        return value

    def name(self, field: str) -> str:
        """An optional event name ('' when absent)."""
        value = self.query.get(field, "")
        if len(value) > EVENT_NAME_MAX:
            self.bad(field, f"at most {EVENT_NAME_MAX} characters")
            return ""
        return value

    def integer(self, field: str, default: int, low: int, high: int) -> int:
        """An integer in [low, high]."""
        raw = self.query.get(field)
        if raw is None:
            return default
        if not raw.isdigit() or not low <= int(raw) <= high:
            self.bad(field, f"an integer from {low} to {high}")
            return default
        return int(raw)

    def instant(self, field: str, tz: str, end: bool) -> datetime | None:
        """An ISO 8601 date or time as naive UTC; a date `to` means the end of that day."""
        raw = self.query.get(field)
        if raw is None:
            self.bad(field, "required: an ISO 8601 date or time")
            return None
        try:
            if len(raw) == 10:
                value = datetime.combine(date.fromisoformat(raw), datetime.min.time())
                value += timedelta(days=1) if end else timedelta()
            else:
                value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
            if value.tzinfo is None:
                value = value.replace(tzinfo=zoneinfo.ZoneInfo(tz))
            # Years 1 and 9999 can step out of datetime's range by a day or an offset.
            value = value.astimezone(UTC).replace(tzinfo=None)
        except ValueError:
            self.bad(field, "not an ISO 8601 date (2026-03-01) or time (2026-03-01T12:00:00Z)")
            return None
        except OverflowError:
            value = datetime.max
        if not READ_EARLIEST <= value <= READ_LATEST:
            self.bad(field, f"must be from {READ_EARLIEST:%Y-%m-%d} to {READ_LATEST:%Y-%m-%d} UTC")
            return None
        return value

    def range(self, tz: str) -> tuple[datetime, datetime]:
        """`from` and `to`, ordered and at most `read_max_range_days` apart."""
        start = self.instant("from", tz, end=False)
        end = self.instant("to", tz, end=True)
        if start is None or end is None:
            return datetime.min, datetime.min
        max_days = self.settings.read_max_range_days
        if end <= start:
            self.bad("to", "must be after `from`")
        elif end - start > timedelta(days=max_days):
            self.bad("to", f"at most {max_days} days after `from` (READ_MAX_RANGE_DAYS)")
        return start, end

    def cursor(self) -> tuple[str, str] | None:
        """The position /v1/events' previous page ended at."""
        raw = self.query.get("cursor")
        if not raw:
            return None
        try:
            after = orjson.loads(base64.urlsafe_b64decode(raw.encode()))
            datetime.fromisoformat(after[0][:19])
            if len(after) == 2 and all(isinstance(v, str) for v in after):
                return after[0], after[1]
        except (ValueError, TypeError, IndexError, binascii.Error, orjson.JSONDecodeError):
            pass
        self.bad("cursor", "not a cursor from a previous page's `next_cursor`")
        return None

    def check(self) -> None:
        """Raise BadParameters if anything was wrong."""
        if self.details:
            raise BadParameters(self.details)


def _iso(bucket: str, tz: str) -> str:
    """A bucket start as ClickHouse printed it (in `tz`) as ISO 8601 with its offset."""
    return datetime.fromisoformat(bucket).replace(tzinfo=zoneinfo.ZoneInfo(tz)).isoformat()


async def _stats(reader: Reader, project: str, p: Params) -> dict[str, Any]:
    tz = p.choice("tz", TIME_ZONES, "UTC")
    interval = p.choice("interval", tuple(read_queries.BUCKETS), "day")
    event = p.name("event")
    start, end = p.range(tz)
    p.check()
    limit = p.settings.read_max_range_days * 24
    query = read_queries.stats(project, start, end, event, interval, tz, limit)
    rows = await reader.rows(query.sql())
    buckets = [
        {"start": _iso(b, tz), "events": int(e), "visitors": int(v), "users": int(u)}
        for b, e, v, u in rows
    ]
    return {"ok": True, "buckets": buckets}


async def _sources(reader: Reader, project: str, p: Params) -> dict[str, Any]:
    group_by = p.choice("group_by", tuple(read_queries.GROUP_COLUMNS), "channel")
    conversion_event = p.name("conversion_event")
    start, end = p.range("UTC")
    p.check()
    limit = p.settings.read_max_rows
    query = read_queries.sources(project, start, end, group_by, conversion_event, limit)
    out = []
    for entry, sessions, visitors, conversions in await reader.rows(query.sql()):
        n, c = int(sessions), int(conversions)
        row = {group_by: entry, "sessions": n, "visitors": int(visitors), "conversions": c}
        out.append(row | {"conversion_rate": c / n if n else 0.0})
    return {"ok": True, "rows": out}


async def _events(reader: Reader, project: str, p: Params) -> dict[str, Any]:
    limit = p.integer("limit", DEFAULT_EVENTS_LIMIT, 1, p.settings.read_max_rows)
    event = p.name("event")
    after = p.cursor()
    start, end = p.range("UTC")
    p.check()
    # One row more than asked tells whether another page follows. A page is looked for in a
    # window after the cursor, widened until it fills: sorting a whole range is what costs.
    low = datetime.fromisoformat(after[0][:19]) if after else start
    window = EVENTS_FIRST_WINDOW
    while True:
        high = min(end, low + window)
        query = read_queries.events(project, start, high, event, after, limit + 1)
        rows = await reader.rows(query.sql())
        if len(rows) > limit or high >= end:
            break
        window *= EVENTS_WINDOW_GROWTH
    page = [_event(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = base64.urlsafe_b64encode(orjson.dumps([last[0], last[1]])).decode()
    return {"ok": True, "events": page, "next_cursor": next_cursor}


def _event(row: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(zip(read_queries.EVENT_COLUMNS, row[1:], strict=True))
    out["timestamp"] = datetime.fromisoformat(row[0]).replace(tzinfo=UTC).isoformat()
    with contextlib.suppress(orjson.JSONDecodeError):  # else kept as the stored text
        out["properties"] = orjson.loads(out["properties"] or "{}")
    return out


Answer = Callable[[Reader, str, Params], Any]
ANSWERS: dict[str, Answer] = {"stats": _stats, "sources": _sources, "events": _events}


class ReadApi:
    """The read routes of one gateway: its key store, limiter, store reader and answer cache."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.reader: Reader = open_reader(gateway.settings)
        self._cache: dict[tuple[str, str, bytes], tuple[float, dict[str, Any]]] = {}

    def routes(self) -> list[Route]:
        """GET /v1/stats, /v1/sources, /v1/events."""
        return [Route(f"/v1/{name}", self._endpoint(name), methods=["GET"]) for name in ANSWERS]

    def _endpoint(self, name: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await self.answer(name, request)

        return endpoint

    async def answer(self, name: str, request: Request) -> Response:
        """Authenticate, limit, validate, then answer from the cache or ClickHouse."""
        gw = self.gateway
        try:
            credentials = authorization(
                request.headers.get("authorization"), request.scope["query_string"]
            )
            who = gw.keys.authenticate(credentials, request.headers.get("origin"), "read")
        except AuthError as error:
            retry = {"retry-after": error.retry_after} if error.retry_after is not None else None
            return error_response(error.code, retry)
        decision = await gw.limiter.check(who.project, "read", gw.limit_for("read", who.project))
        if not decision.allowed:
            wait = str(max(1, math.ceil(decision.retry_after)))
            return error_response("rate_limited", {"retry-after": wait})
        query = {k: v for k, v in request.query_params.items() if k != "key"}
        key = (who.project, name, orjson.dumps(sorted(query.items())))
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return json_response(cached[1], 200)
        try:
            body = await ANSWERS[name](self.reader, who.project, Params(name, query, self.settings))
        except BadParameters as error:
            return error_response("invalid_parameter", details=error.details)
        except StoreUnavailable as error:
            log.warning("read %s for %s failed: %s", name, who.project, error)
            return error_response("store_unavailable", {"retry-after": "1"})
        if self.settings.read_cache_s > 0:
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.pop(next(iter(self._cache)))  # the oldest entry
            self._cache[key] = (now + self.settings.read_cache_s, body)
        return json_response(body, 200)

    async def close(self) -> None:
        """Release the store reader."""
        await self.reader.close()
