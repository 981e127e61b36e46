"""Backfill bench: `millimetric backfill` of a gzipped NDJSON history into the whole pipeline.

The command runs as a user runs it (its own process, the historical lane's default rate limit);
measured: events/s until it exits with every line accepted, and until the last is counted in
ClickHouse. Baseline: the gateway's /v1/batch rate under wrk.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import REPO_ROOT
from bench.client import wait_count
from bench.services import Proc, create_keys, start_stages
from bench.table import Row
from ingest.topics import ensure_topics
from millimetric_app.embedded import EmbeddedBroker

FIRST_MS = 1_600_000_000_000  # 2020-09-13: history, inside the gateway's window


def write_history(path: Path, events: int) -> Path:
    """`events` page views a minute apart, no event_id (the command derives them)."""
    with gzip.open(path, "wt", compresslevel=1) as out:
        for i in range(events):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(FIRST_MS / 1000 + i * 60))
            event = {"event": "$pageview", "timestamp": stamp, "anonymous_id": f"a{i % 1000}"}
            out.write(json.dumps(event | {"path": f"/p{i % 50}"}) + "\n")
    return path


def run(root: Path, events: int, gateway_eps: float | None = None) -> list[Row]:
    """The backfill rows."""
    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "data"
    history = write_history(root / "history.ndjson.gz", events)
    broker = EmbeddedBroker().start()
    stages: dict[str, Proc] = {}
    try:
        asyncio.run(ensure_topics(broker.bootstrap))
        (key,) = asyncio.run(create_keys(broker.bootstrap, 1))
        base, env = start_stages(broker.bootstrap, data_dir, root, stages)
        time.sleep(2)  # the key reaches the gateway through the keys topic
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "millimetric_app.cli", "backfill", str(history)],
            env=env | {"MILLIMETRIC_HOST": base, "MILLIMETRIC_KEY": key},
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        sent = time.monotonic() - start
        if done.returncode or f"{events} accepted, 0 rejected" not in done.stdout:
            raise RuntimeError(f"backfill failed: {done.stdout}{done.stderr}")
        visible = wait_count(data_dir, events, 600) - start
    finally:
        for name in ("gateway", "processor", "sink"):
            if name in stages:
                stages[name].stop()
        broker.stop()
    print(f"backfill: {done.stdout.strip()}")
    return [
        Row("backfill", f"events/s accepted, {events:,} historical events", events / sent,
            gateway_eps, "-", "events/s"),
        Row("backfill", "events/s visible in ClickHouse (pipeline-bound)", events / visible, None,
            "-", "events/s"),
    ]  # fmt: skip
