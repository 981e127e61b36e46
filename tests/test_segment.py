"""Segment's tracking API at the gateway (in process, real broker): HTTP Basic keys, Segment's
batch and single-message bodies mapped to raw records, skew correction, key rules unchanged.

The real SDKs against a whole pipeline are in test_segment_sdks.py.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

from gateway.segment import META_KEY
from tests.test_gateway import (
    ACCEPTED,
    ORIGIN,
    Gw,
    check_accepted,
    check_error,
    gw,
    iso,
    raw_records,
)

__all__ = ["gw"]  # the module fixture, shared with test_gateway.py


def basic(key: str, password: str = "") -> dict[str, str]:
    """The Authorization header Segment's SDKs send."""
    return {"authorization": "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()}


async def test_basic_auth_with_the_key_as_user_name(gw: Gw) -> None:
    r = await gw.post("/v1/track", {"event": "a"}, headers=basic(gw.sk))
    check_accepted(r, "track")
    check_error(
        await gw.post("/v1/track", {"event": "a"}, headers=basic(gw.sk, "pw")), "malformed_api_key"
    )
    bad = {"authorization": "Basic !!notbase64"}
    check_error(await gw.post("/v1/track", {"event": "a"}, headers=bad), "malformed_api_key")
    check_error(await gw.post("/v1/track", {"event": "a"}, headers=basic(gw.rk)), "read_only_key")


async def test_pk_keys_over_basic_follow_the_origin_rules(gw: Gw) -> None:
    body = {"batch": [{"type": "page", "anonymousId": "anon-pk", "messageId": uuid.uuid4().hex}]}
    r = await gw.post("/v1/batch", body, headers=basic(gw.pk))
    check_error(r, "origin_not_allowed")
    r = await gw.post(
        "/v1/page", body["batch"][0], headers=basic(gw.pk) | {"origin": "https://evil.example"}
    )
    check_error(r, "origin_not_allowed")
    r = await gw.post("/v1/page", body["batch"][0], headers=basic(gw.pk) | {"origin": ORIGIN})
    assert accepted(r, "track")["event_id"] == body["batch"][0]["messageId"]
    assert r.headers["access-control-allow-origin"] == ORIGIN
    preflight = await gw.client.options("/v1/page", headers={"origin": ORIGIN})
    assert preflight.status_code == 204


def accepted(r: Any, route: str) -> dict[str, Any]:
    """A Segment body's answer: ours, with 200 (RudderStack's SDKs take no other 2xx)."""
    assert r.status_code == 200, r.text
    return ACCEPTED[route].model_validate(r.json()).model_dump()


def _message(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "messageId": uuid.uuid4().hex, **fields}


async def test_a_segment_batch_is_mapped_field_by_field(gw: Gw) -> None:
    now = time.time() * 1000
    skew = 3_600_000  # the device's clock is an hour behind
    device_ts, device_sent = iso(now - skew - 5000), iso(now - skew)
    context = {
        "ip": "81.2.69.160",
        "userAgent": "Mozilla/5.0 (iPhone)",
        "page": {
            "url": "https://shop.example/p?x=1",
            "path": "/p",
            "referrer": "https://t.co/",
            "title": "P",
        },
        "campaign": {"source": "newsletter", "medium": "email", "name": "spring", "term": "t"},
        "library": {"name": "analytics.js", "version": "5"},
    }
    batch = [
        _message(
            "track", event="Order Completed", anonymousId="a1", userId=42, properties={"total": 9}
        ),
        _message("page", anonymousId="a1", name="Home", category="Docs", properties={"k": 1}),
        _message("screen", anonymousId="a1", name="Settings"),
        _message("identify", anonymousId="a1", userId="u1", traits={"plan": "pro"}),
        _message("identify", userId="u2", traits={"plan": "free"}),
        _message("group", anonymousId="a1", groupId="g1", traits={"seats": 3}),
        _message("alias", previousId="a1", userId="u1"),
    ]
    for m in batch:
        m["timestamp"] = device_ts
        m["context"] = {"locale": "en-GB"}
    body = {"batch": batch, "sentAt": device_sent, "context": context, "writeKey": gw.sk}
    r = await gw.post("/v1/batch", body, headers=basic(gw.sk))
    ids = accepted(r, "batch")["event_ids"]
    assert ids == [m["messageId"] for m in batch]
    records = await raw_records(gw.bootstrap, ids)
    track, page, screen, ident, ident_no_anon, group, alias = (records[i] for i in ids)
    assert (track["event"], track["user_id"], track["anonymous_id"]) == (
        "Order Completed",
        "42",
        "a1",
    )
    assert track["properties"]["total"] == 9
    assert (track["url"], track["path"], track["referrer"]) == (
        "https://shop.example/p?x=1",
        "/p",
        "https://t.co/",
    )
    assert track["campaign"] == {
        "utm_source": "newsletter",
        "utm_medium": "email",
        "utm_campaign": "spring",
    }
    # sk_ key: context.ip/userAgent honoured like our forwarded fields, and not kept as properties.
    assert track["context"]["ip"] == "81.2.69.160"
    assert track["context"]["user_agent"] == "Mozilla/5.0 (iPhone)"
    meta = track["properties"][META_KEY]
    assert meta["context"] == {
        "page": {"title": "P"},
        "campaign": context["campaign"],
        "library": context["library"],
        "locale": "en-GB",
    }
    assert meta["timestamp"] == device_ts and meta["sentAt"] == device_sent
    assert "writeKey" not in meta and gw.sk not in str(records)
    # Segment's skew correction: timestamp + (receivedAt - sentAt).
    assert track["timestamp"] == track["received_at"] - 5000
    assert page["event"] == "$pageview"
    assert {k: page["properties"][k] for k in ("k", "name", "category")} == {
        "k": 1,
        "name": "Home",
        "category": "Docs",
    }
    assert screen["event"] == "$screen" and screen["properties"]["name"] == "Settings"
    assert (ident["type"], ident["event"], ident["user_id"]) == ("identify", "$identify", "u1")
    assert ident["traits"]["plan"] == "pro"
    # Without an anonymousId there is nothing to link: a $identify event with its traits.
    assert (ident_no_anon["type"], ident_no_anon["properties"]["plan"]) == ("track", "free")
    assert group["event"] == "$group"
    assert (group["properties"]["group_id"], group["properties"]["traits"]) == ("g1", {"seats": 3})
    assert (alias["type"], alias["event"]) == ("identify", "$alias")
    assert (alias["anonymous_id"], alias["user_id"]) == ("a1", "u1")


async def test_pk_keys_do_not_forward_context_ip(gw: Gw) -> None:
    message = _message("track", event="e", anonymousId="a2", context={"ip": "81.2.69.160"})
    headers = basic(gw.pk) | {"origin": ORIGIN}
    event_id = accepted(await gw.post("/v1/track", message, headers=headers), "track")["event_id"]
    record = (await raw_records(gw.bootstrap, [event_id]))[event_id]
    assert record["context"]["ip"] == "203.0.113.9"
    assert "ip" not in str(record["properties"])


async def test_single_routes_and_our_bodies_keep_working(gw: Gw) -> None:
    ids = []
    for route, message in (
        ("track", _message("track", event="Signed Up", userId="u9")),
        ("identify", _message("identify", anonymousId="a9", userId="u9")),
        ("page", {"anonymousId": "a9", "name": "Pricing"}),
        ("screen", {"userId": "u9", "name": "Home"}),
        ("group", {"userId": "u9", "groupId": 7}),
        ("alias", {"previousId": "a9", "userId": "u9"}),
    ):
        ids.append(
            accepted(await gw.post(f"/v1/{route}", message, headers=basic(gw.sk)), "track")[
                "event_id"
            ]
        )
    ours = await gw.post(
        "/v1/track", {"event": "ours", "anonymous_id": "a9", "properties": {"userId": 1}}
    )
    ids.append(check_accepted(ours, "track")["event_id"])
    records = await raw_records(gw.bootstrap, ids)
    names = [records[i]["event"] for i in ids]
    assert names == ["Signed Up", "$identify", "$pageview", "$screen", "$group", "$alias", "ours"]
    assert records[ids[-1]]["properties"] == {"userId": 1}


async def test_bad_segment_bodies_are_documented_400s(gw: Gw) -> None:
    bad = {
        "batch": [
            _message("track", event="ok"),
            _message("launch"),
            "x",
            _message("alias", userId="u"),
        ]
    }
    # Not all or nothing: Segment's SDKs drop a refused batch whole, so the good one is kept.
    answer = accepted(await gw.post("/v1/batch", bad, headers=basic(gw.sk)), "batch")
    assert answer["event_ids"] == [bad["batch"][0]["messageId"]]
    assert [(d["index"], d["field"]) for d in answer["rejected"]] == [
        (1, "type"),
        (2, "(message)"),
        (3, "previousId"),
    ]
    await raw_records(gw.bootstrap, answer["event_ids"])
    # Object fields that are not objects are refused, not dropped.
    objects = [_message("page", properties=[1]), _message("page", context={"page": "/p"})]
    r = await gw.post("/v1/batch", {"batch": objects}, headers=basic(gw.sk))
    details = check_error(r, "invalid_payload")["details"]
    assert [(d["index"], d["field"]) for d in details] == [(0, "properties"), (1, "context.page")]
    long_id = _message("track", event="e", messageId="x" * 200)
    details = check_error(
        await gw.post("/v1/track", long_id, headers=basic(gw.sk)), "invalid_payload"
    )["details"]
    assert details[0]["field"] == "messageId"
    empty = {"batch": []}
    check_error(await gw.post("/v1/batch", empty, headers=basic(gw.sk)), "invalid_payload")
    check_error(await gw.post("/v1/page", content=b"[1]", headers=basic(gw.sk)), "invalid_payload")
    check_error(await gw.post("/v1/page", content=b"{", headers=basic(gw.sk)), "invalid_json")


async def test_the_timestamp_window_applies_to_the_corrected_timestamp(gw: Gw) -> None:
    now = time.time() * 1000
    year = 365 * 86_400_000
    # A device whose clock is 20 years behind: raw timestamp outside the window, corrected inside.
    skewed = _message("track", event="e", anonymousId="a3", timestamp=iso(now - 20 * year))
    r = await gw.post(
        "/v1/batch", {"batch": [skewed], "sentAt": iso(now - 20 * year)}, headers=basic(gw.sk)
    )
    event_id = accepted(r, "batch")["event_ids"][0]
    record = (await raw_records(gw.bootstrap, [event_id]))[event_id]
    assert abs(record["timestamp"] - record["received_at"]) < 1000
    # Without sentAt, no correction: the same message is outside the window.
    r = await gw.post(
        "/v1/batch",
        {"batch": [_message("track", event="e", anonymousId="a3", timestamp=iso(now - 20 * year))]},
        headers=basic(gw.sk),
    )
    assert check_error(r, "invalid_payload")["details"][0]["field"] == "timestamp"


async def test_an_integral_number_is_an_integer_id(gw: Gw) -> None:
    # JSON has one number type: 283.0 is the integer 283, as JSON Schema (the document) says.
    r = await gw.post("/v1/page", {"userId": 283.0, "messageId": 7}, headers=basic(gw.sk))
    event_id = accepted(r, "track")["event_id"]
    record = (await raw_records(gw.bootstrap, [event_id]))[event_id]
    assert (record["user_id"], event_id) == ("283", "7")
    # Past 2**53 - 1 a float stands for several integers (2**53 + 1 arrives as 2**53): refused.
    for value in (b"283.5", b"9007199254740993.0", b"123456789012345678901234567890"):
        body = b'{"userId": ' + value + b"}"
        refused = await gw.post("/v1/page", content=body, headers=basic(gw.sk))
        check_error(refused, "invalid_payload")
