"""The read API against a running pipeline (chdb through the sink, and the 18.16 server): counts
equal what the test sent, after a redelivery and a forget; keys see their project only; bad
parameters are named. One pipeline per store for the module: the tests run in file order."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.services import ClickHouseServer
from gateway.key_admin import create_key
from gateway.responses import EventsAnswer, SourcesAnswer, StatsAnswer
from tests.services import Pipeline, kafka_broker

DAY1 = (datetime.now(UTC) - timedelta(days=2)).replace(hour=10, minute=0, second=0, microsecond=0)
DAY2 = DAY1 + timedelta(days=1)
FROM, TO = DAY1.date().isoformat(), DAY2.date().isoformat()  # `to` as a date: the whole day


def _event(n: int, when: datetime, anonymous_id: str, session: str, **more: Any) -> dict[str, Any]:
    return {
        "event": "page",
        "event_id": f"ev-{n}",
        "timestamp": (when + timedelta(minutes=n)).isoformat().replace("+00:00", "Z"),
        "anonymous_id": anonymous_id,
        "session_id": session,
        **more,
    }


SENT = [
    # Paid Social: a Facebook ad click, then a signup in the same session.
    _event(1, DAY1, "v1", "s1", url="https://shop.example/?utm_source=facebook&utm_medium=cpc"),
    _event(2, DAY1, "v1", "s1", event="signup", user_id="u1"),
    # Organic Social: a link shared on Facebook.
    _event(3, DAY1, "v2", "s2", url="https://shop.example/", referrer="https://l.facebook.com/"),
    _event(4, DAY2, "v2", "s4", url="https://shop.example/"),
    # The person the test forgets.
    _event(5, DAY2, "gone", "s5", url="https://shop.example/", user_id="u5"),
    _event(6, DAY2, "gone", "s5", event="signup", user_id="u5"),
]


def expected_stats(rows: list[dict[str, Any]], hourly: bool = False) -> list[dict[str, Any]]:
    """Per UTC day (or hour): distinct event_ids, anonymous_ids and non-empty user_ids."""
    days: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        days.setdefault(row["timestamp"][:13] if hourly else row["timestamp"][:10], []).append(row)
    start = ":00:00+00:00" if hourly else "T00:00:00+00:00"
    return [
        {
            "start": day + start,
            "events": len({r["event_id"] for r in group}),
            "visitors": len({r["anonymous_id"] for r in group}),
            "users": len({r["user_id"] for r in group if r.get("user_id")}),
        }
        for day, group in sorted(days.items())
    ]


class Reader:
    """The pipeline's gateway, read with one key."""

    def __init__(self, pipeline: Pipeline, key: str) -> None:
        self.pipeline, self.key = pipeline, key

    def get(self, path: str, **params: str) -> httpx.Response:
        return httpx.get(
            f"{self.pipeline.base_url}{path}",
            params=params,
            headers={"authorization": f"Bearer {self.key}"},
            timeout=30,
        )

    def until(self, path: str, expected: Any, pick: str, timeout: float = 90, **params: str) -> Any:
        """Poll until the answer's `pick` equals `expected` (or fail with the last answer)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.get(path, **params)
            last = r.json().get(pick) if r.status_code == 200 else r.text
            if last == expected or time.monotonic() > deadline:
                assert last == expected
                return last
            time.sleep(0.5)


@pytest.fixture(scope="module", params=["chdb", "server"])
def pipeline(request: pytest.FixtureRequest) -> Iterator[Pipeline]:
    url = None
    if request.param == "server":
        server: str | ClickHouseServer = request.getfixturevalue("ch_server")
        url = server.url("t_read") if isinstance(server, ClickHouseServer) else server
    root = Path(tempfile.mkdtemp(prefix="mm-read-"))
    with kafka_broker() as bootstrap:
        env = {"MILLIMETRIC_READ_CACHE_S": "5", "MILLIMETRIC_FORGET_GRACE_S": "1"}
        p = Pipeline(bootstrap, url, root, env).start()
        try:
            yield p
        finally:
            p.stop()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def keys(pipeline: Pipeline) -> dict[str, str]:
    made = {
        "rk": ("demo", "rk", []),
        "pk": ("demo", "pk", ["https://shop.example"]),
        "other": ("other", "rk", []),
    }
    return {
        name: asyncio.run(create_key(pipeline.bootstrap, project, kind, "live", origins))
        for name, (project, kind, origins) in made.items()
    }


def test_counts_equal_the_rows_sent_after_a_redelivery(
    pipeline: Pipeline, keys: dict[str, str]
) -> None:
    r = pipeline.post("/v1/batch", {"events": SENT})
    assert r.status_code == 202, r.text
    assert pipeline.post("/v1/track", SENT[0]).status_code == 202  # redelivered: same event_id
    rk = Reader(pipeline, keys["rk"])
    rk.until("/v1/stats", expected_stats(SENT), "buckets", **{"from": FROM, "to": TO})
    hourly = rk.get("/v1/stats", **{"from": FROM, "to": TO, "interval": "hour"}).json()
    assert sum(b["events"] for b in hourly["buckets"]) == len(SENT)
    assert hourly["buckets"] == expected_stats(SENT, hourly=True)
    # Paris days (whole hours off UTC) come from the rollup too; every event is 10:xx UTC.
    paris = rk.get("/v1/stats", **{"from": FROM, "to": TO, "tz": "Europe/Paris"}).json()
    assert [(b["start"][:10], b["events"], b["visitors"]) for b in paris["buckets"]] == [
        (b["start"][:10], b["events"], b["visitors"]) for b in expected_stats(SENT)
    ]
    sk = Reader(pipeline, pipeline.key)  # sk_ keys read too
    assert sk.get("/v1/stats", **{"from": FROM, "to": TO}).json()["buckets"] == expected_stats(SENT)
    StatsAnswer.model_validate(hourly)
    only_signups = rk.get("/v1/stats", **{"from": FROM, "to": TO, "event": "signup"}).json()
    assert sum(b["events"] for b in only_signups["buckets"]) == 2


def test_sources_split_facebook_into_paid_and_organic_social(
    pipeline: Pipeline, keys: dict[str, str]
) -> None:
    rk = Reader(pipeline, keys["rk"])
    params = {"from": FROM, "to": TO, "conversion_event": "signup"}
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rows = rk.get("/v1/sources", **params).json()["rows"]
        if sum(r["sessions"] for r in rows) == 4:
            break
        time.sleep(0.5)
    SourcesAnswer.model_validate({"ok": True, "rows": rows})
    by_channel = {r["channel"]: r for r in rows}
    assert by_channel["Paid Social"] == {
        "channel": "Paid Social",
        "sessions": 1,
        "visitors": 1,
        "conversions": 1,
        "conversion_rate": 1.0,
    }
    assert by_channel["Organic Social"]["sessions"] == 1
    assert sum(r["sessions"] for r in by_channel.values()) == 4
    assert sum(r["conversions"] for r in by_channel.values()) == 2
    sources = rk.get("/v1/sources", **params, group_by="source").json()["rows"]
    assert {r["source"] for r in sources} >= {"facebook"}


def test_events_pages_through_every_row_once(pipeline: Pipeline, keys: dict[str, str]) -> None:
    rk = Reader(pipeline, keys["rk"])
    seen: list[str] = []
    params = {"from": FROM, "to": TO, "limit": "2"}
    while True:
        page = EventsAnswer.model_validate(rk.get("/v1/events", **params).json()).model_dump()
        seen += [e["event_id"] for e in page["events"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == [e["event_id"] for e in SENT]
    first = rk.get("/v1/events", **{"from": FROM, "to": TO, "limit": "1"}).json()["events"][0]
    assert first["properties"] == {} and first["timestamp"] == SENT[0]["timestamp"].replace(
        "Z", "+00:00"
    )


def test_another_projects_key_sees_nothing(pipeline: Pipeline, keys: dict[str, str]) -> None:
    other = Reader(pipeline, keys["other"])
    span = {"from": FROM, "to": TO}
    assert other.get("/v1/stats", **span).json() == {"ok": True, "buckets": []}
    assert other.get("/v1/sources", **span).json() == {"ok": True, "rows": []}
    assert other.get("/v1/events", **span).json() == {
        "ok": True,
        "events": [],
        "next_cursor": None,
    }


def test_a_publishable_key_is_refused(pipeline: Pipeline, keys: dict[str, str]) -> None:
    r = httpx.get(
        f"{pipeline.base_url}/v1/stats",
        params={"from": FROM, "to": TO},
        headers={"authorization": f"Bearer {keys['pk']}", "origin": "https://shop.example"},
        timeout=30,
    )
    assert r.status_code == 403
    assert r.json()["error"] == "publishable_key_cannot_read"


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/stats", {"to": "2026-03-01"}, "from"),
        ("/v1/stats", {"from": "yesterday", "to": "2026-03-01"}, "from"),
        ("/v1/stats", {"from": "2026-03-02", "to": "2026-03-01"}, "to"),
        ("/v1/stats", {"from": "2020-01-01", "to": "2026-03-01"}, "to"),
        ("/v1/stats", {"from": "9999-12-30", "to": "9999-12-31"}, "to"),  # a 500 before
        ("/v1/stats", {"from": "0001-01-01", "to": "0001-01-02", "tz": "Asia/Tokyo"}, "from"),
        ("/v1/stats", {"from": "1969-12-30", "to": "1969-12-31"}, "from"),
        ("/v1/stats", {"from": "2026-03-01", "to": "2026-03-02", "interval": "week"}, "interval"),
        ("/v1/stats", {"from": "2026-03-01", "to": "2026-03-02", "tz": "Mars/Base"}, "tz"),
        ("/v1/stats", {"from": "2026-03-01", "to": "2026-03-02", "evnt": "x"}, "evnt"),
        ("/v1/sources", {"from": "2026-03-01", "to": "2026-03-02", "group_by": "x"}, "group_by"),
        ("/v1/events", {"from": "2026-03-01", "to": "2026-03-02", "limit": "0"}, "limit"),
        ("/v1/events", {"from": "2026-03-01", "to": "2026-03-02", "cursor": "x'"}, "cursor"),
        ("/v1/events", {"from": "2026-03-01", "to": "2026-03-02", "event": "x" * 129}, "event"),
    ],
)
def test_bad_parameters_are_named(
    pipeline: Pipeline, keys: dict[str, str], path: str, params: dict[str, str], field: str
) -> None:
    r = Reader(pipeline, keys["rk"]).get(path, **params)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_parameter"
    assert field in [d["field"] for d in r.json()["details"]]


def test_quotes_in_values_stay_values(pipeline: Pipeline, keys: dict[str, str]) -> None:
    rk = Reader(pipeline, keys["rk"])
    r = rk.get("/v1/stats", **{"from": FROM, "to": TO, "event": "x' OR '1'='1"})
    assert r.json() == {"ok": True, "buckets": []}


def test_after_a_forget_the_person_is_gone_from_sources_and_events(
    pipeline: Pipeline, keys: dict[str, str]
) -> None:
    assert pipeline.post("/v1/forget", {"anonymous_id": "gone"}).status_code == 202
    kept = [e for e in SENT if e["anonymous_id"] != "gone"]
    rk = Reader(pipeline, keys["rk"])
    span = {"from": FROM, "to": TO}
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        events = rk.get("/v1/events", **span).json()["events"]
        if len(events) == len(kept):
            break
        time.sleep(0.5)
    assert [e["event_id"] for e in events] == [e["event_id"] for e in kept]
    # Parameters asked for nowhere before: no answer cached before the forget.
    rows = rk.get("/v1/sources", **span, conversion_event="signup", group_by="channel").json()[
        "rows"
    ]
    assert sum(r["sessions"] for r in rows) == 3 and sum(r["conversions"] for r in rows) == 1
    by_hour = rk.get("/v1/stats", **span, interval="hour", tz="UTC").json()["buckets"]
    assert by_hour == expected_stats(kept, hourly=True)
    # hourly_rollup's hours of the person were rebuilt from the events left: daily counts too.
    by_day = rk.get("/v1/stats", **span, interval="day", tz="UTC").json()["buckets"]
    assert by_day == expected_stats(kept)
    signups = rk.get("/v1/stats", **span, event="signup", tz="UTC").json()["buckets"]
    assert sum(b["events"] for b in signups) == 1


def test_answers_are_cached_and_without_a_store_reads_are_503(
    pipeline: Pipeline, keys: dict[str, str]
) -> None:
    if pipeline.clickhouse_url:
        pytest.skip("the server is read directly; the sink's endpoint serves only chdb")
    rk = Reader(pipeline, keys["rk"])
    params = {"from": FROM, "to": TO, "tz": "Europe/Paris"}
    first = rk.get("/v1/stats", **params)
    deadline = time.monotonic() + 60
    while first.status_code != 200 and time.monotonic() < deadline:  # the sink may be starting
        time.sleep(0.5)
        first = rk.get("/v1/stats", **params)
    assert first.status_code == 200, first.text
    endpoint = pipeline.root / "clickhouse.endpoint"
    endpoint.rename(endpoint.with_suffix(".away"))  # the gateway finds no sink to ask
    try:
        assert rk.get("/v1/stats", **params).json() == first.json()  # from the cache
        r = rk.get("/v1/stats", **params, event="page")
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "store_unavailable" and r.headers["retry-after"] == "1"
    finally:
        endpoint.with_suffix(".away").rename(endpoint)
