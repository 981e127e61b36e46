"""Operations: the stages' metrics scraped by a real Prometheus, `millimetric status`, and the
alert rules and dashboard in deploy/ checked against what the stages really expose."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.partitioner import partition_for
from ingest.status import collect, scrape, total
from ingest.topics import topic
from millimetric_app.embedded import free_port
from tests.prometheus_service import PROMETHEUS_BIN, Prometheus
from tests.services import Pipeline, kafka_broker

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "alerts" / "millimetric.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "millimetric.json"
STAGES = ("gateway", "processor", "sink")
GROUPS = ("millimetric-processor", "millimetric-sink")

needs_prometheus = pytest.mark.skipif(
    not PROMETHEUS_BIN.exists(), reason="Debian's prometheus package is not installed"
)


def _events(n: int, prefix: str) -> dict[str, Any]:
    return {"events": [{"event": "view", "anonymous_id": f"{prefix}_{i}"} for i in range(n)]}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A whole pipeline (chdb) whose stages serve metrics on ports of their own."""
    ports = {stage: free_port() for stage in STAGES}
    env = {f"MILLIMETRIC_{s.upper()}_METRICS_PORT": str(p) for s, p in ports.items()}
    env["MILLIMETRIC_LAG_INTERVAL_S"] = "1"
    with kafka_broker() as bootstrap:
        p = Pipeline(bootstrap, None, tmp_path_factory.mktemp("ops"), env).start()
        p.metrics_ports = ports  # type: ignore[attr-defined]
        yield p
        p.stop()


def _metrics_url(pipeline: Pipeline, stage: str) -> str:
    return f"http://127.0.0.1:{pipeline.metrics_ports[stage]}/metrics"  # type: ignore[attr-defined]


def _status(pipeline: Pipeline) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "millimetric_app.cli", "status", "--json"],
        env=pipeline.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@needs_prometheus
def test_prometheus_scrapes_the_funnel_from_every_stage(pipeline: Pipeline, tmp_path: Path) -> None:
    targets = {f"millimetric-{s}": f"127.0.0.1:{p}" for s, p in pipeline.metrics_ports.items()}  # type: ignore[attr-defined]
    prometheus = Prometheus(tmp_path / "prometheus", targets, [RULES]).start()
    try:
        # Counters are per process since its start: count from what the stages hold now.
        before = _status(pipeline)
        n = 25
        assert pipeline.post("/v1/batch", _events(n, "prom")).status_code == 202
        assert pipeline.post("/v1/track", {"anonymous_id": "x"}).status_code == 400
        for promql, figure in (
            ("sum(millimetric_gateway_events_accepted_total)", "accepted_total"),
            ("sum(millimetric_processor_events_processed_total)", "processed_total"),
            ("sum(millimetric_sink_rows_inserted_total)", "inserted_total"),
        ):
            prometheus.wait_for(promql, before[figure] + n)
        assert prometheus.value('sum(millimetric_gateway_rejected_total{code="invalid_payload"})')
        assert prometheus.value("sum(millimetric_freshness_seconds_count)") >= n  # type: ignore[operator]
        # `status` estimates quantiles as Prometheus does, from the same buckets.
        sink_count = 'sum(millimetric_freshness_seconds_count{job="millimetric-sink"})'
        prometheus.wait_for(sink_count, _status(pipeline)["freshness_count"])
        status = _status(pipeline)
        for q, key in ((0.5, "p50"), (0.99, "p99")):
            promql = f"histogram_quantile({q}, sum by (le) (millimetric_freshness_seconds_bucket))"
            assert prometheus.value(promql) == pytest.approx(status["freshness_seconds"][key])
        for stage in STAGES:
            prometheus.wait_for(f'up{{job="millimetric-{stage}"}}', 1)
            prometheus.wait_for(f'millimetric_ready{{stage="{stage}"}}', 1)
        for group in GROUPS:  # caught up: nothing left to consume
            prometheus.wait_for(f'max(millimetric_consumer_lag_records{{group="{group}"}})', 0)
        prometheus.wait_for('count(millimetric_gateway_request_seconds_count{route="batch"})', 1)
        rules = prometheus.api("rules")
        assert isinstance(rules, dict)
        evaluated = [r for g in rules["groups"] for r in g["rules"]]
        assert len(evaluated) == 9 and all(r["health"] != "err" for r in evaluated), evaluated
    finally:
        prometheus.stop()


