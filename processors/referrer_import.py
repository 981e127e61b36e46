"""Regenerate referrer_data/lists.json from the pinned copies of the public referrer lists.

Run `python -m processors.referrer_import` after replacing a pinned copy (see
referrer_data/NOTICE.md); tests/test_referrer_lists.py fails while lists.json is stale. Only
this command needs PyYAML; the processor reads the generated JSON.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from processors.referrers import HAND, LISTS_PATH, REFERRERS_PATH, Referrers, clean_host

DATA = LISTS_PATH.parent
# List id -> title, in precedence order: on a key two lists claim, the earlier list wins.
LISTS = {
    "snowplow": "Snowplow referer-parser",
    "matomo": "Matomo searchengine-and-social-list",
    "ga4": "GA4 source categories",
    "posthog": "PostHog channel definitions",
}
# Snowplow medium -> our category; "unknown" (known source, no medium) first, since it exists to
# keep e.g. maps.google.com out of search; "paid" (ad servers) is left out: GA4 reads an untagged
# visit from an ad server as a referral.
SNOWPLOW = {"unknown": "", "email": "email", "social": "social", "search": "search"}
SNOWPLOW_AI = ("chatbot", "ai_assistant")
MATOMO = {
    "SearchEngines.yml": "search",
    "Socials.yml": "social",
    "AIAssistants.yml": "ai_assistant",
}
GA4 = {
    "SOURCE_CATEGORY_SEARCH": "search",
    "SOURCE_CATEGORY_SOCIAL": "social",
    "SOURCE_CATEGORY_SHOPPING": "shopping",
    "SOURCE_CATEGORY_VIDEO": "video",
}
# PostHog's source type of an app id -> our category.
POSTHOG = {"Search": "search", "Social": "social", "Shopping": "shopping", "Video": "video",
           "Email": "email"}  # fmt: skip


class Group(NamedTuple):
    """One source as a list names it: list id, display name, category and raw entries."""

    list: str
    display: str
    category: str
    entries: list[str]


def _snowplow() -> Iterator[Group]:
    import yaml  # only the import command needs PyYAML

    data = yaml.safe_load((DATA / "snowplow" / "referers.yml").read_text("utf-8"))
    for medium, category in (*SNOWPLOW.items(), SNOWPLOW_AI):
        for display, spec in data[medium].items():
            yield Group("snowplow", display, category, spec["domains"])


def _matomo() -> Iterator[Group]:
    import yaml

    for file, category in MATOMO.items():
        data = yaml.safe_load((DATA / "matomo" / file).read_text("utf-8"))
        for display, spec in data.items():
            urls = [u for conf in spec for u in conf["urls"]] if category == "search" else spec
            yield Group("matomo", str(display), category, urls)


def _ga4() -> Iterator[Group]:
    with (DATA / "ga4" / "ga4_source_categories.csv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield Group("ga4", "", GA4[row["source_category"]], [row["source"]])


def _posthog() -> Iterator[Group]:
    with (DATA / "posthog" / "apps.tsv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            yield Group("posthog", "", POSTHOG[row["category"]], [row["app_id"]])


def _key(entry: str) -> tuple[str, str] | None:
    """(kind, key) of a list entry: hosts match by suffix, stems as "stem.<tld>"; None if the
    entry needs a path (we match hosts only) or is no usable name."""
    raw = entry.strip().lower()
    if "/" in raw:
        return None
    if "." not in raw:
        return ("aliases", raw) if raw else None
    if raw.endswith(".{}"):  # Matomo "name.{}": any TLD
        stem = raw[:-3].removeprefix("www.")
        return ("wildcards", stem) if stem and "{}" not in stem else None
    raw = raw.rpartition("{}.")[2]  # Matomo "{}.name.com": any country sub-domain
    host = clean_host(raw)
    return ("hosts", host) if host else None


def _slug(display: str) -> str:
    """Our lower-case spelling of a list's display name: "Yahoo! Mail" -> "yahoo_mail"."""
    return re.sub(r"[^\w]+", "_", display.lower()).strip("_")


def build() -> dict[str, Any]:
    """The lists.json document from the pinned copies: every key once, hand-kept keys left out."""
    hand = Referrers(REFERRERS_PATH, lists_path=None)
    claimed: set[tuple[str, str]] = set()
    ga4_aliases = {g.entries[0].lower(): g.category for g in _ga4() if "." not in g.entries[0]}
    sources: list[dict[str, Any]] = []
    for group in groups():
        keys: dict[str, list[str]] = {"hosts": [], "wildcards": [], "aliases": []}
        name = ""
        for entry in group.entries:
            if (parsed := _key(entry)) is None:
                continue
            kind, key = parsed
            known = hand.hand_entry(kind, key)
            if known is None and kind != "wildcards":
                known = hand.lookup_source(key)  # a listed parent domain or an alias
            if known is not None and known.via == HAND and known.category == group.category:
                name = name or known.name  # the hand table already says so: keep our name
                continue
            if (kind, key) in claimed or hand.hand_entry(kind, key) is not None:
                continue
            claimed.add((kind, key))
            keys[kind].append(key)
        if not any(keys.values()):
            continue
        if not name:
            name = _slug(group.display) if group.display else _name(keys, ga4_aliases, group, hand)
        sources.append(
            {"list": group.list, "display": group.display, "name": name,
             "category": group.category, **{k: v for k, v in keys.items() if v}}
        )  # fmt: skip
    return {"lists": LISTS, "sources": sources}


def _name(
    keys: dict[str, list[str]], aliases: dict[str, str], group: Group, hand: Referrers
) -> str:
    """A source without a display name is named by a label of its key that names a source of
    the same category: "crackle.com" by GA4's row "crackle", "com.instagram.lite" by ours."""
    for key in (*keys["hosts"], *keys["aliases"]):
        for label in key.split("."):
            known = hand.hand_entry("aliases", label)
            if known is not None and known.category == group.category:
                return known.name
            if aliases.get(label) == group.category:
                return label
    return (keys["hosts"] or keys["aliases"] or keys["wildcards"])[0]


def groups() -> Iterator[Group]:
    """Every list's sources, in precedence order."""
    yield from (*_snowplow(), *_matomo(), *_ga4(), *_posthog())


def render(doc: dict[str, Any]) -> str:
    """lists.json text: one source per line, so an upstream change reads as a small diff."""
    lines = [json.dumps(s, ensure_ascii=False) for s in doc["sources"]]
    lists = json.dumps(doc["lists"], ensure_ascii=False)
    return '{"lists": ' + lists + ',\n"sources": [\n' + ",\n".join(lines) + "\n]}\n"


def main() -> None:
    """Write lists.json and say how many sources each list contributed."""
    doc = build()
    LISTS_PATH.write_text(render(doc), "utf-8")
    counts = {lid: sum(s["list"] == lid for s in doc["sources"]) for lid in LISTS}
    print(f"wrote {LISTS_PATH}: {counts}")


if __name__ == "__main__":
    main()
