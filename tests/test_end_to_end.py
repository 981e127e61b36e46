"""HTTP in -> row in ClickHouse, through the real broker and real stage processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from millimetric_app.embedded import free_port
from tests.services import Pipeline, stage_env

# The spec's "Track a single event" body (millimetric-track.SKILL.md), verbatim.
SPEC_TRACK = {
    "event": "signup",
    "anonymous_id": "u_abc",
    "user_id": "user_42",
    "url": "https://yoursite.com/?utm_source=facebook&utm_medium=cpc&fbclid=abc",
    "properties": {"plan": "free"},
}


@pytest.fixture(params=["chdb", "server"])
def pipeline(
    request: pytest.FixtureRequest, fresh_broker: str, data_dir: Path
) -> Iterator[Pipeline]:
    """The pipeline on the embedded chdb store, and on the real ClickHouse server."""
    url = request.getfixturevalue("ch_url") if request.param == "server" else None
    p = Pipeline(fresh_broker, url, data_dir).start()
    yield p
    p.stop()


def test_track_lands_classified_and_enriched(pipeline: Pipeline) -> None:
    response = pipeline.post(
        "/v1/track",
        SPEC_TRACK,
    )
    assert response.status_code == 202
    body = response.json()
    assert body["ok"] is True and len(body["event_id"]) >= 16
    row = pipeline.wait_for(
        "SELECT event, user_id, event_id, source, medium, channel, click_id_network, properties "
        "FROM events",
        f"signup\tuser_42\t{body['event_id']}\tfacebook\tcpc\tPaid Social\tfacebook\t"
        '{"plan":"free"}\n',
    )
    assert row
    session = pipeline.sql("SELECT session_id, length(ip_hash) FROM events").split()
    assert session[0].startswith("u_abc-") and session[1] == "32"


def test_a_client_retry_with_the_same_event_id_is_counted_once(pipeline: Pipeline) -> None:
    """The client library resends the same bytes (event_id and timestamp): one event in every
    table, as a single post and as a batch alike."""
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    event = {"event": "buy", "anonymous_id": "r1", "event_id": "retry-1", "timestamp": stamp}
    pipeline.post_accepted("/v1/track", event)
    pipeline.post_accepted("/v1/batch", {"events": [event]})
    pipeline.post_accepted("/v1/track", event)
    # Same device, so same partition: once the marker has landed, every retry has too.
    marker = pipeline.post_accepted("/v1/track", {"event": "marker", "anonymous_id": "r1"})
    pipeline.wait_for(
        f"SELECT count() FROM events WHERE event_id = '{marker.json()['event_id']}'", "1\n"
    )
    assert pipeline.counts() == (2, 2, 2)


def test_fabricated_ids_and_timestamps(pipeline: Pipeline) -> None:
    r = pipeline.post(
        "/v1/batch",
        {
            "events": [
                {"event": "a", "timestamp": "2026-05-16T19:00:00.123Z"},
                {"event": "b", "user_id": "u1", "session_id": "s-1"},
            ]
        },
    )
    assert r.status_code == 202, r.text
    ids = r.json()["event_ids"]
    pipeline.wait_for("SELECT count() FROM events", "2\n")
    a = pipeline.sql(f"SELECT anonymous_id, session_id FROM events WHERE event_id = '{ids[0]}'")
    anonymous_id, session_id = a.split()
    assert len(anonymous_id) == 36 and session_id.startswith(anonymous_id + "-")
    b = pipeline.sql(f"SELECT user_id, session_id FROM events WHERE event_id = '{ids[1]}'")
    assert b == "u1\ts-1\n"
    if pipeline.clickhouse_url is None:  # DateTime64 on current ClickHouse
        ts = pipeline.sql(f"SELECT timestamp FROM events WHERE event_id = '{ids[0]}'")
        assert ts == "2026-05-16 19:00:00.123\n"
    else:  # the 18.16 server: seconds plus a milliseconds column
        ts = pipeline.sql(f"SELECT timestamp, timestamp_ms FROM events WHERE event_id = '{ids[0]}'")
        assert ts == "2026-05-16 19:00:00\t123\n"


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "millimetric_app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dev_command_as_the_readme_shows(tmp_path: Path) -> None:
    """`millimetric dev`, then keys create, the spec's curl, and `millimetric sql`; twice, with a
    restart between, to show keys and rows survive it."""
    port = free_port()
    env = stage_env({"MILLIMETRIC_GATEWAY_PORT": str(port)})
    key = ""
    for round_ in (1, 2):
        dev = subprocess.Popen(
            [sys.executable, "-m", "millimetric_app.cli", "dev"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not (tmp_path / ".millimetric" / "dev.json").exists():
                assert time.monotonic() < deadline, "dev did not start"
                time.sleep(0.2)
            if round_ == 1:
                created = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "millimetric_app.cli",
                        "keys",
                        "create",
                        "--project",
                        "demo",
                        "--type",
                        "sk",
                    ],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert created.returncode == 0, created.stderr
                key = created.stdout.strip().splitlines()[-1]
                assert key.startswith("sk_live_")
            body = {**SPEC_TRACK, "event": f"signup_{round_}"}
            status = 0
            while time.monotonic() < deadline and status != 202:
                try:
                    status = httpx.post(
                        f"http://localhost:{port}/v1/track",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                    ).status_code
                except httpx.HTTPError:
                    time.sleep(0.3)
                else:
                    if status != 202:
                        time.sleep(0.3)
            assert status == 202
            expected = "".join(f"signup_{i}\tuser_42\n" for i in range(1, round_ + 1))
            out = ""
            while time.monotonic() < deadline + 30 and out != expected:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "millimetric_app.cli",
                        "sql",
                        "SELECT event, user_id FROM events ORDER BY event",
                    ],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).stdout
                time.sleep(0.5)
            assert out == expected
        finally:
            dev.send_signal(signal.SIGINT)
            dev.wait(60)


PROJECT_RULES = """
[[demo]]
id = "demo.newsletter"
channel = "Email"
confidence = 1.0
utm_source = ["newsletter"]
why = "our newsletter tags links with utm_source=newsletter and no medium"
"""

CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


def test_enrichment_with_geo_database_project_rules_and_bot_dropping(
    fresh_broker: str, data_dir: Path, tmp_path: Path
) -> None:
    from tests.mmdb_fixture import write_country_mmdb

    geo = write_country_mmdb(tmp_path / "country.mmdb", {"81.2.69.0/24": "GB"})
    rules = tmp_path / "rules.toml"
    rules.write_text(PROJECT_RULES)
    processor_port = free_port()
    p = Pipeline(
        fresh_broker,
        None,
        data_dir,
        {
            "MILLIMETRIC_GEOIP_PATH": str(geo),
            "MILLIMETRIC_PROJECT_RULES_PATH": str(rules),
            "MILLIMETRIC_DROP_BOTS": "true",
            "MILLIMETRIC_PROCESSOR_PORT": str(processor_port),
        },
    ).start()
    try:
        human = p.post_accepted(
            "/v1/track",
            {
                "event": "open",
                "url": "https://s.example/?utm_source=newsletter",
                "ip": "81.2.69.160",
                "user_agent": CHROME_WINDOWS,
            },
        ).json()["event_id"]
        # The bot's request is accepted (202), then dropped by the processor. One device for
        # both, so one partition: once "after" has landed, "crawl" went through before it.
        crawl = {"event": "crawl", "user_agent": GOOGLEBOT, "ip": "81.2.69.1"}
        p.post_accepted("/v1/track", {**crawl, "anonymous_id": "visitor"})
        # (httpx's own User-Agent is a bot too: a person is forwarded explicitly)
        after = {"event": "after", "user_agent": CHROME_WINDOWS, "anonymous_id": "visitor"}
        p.post_accepted("/v1/track", after)
        p.wait_for("SELECT event FROM events ORDER BY event", "after\nopen\n")
        row = p.sql(
            "SELECT channel, source_rule_id, country, device_type, browser, os, is_bot, "
            f"length(ip_hash) FROM events WHERE event_id = '{human}'"
        )
        assert row == "Email\tdemo.newsletter\tGB\tdesktop\tChrome\tWindows\t0\t32\n"
        # The worker that did this says it has a geo database.
        ready = httpx.get(f"http://127.0.0.1:{processor_port}/ready", timeout=10).json()
        assert ready["geo_available"] is True and "GeoLite2-Country" in ready["geo"]
    finally:
        p.stop()


def test_one_batch_spanning_ten_years_lands_and_the_pipeline_flows_on(
    fresh_broker: str, data_dir: Path
) -> None:
    """The window lets a backfill of ten years through in one /v1/batch: ~119 monthly partitions,
    more than ClickHouse creates in one insert. It lands whole, and later events still flow."""
    now = time.time()
    day = 86_400
    stamps = [
        datetime.fromtimestamp(now - i * 30 * day, UTC).isoformat(timespec="milliseconds")
        for i in range(121)
    ]
    env = {"MILLIMETRIC_SINK_BATCH_SECONDS": "3"}  # so the whole backfill meets in one insert
    p = Pipeline(fresh_broker, None, data_dir, env).start()
    try:
        r = p.post("/v1/batch", {"events": [{"event": "old", "timestamp": t} for t in stamps]})
        assert r.status_code == 202, r.text
        assert p.post("/v1/track", {"event": "later"}).status_code == 202
        p.wait_for("SELECT count() FROM events", "122\n", timeout=120)
        assert int(p.sql("SELECT uniqExact(toYYYYMM(timestamp)) FROM events")) > 100
    finally:
        p.stop()