def test_status_json_reports_the_pipeline(pipeline: Pipeline) -> None:
    before = _status(pipeline)
    assert pipeline.post("/v1/batch", _events(10, "status")).status_code == 202
    deadline = time.monotonic() + 90
    status = before
    while time.monotonic() < deadline:
        status = _status(pipeline)
        if status["inserted_total"] == before["inserted_total"] + 10 and set(status["lag"]) == set(
            GROUPS
        ):
            break
        time.sleep(0.5)
    assert [(s["name"], s["ready"]) for s in status["stages"]] == [(s, True) for s in STAGES]
    assert status["stages"][0]["metrics_url"] == _metrics_url(pipeline, "gateway")
    for stage in STAGES:  # the probes beside the metrics
        for probe in ("health", "ready"):
            url = _metrics_url(pipeline, stage).replace("/metrics", f"/{probe}")
            with urllib.request.urlopen(url, timeout=10) as response:
                assert json.loads(response.read()) == {"ok": True, "stage": stage}
    for figure in ("accepted_total", "processed_total", "inserted_total"):
        assert status[figure] == before[figure] + 10, (figure, status)
    assert set(status["lag"]) == set(GROUPS)
    assert all(set(lag) == {"records", "seconds"} for lag in status["lag"].values())
    assert status["dead_letters_total"] == 0
    assert 0 < status["freshness_seconds"]["p50"] <= status["freshness_seconds"]["p99"] < 60


