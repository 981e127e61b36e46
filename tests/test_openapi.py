"""/openapi.json checked by an OpenAPI validator and by a schema-driven fuzzer (schemathesis)
against a running gateway: every answer to a request drawn from the document matches the
document, and on the ingest, Segment and read routes what the document allows is accepted: it
states the timestamp window, that a forget names a user_id or an anonymous_id, what each Segment
call needs, and each read parameter's values."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.key_admin import create_key, set_project_limit
from gateway.models import BatchBody, ForgetBody, IdentifyBody, TrackBody, TrackEvent
from gateway.openapi import JSON_VALUE, JSON_VALUE_REF, build_openapi
from gateway.rate_limit import Limit
from ingest.settings import Settings
from sinks.clickhouse import ServerClickHouse
from sinks.migrate import migrate
from tests.test_gateway_processes import GatewayProcess, wait

# Per operation. The default run draws the same ~150 requests every time (a few seconds), so CI
# does not fail on a draw no earlier run made; a count set here draws new ones each run.
FUZZ_EXAMPLES = os.environ.get("MILLIMETRIC_TEST_FUZZ_EXAMPLES")
EXAMPLES = int(FUZZ_EXAMPLES or 6)
READS = {"/v1/stats", "/v1/sources", "/v1/events"}
SEGMENT = {"/v1/page", "/v1/screen", "/v1/group", "/v1/alias"}
ACCEPTING = {"/v1/track", "/v1/identify", "/v1/batch", "/v1/forget", *SEGMENT, *READS}
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# What this test draws for a windowed timestamp, a skew-correcting sentAt and a read's instant.
WINDOW_FORMAT, NEAR_NOW_FORMAT, INSTANT_FORMAT = "mm-window", "mm-near-now", "mm-instant"
# Read instants this far inside the document's 1970..2106: an offset or `tz` moves one by a day.
EARLIEST, LATEST = datetime(1970, 1, 2), datetime(2100, 12, 31)
OFFSETS = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
INSTANTS = st.one_of(
    st.dates(EARLIEST.date(), LATEST.date()).map(date.isoformat),
    st.datetimes(EARLIEST, LATEST, timezones=OFFSETS).map(datetime.isoformat),
)
# A cursor is only what a page gave: base64url of [a stored time, an event_id].
CURSORS = st.tuples(
    st.datetimes(EARLIEST, LATEST).map(lambda t: t.isoformat(sep=" ", timespec="milliseconds")),
    st.text(max_size=40),
).map(lambda after: base64.urlsafe_b64encode(orjson.dumps(list(after))).decode())


def test_the_document_is_valid_openapi() -> None:
    doc = build_openapi(Settings(timestamp_max_age_days=30, timestamp_max_future_s=600))
    validate(doc)
    timestamp = doc["components"]["schemas"]["TrackEvent"]["properties"]["timestamp"]
    assert {"format": "date-time", "x-max-age-days": 30, "x-max-future-s": 600}.items() <= (
        timestamp["anyOf"][0].items()
    )
    forget = doc["components"]["schemas"]["ForgetBody"]
    assert [branch["required"] for branch in forget["anyOf"]] == [["user_id"], ["anonymous_id"]]


def test_each_body_model_has_its_own_json_schema() -> None:
    # A reference to the document's JsonValue inside a model broke its model_json_schema().
    for model in (TrackBody, TrackEvent, IdentifyBody, BatchBody, ForgetBody):
        schema = model.model_json_schema()
        Draft202012Validator.check_schema(schema)


def test_the_document_refuses_what_the_gateway_refuses_in_free_form_objects() -> None:
    doc = build_openapi(Settings())
    schemas = doc["components"]["schemas"]
    identify = Draft202012Validator(
        {"$ref": "#/components/schemas/IdentifyBody", "components": doc["components"]}
    )
    ok = {
        "anonymous_id": "a",
        "user_id": "u",
        "traits": {"n": [2**63 - 1, -(2**63), 1.5, {"s": None}]},
    }
    assert identify.is_valid(ok)
    for value in (2**64, -(2**63) - 1, 1e30):  # 1e30 has no fraction: JSON Schema's integer
        assert not identify.is_valid({**ok, "traits": {"deep": {"n": [value]}}}), value
    assert schemas["JsonValue"]["anyOf"][1] == {
        "type": "integer",
        "minimum": -(2**63),
        "maximum": 2**64 - 1,
    }


def finite_json(node: Any, depth: int = 3) -> Any:
    """The document with JsonValue's recursion inlined `depth` levels deep, scalars below: past
    its own depth limit the fuzzer draws any value for a reference, so it would draw 2**100."""
    if isinstance(node, dict):
        if node.get("$ref") == JSON_VALUE_REF:
            branches = JSON_VALUE["anyOf"] if depth else JSON_VALUE["anyOf"][:3]
            return finite_json({"anyOf": branches}, depth - 1)
        return {k: finite_json(v, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [finite_json(v, depth) for v in node]
    return node


def windowed(node: Any) -> Any:
    """The document with its `x-` rules drawn by this test's formats: windowed date-times, a
    sentAt near the server's clock (so the skew it corrects keeps `timestamp` in its window), and
    read instants within their bounds (`to` is then moved after `from`: `follow`)."""
    if isinstance(node, dict):
        if "x-max-age-days" in node:
            return {"type": "string", "format": WINDOW_FORMAT}
        if "x-skew-of" in node:
            return {"anyOf": [{"type": "string", "format": NEAR_NOW_FORMAT}, {"type": "null"}]}
        if "x-earliest" in node:
            return {"type": "string", "format": INSTANT_FORMAT}
        return {k: windowed(v) for k, v in node.items()}
    if isinstance(node, list):
        return [windowed(v) for v in node]
    return node


def follow(query: dict[str, Any], span: int, max_days: int) -> None:
    """Move a read's `to` after its `from` within `max_days` (`x-max-range-days`), as a
    client asks: JSON Schema relates no two parameters."""
    start = query["from"]
    if len(start) == 10:  # a date `to` means the end of that day
        end: date = date.fromisoformat(start) + timedelta(days=span % max_days)
    else:
        end = datetime.fromisoformat(start) + timedelta(seconds=1 + span % (max_days * 86_400 - 1))
    query["to"] = end.isoformat()


def fuzz(operation: Any, base_url: str, headers: dict[str, str], max_days: int) -> Counter[int]:
    """EXAMPLES requests drawn from one operation's part of the document, each answer checked;
    how many got each status."""
    statuses: Counter[int] = Counter()
    checks = CONFORMANCE + ([positive_data_acceptance] if operation.path in ACCEPTING else [])

    @given(case=operation.as_strategy(), span=st.integers(0, 2**40))
    @settings(
        max_examples=EXAMPLES,
        derandomize=FUZZ_EXAMPLES is None,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def answers(case: schemathesis.Case, span: int) -> None:
        if operation.path in READS:
            follow(case.query, span, max_days)
        response = case.call_and_validate(base_url=base_url, headers=headers, checks=checks)
        statuses[response.status_code] += 1

    answers()
    return statuses


def test_the_gateway_answers_as_its_document_says(broker: str, ch_url: str, tmp_path: Path) -> None:
    max_age_days, max_future_s = 30, 600
    store = ServerClickHouse(ch_url)
    migrate(store)  # the tables a sink makes, for the read routes
    store.close()
    gw = GatewayProcess(
        broker,
        tmp_path,
        invalid_request_burst="100000",
        timestamp_max_age_days=str(max_age_days),
        timestamp_max_future_s=str(max_future_s),
        clickhouse_url=ch_url,
        read_cache_s="0",
    ).start()
    try:
        project = f"openapi-{uuid.uuid4().hex[:8]}"
        # Room for every drawn request (Segment's routes count against track's bucket).
        for route in ("track", "identify", "batch", "forget", "read"):
            asyncio.run(set_project_limit(broker, project, route, Limit(rate=1000, burst=1000)))
        key = asyncio.run(create_key(broker, project, "sk", "live", []))
        gw.wait_ready()
        wait(lambda: gw.knows(key), timeout=60)
        # A margin each side for the run's own duration and the clocks.
        now = datetime.now(UTC).replace(tzinfo=None)
        earliest = now - timedelta(days=max_age_days - 1)
        latest = now + timedelta(seconds=max_future_s - 120)
        schemathesis.openapi.format(
            WINDOW_FORMAT,
            st.datetimes(earliest, latest, timezones=st.just(UTC)).map(
                lambda t: t.isoformat(timespec="milliseconds")
            ),
        )
        near_now = st.datetimes(now - timedelta(minutes=1), now + timedelta(minutes=1))
        schemathesis.openapi.format(NEAR_NOW_FORMAT, near_now.map(lambda t: f"{t.isoformat()}Z"))
        schemathesis.openapi.format(INSTANT_FORMAT, INSTANTS)
        schemathesis.openapi.format("base64url", CURSORS)
        document = httpx.get(f"{gw.url}/openapi.json", timeout=30).json()
        schema = schemathesis.openapi.from_dict(finite_json(windowed(document)))
        headers = {"Authorization": f"Bearer {key}"}
        tested = 0
        to = document["paths"]["/v1/stats"]["get"]["parameters"]
        max_days = next(p["schema"]["x-max-range-days"] for p in to if p["name"] == "to")
        for result in schema.get_all_operations():
            operation = result.ok()
            statuses = fuzz(operation, gw.url, headers, max_days)
            # The acceptance check passes a documented 503 (store or broker down) and 401/403
            # (the drawn query `key`): each accepting route must have accepted something.
            if operation.path in ACCEPTING and operation.method.upper() != "OPTIONS":
                assert {200, 202} & set(statuses), (operation.path, statuses)
            tested += 1
        assert tested == sum(len(operations) for operations in document["paths"].values())
    finally:
        gw.stage.stop()
