"""Metric names: the one table of every Prometheus metric the stages record.

Code records through the objects below; the README's metrics table is rendered from `METRICS`,
and tests check that every metric the dashboard and the alert rules name is in it. Labels are
bounded (operation, stage, reason, route, code, status, table, group, topic, partition, and a
destination's name or a per-project destination's id, as many as `destinations add` made): never
a key, a project id or a raw URL. Each stage serves them on its own port (`ingest.ops_port`).
"""

from __future__ import annotations

import collections
import time
from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from ingest.topics import DESTINATIONS

RETRIES = Counter(
    "millimetric_retries",
    "Attempts of a failing operation that were retried after a backoff, by operation.",
    ["operation"],
)
GAVE_UP = Counter(
    "millimetric_retries_exhausted",
    "Operations that failed every allowed attempt with an error that cannot heal, by operation.",
    ["operation"],
)
DEAD_LETTERS = Counter(
    "millimetric_dead_letters",
    "Records sent to the dead-letter topic, by stage and reason.",
    ["stage", "reason"],
)
READY = Gauge(
    "millimetric_ready",
    "1 while a stage runs and serves (started, not draining), else 0.",
    ["stage"],
)
REQUESTS = Counter(
    "millimetric_gateway_requests",
    "HTTP requests the gateway answered (received), by route and status code.",
    ["route", "status"],
)
REQUEST_SECONDS = Histogram(
    "millimetric_gateway_request_seconds",
    "Time from a request's arrival to its answer, by route.",
    ["route"],
)
ACCEPTED = Counter(
    "millimetric_gateway_events_accepted",
    "Events (records) the broker acknowledged and the gateway answered 202 for, by route.",
    ["route"],
)
REJECTED = Counter(
    "millimetric_gateway_rejected",
    "Requests answered with an error, by error code (see the errors table).",
    ["code"],
)
RATE_LIMITED = Counter(
    "millimetric_gateway_rate_limited",
    "Requests refused by a rate limit (429), by route.",
    ["route"],
)
BROKER_ACK_SECONDS = Histogram(
    "millimetric_gateway_broker_ack_seconds",
    "Time from handing a request's records to the producer to the broker's ack, by topic.",
    ["topic"],
)
PROCESSED = Counter(
    "millimetric_processor_events_processed",
    "Raw events the processor enriched and the broker acknowledged on the enriched topic.",
)
DROPPED = Counter(
    "millimetric_processor_events_dropped",
    "Raw events the processor dropped on purpose, by reason (`bot`: MILLIMETRIC_DROP_BOTS).",
    ["reason"],
)
STEP_SECONDS = Histogram(
    "millimetric_processor_step_seconds",
    "Time the processor takes for one step (a batch of raw events, up to the broker's ack).",
)
INSERTED = Counter(
    "millimetric_sink_rows_inserted",
    "Rows ClickHouse accepted from the sink, by table.",
    ["table"],
)
BATCH_ROWS = Histogram(
    "millimetric_sink_batch_rows",
    "Rows per ClickHouse insert.",
    buckets=(1, 10, 100, 500, 1000, 5000, 10_000, 20_000, 50_000, 100_000),
)
INSERT_SECONDS = Histogram(
    "millimetric_sink_insert_seconds",
    "Time of one successful ClickHouse insert.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LAST_INSERT = Gauge(
    "millimetric_sink_last_insert_timestamp_seconds",
    "Unix time of the sink's last successful insert (0: none yet).",
)
HEARTBEAT_SECONDS = Gauge(
    "millimetric_heartbeat_seconds",
    "Trip time (sink -> raw topic -> processor -> enriched topic -> sink) of the last heartbeat "
    "this sink read (MILLIMETRIC_HEARTBEAT_INTERVAL_S).",
)
HEARTBEAT_AT = Gauge(
    "millimetric_heartbeat_timestamp_seconds",
    "Unix time this sink last read a heartbeat (0: none yet, or heartbeats are off).",
)
FRESHNESS = Histogram(
    "millimetric_freshness_seconds",
    "Per event: from the gateway receiving it to its row being inserted in ClickHouse.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
FORGETS = Counter(
    "millimetric_forgets",
    "Erasures a sink picked up (`requested`), carried out (`done`) or must retry (`failed`: "
    "requested again later), by outcome.",
    ["outcome"],
)
LAG_RECORDS = Gauge(
    "millimetric_consumer_lag_records",
    "Records on a partition not yet committed by a consumer group (from the fetch high "
    "watermark, so exact on Tansu too).",
    ["group", "topic", "partition"],
)
LAG_SECONDS = Gauge(
    "millimetric_consumer_lag_seconds",
    "Age of the oldest record a consumer group has not committed on a partition (0: none).",
    ["group", "topic", "partition"],
)

DEVICES_OVER_CAP = Counter(
    "millimetric_processor_devices_over_cap",
    "Identifies past MILLIMETRIC_PROCESSOR_MAX_DEVICES_PER_USER: the device was unlinked.",
)
WEBHOOK_DELIVERIES = Counter(
    "millimetric_webhook_deliveries",
    "Webhook deliveries by provider and outcome (`accepted` or the error code).",
    ["provider", "outcome"],
)

DESTINATION_SENT = Counter(
    "millimetric_destination_events_sent",
    "Events a destination's provider accepted, by destination (posthog, mixpanel, amplitude, "
    "webhook; a per-project destination's id, `ds_...`).",
    ["destination"],
)
DESTINATION_FAILED = Counter(
    "millimetric_destination_events_failed",
    "Events a destination did not deliver, by destination (its name, or a per-project one's "
    "id) and reason (`rejected`: the provider refused it, it is on the destination's "
    "dead-letter topic; `undecodable`).",
    ["destination", "reason"],
)
DESTINATION_SKIPPED = Counter(
    "millimetric_destination_events_skipped",
    "Events a destination does not forward on purpose, by destination (its name, or a "
    "per-project one's id) and reason (`bot`, `test`, `forgotten`).",
    ["destination", "reason"],
)

METRICS: tuple[MetricWrapperBase, ...] = (
    REQUESTS,
    REQUEST_SECONDS,
    ACCEPTED,
    REJECTED,
    RATE_LIMITED,
    BROKER_ACK_SECONDS,
    PROCESSED,
    DROPPED,
    STEP_SECONDS,
    INSERTED,
    BATCH_ROWS,
    INSERT_SECONDS,
    LAST_INSERT,
    HEARTBEAT_SECONDS,
    HEARTBEAT_AT,
    FRESHNESS,
    DEAD_LETTERS,
    RETRIES,
    GAVE_UP,
    FORGETS,
    LAG_RECORDS,
    LAG_SECONDS,
    READY,
    DEVICES_OVER_CAP,
    WEBHOOK_DELIVERIES,
    DESTINATION_SENT,
    DESTINATION_FAILED,
    DESTINATION_SKIPPED,
)

# What Prometheus sees of each metric type: the series names it exposes.
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exposed_names() -> set[str]:
    """Every series name the stages can expose (a counter `x` is `x_total`, and so on)."""
    return {m._name + s for m in METRICS for s in SUFFIXES[m._type]}


# The series each stage exposes from its start, at 0: `rate()` and `increase()` need a series
# before its first event, and the dashboard test finds every metric it names.
INGEST_ROUTES = ("track", "identify", "batch", "forget")
STAGE_SERIES: dict[str, list[tuple[MetricWrapperBase, tuple[str, ...]]]] = {
    "gateway": [(m, (r,)) for m in (ACCEPTED, RATE_LIMITED) for r in INGEST_ROUTES],
    "processor": [(DROPPED, ("bot",)), (DEAD_LETTERS, ("processor", "enrich_failed"))],
    "sink": [
        (INSERTED, ("events",)),
        (DEAD_LETTERS, ("sink", "undecodable")),
        (DEAD_LETTERS, ("sink", "clickhouse_refused")),
        (RETRIES, ("clickhouse_insert",)),
        *((FORGETS, (outcome,)) for outcome in ("requested", "done", "failed")),
    ],
    "destinations": [
        *((DESTINATION_SENT, (name,)) for name in DESTINATIONS),
        *((DESTINATION_FAILED, (name, "rejected")) for name in DESTINATIONS),
    ],
}


_serving: dict[str, bool] = {}
_lagging: dict[str, bool] = {}


def set_serving(stage: str, serving: bool) -> None:
    """A stage started (True), or stops or drains (False); `millimetric_ready` follows."""
    _serving[stage] = serving
    READY.labels(stage).set(int(is_ready(stage)))


def set_lagging(stage: str, lagging: bool) -> None:
    """A stage's consumer group is behind MILLIMETRIC_READY_MAX_LAG_S, or no longer."""
    _lagging[stage] = lagging
    READY.labels(stage).set(int(is_ready(stage)))


def is_ready(stage: str) -> bool:
    """Whether a stage serves and keeps up (what its /ready and `millimetric_ready` say)."""
    return _serving.get(stage, False) and not _lagging.get(stage, False)


def observe_insert(received_at_ms: Sequence[int], started: float) -> None:
    """Record one successful insert begun at `started` (perf_counter): its rows, its duration,
    and every row's freshness."""
    INSERT_SECONDS.observe(time.perf_counter() - started)
    BATCH_ROWS.observe(len(received_at_ms))
    INSERTED.labels("events").inc(len(received_at_ms))
    LAST_INSERT.set_to_current_time()
    observe_many(FRESHNESS, [(time.time() * 1000 - ms) / 1000 for ms in received_at_ms])


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for every v, at a fraction of the cost (one bucket search in C per
    value, one locked increment per bucket): the sink records freshness for every row."""
    bounds = histogram._upper_bounds
    for index, count in collections.Counter(bisect_left(bounds, v) for v in values).items():
        histogram._buckets[index].inc(count)
    histogram._sum.inc(sum(values))


def markdown_table() -> str:
    """Render the metrics as the README shows them."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for metric in METRICS:
        labels = ", ".join(f"`{label}`" for label in metric._labelnames)
        name = metric._name + ("_total" if metric._type == "counter" else "")
        lines.append(f"| `{name}` | {metric._type} | {labels} | {metric._documentation} |")
    return "\n".join(lines)
