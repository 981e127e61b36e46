"""The real Segment and RudderStack Python SDKs, pointed at a running pipeline by changing only
the host: every call type lands in ClickHouse mapped, a retried batch counts once.

`@segment/analytics-node` runs when node is installed and tests/segment_node has its
node_modules (`npm ci` there; skipped otherwise).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rudderstack.analytics.client as rudder_client
import rudderstack.analytics.request as rudder_request
import segment.analytics.client as segment_client
import segment.analytics.request as segment_request

from tests.mmdb_fixture import write_country_mmdb
from tests.services import Pipeline, kafka_broker

SKEW = timedelta(hours=1)  # the device's clock is an hour behind
BEHIND = timedelta(seconds=30)  # each message happened this long before it was sent
GB_IP = "81.2.69.160"
CAMPAIGN = {"source": "newsletter", "medium": "email", "name": "spring"}


class SkewedClock(datetime):
    """The device's clock: what the SDKs stamp sentAt with."""

    @classmethod
    def now(cls, tz: Any = None) -> SkewedClock:  # type: ignore[override]
        return datetime.now(tz) - SKEW  # type: ignore[return-value]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """One pipeline (embedded ClickHouse, a geo database knowing GB_IP) for the module."""
    root = tmp_path_factory.mktemp("segment")
    mmdb = write_country_mmdb(root / "country.mmdb", {"81.2.69.0/24": "GB"})
    data = root / "data"
    data.mkdir()
    with kafka_broker() as bootstrap:
        p = Pipeline(bootstrap, None, Path(data), {"MILLIMETRIC_GEOIP_PATH": str(mmdb)}).start()
        try:
            yield p
        finally:
            p.stop()


EVENTS = {"t": "Order Completed", "p": "$pageview", "s": "$screen", "i": "$identify"}
EVENTS |= {"g": "$group", "a": "$alias"}
NODE_DIR = Path(__file__).with_name("segment_node")


def _spec(tag: str, device_now: datetime) -> dict[str, Any]:
    """What one SDK sends: explicit message ids, the device's time, a context to map."""
    return {
        "ids": {name: f"{tag}-{name}-{uuid.uuid4().hex[:8]}" for name in EVENTS},
        "anon": f"{tag}-anon",
        "user": f"{tag}-user",
        "timestamp": device_now.isoformat(),
        "context": {
            "ip": GB_IP,
            "page": {"url": f"https://shop.example/{tag}", "referrer": "https://www.google.com/"},
            "campaign": CAMPAIGN,
        },
    }


def _send_python(client: Any, spec: dict[str, Any]) -> None:
    """Every call type once through a Python SDK client, then flush."""
    ids, anon, user = spec["ids"], spec["anon"], spec["user"]
    common = {"context": spec["context"], "timestamp": datetime.fromisoformat(spec["timestamp"])}
    client.track(
        user_id=user,
        anonymous_id=anon,
        event="Order Completed",
        properties={"total": 9},
        message_id=ids["t"],
        **common,
    )
    client.page(anonymous_id=anon, category="Docs", name="Home", message_id=ids["p"], **common)
    client.screen(user_id=user, name="Settings", message_id=ids["s"], **common)
    client.identify(
        user_id=user, anonymous_id=anon, traits={"plan": "pro"}, message_id=ids["i"], **common
    )
    client.group(user_id=user, group_id="g1", traits={"seats": 3}, message_id=ids["g"], **common)
    client.alias(previous_id=anon, user_id=user, message_id=ids["a"], **common)
    client.flush()


def _check_rows(pipeline: Pipeline, spec: dict[str, Any]) -> None:
    """Every message is in ClickHouse once, mapped, at its skew-corrected time."""
    expected = {spec["ids"][name]: event for name, event in EVENTS.items()}
    in_list = ", ".join(f"'{i}'" for i in expected)
    pipeline.wait_for(
        f"SELECT count() FROM events FINAL WHERE event_id IN ({in_list})", f"{len(expected)}\n"
    )
    sent = time.time()
    rows = pipeline.sql(
        "SELECT event_id, event, user_id, url, source, medium, campaign, country, "
        "toUnixTimestamp(timestamp) FROM events FINAL "
        f"WHERE event_id IN ({in_list}) ORDER BY event_id"
    )
    for line in rows.splitlines():
        event_id, event, user_id, url, source, medium, campaign, country, ts = line.split("\t")
        assert event == expected[event_id], line
        # The page is anonymous and comes before the identify: nothing to stitch yet.
        assert user_id == ("" if event == "$pageview" else spec["user"]), line
        assert url == spec["context"]["page"]["url"], line
        # No utm_ in the URL: the campaign beats the Google referrer, as a utm_ would.
        assert (source, medium, campaign) == ("newsletter", "email", "spring"), line
        assert country == "GB", line
        # Skew-corrected: about BEHIND before it was sent (give or take the pipeline's delay),
        # not SKEW + BEHIND.
        assert abs(int(ts) - (sent - BEHIND.total_seconds())) < 120, line


@pytest.mark.parametrize(
    ("sdk", "request_module"),
    [(segment_client, segment_request), (rudder_client, rudder_request)],
    ids=["segment", "rudderstack"],
)
def test_every_call_type_lands_mapped(
    pipeline: Pipeline, sdk: Any, request_module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request_module, "datetime", SkewedClock)
    errors: list[Exception] = []
    client = sdk.Client(
        write_key=pipeline.key,
        host=pipeline.base_url,  # the one line a team changes
        gzip=True,
        on_error=lambda error, _batch: errors.append(error),
        max_retries=3,
    )
    spec = _spec(sdk.__name__.split(".")[0], datetime.now(UTC) - SKEW - BEHIND)
    _send_python(client, spec)
    client.shutdown()
    assert not errors
    _check_rows(pipeline, spec)


def test_node_sdk_lands_mapped(pipeline: Pipeline) -> None:
    if shutil.which("node") is None or not (NODE_DIR / "node_modules").is_dir():
        pytest.skip("needs node and `npm ci` in tests/segment_node (npm needs the network)")
    # Node's clock is this machine's: no skew to correct, the times must stay as sent.
    spec = _spec("node", datetime.now(UTC) - BEHIND)
    node = ["node", "send.mjs", pipeline.base_url, pipeline.key, json.dumps(spec)]
    done = subprocess.run(node, cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _check_rows(pipeline, spec)


def test_a_retried_batch_counts_once(pipeline: Pipeline) -> None:
    batch = [
        {
            "type": "track",
            "event": "Retried",
            "anonymousId": "r-anon",
            "messageId": f"retry-{uuid.uuid4().hex}",
        },
        {"type": "page", "anonymousId": "r-anon", "messageId": f"retry-{uuid.uuid4().hex}"},
    ]
    for _ in range(3):  # what the SDK does after a 5xx or a timeout: the same messages again
        response = segment_request.post(
            pipeline.key, host=pipeline.base_url, gzip=True, batch=batch
        )
        assert response.status_code == 200
    ids = ", ".join(f"'{m['messageId']}'" for m in batch)
    pipeline.wait_for(f"SELECT count() FROM events FINAL WHERE event_id IN ({ids})", "2\n")
