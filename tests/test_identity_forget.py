"""Identify and forget through the whole pipeline: real broker, Faust worker, chdb and the 18.16
server. Forgets race in-flight events; the processor restarts between identify and forget."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ingest.drain import Backlog
from processors.faust_app import TABLES_DIR
from tests.services import Pipeline, read_topic

# Exact changelog recovery on Tansu (see README): one record per producer batch.
EXACT_TABLES = {
    "MILLIMETRIC_PROCESSOR_PRODUCER_MAX_BATCH_SIZE": "1",
    "MILLIMETRIC_FORGET_GRACE_S": "1",
}


@pytest.fixture(params=["chdb", "server"])
def pipeline(
    request: pytest.FixtureRequest, fresh_broker: str, data_dir: Path
) -> Iterator[Pipeline]:
    url = request.getfixturevalue("ch_url") if request.param == "server" else None
    p = Pipeline(fresh_broker, url, data_dir, EXACT_TABLES).start()
    yield p
    p.stop()


def track(p: Pipeline, **fields: object) -> str:
    r = p.post("/v1/track", {"event": "page", **fields})
    assert r.status_code == 202, r.text
    return str(r.json()["event_id"])


def forget_status(p: Pipeline, forget_id: str, timeout: float = 90) -> dict[str, object]:
    """The forget's status once done, or the last one seen at the timeout."""
    deadline = time.monotonic() + timeout
    while (status := p.forget_status(forget_id))["status"] != "done":
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return status


def erasure_devices(p: Pipeline, forget_id: str) -> list[str]:
    """The devices the processor itself resolved for a forget (its erasures-topic record); the
    status' count can hide a lost device list, as the sink also finds devices in the rows."""
    records = asyncio.run(read_topic(p.bootstrap, "erasures", lambda seen: forget_id in seen))
    assert forget_id in records, f"no erasure for {forget_id}"
    return list(records[forget_id]["anonymous_ids"])


def test_identify_fills_user_id_on_later_anonymous_events(pipeline: Pipeline) -> None:
    track(pipeline, anonymous_id="dev1")
    r = pipeline.post(
        "/v1/identify", {"anonymous_id": "dev1", "user_id": "alice", "traits": {"plan": "pro"}}
    )
    assert r.status_code == 202
    later = track(pipeline, anonymous_id="dev1")
    pipeline.wait_for(f"SELECT user_id FROM events WHERE event_id = '{later}'", "alice\n")
    pipeline.wait_for(
        "SELECT user_id, anonymous_id, argMaxMerge(traits) FROM identities "
        "GROUP BY project, user_id, anonymous_id",
        'alice\tdev1\t{"plan":"pro"}\n',
    )


