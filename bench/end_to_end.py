"""End-to-end bench: gateway -> broker -> processor -> sink -> chdb, all stages as processes.

1. Sustained throughput: wrk saturates /v1/batch (500 events a call) for the run's duration; the
   rate is the accepted events over the time until the last of them is counted in ClickHouse
   (so a stage that falls behind pays for its backlog).
2. Freshness at a fixed offered rate (the lower of 25k events/s and 80% of step 1's rate), held
   open loop by bench.loadgen, while the bench sends one /v1/track probe every 100 ms and polls
   ClickHouse every 100 ms: freshness = first poll that sees the probe - the probe's send time
   (an upper bound on receive -> visible, by up to a poll interval plus the gateway's answer).
Peak RSS of each stage is read after both loads. CPU per event: each process's CPU time (gateway,
processor, sink with its chdb, broker) over step 1, divided by its events; the cores divided by
their sum is the most any scheduling could sustain on this machine.
Step 1 runs for both designs (MILLIMETRIC_ENVELOPES false, then true, each on a fresh broker and
store), step 2 for envelopes only; the ratios of the two are rows too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from bench import REPO_ROOT
from bench.events import DESIGNS, batch_body
from bench.gateway import BATCH, BATCH_CONNECTIONS, KEYS, wrk, wrk_script
from bench.loadgen import percentile
from bench.services import (
    cpu_seconds,
    create_keys,
    sink_sql,
    stage,
    stage_env,
    wait_http_ok,
    write_geo_db,
)
from bench.table import Row
from ingest.topics import ensure_topics
from millimetric_app.embedded import EmbeddedBroker, free_port

TARGET_EPS = 25_000
PROBE_EVERY = 0.1


async def _drain(data_dir: Path, expected: int, timeout: float) -> float:
    """Wait until count() reaches `expected`; return when (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(sink_sql, data_dir, "SELECT count() FROM events")
        if got and int(got) >= expected:
            return time.monotonic()
        await asyncio.sleep(0.1)
    raise TimeoutError(f"ClickHouse did not reach {expected} rows in {timeout}s")


def _probe(base: str, key: str, event_id: str) -> None:
    body = json.dumps({"event": "bench_probe", "event_id": event_id, "anonymous_id": event_id})
    request = urllib.request.Request(
        f"{base}/v1/track",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


async def freshness(
    base: str, key: str, data_dir: Path, load: subprocess.Popen[str]
) -> list[float]:
    """Probe while `load` runs (and until every probe is visible); return freshness in s."""
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    query = "SELECT event_id FROM events WHERE project = 'bench0' AND event = 'bench_probe'"

    async def probes() -> None:
        while load.poll() is None:
            event_id = uuid.uuid4().hex
            sent_at = time.monotonic()
            await asyncio.to_thread(_probe, base, key, event_id)
            sent[event_id] = sent_at
            await asyncio.sleep(PROBE_EVERY)

    async def polls() -> None:
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            if deadline is None and load.poll() is not None:
                deadline = time.monotonic() + 60
            out = await asyncio.to_thread(sink_sql, data_dir, query)
            now = time.monotonic()
            for event_id in out.split():
                seen.setdefault(event_id, now)
            if deadline is not None and sent and all(e in seen for e in sent):
                return
            await asyncio.sleep(PROBE_EVERY)

    await asyncio.gather(probes(), polls())
    return [seen[e] - t for e, t in sent.items() if e in seen]


def run(root: Path, seconds: float, stage_min: float) -> list[Row]:
    """The end-to-end rows of both designs and their ratios; `stage_min` is the slowest stage's
    throughput (the baseline)."""
    single, single_eps, single_us = design(root / "single", seconds, stage_min, "single records")
    rows, eps, total_us = design(root / "envelopes", seconds, stage_min, "envelopes")
    return [
        *single,
        *rows,
        Row("end to end", "sustained events/s: envelopes vs single records", eps, single_eps,
            "≥ 2.5x", "events/s"),
        Row("end to end", "CPU per event, all processes: envelopes vs single records", total_us,
            single_us, "≤ 80 µs", "µs"),
    ]  # fmt: skip


def design(
    root: Path, seconds: float, stage_min: float, label: str
) -> tuple[list[Row], float, float]:
    """One design's rows, sustained events/s and CPU µs per event of all processes; freshness
    only for envelopes."""
    envelopes = DESIGNS[label] == "true"
    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "data"
    geo = write_geo_db(root / "bench-country.mmdb")
    broker = EmbeddedBroker().start()
    stages = {}
    try:
        asyncio.run(ensure_topics(broker.bootstrap))
        keys = asyncio.run(create_keys(broker.bootstrap, KEYS))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = stage_env(
            broker.bootstrap,
            data_dir,
            MILLIMETRIC_GATEWAY_PORT=str(port),
            MILLIMETRIC_GEOIP_PATH=str(geo),
            MILLIMETRIC_ENVELOPES=DESIGNS[label],
        )
        for name in ("sink", "processor", "gateway"):
            stages[name] = stage(name, env, root).start()
        wait_http_ok(f"{base}/ready")
        _probe(base, keys[0], uuid.uuid4().hex)  # the whole path is up once this lands
        asyncio.run(_drain(data_dir, 1, 120))

        script = wrk_script(root / "batch.lua", keys, json.dumps(batch_body(BATCH)))
        assert broker.pid is not None
        pids = {name: proc.pid for name, proc in stages.items()} | {"broker": broker.pid}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.monotonic()
        _, accepted, _ = wrk(f"{base}/v1/batch", script, seconds, BATCH_CONNECTIONS)
        done = asyncio.run(_drain(data_dir, 1 + accepted * BATCH, 300 + seconds * 10))
        sustained = accepted * BATCH / (done - start)
        # CPU each process spent per event of the sustained load: where a core's time goes.
        cpu_us = {
            name: (cpu_seconds(pid) - cpu_before[name]) * 1e6 / (accepted * BATCH)
            for name, pid in pids.items()
        }

        fresh: list[float] = []
        offered = min(TARGET_EPS, 0.8 * sustained)
        if envelopes:
            spec = {
                "url": f"{base}/v1/batch",
                "rate": offered / BATCH,
                "seconds": seconds,
                "body": json.dumps(batch_body(BATCH, seed=12)),
                "keys": keys[1:],
                "headers": {"Content-Type": "application/json"},
            }
            load = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen"],
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert load.stdin is not None
            load.stdin.write(json.dumps(spec))
            load.stdin.close()
            fresh = asyncio.run(freshness(base, keys[0], data_dir, load))
            assert load.stdout is not None
            load.stdout.read()
            load.wait()
        rss = {stage: proc.peak_rss_mb() for stage, proc in stages.items()}
    finally:
        for stage_name in ("gateway", "processor", "sink"):
            if stage_name in stages:
                stages[stage_name].stop()
        broker.stop()
    at = f"at {offered:,.0f} events/s offered"
    total_us = sum(cpu_us.values())
    cores = os.cpu_count() or 1
    cpu_rows = [
        Row("end to end", f"CPU per event, {name}, {label}", us, None, "-", "µs")
        for name, us in cpu_us.items()
    ]
    fresh_rows = [
        Row("end to end", f"freshness p50 {at}", percentile(fresh, 0.5), None, "-", "s"),
        Row("end to end", f"freshness p99 {at}", percentile(fresh, 0.99), None, "≤ 5 s", "s"),
    ] if fresh else []  # fmt: skip
    rows = [
        Row("end to end", f"sustained events/s, gateway -> ClickHouse (chdb), {label}",
            sustained, stage_min, f"≥ {TARGET_EPS:,} events/s", "events/s"),
        *fresh_rows,
        Row("end to end", f"gateway peak RSS (VmHWM), {label}", rss["gateway"], None,
            "≤ 150 MB", "MB"),
        Row("end to end", f"processor peak RSS (VmHWM), {label}", rss["processor"], None,
            "≤ 300 MB", "MB"),
        Row("end to end", f"sink peak RSS (VmHWM), chdb, {label}", rss["sink"], None,
            "bounded by batch settings", "MB"),
        *cpu_rows,
        Row("end to end", f"CPU per event, all processes, {label}", total_us, None, "≤ 80 µs",
            "µs"),
        Row("end to end", f"ceiling: {cores} cores / CPU per event of all processes, {label}",
            cores * 1e6 / total_us, None, "-", "events/s"),
    ]  # fmt: skip
    return rows, sustained, total_us