def test_status_says_what_is_down(tmp_path: Path) -> None:
    env = {"PATH": "", "MILLIMETRIC_DATA_DIR": str(tmp_path)}
    env["MILLIMETRIC_SINK_METRICS_PORT"] = str(free_port())  # nothing listens there
    out = subprocess.run(
        [sys.executable, "-m", "millimetric_app.cli", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    status = json.loads(out.stdout)
    assert out.returncode == 1
    assert status["stages"][2]["up"] is False and status["stages"][2]["ready"] is False
    assert any(problem.startswith("sink: no metrics at http") for problem in status["unhealthy"])


def _named_metrics(expressions: list[str]) -> set[str]:
    return {name for e in expressions for name in re.findall(r"\bmillimetric_[a-z_]+", e)}


def test_dashboard_and_rules_name_only_metrics_the_stages_expose(pipeline: Pipeline) -> None:
    exposed: set[str] = set()
    for stage in STAGES:
        with urllib.request.urlopen(_metrics_url(pipeline, stage), timeout=10) as response:
            text = response.read().decode()
        exposed |= {
            line.split("{")[0].split()[0] for line in text.splitlines() if line[:1].isalpha()
        }
    rules = yaml.safe_load(RULES.read_text())
    named = _named_metrics([r["expr"] for g in rules["groups"] for r in g["rules"]])
    dashboard = json.loads(DASHBOARD.read_text())
    named |= _named_metrics([t["expr"] for p in dashboard["panels"] for t in p["targets"]])
    assert len(named) > 10
    assert named <= exposed, sorted(named - exposed)


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian's prometheus) missing")
def test_promtool_checks_the_alert_rules() -> None:
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sink_lag_grows_while_no_sink_runs(pipeline: Pipeline) -> None:
    # Idle first: what earlier tests sent must not reach the topic after the sink stopped.
    deadline = time.monotonic() + 90
    while (
        any(_status(pipeline)["lag"].get(g, {}).get("records", 1) for g in GROUPS)
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    sink = pipeline.stages["sink"]
    sink.stop()
    try:
        before = _status(pipeline)
        assert before["lag"]["millimetric-sink"]["records"] == 0
        assert pipeline.post("/v1/batch", _events(7, "lag")).status_code == 202
        # Lag counts records: an envelope per partition (more if the processor took the
        # request's raw records in several steps), at most one per event.
        count = topic("enriched").partitions
        partitions = {partition_for(f"demo:lag_{i}".encode(), count) for i in range(7)}
        deadline = time.monotonic() + 90
        status = before
        while time.monotonic() < deadline:
            status = _status(pipeline)
            sink_lag, processor_lag = (status["lag"][g]["records"] for g in reversed(GROUPS))
            done = status["processed_total"] == before["processed_total"] + 7
            if done and sink_lag >= len(partitions) and processor_lag == 0:
                break
            time.sleep(0.5)
        assert len(partitions) <= status["lag"]["millimetric-sink"]["records"] <= 7, status
        assert status["lag"]["millimetric-sink"]["seconds"] > 0
        assert status["lag"]["millimetric-processor"]["records"] == 0
        assert "sink: no metrics at " + _metrics_url(pipeline, "sink") in status["unhealthy"]
        assert status["stages"][2] == {
            "name": "sink",
            "metrics_url": _metrics_url(pipeline, "sink"),
            "up": False,
            "ready": False,
        }
    finally:
        sink.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and status["lag"]["millimetric-sink"]["records"]:
        time.sleep(0.5)
        status = _status(pipeline)
    assert status["lag"]["millimetric-sink"] == {"records": 0, "seconds": 0}


def test_stage_logs_are_json_lines_off_a_terminal(pipeline: Pipeline) -> None:
    lines = [
        line
        for stage in STAGES
        for line in (pipeline.root / f"{stage}.log").read_text().splitlines()
        if line.strip()
    ]
    assert any('"geo: ' in line for line in lines)  # the processor's start-up warning
    for line in lines:
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(record), line


def test_status_screen_shows_the_figures_and_the_problems(pipeline: Pipeline) -> None:
    from rich.console import Console

    from ingest.status import collect, rates, render

    urls = {stage: _metrics_url(pipeline, stage) for stage in ("gateway", "processor")}
    before = collect(urls)
    assert pipeline.post("/v1/batch", _events(4, "screen")).status_code == 202
    after = collect(urls)
    console = Console(record=True, width=140)
    console.print(render(after, rates(before, after, 2.0)))
    screen = console.export_text()
    assert "millimetric-processor" in screen and "freshness p50" in screen
    assert f"{after['accepted_total']:.0f} (2.0/s)" in screen  # 4 events in 2 s
    assert "sink: no metrics at (no URL set)" in screen


def test_heartbeats_cross_the_pipeline_without_rows_or_counts(tmp_path: Path) -> None:
    ports = {stage: free_port() for stage in ("processor", "sink")}
    env = {f"MILLIMETRIC_{s.upper()}_METRICS_PORT": str(p) for s, p in ports.items()}
    env["MILLIMETRIC_HEARTBEAT_INTERVAL_S"] = "0.5"
    urls = {s: f"http://127.0.0.1:{p}/metrics" for s, p in ports.items()}
    with kafka_broker() as bootstrap:
        p = Pipeline(bootstrap, None, tmp_path, env).start("sink", "processor")
        try:
            deadline = time.monotonic() + 90
            samples: list[Any] = []
            while time.monotonic() < deadline:
                samples = scrape(urls["sink"]) or []
                if total(samples, "millimetric_heartbeat_timestamp_seconds") > 0:
                    break
                time.sleep(0.5)
            assert 0 < total(samples, "millimetric_heartbeat_seconds") < 60
            status = collect(urls)
            assert 0 < status["heartbeat_seconds"] < 60
            assert status["processed_total"] == status["inserted_total"] == 0
            assert status["dead_letters_total"] == 0
            assert p.sql("SELECT count() FROM events") == "0\n"
        finally:
            p.stop()