def test_forget_erases_both_devices_and_their_sessions(pipeline: Pipeline) -> None:
    for device in ("phone", "laptop"):
        track(pipeline, anonymous_id=device)
        assert (
            pipeline.post("/v1/identify", {"anonymous_id": device, "user_id": "bob"}).status_code
            == 202
        )
        track(pipeline, anonymous_id=device)
    bystander = track(pipeline, anonymous_id="carol-device", user_id="carol")
    pipeline.wait_for("SELECT count() FROM events", "7\n")
    pipeline.wait_for("SELECT count() FROM identities", "2\n")
    r = pipeline.post("/v1/forget", {"user_id": "bob"})
    assert r.status_code == 202
    status = forget_status(pipeline, r.json()["forget_id"])
    assert status["status"] == "done", status
    assert status["events_deleted"] == 6 and status["anonymous_ids"] == 2
    forget_id = r.json()["forget_id"]
    # The processor itself knows both devices (the sink's own lookup could hide a lost list).
    assert sorted(erasure_devices(pipeline, forget_id)) == ["laptop", "phone"]
    # The gateway answers for it too (sk_ keys), from the keys topic every gateway follows: the
    # same answer as `millimetric forget status`, which reads that topic.
    deadline = time.monotonic() + 10
    answer = {}
    while time.monotonic() < deadline and answer.get("status") != "done":
        answer = httpx.get(
            f"{pipeline.base_url}/v1/forget/{forget_id}",
            timeout=10,
            headers={"Authorization": f"Bearer {pipeline.key}"},
        ).json()
        time.sleep(0.2)
    command = [sys.executable, "-m", "millimetric_app.cli", "forget", "status", forget_id]
    cli = subprocess.run(command, env=pipeline.env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert answer == {"ok": True, **json.loads(cli.stdout)} == {"ok": True, **status}, answer
    assert pipeline.sql("SELECT event_id FROM events") == f"{bystander}\n"
    assert pipeline.sql("SELECT count() FROM identities") == "0\n"
    sessions = pipeline.sql("SELECT anyMerge(anonymous_id) FROM sessions GROUP BY session_id")
    assert sessions == "carol-device\n"
    # Events accepted after the forget are new data: neither device is stitched to bob again.
    for device in ("phone", "laptop"):
        again = track(pipeline, anonymous_id=device)
        pipeline.wait_for(f"SELECT count() FROM events WHERE event_id = '{again}'", "1\n")
        assert pipeline.sql(f"SELECT user_id FROM events WHERE event_id = '{again}'") == "\n"


def test_forget_by_anonymous_id_only_erases_that_device(pipeline: Pipeline) -> None:
    for _ in range(2):
        track(pipeline, anonymous_id="kiosk")
    home = track(pipeline, anonymous_id="home")
    pipeline.wait_for("SELECT count() FROM events FINAL", "3\n")
    r = pipeline.post_accepted("/v1/forget", {"anonymous_id": "kiosk"})
    status = forget_status(pipeline, r.json()["forget_id"])
    assert status["status"] == "done" and status["events_deleted"] == 2, status
    assert pipeline.sql("SELECT event_id FROM events") == f"{home}\n"
    sessions = pipeline.sql("SELECT anyMerge(anonymous_id) FROM sessions GROUP BY session_id")
    assert sessions == "home\n"


def test_forget_of_unknown_user_completes_with_zero_rows(pipeline: Pipeline) -> None:
    r = pipeline.post("/v1/forget", {"user_id": "nobody"})
    status = forget_status(pipeline, r.json()["forget_id"])
    assert status["status"] == "done" and status["events_deleted"] == 0


def test_forget_races_in_flight_events_across_partitions(pipeline: Pipeline) -> None:
    """Events of the person on many devices (so many partitions), sent in bursts around the
    forget: none of theirs may be left, however the race falls. The sink is down for the last
    bursts and the forget, so those events are provably in flight when the forget is made."""
    devices = [f"d{i}" for i in range(12)]
    for device in devices:
        pipeline.post_accepted("/v1/identify", {"anonymous_id": device, "user_id": "dave"})
    pipeline.wait_for("SELECT count() FROM identities", f"{len(devices)}\n")

    def burst(round_: int) -> None:
        events = [
            {"event": f"burst{round_}", "anonymous_id": d, "event_id": f"b{round_}-{d}"}
            for d in devices
        ]
        pipeline.post_accepted("/v1/batch", {"events": events})

    for round_ in range(3):
        burst(round_)
    pipeline.stages["sink"].stop()
    for round_ in range(3, 5):
        burst(round_)
    r = pipeline.post_accepted("/v1/forget", {"user_id": "dave"})
    pipeline.stages["sink"].start()
    status = forget_status(pipeline, r.json()["forget_id"])
    assert status["status"] == "done", status
    # The race happened: at least the 24 events sent while the sink was down were not stored
    # when the forget's delete ran (the identifies' 12 and the 36 earlier ones may have been).
    assert int(status["events_deleted"]) <= 12 + 36, status  # type: ignore[call-overload]
    # One event per device after the forget, in the same partition as that device's burst
    # events: once each has landed, every burst event before it went through the sink.
    for device in devices:
        track(pipeline, anonymous_id=device, event_id=f"after-{device}")
    pipeline.wait_for("SELECT count() FROM events FINAL", f"{len(devices)}\n")
    assert pipeline.sql("SELECT DISTINCT event FROM events FINAL") == "page\n"


async def processor_committed_all(bootstrap: str, timeout: float = 60) -> None:
    """Wait until the processor committed every record of raw, forgets and identities (twice in
    a row, as `dev`'s drain reads it): a restart then re-reads none of them."""
    deadline = time.monotonic() + timeout
    empty = 0
    async with Backlog(bootstrap) as backlog:
        while empty < 2:
            assert time.monotonic() < deadline, "the processor did not commit its offsets"
            empty = 0 if (await backlog.remaining())["processor"] else empty + 1
            await asyncio.sleep(0.5)


def test_processor_restart_between_identify_and_forget(pipeline: Pipeline) -> None:
    pipeline.post_accepted("/v1/identify", {"anonymous_id": "tab1", "user_id": "erin"})
    pipeline.post_accepted("/v1/identify", {"anonymous_id": "tab2", "user_id": "erin"})
    pipeline.wait_for("SELECT count() FROM identities", "2\n")
    # The changelog is the only way back: the identifies and links are committed (not read
    # again) and the local tables are gone, as on a new machine.
    asyncio.run(processor_committed_all(pipeline.bootstrap))
    pipeline.stages["processor"].stop()
    shutil.rmtree(pipeline.root / TABLES_DIR)
    pipeline.stages["processor"].start()
    # The restarted worker knows tab2 is erin's (recovered from the changelog)...
    later = track(pipeline, anonymous_id="tab2")
    # FINAL: around a restart a step can be processed twice (at-least-once: a rebalance before
    # its offsets are committed); the events table collapses the repeat.
    query = f"SELECT user_id FROM events FINAL WHERE event_id = '{later}'"
    pipeline.wait_for(query, "erin\n")
    # ...and which devices to erase.
    r = pipeline.post_accepted("/v1/forget", {"user_id": "erin"})
    status = forget_status(pipeline, r.json()["forget_id"])
    assert status["status"] == "done" and status["anonymous_ids"] == 2, status
    assert sorted(erasure_devices(pipeline, r.json()["forget_id"])) == ["tab1", "tab2"]
    assert pipeline.sql("SELECT count() FROM events") == "0\n"
