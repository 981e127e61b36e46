"""`millimetric status`: the whole pipeline on one screen, from the stages' metrics endpoints.

It reads each stage's Prometheus text (the URLs come from settings, or from a running `dev`),
so it works the same against `millimetric dev` and a production deployment, and imports no
stage. Counters are since each stage process started; freshness quantiles are estimated from
the histogram's buckets as Prometheus' `histogram_quantile` does.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ingest.settings import Settings

STAGES = ("gateway", "processor", "sink")
OPTIONAL_STAGES = ("destinations",)  # read only where a metrics URL is known for them
DEV_STATE_FILE = "dev.json"  # written by `millimetric dev` (millimetric_app/dev.py) in the data dir
SCRAPE_TIMEOUT_S = 3.0
FRESHNESS_LIMIT_S = 300.0  # the alert rules' threshold: older rows mean a stalled pipeline
LAG_LIMIT_S = 60.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One series' value."""

    name: str
    labels: dict[str, str]
    value: float


def metrics_urls(settings: Settings) -> dict[str, str]:
    """Each stage's metrics URL: named in MILLIMETRIC_STATUS_METRICS_URLS, else its metrics port
    on MILLIMETRIC_METRICS_HOST, else the one a running `dev` recorded in its state file."""
    host = "127.0.0.1" if settings.metrics_host in ("0.0.0.0", "::") else settings.metrics_host
    dev: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        dev = json.loads((settings.data_dir / DEV_STATE_FILE).read_text()).get("metrics_urls", {})
    urls: dict[str, str] = {}
    for stage in (*STAGES, *OPTIONAL_STAGES):
        port = getattr(settings, f"{stage}_metrics_port")
        url = settings.status_metrics_urls.get(stage) or (
            f"http://{host}:{port}/metrics" if port is not None else dev.get(stage)
        )
        if url:
            urls[stage] = url
    return urls


