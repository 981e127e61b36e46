"""Traffic-source classifier: (landing URL, referrer) -> source, medium, campaign and channel.

Pure Python (no Kafka/Faust). The ordered rules live in attribution.toml (its schema and compiled
rules: attribution_rules.py); the referring domains in referrers.toml (hand-kept, wins) over the
imported public lists in referrer_data/lists.json (see referrers.py); all are parsed once. The
`millimetric classify` command is classify_cli.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus

from pydantic import ValidationError

from processors.attribution_rules import (
    ATTRIBUTION_PATH,
    CompiledRule,
    Facts,
    RuleError,
    RuleSpec,
    load_attribution,
)
from processors.referrers import LISTS_PATH, REFERRERS_PATH, Known, Referrers, clean_host

_MAX_VALUE = 500  # cap on kept parameter values so a junk URL cannot bloat the output row
_UTM = ("utm_source", "utm_medium", "utm_campaign")
# Scheme only when followed by "//", so "example.com:8080/x" is not read as scheme "example.com".
_AUTHORITY = re.compile(r"\s*(?:([a-zA-Z][\w+.\-]{0,31}):(?=//))?(?://)?([^/?#\\\s]*)")
_TO_AMP = str.maketrans("?#", "&&")  # fragment params (#utm_source=...) count like query ones


@dataclass(frozen=True, slots=True)
class Classification:
    """Where a visit came from, and which rule said so."""

    source: str
    medium: str
    campaign: str
    channel: str
    source_confidence: float
    source_rule_id: str
    click_id: str
    click_id_network: str
    why: str


_FIELDS = fields(Classification)


@lru_cache(maxsize=4)
def _referrers(path: Path, lists_path: Path | None) -> Referrers:
    return Referrers(path, lists_path)  # shared by every Classifier: one host memo per process


CLASSIFIER_VERSION: str = load_attribution().version


def _extract(url: str, wanted: frozenset[str]) -> dict[str, str]:
    """First non-empty value of each wanted parameter in the query or the #fragment."""
    out: dict[str, str] = {}
    if "?" not in url and "#" not in url:
        if "%" not in url:
            return out
        url = unquote(url)  # a fully percent-encoded URL hides its "?" as %3F
    cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=-1)
    if cut < 0:
        return out
    for piece in url[cut + 1 :].translate(_TO_AMP).split("&"):
        key, eq, value = piece.partition("=")
        if not eq:
            continue
        key = key.strip().lower()
        if "%" in key or "+" in key:
            key = unquote_plus(key).strip().lower()
        key = key.removeprefix("amp;")  # HTML-escaped "&amp;" separators
        if key in wanted and key not in out:
            if "%" in value or "+" in value:
                value = unquote_plus(value)
            if value := value.strip()[:_MAX_VALUE]:
                out[key] = value
    return out


def _category(known: Known | None) -> str:
    return known.category if known else ""


