"""The gateway's HTTP contract, in process (httpx over ASGI, the app's real lifespan), against the
real broker: every error-table row, the limits at their boundaries, keys and scopes, CORS,
per-project limits, /openapi.json, and a property-based fuzz that finds no 5xx.

Rate limits across processes (Redis), oversized bodies on a real socket and the broker outage are
in test_gateway_processes.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import ROUTES, GatewayApp, build_app
from gateway.auth import SEGMENT_ROUTES
from gateway.key_admin import create_key, revoke_key, set_project_limit
from gateway.models import ForgetBody, IdentifyBody, TrackBody
from gateway.openapi import OPERATIONS, build_openapi, express_rules, route_errors
from gateway.rate_limit import Limit, load_default_limits
from gateway.read_api import ANSWERS
from gateway.responses import BatchAccepted, ErrorBody, ForgetAccepted, TrackAccepted
from gateway.validate import new_id
from ingest.errors import ERROR_CODES
from ingest.partitioner import partition_for
from ingest.records import event_key
from ingest.records import raw_records as unpack_raw
from ingest.settings import Settings
from ingest.topics import topic
from millimetric_app.embedded import free_port
from tests.services import read_topic

RAW_PARTITIONS = topic("raw").partitions

ORIGIN = "https://site.example"
JSON = {"content-type": "application/json"}
UNLIMITED = Limit(1_000_000.0, 1_000_000)
ACCEPTED = {"track": TrackAccepted, "identify": TrackAccepted, "batch": BatchAccepted}
ACCEPTED |= {"forget": ForgetAccepted} | {route: TrackAccepted for route in SEGMENT_ROUTES}


def gateway_settings(bootstrap: str, **overrides: Any) -> Settings:
    """Settings of a test gateway (explicit, whatever the environment holds)."""
    values: dict[str, Any] = dict(
        kafka_bootstrap_servers=bootstrap,
        kafka_idempotence=False,
        redis_url=None,
        publish_timeout_s=5.0,
        log_level="WARNING",
        # These tests send invalid requests by the hundred: the budget has its own tests.
        invalid_request_rate=1_000_000.0,
        invalid_request_burst=1_000_000,
    )
    return Settings(**(values | overrides))


@dataclass
class Gw:
    """A running in-process gateway, a client for it, and keys of one project."""

    app: GatewayApp
    client: httpx.AsyncClient
    bootstrap: str
    project: str
    sk: str = ""
    pk: str = ""
    rk: str = ""

    async def post(
        self,
        path: str,
        body: Any = None,
        key: str | None = None,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST JSON (or raw `content`) with a Bearer key (the project's sk_ by default)."""
        hdrs = {**JSON, "authorization": f"Bearer {key or self.sk}", **(headers or {})}
        data = orjson.dumps(body) if content is None else content
        return await self.client.post(path, content=data, headers=hdrs)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll `check` until it holds (or fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def known(gw: Gw, key: str, origin: str | None = None) -> bool:
    """Whether the gateway knows `key` yet (an empty body costs no token and publishes nothing)."""
    headers = {"origin": origin} if origin else None
    r = await gw.post("/v1/track", {}, key, headers=headers)
    return r.json()["error"] not in ("invalid_api_key", "keys_loading")


async def new_key(gw: Gw, kind: str, project: str | None = None, origins: list[str] | None = None):
    """Create a key and wait until the gateway has it."""
    key = await create_key(gw.bootstrap, project or gw.project, kind, "live", origins or [])
    await wait_until(lambda: known(gw, key, (origins or [None])[0]))
    return key


async def set_limit(gw: Gw, project: str, route: str, limit: Limit | None) -> None:
    """Override a project's limit and wait until the gateway applies it."""
    await set_project_limit(gw.bootstrap, project, route, limit)
    store = gw.app.state.gateway.keys

    async def applied() -> bool:
        return store.limit_override(project, route) == limit

    await wait_until(applied)


async def raw_records(bootstrap: str, ids: list[str]) -> dict[str, Any]:
    """The raw-topic records of these event ids (fails if one does not show up)."""
    out = await read_topic(bootstrap, "raw", lambda seen: all(i in seen for i in ids))
    missing = [i for i in ids if i not in out]
    assert not missing, f"not on the raw topic: {missing}"
    return out


def iso(millis: float) -> str:
    """An ISO 8601 UTC instant with milliseconds."""
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds")


def check_error(r: httpx.Response, code: str, route: str | None = None) -> dict[str, Any]:
    """The answer is the table's row for `code`, in the documented shape."""
    assert r.status_code == ERROR_CODES[code].status, r.text
    body = ErrorBody.model_validate(r.json())
    assert body.error == code, r.text
    if route is not None:
        assert code in route_errors(route), f"{code} is not in /openapi.json for {route}"
    return r.json()


def check_accepted(r: httpx.Response, route: str) -> dict[str, Any]:
    """A 202 in the documented shape."""
    assert r.status_code == 202, r.text
    ACCEPTED[route].model_validate(r.json())
    return r.json()


@pytest.fixture(scope="module")
async def gw(broker: str) -> AsyncIterator[Gw]:
    """One in-process gateway on the session broker; its project's limits are lifted (through
    the per-project override) so that the tests measure validation, not the default limits."""
    app = build_app(gateway_settings(broker), broker)
    async with app.starlette.router.lifespan_context(app.starlette):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            g = Gw(app, client, broker, f"gw-{uuid.uuid4().hex[:8]}")
            g.sk = await new_key(g, "sk")
            g.pk = await new_key(g, "pk", origins=[ORIGIN])
            g.rk = await new_key(g, "rk")
            for route in load_default_limits():  # Segment's page/... share track's
                await set_limit(g, g.project, route, UNLIMITED)
            yield g


# --- endpoints ----------------------------------------------------------------------------


async def test_track_202_after_the_ack_and_on_the_raw_topic(gw: Gw) -> None:
    r = await gw.post("/v1/track", {"event": "signup", "anonymous_id": "a1", "country": "XX"})
    event_id = check_accepted(r, "track")["event_id"]
    record = (await raw_records(gw.bootstrap, [event_id]))[event_id]
    assert record["event"] == "signup" and record["project"] == gw.project
    assert record["context"]["ip"] == "203.0.113.9"  # the peer: no trusted proxy configured
    assert "country" not in record  # a field the server adds is ignored when sent


async def test_a_test_keys_events_are_marked_on_the_raw_topic(gw: Gw) -> None:
    test_key = await create_key(gw.bootstrap, gw.project, "sk", "test", [])
    await wait_until(lambda: known(gw, test_key))
    test_id = check_accepted(await gw.post("/v1/track", {"event": "t"}, test_key), "track")
    live_id = check_accepted(await gw.post("/v1/track", {"event": "l"}), "track")
    ids = [test_id["event_id"], live_id["event_id"]]
    records = await raw_records(gw.bootstrap, ids)
    assert records[ids[0]]["context"]["env"] == "test"  # destinations skip these
    assert "env" not in records[ids[1]]["context"]


async def test_identify_flows_as_an_identify_event(gw: Gw) -> None:
    body = {"anonymous_id": "u_abc", "user_id": "user_42", "traits": {"plan": "pro"}}
    event_id = check_accepted(await gw.post("/v1/identify", body), "identify")["event_id"]
    record = (await raw_records(gw.bootstrap, [event_id]))[event_id]
    assert (record["type"], record["event"]) == ("identify", "$identify")
    assert (record["anonymous_id"], record["user_id"], record["traits"]) == (
        "u_abc",
        "user_42",
        {"plan": "pro"},
    )


async def test_batch_returns_every_event_id_in_order(gw: Gw) -> None:
    sent = [{"event": f"e{i}", "event_id": f"id-{uuid.uuid4().hex}"} for i in range(5)]
    sent[2].pop("event_id")
    ids = check_accepted(await gw.post("/v1/batch", {"events": sent}), "batch")["event_ids"]
    assert len(ids) == 5 and [ids[i] for i in (0, 1, 3, 4)] == [
        sent[i]["event_id"] for i in (0, 1, 3, 4)
    ]
    records = await raw_records(gw.bootstrap, ids)
    assert [records[i]["event"] for i in ids] == [f"e{i}" for i in range(5)]


async def raw_messages(bootstrap: str, ids: set[str]) -> list[tuple[int, list[dict[str, Any]]]]:
    """(partition, events) of the raw-topic records carrying any of these event ids, in order
    per partition (read until all of them showed up)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        name = topic("raw").name
        await consumer.topics()
        tps = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[int, list[dict[str, Any]]]] = []
        seen: set[str] = set()
        async with asyncio.timeout(30):
            while not ids <= seen:
                for messages in (await consumer.getmany(timeout_ms=200)).values():
                    for m in messages:
                        events = unpack_raw(m.value)
                        if carried := {e.get("event_id") for e in events} & ids:
                            out.append((m.partition, events))
                            seen |= carried
        return out
    finally:
        await consumer.stop()


async def test_a_batch_is_one_record_per_partition_each_visitor_in_order(gw: Gw) -> None:
    """/v1/batch publishes one record (an envelope) per partition it touches, each event on the
    partition of its own key, so each visitor's order and the co-partitioning of the processor's
    tables hold; /v1/track stays one event in one v1 record."""
    visitors = [f"group-{n}-{uuid.uuid4().hex[:6]}" for n in range(8)]
    sent = [{"event": f"e{i}", "anonymous_id": visitors[i % 8]} for i in range(40)]
    ids = check_accepted(await gw.post("/v1/batch", {"events": sent}), "batch")["event_ids"]
    records = await raw_messages(gw.bootstrap, set(ids))
    partitions = {partition_for(event_key(e), RAW_PARTITIONS) for _, es in records for e in es}
    assert len(records) == len(partitions)  # one record per partition
    for partition, events in records:
        assert {partition_for(event_key(e), RAW_PARTITIONS) for e in events} == {partition}
    order = [e["event_id"] for _, events in records for e in events]
    for visitor in visitors:
        mine = [i for i, body in zip(ids, sent, strict=True) if body["anonymous_id"] == visitor]
        assert [i for i in order if i in mine] == mine
    track = check_accepted(await gw.post("/v1/track", {"event": "one", "anonymous_id": "t1"}),
                           "track")["event_id"]  # fmt: skip
    [(_, [single])] = await raw_messages(gw.bootstrap, {track})
    assert single["v"] == 1 and single["event_id"] == track


async def test_batch_is_all_or_nothing_and_names_the_bad_events(gw: Gw) -> None:
    anon = f"batch-{uuid.uuid4().hex}"  # one partition: the marker lands after the batch would
    events = [{"event": "ok", "anonymous_id": anon, "event_id": uuid.uuid4().hex} for _ in range(6)]
    events[3] = {"event": "", "anonymous_id": anon}
    events[5] = {**events[5], "properties": {"blob": "x" * 9000}}
    body = check_error(await gw.post("/v1/batch", {"events": events}), "invalid_payload", "batch")
    assert [(d["index"], d["field"]) for d in body["details"]] == [(3, "event")]
    # pydantic errors come first; the size check runs once every event parsed
    events[3] = {"event": "fixed", "anonymous_id": anon}
    body = check_error(await gw.post("/v1/batch", {"events": events}), "invalid_payload")
    assert [(d["index"], d["field"]) for d in body["details"]] == [(5, "properties")]
    marker = check_accepted(
        await gw.post("/v1/track", {"event": "marker", "anonymous_id": anon}), "track"
    )["event_id"]
    seen = await raw_records(gw.bootstrap, [marker])
    assert not {e.get("event_id") for e in events} & set(seen)


async def test_forget_202_with_forget_id_on_the_forgets_topic(gw: Gw) -> None:
    r = await gw.post("/v1/forget", {"user_id": "user_42"})
    forget_id = check_accepted(r, "forget")["forget_id"]
    out = await read_topic(gw.bootstrap, "forgets", lambda seen: forget_id in seen)
    assert out[forget_id]["user_id"] == "user_42" and out[forget_id]["project"] == gw.project
    body = check_error(await gw.post("/v1/forget", {}), "invalid_payload", "forget")
    assert body["details"][0]["field"] == "user_id"


async def test_health_ready_and_unknown_paths(gw: Gw) -> None:
    assert (await gw.client.get("/health")).json() == {"ok": True}
    ready = await gw.client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {
        "ok": True,
        "broker": True,
        "keys_loaded": True,
    }
    check_error(await gw.client.get("/v1/nope"), "not_found")
    r = await gw.client.get("/v1/track")
    check_error(r, "method_not_allowed", "track")
    assert "POST" in r.headers["allow"]


async def test_sk_keys_forward_ip_and_user_agent_other_keys_do_not(gw: Gw) -> None:
    body = {"event": "hook", "ip": "198.51.100.7", "user_agent": "Forwarded/1.0"}
    sk_id = check_accepted(await gw.post("/v1/track", body), "track")["event_id"]
    r = await gw.post("/v1/track", body, gw.pk, headers={"origin": ORIGIN, "user-agent": "Own/2"})
    pk_id = check_accepted(r, "track")["event_id"]
    records = await raw_records(gw.bootstrap, [sk_id, pk_id])
    assert records[sk_id]["context"] == {"ip": "198.51.100.7", "user_agent": "Forwarded/1.0"}
    assert records[pk_id]["context"] == {"ip": "203.0.113.9", "user_agent": "Own/2"}


# --- every row of the error table -----------------------------------------------------------

# code -> (route, request kwargs for Gw.post); rate_limited and broker_unavailable have tests of
# their own below and in test_gateway_processes.py.
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "invalid_json": ("track", {"content": b'{"event": "a",'}),
    "invalid_payload": ("track", {"body": {"event": "a", "propertys": {}}}),
    "unsupported_media_type": (
        "track",
        {
            "body": {"event": "a"},
            "headers": JSON | {"content-type": "application/x-www-form-urlencoded"},
        },
    ),
    "payload_too_large": ("track", {"body": {"event": "a", "url": "x" * 40_000}}),
    "invalid_gzip": (
        "batch",
        {"content": b"\x1f\x8bnot gzip", "headers": JSON | {"content-encoding": "gzip"}},
    ),
    "unsupported_encoding": (
        "track",
        {"body": {"event": "a"}, "headers": JSON | {"content-encoding": "br"}},
    ),
    "missing_api_key": ("track", {"body": {"event": "a"}, "headers": {"authorization": ""}}),
    "malformed_api_key": ("track", {"body": {"event": "a"}, "key": "sk_live_short"}),
    "invalid_api_key": ("track", {"body": {"event": "a"}, "key": "sk_live_" + "A" * 32}),
    "origin_not_allowed": ("track", {"body": {"event": "a"}, "key": "<pk>"}),
    "read_only_key": ("track", {"body": {"event": "a"}, "key": "<rk>"}),
    "forget_requires_secret_key": ("forget", {"body": {"user_id": "u"}, "key": "<pk>"}),
}
# secret_key_in_url needs a query string: tested in test_snippet.py.
OTHER_ROWS = {"not_found", "method_not_allowed", "rate_limited", "broker_unavailable"}
OTHER_ROWS |= {"secret_key_in_url"}
OTHER_ROWS |= {
    "keys_loading",
    "request_timeout",
    "overloaded",
    "too_many_invalid_requests",
}  # test_gateway_hardening.py
# The read API's rows: tested against a running pipeline in test_read_api.py.
OTHER_ROWS |= {"publishable_key_cannot_read", "invalid_parameter", "store_unavailable"}
# The webhook rows: tested against a running pipeline in test_hooks.py.
OTHER_ROWS |= {"invalid_signature", "stale_timestamp", "unknown_hook"}


def test_every_error_row_has_a_test() -> None:
    assert set(ROWS) | OTHER_ROWS == set(ERROR_CODES)


@pytest.mark.parametrize("code", list(ROWS))
async def test_error_row(gw: Gw, code: str) -> None:
    route, kwargs = ROWS[code]
    kwargs = dict(kwargs)
    if kwargs.get("key") in ("<pk>", "<rk>"):
        kwargs["key"] = gw.pk if kwargs["key"] == "<pk>" else gw.rk
    check_error(await gw.post(f"/v1/{route}", **kwargs), code, route)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer sk_live_",
        "Bearer xk_live_" + "a" * 32,
        "Bearer sk_prod_" + "a" * 32,
        "Bearer sk_live_" + "a" * 32 + "!",
        "Bearer sk_live_" + "a" * 129,
        "Basic sk_live_" + "a" * 32,
        "sk_live_" + "a" * 32,
        "Bearer  ",
    ],
)
async def test_malformed_keys(gw: Gw, authorization: str) -> None:
    r = await gw.post("/v1/track", {"event": "a"}, headers={"authorization": authorization})
    check_error(r, "malformed_api_key")


async def test_key_scopes(gw: Gw) -> None:
    rk_forget = await gw.post("/v1/forget", {"user_id": "u"}, gw.rk)
    check_error(rk_forget, "forget_requires_secret_key", "forget")
    for route, body in (("identify", {"anonymous_id": "a", "user_id": "u"}), ("batch", {})):
        check_error(await gw.post(f"/v1/{route}", body, gw.rk), "read_only_key", route)
    wrong = await gw.post(
        "/v1/track", {"event": "a"}, gw.pk, headers={"origin": "https://evil.example"}
    )
    check_error(wrong, "origin_not_allowed")
    assert "access-control-allow-origin" not in wrong.headers
    ok = await gw.post("/v1/batch", {"events": [{"event": "a"}]}, gw.pk, headers={"origin": ORIGIN})
    check_accepted(ok, "batch")
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    sk = await gw.post("/v1/track", {"event": "a"}, headers={"origin": ORIGIN})
    check_accepted(sk, "track")  # no Origin check for sk_, and no CORS for its answers
    assert "access-control-allow-origin" not in sk.headers


async def test_cors_preflight(gw: Gw) -> None:
    async def preflight(path: str, origin: str) -> httpx.Response:
        headers = {"origin": origin, "access-control-request-method": "POST"}
        return await gw.client.options(path, headers=headers)

    r = await preflight("/v1/track", ORIGIN)
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"]
    check_error(await preflight("/v1/track", "https://evil.example"), "origin_not_allowed")
    check_error(await preflight("/v1/forget", ORIGIN), "origin_not_allowed")  # sk_ only


async def test_revoking_a_pk_key_shrinks_the_cors_allowlist(gw: Gw) -> None:
    origin = f"https://shop-{uuid.uuid4().hex[:8]}.example"
    key = await new_key(gw, "pk", origins=[origin])
    headers = {"origin": origin, "access-control-request-method": "POST"}

    async def preflight_refused() -> bool:
        r = await gw.client.options("/v1/track", headers=headers)
        return r.status_code == 403 and r.json()["error"] == "origin_not_allowed"

    assert not await preflight_refused()  # the key's origin is allowed while the key lives
    assert await revoke_key(gw.bootstrap, key) == 1
    await wait_until(preflight_refused)
    r = await gw.client.options("/v1/track", headers=headers)
    assert "access-control-allow-origin" not in r.headers
    # Origins of the other pk_ keys stay allowed.
    r = await gw.client.options("/v1/track", headers={**headers, "origin": ORIGIN})
    assert r.status_code == 204


async def test_revocation_reaches_the_gateway_within_seconds(gw: Gw) -> None:
    key = await new_key(gw, "sk")
    check_accepted(await gw.post("/v1/track", {"event": "a"}, key), "track")
    assert await revoke_key(gw.bootstrap, key) == 1
    started = time.monotonic()
    await wait_until(lambda: _refused(gw, key), timeout=5)
    assert time.monotonic() - started < 5
    check_accepted(await gw.post("/v1/track", {"event": "a"}), "track")  # others unaffected


async def _refused(gw: Gw, key: str) -> bool:
    r = await gw.post("/v1/track", {"event": "a"}, key)
    return r.status_code == 401 and r.json()["error"] == "invalid_api_key"


# --- input edge cases -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type", "code"),
    [
        (b"", "application/json", "invalid_json"),
        (b"not json", "application/json", "invalid_json"),
        (b'{"event": "\xff\xfe"}', "application/json", "invalid_json"),  # not UTF-8
        (b'{"event": "a\\ud800"}', "application/json", "invalid_json"),  # lone surrogate
        (b'{"event": "a"}', "", "unsupported_media_type"),
        (b'{"event": "a"}', "multipart/form-data; boundary=x", "unsupported_media_type"),
        (b"[]", "application/json", "invalid_payload"),
        (b'"event"', "application/json", "invalid_payload"),
        (b'{"event": 7}', "application/json", "invalid_payload"),
        (b'{"event": "a", "properties": [1]}', "application/json", "invalid_payload"),
        (b'{"event": "a", "properties": "x"}', "application/json", "invalid_payload"),
        (b'{"event": "a", "properties": {"n": NaN}}', "application/json", "invalid_payload"),
        (b'{"event": "a", "properties": {"n": 1e999}}', "application/json", "invalid_payload"),
        (
            b'{"event": "a", "properties": {"n": 99999999999999999999}}',
            "application/json",
            "invalid_payload",
        ),
        (
            b'{"event": "a", "properties": {"n": ' + b"9" * 5000 + b"}}",
            "application/json",
            "invalid_json",
        ),
        (
            b'{"event": "a", "properties": {"n": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
            "application/json",
            "invalid_json",
        ),
        (b'{"event": "a", "timestamp": "yesterday"}', "application/json", "invalid_payload"),
        (
            b'{"event": "a", "timestamp": "0001-01-01T00:00:00+01:00"}',
            "application/json",
            "invalid_payload",
        ),
        (b'{"event": "a", "timestamp": 1700000000}', "application/json", "invalid_payload"),
    ],
)
async def test_bad_bodies_are_documented_4xx(
    gw: Gw, content: bytes, content_type: str, code: str
) -> None:
    r = await gw.post("/v1/track", content=content, headers={"content-type": content_type})
    check_error(r, code, "track")


async def test_text_plain_is_accepted_for_send_beacon(gw: Gw) -> None:
    r = await gw.post(
        "/v1/track",
        content=b'{"event": "beacon", "properties": {"n": 1}}',
        headers={"content-type": "text/plain;charset=UTF-8"},
    )
    event_id = check_accepted(r, "track")["event_id"]
    record = (await raw_records(gw.bootstrap, [event_id]))[event_id]
    assert record["event"] == "beacon" and record["properties"] == {"n": 1}, record


async def test_streamed_body_over_the_limit_without_content_length(gw: Gw) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"event": "a", "url": "'
        for _ in range(100):
            yield b"x" * 1024

    headers = {**JSON, "authorization": f"Bearer {gw.sk}"}
    r = await gw.client.post("/v1/track", content=chunks(), headers=headers)
    check_error(r, "payload_too_large", "track")


async def test_timestamps_outside_the_window_are_refused_naming_the_field(gw: Gw) -> None:
    """Just inside MILLIMETRIC_TIMESTAMP_MAX_AGE_DAYS / _MAX_FUTURE_S is accepted; just outside is
    400 invalid_payload naming each event's timestamp (the exact edges: test_timestamp_window)."""
    s = gateway_settings(gw.bootstrap)
    now, margin = time.time() * 1000, 60_000  # the gateway reads its clock a little after ours
    oldest = now - s.timestamp_max_age_days * 86_400_000
    newest = now + s.timestamp_max_future_s * 1000

    def stamped(*millis: float) -> dict[str, Any]:
        return {"events": [{"event": "a", "timestamp": iso(m)} for m in millis]}

    check_accepted(await gw.post("/v1/batch", stamped(oldest + margin, newest - margin)), "batch")
    r = await gw.post("/v1/batch", stamped(oldest + margin, oldest - margin, newest + margin))
    details = check_error(r, "invalid_payload", "batch")["details"]
    assert [(d["index"], d["field"]) for d in details] == [(1, "timestamp"), (2, "timestamp")]
    assert "in the past" in details[0]["message"] and "in the future" in details[1]["message"]


# --- limits at their boundaries -----------------------------------------------------------


def _props(size: int) -> dict[str, str]:
    """Properties of exactly `size` bytes as compact JSON: {"p":"xxx..."}."""
    return {"p": "x" * (size - len('{"p":""}'))}


async def test_event_name_128_and_129_chars(gw: Gw) -> None:
    check_accepted(await gw.post("/v1/track", {"event": "e" * 128}), "track")
    body = check_error(await gw.post("/v1/track", {"event": "e" * 129}), "invalid_payload")
    assert body["details"][0]["field"] == "event"


async def test_properties_and_traits_8192_and_8193_bytes(gw: Gw) -> None:
    assert len(orjson.dumps(_props(8192))) == 8192
    check_accepted(await gw.post("/v1/track", {"event": "a", "properties": _props(8192)}), "track")
    body = check_error(
        await gw.post("/v1/track", {"event": "a", "properties": _props(8193)}), "invalid_payload"
    )
    assert body["details"] == [
        {
            "field": "properties",
            "message": "properties: is 8193 bytes as compact JSON; at most 8192",
        }
    ]
    ident = {"anonymous_id": "a", "user_id": "u"}
    check_accepted(await gw.post("/v1/identify", ident | {"traits": _props(8192)}), "identify")
    r = await gw.post("/v1/identify", ident | {"traits": _props(8193)})
    assert check_error(r, "invalid_payload")["details"][0]["field"] == "traits"


async def test_batch_1000_and_1001_events(gw: Gw) -> None:
    events = [{"event": "e"}] * 1000
    ids = check_accepted(await gw.post("/v1/batch", {"events": events}), "batch")["event_ids"]
    assert len(ids) == len(set(ids)) == 1000
    r = await gw.post("/v1/batch", {"events": [*events, {"event": "e"}]})
    assert check_error(r, "payload_too_large", "batch")["details"][0]["field"] == "events"
    check_error(await gw.post("/v1/batch", {"events": []}), "invalid_payload")


async def test_batch_body_of_exactly_1_mib(gw: Gw) -> None:
    limit = gw.app.state.gateway.settings.batch_max_bytes
    assert limit == 1024 * 1024
    events = [{"event": "e", "properties": _props(1000)} for _ in range(1000)]
    body = orjson.dumps({"events": events})
    assert len(body) < limit
    body += b" " * (limit - len(body))  # trailing whitespace is valid JSON
    check_accepted(await gw.post("/v1/batch", content=body), "batch")
    check_error(await gw.post("/v1/batch", content=body + b" "), "payload_too_large", "batch")


# --- rate limits ----------------------------------------------------------------------------


async def test_rate_limited_with_retry_after_then_the_bucket_refills(gw: Gw) -> None:
    project = f"rl-{uuid.uuid4().hex[:8]}"
    key = await new_key(gw, "sk", project)
    await set_limit(gw, project, "track", Limit(rate=4.0, burst=2))
    statuses = [(await gw.post("/v1/track", {"event": "a"}, key)).status_code for _ in range(2)]
    assert statuses == [202, 202]
    r = await gw.post("/v1/track", {"event": "a"}, key)
    check_error(r, "rate_limited", "track")
    assert r.headers["retry-after"] == "1"  # ceil((1 - tokens) / 4) for a just-emptied bucket
    check_accepted(await gw.post("/v1/batch", {"events": [{"event": "a"}]}, key), "batch")
    await asyncio.sleep(0.3)  # 4 tokens/s: one token is back after 0.25 s
    check_accepted(await gw.post("/v1/track", {"event": "a"}, key), "track")
    # A larger burst keeps the bucket's tokens (at most 1 left of the old burst of 2; then a
    # token per 100 s): raising a limit does not hand out a full new bucket, however slow the
    # machine is.
    await set_limit(gw, project, "track", Limit(rate=0.01, burst=100))
    statuses = [(await gw.post("/v1/track", {"event": "a"}, key)).status_code for _ in range(3)]
    assert statuses.count(202) <= 1 and statuses[-2:] == [429, 429], statuses
    await set_limit(gw, project, "track", None)  # reset: the default (50/s) is back
    assert gw.app.state.gateway.limit_for("track", project) == Limit(50.0, 200)
    await asyncio.sleep(0.2)  # 10 tokens at 50/s (a slower sleep only adds more)
    for _ in range(5):
        check_accepted(await gw.post("/v1/track", {"event": "a"}, key), "track")


async def test_default_batch_limit_5_per_s_burst_20(gw: Gw) -> None:
    assert load_default_limits()["batch"] == Limit(5.0, 20)
    assert load_default_limits()["track"] == Limit(50.0, 200)
    key = await new_key(gw, "sk", f"def-{uuid.uuid4().hex[:8]}")
    # Until the first 429 (however slow the machine, requests outpace 5/s): the burst of 20,
    # then at most what 5/s refilled meanwhile.
    started = time.monotonic()
    statuses: list[int] = []
    while 429 not in statuses and len(statuses) < 300:
        r = await gw.post("/v1/batch", {"events": [{"event": "a"}]}, key)
        statuses.append(r.status_code)
    elapsed = time.monotonic() - started
    assert statuses[:20] == [202] * 20 and statuses[-1] == 429, statuses
    assert statuses.count(202) <= 20 + 5 * elapsed + 1


async def test_the_historical_lane_spends_a_bucket_of_its_own(gw: Gw) -> None:
    """A backfill (`X-Millimetric-Lane: historical`) never spends the live batch budget."""
    project = f"lane-{uuid.uuid4().hex[:8]}"
    key = await new_key(gw, "sk", project)
    for route in ("batch", "batch_historical"):
        await set_limit(gw, project, route, Limit(rate=0.01, burst=1))
    one = {"events": [{"event": "a"}]}
    lane = {"X-Millimetric-Lane": "historical"}
    check_accepted(await gw.post("/v1/batch", one, key, headers=lane), "batch")
    check_accepted(await gw.post("/v1/batch", one, key), "batch")  # live: still its token
    check_error(await gw.post("/v1/batch", one, key, headers=lane), "rate_limited", "batch")
    check_error(await gw.post("/v1/batch", one, key), "rate_limited", "batch")


@pytest.mark.parametrize("fail_open", [True, False])
async def test_unreachable_redis_fails_open_by_default(broker: str, fail_open: bool) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = build_app(
        gateway_settings(broker, redis_url=dead, rate_limit_fail_open=fail_open), broker
    )
    async with app.starlette.router.lifespan_context(app.starlette):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            g = Gw(app, client, broker, f"redis-{uuid.uuid4().hex[:8]}")
            g.sk = await new_key(g, "sk")
            r = await g.post("/v1/track", {"event": "a"})
    if fail_open:
        check_accepted(r, "track")
    else:
        check_error(r, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1


# --- OpenAPI ------------------------------------------------------------------------------


async def test_openapi_is_generated_from_the_models_and_the_table(gw: Gw) -> None:
    doc = (await gw.client.get("/openapi.json")).json()
    assert doc == orjson.loads(orjson.dumps(build_openapi(gw.app.state.gateway.settings)))
    assert set(OPERATIONS) == set(ROUTES)
    assert {p for p in doc["paths"] if p.startswith("/v1/")} == {f"/v1/{r}" for r in ROUTES} | {
        "/v1/forget/{forget_id}",
        "/v1/hooks/{hook_id}",
        *(f"/v1/{r}" for r in ANSWERS),
    }
    schemas = doc["components"]["schemas"]
    for model in (TrackBody, IdentifyBody, ForgetBody):
        expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
        settings = gw.app.state.gateway.settings
        assert schemas[model.__name__] == express_rules(model.__name__, expected, settings)
    assert schemas["BatchBody"]["properties"]["events"]["maxItems"] == 1000
    listed = {
        code
        for path in doc["paths"].values()
        for op in path.values()
        for resp in op["responses"].values()
        for code in resp.get("content", {})
        .get("application/json", {})
        .get("schema", {})
        .get("properties", {})
        .get("error", {})
        .get("enum", [])
    }
    assert listed | {"not_found"} == set(ERROR_CODES)
    assert "Retry-After" in doc["paths"]["/v1/track"]["post"]["responses"]["429"]["headers"]
    forget = doc["paths"]["/v1/forget"]["post"]["responses"]["403"]
    assert forget["content"]["application/json"]["schema"]["properties"]["error"]["enum"] == [
        "secret_key_in_url",
        "forget_requires_secret_key",
    ]


async def test_forget_status_is_pending_until_a_sink_reports_it(gw: Gw) -> None:
    r = await gw.client.get("/v1/forget/fgt_0123", headers={"Authorization": f"Bearer {gw.sk}"})
    assert r.status_code == 200 and r.json() == {
        "ok": True,
        "forget_id": "fgt_0123",
        "status": "pending",
    }
    r = await gw.client.get("/v1/forget/fgt_0123", headers={"Authorization": f"Bearer {gw.pk}"})
    assert r.status_code == 403 and r.json()["error"] == "forget_requires_secret_key"


# --- fuzz -----------------------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63 - 1, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**40])
    | st.floats()
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_field = st.sampled_from(
    [
        "event",
        "event_id",
        "timestamp",
        "anonymous_id",
        "user_id",
        "session_id",
        "url",
        "path",
        "referrer",
        "properties",
        "traits",
        "ip",
        "user_agent",
        "country",
        "events",
        "suppress",
        "x",
    ]
)
_event = st.dictionaries(_field, _json | st.text(max_size=140), max_size=6)


def _dumps(value: Any) -> bytes:
    # stdlib json, unlike orjson, writes NaN, Infinity, huge ints and escaped lone surrogates
    return json.dumps(value, ensure_ascii=len(repr(value)) % 2 == 0).encode(errors="replace")


_text = st.text(max_size=20)
_id = st.text(min_size=1, max_size=20)
_edge = st.sampled_from([2**64, -(2**63) - 1, 10**40, float("nan"), float("inf"), 1e308])
_object = st.dictionaries(_text, _json | _edge | st.lists(_edge, max_size=2), max_size=4)
_timestamp = st.datetimes(datetime(1971, 1, 1), datetime(2100, 1, 1)).map(datetime.isoformat)
# Valid but for what the gateway must find itself: NaN, huge numbers, sizes, lengths.
_track = st.fixed_dictionaries(
    {"event": st.text(min_size=1, max_size=130)},
    optional={
        "properties": _object,
        "anonymous_id": _id,
        "user_id": _id,
        "timestamp": _timestamp,
        "url": _text,
        "ip": _text,
        "country": _json,
    },
)
# A body that is (close to) valid for each route, so that many requests reach the publisher.
VALID = {
    "track": _track,
    "identify": st.fixed_dictionaries(
        {"anonymous_id": _id, "user_id": _id},
        optional={"traits": _object, "timestamp": _timestamp},
    ),
    "batch": st.fixed_dictionaries({"events": st.lists(_track, max_size=3)}),
    "forget": st.fixed_dictionaries(
        {}, optional={"user_id": _id, "anonymous_id": _id, "suppress": st.booleans()}
    ),
    "nope": _track,
}
# Segment's messages, with junk where an SDK would put ids, times and context.
SEGMENT_KEYS = build_openapi(Settings())["components"]["schemas"]["SegmentPage"]["properties"]
_segment = st.dictionaries(
    st.sampled_from([*SEGMENT_KEYS, "writeKey"]),
    _json | _id | _timestamp | st.dictionaries(st.sampled_from(["ip", "page", "campaign"]), _json),
    max_size=8,
)
VALID |= {route: _segment for route in SEGMENT_ROUTES}
VALID["batch"] |= st.fixed_dictionaries(
    {"batch": st.lists(_segment, max_size=3)}, optional={"sentAt": _timestamp, "context": _json}
)
_garbage = st.one_of(
    st.binary(max_size=200),
    _json.map(_dumps),
    _event.map(_dumps),
    st.lists(_event, max_size=3).map(lambda es: _dumps({"events": es})),
    st.builds(lambda e, cut: _dumps(e)[:cut], _event, st.integers(0, 60)),
)
_header = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)
CONTENT_TYPES = st.sampled_from(
    ["application/json"] * 6 + ["text/plain", "application/json; x=1", "<garbage>"]
).flatmap(lambda ct: _header if ct == "<garbage>" else st.just(ct))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), route=st.sampled_from([*ROUTES, "nope"]))
async def test_fuzzed_requests_never_get_a_5xx(gw: Gw, data: st.DataObject, route: str) -> None:
    body = data.draw(VALID[route].map(_dumps) | _garbage, "body")
    auth = data.draw(st.sampled_from(["sk"] * 5 + ["pk", "rk", "none", "garbage"]), "auth")
    key = {"sk": gw.sk, "pk": gw.pk, "rk": gw.rk}.get(auth)
    headers = {
        "content-type": data.draw(CONTENT_TYPES, "content_type"),
        "authorization": f"Bearer {key}" if key else data.draw(_header, "authorization"),
    }
    if origin := data.draw(st.sampled_from([None, ORIGIN]) | _header, "origin"):
        headers["origin"] = origin
    encoded = {k: v.encode("latin-1") for k, v in headers.items()}
    r = await gw.client.post(f"/v1/{route}", content=body, headers=encoded)
    assert r.status_code < 500, r.text
    if r.status_code in (200, 202):  # 200: a Segment body
        ACCEPTED[route].model_validate(r.json())
    else:
        ErrorBody.model_validate(r.json())


def test_generated_ids_are_uuid4_hex() -> None:
    ids = {new_id() for _ in range(1_000)}
    assert len(ids) == 1_000
    for value in ids:
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122
