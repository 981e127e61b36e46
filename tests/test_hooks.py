"""Webhook receivers end to end: signed deliveries land as mapped events, once; forgeries, stale
timestamps, unknown hooks and oversized bodies are refused with their codes and land nothing.

One pipeline for the module (chdb); every test uses a project of its own.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import stripe
from standardwebhooks.webhooks import Webhook

from gateway import hook_admin
from tests.services import Pipeline, kafka_broker
from tests.test_sinks import dead_letters

MAX_BYTES = 65_536


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    """One pipeline for the module, with a small webhook body limit."""
    root = Path(tempfile.mkdtemp(prefix="mm-hooks-"))
    with kafka_broker() as bootstrap:
        p = Pipeline(bootstrap, None, root, {"MILLIMETRIC_HOOK_MAX_BYTES": str(MAX_BYTES)})
        p.start()
        try:
            yield p
        finally:
            p.stop()
            shutil.rmtree(root, ignore_errors=True)


def project() -> str:
    return f"h{uuid.uuid4().hex[:10]}"


def post(p: Pipeline, hook_id: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{p.base_url}/v1/hooks/{hook_id}",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )


def wait_known(p: Pipeline, hook_id: str) -> None:
    """Until the gateway knows the hook (an unsigned delivery is then 401, not 404)."""
    deadline = time.monotonic() + 30
    while post(p, hook_id, b"{}", {}).status_code == 404:
        assert time.monotonic() < deadline, "the gateway did not learn the hook"
        time.sleep(0.1)


def create(p: Pipeline, name: str, provider: str, secret: str | None = None) -> tuple[str, str]:
    """A live hook of `provider` for project `name`: (hook_id, secret)."""
    hook, fresh = asyncio.run(hook_admin.create_hook(p.bootstrap, name, provider, secret, None))
    wait_known(p, hook["hook_id"])
    return hook["hook_id"], secret or fresh or ""


def stripe_event(event_id: str, customer: str) -> bytes:
    return orjson.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "invoice.paid",
            "created": 1_760_000_000,
            "data": {"object": {"customer": customer, "amount_paid": 4200}},
        }
    )


def stripe_sig(body: bytes, secret: str, at: int | None = None) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, at)
    return {"stripe-signature": header}


def test_stripe_lands_mapped_once_and_forgeries_land_nothing(pipeline: Pipeline) -> None:
    name = project()
    hook_id, secret = create(pipeline, name, "stripe", "whsec_test_abc")
    body = stripe_event("evt_one", "cus_42")
    first = post(pipeline, hook_id, body, stripe_sig(body, secret))
    assert first.status_code == 202, first.text
    # Stripe retries the same event with a fresh signature: the same row.
    time.sleep(1.1)
    again = post(pipeline, hook_id, body, stripe_sig(body, secret))
    assert again.status_code == 202 and again.json()["event_id"] == first.json()["event_id"]

    forged = stripe_event("evt_forged", "cus_evil")
    bad = post(pipeline, hook_id, forged, stripe_sig(forged, "whsec_wrong"))
    assert (bad.status_code, bad.json()["error"]) == (401, "invalid_signature")
    stale_body = stripe_event("evt_stale", "cus_old")
    stale = post(
        pipeline, hook_id, stale_body, stripe_sig(stale_body, secret, int(time.time()) - 400)
    )
    assert (stale.status_code, stale.json()["error"]) == (401, "stale_timestamp")
    reserialised = orjson.dumps(orjson.loads(forged), option=orjson.OPT_INDENT_2)
    changed = post(pipeline, hook_id, reserialised, stripe_sig(forged, secret))
    assert (changed.status_code, changed.json()["error"]) == (401, "invalid_signature")

    expected = f"stripe.invoice.paid\tcus_42\t{1_760_000_000}\n"
    pipeline.wait_for(
        f"SELECT event, user_id, toUnixTimestamp(timestamp) FROM events FINAL "
        f"WHERE project = '{name}'",
        expected,
    )
    props = orjson.loads(
        pipeline.sql(f"SELECT properties FROM events WHERE project = '{name}' LIMIT 1")
    )
    assert props["data"]["object"]["amount_paid"] == 4200


def test_github_shopify_and_standard_land_mapped(pipeline: Pipeline) -> None:
    name = project()
    github, gh_secret = create(pipeline, name, "github")
    body = orjson.dumps({"action": "opened", "sender": {"login": "octocat"}})
    digest = hmac.new(gh_secret.encode(), body, hashlib.sha256)
    gh_headers = {
        "x-hub-signature-256": "sha256=" + digest.hexdigest(),
        "x-github-event": "issues",
        "x-github-delivery": str(uuid.uuid4()),
    }
    assert post(pipeline, github, body, gh_headers).status_code == 202
    assert post(pipeline, github, body, gh_headers).status_code == 202  # a redelivery

    shopify, shop_secret = create(pipeline, name, "shopify", "shpss_app_secret")
    order = orjson.dumps({"id": 1, "customer": {"id": 7001}, "total_price": "10.00"})
    mac = hmac.new(shop_secret.encode(), order, hashlib.sha256).digest()
    shop_headers = {
        "x-shopify-hmac-sha256": base64.b64encode(mac).decode(),
        "x-shopify-topic": "orders/create",
        "x-shopify-webhook-id": str(uuid.uuid4()),
        "x-shopify-triggered-at": "2025-10-01T12:00:00Z",
    }
    assert post(pipeline, shopify, order, shop_headers).status_code == 202
    wrong = {**shop_headers, "x-shopify-hmac-sha256": base64.b64encode(b"x" * 32).decode()}
    assert post(pipeline, shopify, order, wrong).status_code == 401

    standard, whsec = create(pipeline, name, "standard")
    assert whsec.startswith("whsec_")
    payload = orjson.dumps(
        {"type": "user.created", "timestamp": "2025-10-02T00:00:00Z", "data": {"plan": "pro"}}
    )
    now = datetime.now(UTC)
    msg_id = "msg_" + uuid.uuid4().hex
    std_headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(whsec).sign(msg_id, now, payload.decode()),
    }
    assert post(pipeline, standard, payload, std_headers).status_code == 202
    expected = (
        "github.issues.opened\toctocat\nshopify.orders/create\t7001\nstandard.user.created\t\n"
    )
    pipeline.wait_for(
        f"SELECT event, user_id FROM events FINAL WHERE project = '{name}' ORDER BY event",
        expected,
    )
    times = pipeline.sql(
        f"SELECT toUnixTimestamp(timestamp) FROM events FINAL WHERE project = '{name}' "
        "AND event != 'github.issues.opened' ORDER BY event"
    )
    assert times.split() == [str(1_759_320_000), str(1_759_363_200)]


def test_rotation_accepts_old_and_new_until_the_old_is_retired(pipeline: Pipeline) -> None:
    name = project()
    hook_id, old = create(pipeline, name, "standard")
    _, new = asyncio.run(hook_admin.rotate_hook(pipeline.bootstrap, hook_id, None))
    assert new is not None and new != old

    def send(secret: str) -> httpx.Response:
        body = orjson.dumps({"type": "ping", "data": {}})
        msg_id, now = "msg_" + uuid.uuid4().hex, datetime.now(UTC)
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, now, body.decode()),
        }
        return post(pipeline, hook_id, body, headers)

    deadline = time.monotonic() + 30
    while send(new).status_code != 202:  # until the gateway has the rotated record
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert send(old).status_code == 202
    asyncio.run(hook_admin.retire_old_secrets(pipeline.bootstrap, hook_id))
    deadline = time.monotonic() + 30
    while (answer := send(old)).status_code != 401:
        assert time.monotonic() < deadline, "the old secret stayed valid"
        time.sleep(0.1)
    assert answer.json()["error"] == "invalid_signature"
    assert send(new).status_code == 202
    asyncio.run(hook_admin.revoke_hook(pipeline.bootstrap, hook_id))
    deadline = time.monotonic() + 30
    while (answer := send(new)).status_code != 404:
        assert time.monotonic() < deadline, "the revoked hook stayed live"
        time.sleep(0.1)
    assert answer.json()["error"] == "unknown_hook"


def test_cli_creates_a_generic_hook_with_a_mapping_file(pipeline: Pipeline, tmp_path: Path) -> None:
    name = project()
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        'event_prefix = "crm"\n'
        'event = ["body.kind"]\n'
        'user_id = "body.contact.email"\n'
        'timestamp = "body.at"\n'
        "[properties]\n"
        'deal = "body.deal.id"\n'
        'stage = "header.x-crm-stage"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "millimetric_app.cli", "hooks", "create", "--project", name,
         "--provider", "generic", "--mapping", str(mapping)],
        env=pipeline.env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    hook_id = fields["url"].removeprefix("/v1/hooks/")
    wait_known(pipeline, hook_id)
    body = orjson.dumps(
        {"kind": "deal.won", "contact": {"email": "a@b.c"}, "at": 1_750_000_000_000,
         "deal": {"id": 99}}
    )  # fmt: skip
    signature = hmac.new(fields["secret"].encode(), body, hashlib.sha256).hexdigest()
    headers = {"x-webhook-signature": signature, "x-webhook-id": "d-1", "x-crm-stage": "won"}
    assert post(pipeline, hook_id, body, headers).status_code == 202
    pipeline.wait_for(
        "SELECT event, user_id, toUnixTimestamp(timestamp), properties FROM events FINAL "
        f"WHERE project = '{name}'",
        'crm.deal.won\ta@b.c\t1750000000\t{"deal":99,"stage":"won"}\n',
    )


def test_refusals(pipeline: Pipeline) -> None:
    name = project()
    hook_id, secret = create(pipeline, name, "github")

    def signed(body: bytes) -> dict[str, Any]:
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return {"x-hub-signature-256": f"sha256={digest}", "x-github-event": "push"}

    unknown = post(pipeline, "hk_doesnotexist", b"{}", {})
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_hook")
    big = orjson.dumps({"action": "x", "blob": "a" * MAX_BYTES})
    too_big = post(pipeline, hook_id, big, signed(big))
    assert (too_big.status_code, too_big.json()["error"]) == (413, "payload_too_large")
    bomb = gzip.compress(big)
    inflated = post(pipeline, hook_id, bomb, {**signed(big), "content-encoding": "gzip"})
    assert (inflated.status_code, inflated.json()["error"]) == (413, "payload_too_large")
    not_json = b"action=opened"
    invalid = post(pipeline, hook_id, not_json, signed(not_json))
    assert (invalid.status_code, invalid.json()["error"]) == (400, "invalid_json")
    small = orjson.dumps({"action": "ok"})
    zipped = post(
        pipeline, hook_id, gzip.compress(small), {**signed(small), "content-encoding": "gzip"}
    )
    assert zipped.status_code == 202
    pipeline.wait_for(
        f"SELECT event FROM events FINAL WHERE project = '{name}'", "github.push.ok\n"
    )


def test_an_unmappable_delivery_is_kept_and_dead_lettered(pipeline: Pipeline) -> None:
    name = project()
    hook_id, secret = create(pipeline, name, "stripe", "whsec_unmappable")
    body = orjson.dumps({"id": "evt_no_type", "data": {"object": {}}})  # no `type`: no event name
    answer = post(pipeline, hook_id, body, stripe_sig(body, secret))
    assert answer.status_code == 202  # durable first: the mapping runs after the ack
    letters = [orjson.loads(v) for v in dead_letters(pipeline.bootstrap, 1, timeout=60)]
    event_id = answer.json()["event_id"]
    [letter] = [x for x in letters if (x.get("record") or {}).get("event_id") == event_id]
    assert "Unmappable: no event name" in letter["reason"]
    assert letter["record"]["body"] == body.decode()
    assert pipeline.sql(f"SELECT count() FROM events WHERE project = '{name}'") == "0\n"
