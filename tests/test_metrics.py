"""The metrics table: bulk histogram observations equal one-by-one ones."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from ingest.metrics import exposed_names, observe_many


def test_observe_many_equals_observing_one_by_one() -> None:
    registry = CollectorRegistry()
    buckets = (0.1, 1, 5, 60)
    one_by_one = Histogram("h", "", buckets=buckets, registry=CollectorRegistry())
    bulk = Histogram("h", "", buckets=buckets, registry=registry)
    values = [random.uniform(-1, 100) for _ in range(2000)] + [0.1, 1, 5, 60, 0]
    for value in values:
        one_by_one.observe(value)
    observe_many(bulk, values)
    assert [s for m in bulk.collect() for s in m.samples if s.name != "h_created"] == [
        s for m in one_by_one.collect() for s in m.samples if s.name != "h_created"
    ]
    assert b'h_bucket{le="5.0"}' in generate_latest(registry)


def test_counters_are_exposed_with_their_total_suffix() -> None:
    names = exposed_names()
    assert "millimetric_gateway_events_accepted_total" in names
    assert "millimetric_freshness_seconds_bucket" in names
