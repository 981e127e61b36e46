"""The read API's one quoting function and its TSV parsing, checked by ClickHouse itself (chdb):
whatever a request carries comes back as the same value, never as SQL."""

from __future__ import annotations

from datetime import UTC, datetime

import chdb
import pytest

from gateway.read_queries import STATS_EVENTS, STATS_ROLLUP, literal, stats
from gateway.read_store import parse_tsv

TRICKY = [
    "",
    "plain",
    "a'b",
    "a\\'b",
    "\\",
    "ends with \\",
    "x' OR '1'='1",
    "'; DROP TABLE events; --",
    "tab\tnew\nline\rret",
    "\\n is not a newline",
    "é ☃ 𝄞",
    "nul\0byte",
]


def test_strings_come_back_as_sent() -> None:
    sql = "SELECT " + ", ".join(literal(value) for value in TRICKY)
    assert parse_tsv(str(chdb.query(sql, "TabSeparated"))) == [TRICKY]


def test_times_are_utc_and_integers_are_digits() -> None:
    sql = f"SELECT toString({literal(datetime(2026, 3, 1, 12, 34, 56))}), {literal(42)}"
    assert parse_tsv(str(chdb.query(sql, "TabSeparated"))) == [["2026-03-01 12:34:56", "42"]]


@pytest.mark.parametrize("value", [True, datetime(2026, 3, 1, tzinfo=UTC), 1.5])
def test_other_values_are_refused(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        literal(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("start", "interval", "tz", "template"),
    [
        (datetime(2026, 3, 1), "day", "UTC", STATS_ROLLUP),
        (datetime(2026, 3, 1, 5), "hour", "UTC", STATS_ROLLUP),
        # Paris' days start on UTC hours, across its DST change (2026-03-29) too.
        (datetime(2026, 3, 1), "day", "Europe/Paris", STATS_ROLLUP),
        # Kolkata's (+05:30) hours and days start inside a UTC hour: only the rows can say.
        (datetime(2026, 3, 1), "day", "Asia/Kolkata", STATS_EVENTS),
        (datetime(2026, 3, 1, 0, 30), "hour", "UTC", STATS_EVENTS),
    ],
)
def test_stats_read_the_hourly_rollup_when_buckets_are_whole_hours(
    start: datetime, interval: str, tz: str, template: str
) -> None:
    query = stats("p", start, datetime(2026, 4, 1), "", interval, tz, 100)
    assert query.template is template