def scrape(url: str) -> list[Sample] | None:
    """Every sample a metrics endpoint serves; None if it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            text = response.read().decode()
    except OSError:
        return None
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(samples: Iterable[Sample], name: str) -> float:
    """The sum of every series of `name`."""
    return sum(s.value for s in samples if s.name == name)


def quantile(q: float, samples: Iterable[Sample], name: str) -> float | None:
    """`histogram_quantile(q, sum by (le) (name_bucket))`; None without observations."""
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == f"{name}_bucket":
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):  # in the open top bucket: its lower edge, as Prometheus does
                return lower
            return lower + (bound - lower) * ((rank - below) / max(count - below, 1e-12))
        lower, below = bound, count
    return lower


def collect(urls: dict[str, str]) -> dict[str, Any]:
    """The status object `--json` prints: every stage scraped once."""
    stages: list[dict[str, Any]] = []
    samples: list[Sample] = []
    for name in (*STAGES, *(stage for stage in OPTIONAL_STAGES if stage in urls)):
        url = urls.get(name)
        scraped = scrape(url) if url else None
        ready = bool(scraped) and any(
            s.name == "millimetric_ready" and s.labels.get("stage") == name and s.value == 1
            for s in scraped or ()
        )
        stages.append({"name": name, "metrics_url": url, "up": scraped is not None, "ready": ready})
        samples += scraped or []
    # Several stages may measure one group (the processor measures the sink's too): the most
    # recent figure per partition is not known, so take the largest.
    partitions: dict[tuple[str, str, str, str], float] = {}
    for s in samples:
        if s.name in ("millimetric_consumer_lag_records", "millimetric_consumer_lag_seconds"):
            key = (s.name, s.labels["group"], s.labels["topic"], s.labels["partition"])
            partitions[key] = max(partitions.get(key, 0.0), s.value)
    lag: dict[str, dict[str, float]] = {}
    for (name, group, _, _), value in partitions.items():
        figures = lag.setdefault(group, {"records": 0, "seconds": 0.0})
        if name.endswith("_records"):
            figures["records"] += value
        else:
            figures["seconds"] = max(figures["seconds"], value)
    last_insert = total(samples, "millimetric_sink_last_insert_timestamp_seconds")
    status: dict[str, Any] = {
        "stages": stages,
        "accepted_total": total(samples, "millimetric_gateway_events_accepted_total"),
        "rejected_total": total(samples, "millimetric_gateway_rejected_total"),
        "rate_limited_total": total(samples, "millimetric_gateway_rate_limited_total"),
        "processed_total": total(samples, "millimetric_processor_events_processed_total"),
        "inserted_total": total(samples, "millimetric_sink_rows_inserted_total"),
        "dead_letters_total": total(samples, "millimetric_dead_letters_total"),
        "insert_retries_total": sum(
            s.value
            for s in samples
            if s.name == "millimetric_retries_total"
            and s.labels["operation"] == "clickhouse_insert"
        ),
        "lag": lag,
        "destinations": destination_figures(samples),
        "freshness_seconds": {
            "p50": quantile(0.5, samples, "millimetric_freshness_seconds"),
            "p99": quantile(0.99, samples, "millimetric_freshness_seconds"),
        },
        "freshness_count": total(samples, "millimetric_freshness_seconds_count"),
        "heartbeat_seconds": max(
            (s.value for s in samples if s.name == "millimetric_heartbeat_seconds" and s.value),
            default=None,
        ),
        "last_insert_age_seconds": round(time.time() - last_insert, 3) if last_insert else None,
    }
    status["unhealthy"] = problems(status)
    return status


def destination_figures(samples: Iterable[Sample]) -> dict[str, dict[str, float]]:
    """Per destination: events its provider accepted, and events it dead-lettered."""
    out: dict[str, dict[str, float]] = {}
    for s in samples:
        if s.name == "millimetric_destination_events_sent_total":
            figures = out.setdefault(s.labels["destination"], {"sent": 0.0, "failed": 0.0})
            figures["sent"] += s.value
        elif s.name == "millimetric_destination_events_failed_total":
            figures = out.setdefault(s.labels["destination"], {"sent": 0.0, "failed": 0.0})
            figures["failed"] += s.value
    return out


def problems(status: dict[str, Any]) -> list[str]:
    """What an on-call engineer should look at, in words."""
    found = [
        f"{s['name']}: "
        + ("not ready" if s["up"] else f"no metrics at {s['metrics_url'] or '(no URL set)'}")
        for s in status["stages"]
        if not s["ready"]
    ]
    for group, lag in status["lag"].items():
        if lag["seconds"] > LAG_LIMIT_S:
            found.append(f"{group}: {lag['records']:.0f} records behind, {lag['seconds']:.0f}s")
    p99 = status["freshness_seconds"]["p99"]
    if p99 is not None and p99 > FRESHNESS_LIMIT_S:
        found.append(f"freshness p99 {p99:.0f}s")
    if status["dead_letters_total"]:
        found.append(f"{status['dead_letters_total']:.0f} dead letters")
    return found


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def render(status: dict[str, Any], rates: dict[str, float] | None = None) -> Any:
    """A rich renderable of the status (`rates`: events/s since the previous refresh)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    stages = Table(title="millimetric status", title_justify="left")
    for column in ("stage", "up", "ready", "metrics"):
        stages.add_column(column)
    for s in status["stages"]:
        ok = "[green]yes[/]" if s["ready"] else "[red]no[/]"
        stages.add_row(s["name"], "yes" if s["up"] else "[red]no[/]", ok, s["metrics_url"] or "-")
    funnel = Table(show_header=True)
    for column in ("accepted", "processed", "inserted", "dead letters", "rejected", "limited"):
        funnel.add_column(column, justify="right")
    funnel.add_row(
        *(
            f"{status[k]:.0f}" + (f" ({rates[k]:.1f}/s)" if rates and k in rates else "")
            for k in ("accepted_total", "processed_total", "inserted_total")
        ),
        f"{status['dead_letters_total']:.0f}",
        f"{status['rejected_total']:.0f}",
        f"{status['rate_limited_total']:.0f}",
    )
    lag = Table(show_header=True)
    for column in ("consumer group", "lag (records)", "lag (oldest)"):
        lag.add_column(column)
    for group, value in status["lag"].items():
        lag.add_row(group, f"{value['records']:.0f}", _seconds(value["seconds"]))
    sent = Table(show_header=True)
    for column in ("destination", "sent", "dead-lettered"):
        sent.add_column(column)
    for name, figures in status.get("destinations", {}).items():
        sent.add_row(name, f"{figures['sent']:.0f}", f"{figures['failed']:.0f}")
    fresh = status["freshness_seconds"]
    summary = Text(
        f"freshness p50 {_seconds(fresh['p50'])}  p99 {_seconds(fresh['p99'])}   "
        f"last insert {_seconds(status['last_insert_age_seconds'])} ago"
    )
    unhealthy = Text("\n".join(status["unhealthy"]) or "all healthy", style="red" if status[
        "unhealthy"] else "green")  # fmt: skip
    shown = (stages, funnel, lag, *((sent,) if status.get("destinations") else ()), summary)
    return Group(*shown, unhealthy)


def rates(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, float]:
    """Events per second of the funnel counters between two collections."""
    keys = ("accepted_total", "processed_total", "inserted_total")
    return {k: max(0.0, after[k] - before[k]) / seconds for k in keys}


def watch(settings: Settings, interval_s: float) -> None:
    """Refresh the screen every `interval_s` until Ctrl-C."""
    from rich.live import Live

    urls = metrics_urls(settings)
    previous, previous_at = collect(urls), time.monotonic()
    with Live(render(previous), auto_refresh=False) as live:
        while True:
            time.sleep(interval_s)
            current, now = collect(urls), time.monotonic()
            live.update(render(current, rates(previous, current, now - previous_at)), refresh=True)
            previous, previous_at = current, now


def dev_metrics_urls(ports: dict[str, int], host: str = "127.0.0.1") -> dict[str, str]:
    """The `metrics_urls` entry `dev` records in its state file, for `status` to find."""
    return {stage: f"http://{host}:{port}/metrics" for stage, port in ports.items()}
