"""The gateway's timestamp window at its four edges: the oldest and newest instant accepted, and
one millisecond past each, on every route that takes a timestamp (the HTTP answer's shape is in
test_gateway.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from gateway.validate import InvalidBody, Validator

NOW = 1_795_000_000_000
MAX_AGE_DAYS = 10
MAX_FUTURE_S = 60
OLDEST = NOW - MAX_AGE_DAYS * 86_400_000
NEWEST = NOW + MAX_FUTURE_S * 1000
VALIDATOR = Validator(8192, 1000, MAX_AGE_DAYS, MAX_FUTURE_S)


def iso(millis: int) -> str:
    """An ISO 8601 instant with milliseconds, as clients send it."""
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds")


def send(route: str, millis: int) -> list[int]:
    """Validate one event stamped `millis` on `route` (batch: between two unstamped events);
    return the stored timestamps."""
    event = {"event": "a", "timestamp": iso(millis)}
    if route == "track":
        return [VALIDATOR.track(orjson.dumps(event), "p", {}, NOW, False)["timestamp"]]
    if route == "identify":
        body = {"anonymous_id": "a", "user_id": "u", "timestamp": iso(millis)}
        return [VALIDATOR.identify(orjson.dumps(body), "p", {}, NOW, False)["timestamp"]]
    events = [{"event": "x"}, event, {"event": "y"}]
    records = VALIDATOR.batch(orjson.dumps({"events": events}), "p", {}, NOW, False)
    return [r["timestamp"] for r in records]


@pytest.mark.parametrize("route", ["track", "identify", "batch"])
@pytest.mark.parametrize("millis", [OLDEST, NEWEST])
def test_the_edges_of_the_window_are_accepted(route: str, millis: int) -> None:
    assert millis in send(route, millis)


@pytest.mark.parametrize("route", ["track", "identify", "batch"])
@pytest.mark.parametrize(
    ("millis", "words"),
    [
        (OLDEST - 1, f"more than {MAX_AGE_DAYS} days in the past"),
        (NEWEST + 1, f"more than {MAX_FUTURE_S} seconds in the future"),
    ],
)
def test_one_millisecond_outside_is_refused_naming_the_field(
    route: str, millis: int, words: str
) -> None:
    with pytest.raises(InvalidBody) as refused:
        send(route, millis)
    assert refused.value.code == "invalid_payload"
    [detail] = refused.value.details
    assert detail["field"] == "timestamp"
    assert iso(millis) in detail["message"] and words in detail["message"]
    assert detail.get("index") == (1 if route == "batch" else None)
