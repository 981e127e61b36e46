"""The real Segment and RudderStack Python SDKs, pointed at a running pipeline by changing only
the host: every call type lands in ClickHouse mapped, a retried batch counts once.

(`@segment/analytics-node` is not tested: npm needs the network, which this machine lacks.)
"""

from __future__ import annotations

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


def _calls(client: Any, tag: str) -> dict[str, str]:
    """Every call type once, with explicit message ids; returns message id -> expected event."""
    device_now = datetime.now(UTC) - SKEW - BEHIND
    context = {
        "ip": GB_IP,
        "page": {"url": f"https://shop.example/{tag}", "referrer": "https://www.google.com/"},
        "campaign": CAMPAIGN,
    }
    common = {"context": context, "timestamp": device_now}
    ids = {name: f"{tag}-{name}-{uuid.uuid4().hex[:8]}" for name in ("t", "p", "s", "i", "g", "a")}
    anon, user = f"{tag}-anon", f"{tag}-user"
    client.track(
        user_id=user,
        event="Order Completed",
        properties={"total": 9},
        anonymous_id=anon,
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
    names = ["Order Completed", "$pageview", "$screen", "$identify", "$group", "$alias"]
    return dict(zip(ids.values(), names, strict=True))


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
    tag = sdk.__name__.split(".")[0]
    expected = _calls(client, tag)
    client.shutdown()
    assert not errors
    sent = time.time()
    in_list = ", ".join(f"'{i}'" for i in expected)
    pipeline.wait_for(
        f"SELECT count() FROM events FINAL WHERE event_id IN ({in_list})", f"{len(expected)}\n"
    )
    rows = pipeline.sql(
        "SELECT event_id, event, user_id, url, source, medium, campaign, country, "
        "toUnixTimestamp(timestamp) FROM events FINAL "
        f"WHERE event_id IN ({in_list}) ORDER BY event_id"
    )
    for line in rows.splitlines():
        event_id, event, user_id, url, source, medium, campaign, country, ts = line.split("\t")
        assert event == expected[event_id], line
        # The page is anonymous and comes before the identify: nothing to stitch yet.
        assert user_id == ("" if event == "$pageview" else f"{tag}-user"), line
        assert url == f"https://shop.example/{tag}", line
        # No utm_ in the URL: the campaign beats the Google referrer, as a utm_ would.
        assert (source, medium, campaign) == ("newsletter", "email", "spring"), line
        assert country == "GB", line
        # Skew-corrected: about BEHIND before it was sent, not SKEW + BEHIND.
        assert abs(int(ts) - (sent - BEHIND.total_seconds())) < 120, line


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
