"""Classify bench: the classifier in-process, with the imported referrer lists against the
hand-kept table alone (referrers.toml), measured alternately in the same run.

Warm: events/s over the bench's traffic pool (hosts repeat, so the memos work as in
production). Cold: referrer lookups/s over distinct hosts with fresh tables, the per-new-host
cost. Load: time and traced memory (tracemalloc) to build the tables.
"""

from __future__ import annotations

import random
import time
import tracemalloc
from pathlib import Path

from bench.events import REFERRERS, URLS
from bench.table import Row
from processors.classify import Classifier
from processors.referrers import LISTS_PATH, REFERRERS_PATH, Referrers

ROUNDS = 5
_PARENTS = ("mail.example.de", "shop.example.com", "example.co.uk", "blog.example.fr")


def _warm(clf: Classifier, pairs: list[tuple[str, str | None]]) -> float:
    start = time.perf_counter()
    for url, referrer in pairs:
        clf.classify(url, referrer)
    return len(pairs) / (time.perf_counter() - start)


def _cold(lists_path: Path | None, hosts: list[str]) -> float:
    refs = Referrers(REFERRERS_PATH, lists_path)
    start = time.perf_counter()
    for host in hosts:
        refs.resolve("https", host)
    return len(hosts) / (time.perf_counter() - start)


def _load(lists_path: Path | None) -> tuple[float, float]:
    tracemalloc.start()
    start = time.perf_counter()
    refs = Referrers(REFERRERS_PATH, lists_path)
    seconds = time.perf_counter() - start
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del refs
    return seconds * 1000, size / 1e6


def run(count: int) -> list[Row]:
    """Best of ROUNDS for each figure, with and without the lists taking turns."""
    rng = random.Random(7)
    pairs = [
        (rng.choice(URLS).format(n=i % 97), rng.choice(REFERRERS).format(n=i % 89) or None)
        for i in range(count)
    ]
    letters = "abcdefghijklmnopqrstuvwxyz"
    hosts = [f"{''.join(rng.choices(letters, k=8))}.{rng.choice(_PARENTS)}" for _ in range(count)]
    clfs = {"lists": Classifier(), "hand": Classifier(lists_path=None)}
    paths: dict[str, Path | None] = {"lists": LISTS_PATH, "hand": None}
    warm = dict.fromkeys(clfs, 0.0)
    cold = dict.fromkeys(clfs, 0.0)
    load = {k: (float("inf"), 0.0) for k in clfs}
    for clf in clfs.values():
        _warm(clf, pairs)  # fill the memos
    for _ in range(ROUNDS):
        for key, clf in clfs.items():
            warm[key] = max(warm[key], _warm(clf, pairs))
            cold[key] = max(cold[key], _cold(paths[key], hosts))
            load[key] = min(load[key], _load(paths[key]))
    return [
        Row("classify", f"events/s in-process, warm ({count:,} events)",
            warm["lists"], warm["hand"], "≥ 0.9x", "events/s"),
        Row("classify", f"referrer lookups/s, cold ({count:,} new hosts)",
            cold["lists"], cold["hand"], "-", "lookups/s"),
        Row("classify", "referrer tables: build time", load["lists"][0], load["hand"][0], "-",
            "ms"),
        Row("classify", "referrer tables: traced memory", load["lists"][1], load["hand"][1], "-",
            "MB"),
    ]  # fmt: skip
