"""The read API's SQL, as data, and the one function that puts values into it.

Neither path to ClickHouse has server-side parameters: the 18.16 server predates `{name:Type}`
query parameters, clickhouse-driver substitutes `%(name)s` on the client anyway, and the sink's
loopback endpoint takes SQL text. So every value goes through `literal()` (typed, escaped, the
only place that quotes), identifiers come only from the tables below (never from a request),
and the templates are constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

# /v1/stats bucket functions and /v1/sources entry columns, by the request's validated value.
BUCKETS = {"day": "toStartOfDay", "hour": "toStartOfHour"}
GROUP_COLUMNS = {
    "channel": "entry_channel",
    "source": "entry_source",
    "medium": "entry_medium",
    "campaign": "entry_campaign",
}
EVENT_COLUMNS = (
    "event_id",
    "type",
    "event",
    "anonymous_id",
    "user_id",
    "session_id",
    "url",
    "path",
    "referrer",
    "properties",
    "source",
    "medium",
    "campaign",
    "channel",
    "country",
    "device_type",
    "browser",
    "os",
)

# Whole hours, as hours or as days in a whole-hour time zone: hourly_rollup's states (sets of
# id hashes, exact under redelivery), merged per bucket; far less to read than the rows.
STATS_ROLLUP = """
SELECT toString({bucket}(hour, {tz})) AS bucket, uniqExactMerge(events), uniqExactMerge(visitors),
       uniqExactIfMerge(users)
FROM hourly_rollup
WHERE project = {project} AND hour >= {start} AND hour < {end}
  AND ({event} = '' OR event = {event})
GROUP BY bucket ORDER BY bucket LIMIT {limit}
"""

# Ranges cut inside an hour, or buckets of a half-hour zone: from the rows, still exact.
STATS_EVENTS = """
SELECT toString({bucket}(timestamp, {tz})) AS bucket, uniqExact(event_id), uniqExact(anonymous_id),
       uniqExactIf(user_id, user_id != '')
FROM events
WHERE project = {project} AND timestamp >= {start} AND timestamp < {end}
  AND ({event} = '' OR event = {event})
GROUP BY bucket ORDER BY bucket LIMIT {limit}
"""

# Sessions that started in the range, by their entry source; a conversion is a session with
# the conversion event in the range.
SOURCES = """
SELECT entry, count() AS sessions, uniqExact(visitor),
       countIf(session_id IN (
           SELECT session_id FROM events
           WHERE project = {project} AND event = {conversion_event}
             AND timestamp >= {start} AND timestamp < {end}))
FROM (
    SELECT session_id, argMinMerge({group_column}) AS entry, anyMerge(anonymous_id) AS visitor,
           minMerge(start) AS started
    FROM sessions WHERE project = {project} AND session_id != ''
    GROUP BY session_id HAVING started >= {start} AND started < {end}
)
GROUP BY entry ORDER BY sessions DESC, entry LIMIT {limit}
"""

# Keyset pagination on (timestamp, event_id): a page starts strictly after the cursor's row.
# toString(timestamp) sorts as the time does (fixed width) on DateTime and DateTime64 alike;
# the whole-second bound before it keeps the index in use. A redelivered row not merged yet
# shares its event_id and timestamp, so LIMIT 1 BY drops it.
EVENTS = """
SELECT toString(timestamp), {columns}
FROM events
WHERE project = {project} AND timestamp >= {start} AND timestamp < {end}
  AND ({event} = '' OR event = {event})
  AND timestamp >= {after_second}
  AND (toString(timestamp) > {after_time}
       OR (toString(timestamp) = {after_time} AND event_id > {after_id}))
ORDER BY timestamp, event_id LIMIT 1 BY event_id LIMIT {limit}
"""

Value = str | int | datetime | date


def literal(value: Value) -> str:
    """`value` as a ClickHouse literal: the one function that quotes request values into SQL.

    Strings are single-quoted with backslash and quote escaped (ClickHouse's string escapes);
    ints are digits; datetimes (naive = UTC) are `toDateTime('…', 'UTC')`; dates `toDate('…')`.
    """
    if isinstance(value, bool):
        raise TypeError("no booleans in the read API's SQL")
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            raise ValueError("datetimes are passed as naive UTC")
        return f"toDateTime('{value.strftime('%Y-%m-%d %H:%M:%S')}', 'UTC')"
    if isinstance(value, date):
        return f"toDate('{value.isoformat()}')"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"no SQL literal for {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class Query:
    """A template and its values; `sql()` renders it with every value through `literal()`."""

    template: str
    values: dict[str, Value]
    identifiers: dict[str, str]

    def sql(self) -> str:
        """The SQL to run."""
        return self.template.format(
            **{k: literal(v) for k, v in self.values.items()}, **self.identifiers
        )


def stats(
    project: str, start: datetime, end: datetime, event: str, interval: str, tz: str, limit: int
) -> Query:
    """/v1/stats: from hourly_rollup when every bucket is a sum of whole UTC hours, else rows."""
    values: dict[str, Value] = {"project": project, "start": start, "end": end, "event": event}
    values |= {"limit": limit, "tz": tz}
    identifiers = {"bucket": BUCKETS[interval]}
    if _whole_hours(start) and _whole_hours(end) and _whole_hour_zone(tz, start, end):
        return Query(STATS_ROLLUP, values, identifiers)
    return Query(STATS_EVENTS, values, identifiers)


def _whole_hours(moment: datetime) -> bool:
    return moment.minute == moment.second == moment.microsecond == 0


def _whole_hour_zone(tz: str, start: datetime, end: datetime) -> bool:
    """True if `tz` is a whole number of hours off UTC at every day of the range (Kolkata's
    +05:30 is not: its hours and days start inside a UTC hour)."""
    zone = ZoneInfo(tz)
    day = start
    while True:
        offset = day.replace(tzinfo=UTC).astimezone(zone).utcoffset()
        if offset is None or offset.total_seconds() % 3600:
            return False
        if day >= end:
            return True
        day = min(day + timedelta(days=1), end)


def sources(
    project: str, start: datetime, end: datetime, group_by: str, conversion_event: str, limit: int
) -> Query:
    """/v1/sources: sessions by entry source; no conversion event counts no conversions."""
    values: dict[str, Value] = {"project": project, "start": start, "end": end, "limit": limit}
    values["conversion_event"] = conversion_event
    return Query(SOURCES, values, {"group_column": GROUP_COLUMNS[group_by]})


def events(
    project: str,
    start: datetime,
    end: datetime,
    event: str,
    after: tuple[str, str] | None,
    limit: int,
) -> Query:
    """/v1/events: one page of rows after the cursor's (timestamp, event_id)."""
    after_time, after_id = after or ("", "")
    second = datetime.fromisoformat(after_time[:19]) if after_time else start
    values: dict[str, Value] = {"project": project, "start": start, "end": end, "event": event}
    values |= {"after_second": second, "after_time": after_time, "after_id": after_id}
    values["limit"] = limit
    return Query(EVENTS, values, {"columns": ", ".join(EVENT_COLUMNS)})
