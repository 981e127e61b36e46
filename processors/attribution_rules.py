"""The attribution rule table: attribution.toml's schema (click ids, ordered rules, GA4's default
channel groups plus "AI Assistants"), its loading and validation, and the rules compiled into
the tests the classifier (processors/classify.py) runs on each visit's facts.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from processors.referrers import Category

ATTRIBUTION_PATH = Path(__file__).with_name("attribution.toml")
Channel = Literal[
    "Direct",
    "Cross-network",
    "Paid Shopping",
    "Paid Search",
    "Paid Social",
    "Paid Video",
    "Display",
    "Paid Other",
    "Organic Shopping",
    "Organic Social",
    "Organic Video",
    "Organic Search",
    "Referral",
    "Email",
    "Affiliates",
    "Audio",
    "SMS",
    "Mobile Push Notifications",
    "Unassigned",
    "AI Assistants",
]
# RuleSpec fields that are not conditions; every other field names a Facts value it tests.
_RULE_META = frozenset({"id", "channel", "confidence", "why"})


class RuleSpec(BaseModel):
    """One attribution rule as written in attribution.toml or passed as a per-project rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)
    channel: Channel
    confidence: float = Field(ge=0.0, le=1.0)
    why: str = Field(min_length=1)
    source: list[str] | None = None
    medium: list[str] | None = None
    source_category: list[Category] | None = None
    utm_source: list[str] | None = None
    utm_medium: list[str] | None = None
    utm_campaign: list[str] | None = None
    click_network: list[str] | None = None
    source_regex: str | None = None
    medium_regex: str | None = None
    campaign_regex: str | None = None
    has_utm: bool | None = None

    @field_validator("source_regex", "medium_regex", "campaign_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regex {value!r}: {exc}") from exc
        return value

    def has_conditions(self) -> bool:
        """False for a catch-all rule (no condition at all)."""
        conditions = type(self).model_fields.keys() - _RULE_META
        return any(getattr(self, name) is not None for name in conditions)


class ClickIdSpec(BaseModel):
    """A click-id URL parameter, its ad network and the source/medium it implies without utm."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    param: str = Field(min_length=1)
    network: str = Field(min_length=1)
    source: str = Field(min_length=1)
    medium: str = ""


class AttributionFile(BaseModel):
    """attribution.toml: version, click-id table and ordered rules (the last one a catch-all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: str = Field(min_length=1)
    click_ids: list[ClickIdSpec]
    rules: list[RuleSpec] = Field(min_length=1)


class Facts(NamedTuple):
    """What the rules test of one visit: resolved source and medium, the utm values lower-cased,
    the click id's network."""

    source: str
    medium: str
    campaign: str
    source_category: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    click_network: str
    has_utm: bool


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule ready to test Facts: its value sets and regexes by Facts index."""

    spec: RuleSpec
    sets: tuple[tuple[int, frozenset[str]], ...]  # (Facts index, allowed lower-cased values)
    regexes: tuple[tuple[int, re.Pattern[str]], ...]

    @classmethod
    def compile(cls, spec: RuleSpec) -> CompiledRule:
        """Compile a validated rule (its conditions in declaration order)."""
        sets: list[tuple[int, frozenset[str]]] = []
        regexes: list[tuple[int, re.Pattern[str]]] = []
        for name in RuleSpec.model_fields:  # declaration order: same check order in every process
            if name in _RULE_META or name == "has_utm" or (value := getattr(spec, name)) is None:
                continue
            if name.endswith("_regex"):  # source_regex tests Facts.source, and so on
                index = Facts._fields.index(name.removesuffix("_regex"))
                regexes.append((index, re.compile(value, re.IGNORECASE)))
            else:
                sets.append(
                    (Facts._fields.index(name), frozenset(v.strip().lower() for v in value))
                )
        return cls(spec, tuple(sets), tuple(regexes))

    def matches(self, facts: Facts) -> bool:
        """Whether every condition of the rule holds for these facts."""
        if self.spec.has_utm is not None and facts.has_utm is not self.spec.has_utm:
            return False
        return all(facts[i] in allowed for i, allowed in self.sets) and all(
            pattern.search(facts[i]) is not None for i, pattern in self.regexes
        )


class RuleError(ValueError):
    """A rule (built-in or per-project) failed validation."""


@lru_cache(maxsize=4)
def load_attribution(path: Path = ATTRIBUTION_PATH) -> AttributionFile:
    """Parse and validate attribution.toml once per path; RuleError names the bad rule."""
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
        return AttributionFile.model_validate(raw)
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise RuleError(f"{path.name}: {exc}") from exc