class Classifier:
    """Classifies (landing URL, referrer) pairs; per-project rules run before the built-ins."""

    def __init__(
        self,
        extra_rules: Sequence[Mapping[str, Any]] = (),
        *,
        rules_path: Path = ATTRIBUTION_PATH,
        referrers_path: Path = REFERRERS_PATH,
        lists_path: Path | None = LISTS_PATH,
    ) -> None:
        """Load the tables (cached per path; lists_path=None: the hand-kept referrers only) and
        validate extra_rules; raise RuleError if bad."""
        table = load_attribution(rules_path)
        if table.rules[-1].has_conditions():
            raise RuleError(f"{rules_path.name}: the last rule must be a catch-all")
        specs: list[RuleSpec] = []
        for i, raw in enumerate(extra_rules):
            label = f"extra rule #{i} ({dict(raw).get('id', '?')!r})"
            try:
                spec = RuleSpec.model_validate(dict(raw))
            except ValidationError as exc:
                raise RuleError(f"{label}: {exc}") from exc
            if not spec.has_conditions():
                raise RuleError(f"{label}: has no condition, it would match every visit")
            specs.append(spec)
        specs.extend(table.rules)
        if len({s.id for s in specs}) != len(specs):
            raise RuleError("rule ids must be unique across extra and built-in rules")
        self.version = table.version
        self._rules = tuple(CompiledRule.compile(s) for s in specs)
        self._refs = _referrers(referrers_path, lists_path)
        self._clicks = table.click_ids
        self._click_categories = {c.param: _category(self._known(c.source)) for c in self._clicks}
        self._wanted = frozenset((*_UTM, *(c.param for c in self._clicks)))
        # Resolved facts repeat far more than raw URLs do: memoise rule choice and why text.
        self._decide = lru_cache(maxsize=65536)(self._decide_uncached)

    def _decide_uncached(
        self, facts: Facts, origin: str, via: str, click_param: str
    ) -> tuple[RuleSpec, str]:
        rule = next(r for r in self._rules if r.matches(facts)).spec  # built-ins end in catch-all
        category = f", {facts.source_category}" if facts.source_category else ""
        why = (
            f"{rule.why} Inputs: source={facts.source!r} ({origin}{f'; {via}' if via else ''}"
            f"{category}),"
            f" medium={facts.medium!r}"
            f"{f', campaign={facts.campaign!r}' if facts.campaign else ''}"
            f"{f', click id {click_param} ({facts.click_network})' if click_param else ''}."
        )
        return rule, why

    def _known(self, source: str) -> Known | None:
        return self._refs.lookup_source(source)

    def classify(
        self, url: str | None, referrer: str | None, campaign: Mapping[str, str] | None = None
    ) -> Classification:
        """Classify one visit; never raises on junk input (non-strings count as missing).

        `campaign`: utm_* values sent beside the URL (Segment's context.campaign), used only
        when the URL itself has no utm_ parameter."""
        url = url if isinstance(url, str) else ""
        referrer = referrer if isinstance(referrer, str) else ""
        params = _extract(url, self._wanted)
        if campaign and not any(k in params for k in _UTM):
            params = {**params, **{k: v for k in _UTM if isinstance(v := campaign.get(k), str)}}
        # Table order decides when several ids are present (gclid before gad_source).
        click = next((c for c in self._clicks if c.param in params), None) if params else None
        utm_source, utm_medium, utm_campaign = (params.get(k, "") for k in _UTM)
        has_utm = bool(utm_source or utm_medium or utm_campaign)
        ref = None
        if referrer:
            scheme, authority = _AUTHORITY.match(referrer).groups()  # type: ignore[union-attr]
            ref = self._refs.resolve((scheme or "").lower(), authority)
        internal = via = ""  # via: the table that named the source, for the why text
        if ref is not None:  # same host as the landing page (ignoring www.) is no source
            landing = _AUTHORITY.match(url).group(2)  # type: ignore[union-attr]
            if ref.host == clean_host(landing):
                ref, internal = None, "; internal referrer ignored"
        if has_utm:  # utm always beats the referrer and click ids (GA4 manual tagging)
            source, medium = utm_source.lower() or "(not set)", utm_medium.lower() or "(not set)"
            known = self._known(source) if utm_source else None
            category, origin, via = _category(known), "utm", known.via if known else ""
        elif click is not None and click.medium:  # e.g. gclid: proof of an ad click
            source, medium, origin = click.source, click.medium, f"click id {click.param}"
            category = self._click_categories[click.param]
        elif ref is not None:
            source, category, origin, via = ref.source, ref.category, ref.origin, ref.via
            medium = "organic" if category == "search" else "referral"
        elif click is not None:  # e.g. fbclid with a stripped referrer: still that network
            source, medium, origin = click.source, "referral", f"click id {click.param}"
            category = self._click_categories[click.param]
        else:
            source, medium, category, origin = "(direct)", "(none)", "", "no referrer"
        facts = Facts(
            source,
            medium,
            utm_campaign,
            category,
            utm_source.lower(),
            utm_medium.lower(),
            utm_campaign.lower(),
            click.network if click else "",
            has_utm,
        )
        rule, why = self._decide(facts, origin + internal, via, click.param if click else "")
        return Classification(
            source=source,
            medium=medium,
            campaign=utm_campaign,
            channel=rule.channel,
            source_confidence=rule.confidence,
            source_rule_id=rule.id,
            click_id=params[click.param] if click else "",
            click_id_network=click.network if click else "",
            why=why,
        )

    def as_dict(self, c: Classification) -> dict[str, Any]:
        """JSON-ready dict of a Classification plus classifier_version."""
        out: dict[str, Any] = {f.name: getattr(c, f.name) for f in _FIELDS}
        out["classifier_version"] = self.version
        return out


@lru_cache(maxsize=1)
def default_classifier() -> Classifier:
    """The process-wide classifier with only the built-in rules."""
    return Classifier()
