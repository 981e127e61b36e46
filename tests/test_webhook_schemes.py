"""Webhook verification and mapping without services: the providers' own libraries sign (Stripe's
`WebhookSignature`, `standardwebhooks`), GitHub's and Shopify's HMACs are computed by hand."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import orjson
import pytest
import stripe
from standardwebhooks.webhooks import Webhook

from gateway.webhook_schemes import SCHEMES, SignatureError, new_secret, stored_secret, verify
from processors.hook_mapping import Unmappable, check_mapping, map_delivery, trim_properties

BODY = orjson.dumps(
    {
        "id": "evt_1",
        "type": "invoice.paid",
        "created": 1_700_000_000,
        "data": {"object": {"customer": "cus_9", "amount_paid": 1200}},
    }
)


def stripe_headers(body: bytes, secret: str, at: int | None = None) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, at)
    return {"stripe-signature": header}


def refused(provider: str, secrets: list[str], headers: dict[str, str], body: bytes) -> str:
    with pytest.raises(SignatureError) as error:
        verify(
            SCHEMES[provider], secrets, headers, body, headers.get("webhook-id", ""), time.time()
        )
    return error.value.code


def test_stripe_signature_from_stripes_library() -> None:
    headers = stripe_headers(BODY, "whsec_test")
    verify(SCHEMES["stripe"], ["whsec_test"], headers, BODY, "", time.time())
    assert refused("stripe", ["whsec_other"], headers, BODY) == "invalid_signature"
    reserialised = orjson.dumps(orjson.loads(BODY), option=orjson.OPT_INDENT_2)
    assert refused("stripe", ["whsec_test"], headers, reserialised) == "invalid_signature"
    stale = stripe_headers(BODY, "whsec_test", int(time.time()) - 301)
    assert refused("stripe", ["whsec_test"], stale, BODY) == "stale_timestamp"
    assert refused("stripe", ["whsec_test"], {}, BODY) == "invalid_signature"


def test_a_forged_stale_timestamp_is_an_invalid_signature() -> None:
    stale = stripe_headers(BODY, "whsec_forged", int(time.time()) - 3600)
    assert refused("stripe", ["whsec_test"], stale, BODY) == "invalid_signature"


def test_every_secret_of_a_rotation_is_valid() -> None:
    for secret in ("whsec_old", "whsec_new"):
        headers = stripe_headers(BODY, secret)
        verify(SCHEMES["stripe"], ["whsec_new", "whsec_old"], headers, BODY, "", time.time())
    assert refused("stripe", ["whsec_new"], stripe_headers(BODY, "whsec_old"), BODY) == (
        "invalid_signature"
    )


def test_github_and_shopify_hand_computed() -> None:
    digest = hmac.new(b"gh-secret", BODY, hashlib.sha256)
    github = {"x-hub-signature-256": "sha256=" + digest.hexdigest()}
    verify(SCHEMES["github"], ["gh-secret"], github, BODY, "", time.time())
    assert refused("github", ["other"], github, BODY) == "invalid_signature"
    shopify = {"x-shopify-hmac-sha256": base64.b64encode(digest.digest()).decode()}
    verify(SCHEMES["shopify"], ["gh-secret"], shopify, BODY, "", time.time())
    assert refused("shopify", ["gh-secret"], shopify, BODY + b" ") == "invalid_signature"


def test_standard_webhooks_signed_by_its_library() -> None:
    secret = new_secret(SCHEMES["standard"])
    assert secret.startswith("whsec_")
    now = datetime.now(UTC)
    signature = Webhook(secret).sign("msg_1", now, BODY.decode())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(now.timestamp())),
        # Several signatures, space-separated: one of another secret, then ours.
        "webhook-signature": "v1,bm90IGl0 " + signature,
    }
    verify(SCHEMES["standard"], [secret], headers, BODY, "msg_1", time.time())
    assert refused("standard", [new_secret(SCHEMES["standard"])], headers, BODY) == (
        "invalid_signature"
    )
    other_id = {**headers, "webhook-id": "msg_2"}
    assert refused("standard", [secret], other_id, BODY) == "invalid_signature"
    old = datetime.fromtimestamp(now.timestamp() - 600, UTC)
    stale = {
        **headers,
        "webhook-timestamp": str(int(old.timestamp())),
        "webhook-signature": Webhook(secret).sign("msg_1", old, BODY.decode()),
    }
    assert refused("standard", [secret], stale, BODY) == "stale_timestamp"


def test_bearer_secrets_are_stored_hashed() -> None:
    stored = stored_secret(SCHEMES["bearer"], "s3cret")
    assert "s3cret" not in stored
    verify(SCHEMES["bearer"], [stored], {"authorization": "Bearer s3cret"}, BODY, "", 0)
    assert refused("bearer", [stored], {"authorization": "Bearer s3cre"}, BODY) == (
        "invalid_signature"
    )
    with pytest.raises(ValueError):
        stored_secret(SCHEMES["standard"], "whsec_not base64!")


def delivery(provider: str, body: bytes, headers: dict[str, str], **mapping: object) -> dict:
    return {
        "v": 1,
        "type": "webhook",
        "project": "demo",
        "event_id": "e" * 32,
        "hook_id": "hk_x",
        "provider": provider,
        "delivery_id": "d",
        "received_at": 1_800_000_000_000,
        "headers": headers,
        "body": body.decode(),
        "mapping": {**SCHEMES[provider].mapping, **mapping},
    }


def test_default_mappings() -> None:
    event = map_delivery(delivery("stripe", BODY, {}), 8192)  # type: ignore[arg-type]
    assert (event["event"], event["user_id"], event["timestamp"]) == (
        "stripe.invoice.paid",
        "cus_9",
        1_700_000_000_000,
    )
    assert event["properties"] == orjson.loads(BODY)
    gh = orjson.dumps({"action": "opened", "sender": {"login": "octo"}})
    event = map_delivery(delivery("github", gh, {"x-github-event": "issues"}), 8192)  # type: ignore[arg-type]
    assert (event["event"], event["user_id"], event["timestamp"]) == (
        "github.issues.opened",
        "octo",
        1_800_000_000_000,
    )
    ping = delivery("github", b'{"zen": "x"}', {"x-github-event": "ping"})
    assert map_delivery(ping, 8192)["event"] == "github.ping"  # type: ignore[arg-type]
    with pytest.raises(Unmappable):
        map_delivery(delivery("stripe", b'{"id": "evt_2"}', {}), 8192)  # type: ignore[arg-type]


def test_a_mapping_overrides_the_default() -> None:
    mapping = check_mapping(
        {
            "event_prefix": "billing",
            "user_id": "body.data.object.customer",
            "properties": {"amount": "body.data.object.amount_paid", "kind": "body.type"},
        }
    )
    event = map_delivery(delivery("stripe", BODY, {}, **mapping), 8192)  # type: ignore[arg-type]
    assert event["event"] == "billing.invoice.paid"
    assert event["properties"] == {"amount": 1200, "kind": "invoice.paid"}
    with pytest.raises(ValueError):
        check_mapping({"evnt": ["body.type"]})


def test_oversized_properties_keep_what_fits_and_name_the_rest() -> None:
    props = {"small": 1, "big": "x" * 9000, "also_small": "y"}
    trimmed = trim_properties(props, 8192)
    assert trimmed == {"small": 1, "also_small": "y", "$dropped": ["big"]}
    assert len(orjson.dumps(trimmed)) <= 8192
    assert trim_properties({"a": 1}, 8192) == {"a": 1}
