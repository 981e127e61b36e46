"""Referrer domain table: loads referrers.toml and maps hosts / source strings to known sources."""

from __future__ import annotations

import re
import tomllib
from contextlib import suppress
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError

REFERRERS_PATH = Path(__file__).with_name("referrers.toml")
Category = Literal["search", "social", "video", "shopping", "email", "ai_assistant"]
CATEGORIES: tuple[str, ...] = Category.__args__  # type: ignore[attr-defined]
# Second-level labels under a ccTLD, so "google.*" matches google.co.uk but not google.evil.com.
_SECOND_LEVEL = frozenset({"co", "com", "net", "org", "ac", "edu", "gov", "gob", "ne", "or", "go"})
_BAD_HOST = re.compile(r"[^\w.\-]")  # anything but letters, digits, "_", "." and "-" is junk


class Known(NamedTuple):
    """A well-known source: its canonical name and category."""

    name: str
    category: str


class Resolved(NamedTuple):
    """A usable referrer: comparable host (or app id), source name, category ("" if unknown)."""

    host: str
    source: str
    category: str
    origin: str


class _ReferrerFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    search: dict[str, list[str]]
    social: dict[str, list[str]]
    video: dict[str, list[str]]
    shopping: dict[str, list[str]]
    email: dict[str, list[str]]
    ai_assistant: dict[str, list[str]]
    apps: dict[str, str]


@lru_cache(maxsize=65536)
def clean_host(raw: str) -> str:
    """Normalise a URL authority to a comparable host: lower-case, no userinfo/port/"www.",
    IDNA ("xn--") labels decoded to Unicode; "" when it is not a usable host name."""
    host = raw.rpartition("@")[2].strip().lower()
    if host.startswith("["):  # IPv6 literal: keep as is, minus the port
        return host.partition("]")[0] + "]"
    host = host.partition(":")[0].strip(".")
    if host.startswith("www."):
        host = host[4:]
    if "xn--" in host:
        with suppress(UnicodeError):  # undecodable punycode: keep the ASCII form, never fail
            host = host.encode("ascii").decode("idna")
    if "." not in host or _BAD_HOST.search(host):
        return ""
    return host


def _tld_like(labels: list[str]) -> bool:
    """True for "de", "com", "co.uk", "com.br": what may follow a "name.*" wildcard."""
    if len(labels) == 1:
        return 2 <= len(labels[0]) <= 6
    return len(labels) == 2 and labels[0] in _SECOND_LEVEL and len(labels[1]) == 2


def _add(table: dict[str, Known], key: str, known: Known, path: Path) -> None:
    """Insert key, refusing a key that two different sources claim."""
    if table.setdefault(key, known) != known:
        raise ValueError(f"{path.name}: {key!r} is listed under {table[key].name} and {known.name}")


class Referrers:
    """Lookup tables built once from referrers.toml; host lookups are memoised."""

    def __init__(self, path: Path = REFERRERS_PATH) -> None:
        try:
            table = _ReferrerFile.model_validate(tomllib.loads(path.read_text("utf-8")))
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ValueError(f"{path.name}: {exc}") from exc
        self._exact: dict[str, Known] = {}
        self._wild: dict[str, Known] = {}
        self._alias: dict[str, Known] = {}
        for category in CATEGORIES:
            for name, entries in getattr(table, category).items():
                known = Known(name, category)
                _add(self._alias, name.lower(), known, path)
                for entry in entries:
                    key = entry.strip().lower()
                    if key.endswith(".*"):
                        _add(self._wild, key[:-2], known, path)
                    else:
                        _add(self._exact if "." in key else self._alias, key, known, path)
        self._apps: dict[str, Known] = {}
        for app_id, name in table.apps.items():
            if name not in self._alias:
                raise ValueError(f"{path.name}: app {app_id!r} maps to unknown source {name!r}")
            self._apps[app_id.lower()] = self._alias[name]
        # Per-instance memo: hosts and utm_source values repeat heavily in real traffic.
        self.lookup_host = lru_cache(maxsize=65536)(self._lookup_host)
        self.lookup_source = lru_cache(maxsize=16384)(self._lookup_source)
        self.resolve = lru_cache(maxsize=65536)(self._resolve)

    def _lookup_host(self, host: str) -> Known | None:
        """Longest listed suffix of a clean host, else a "name.<tld>" wildcard match."""
        suffix = host
        while True:
            if (known := self._exact.get(suffix)) is not None:
                return known
            dot = suffix.find(".")
            if dot < 0:
                break
            suffix = suffix[dot + 1 :]
        labels = host.split(".")
        for i in range(len(labels) - 1):
            if (known := self._wild.get(labels[i])) is not None and _tld_like(labels[i + 1 :]):
                return known
        return None

    def _lookup_source(self, source: str) -> Known | None:
        """Known source for a (lower-cased) utm_source value: an alias or a domain spelling."""
        if (known := self._alias.get(source)) is not None:
            return known
        if "." in source:
            host = clean_host(source.partition("/")[0])
            return self.lookup_host(host) if host else None
        return None

    def _resolve(self, scheme: str, authority: str) -> Resolved | None:
        """Referrer (scheme, authority) -> host, source name and category; None if unusable."""
        if scheme in ("android-app", "ios-app"):  # app referrers carry a package id, not a host
            app = authority.strip().lower()
            if not app or _BAD_HOST.search(app):
                return None
            known = self._apps.get(app)
            return Resolved(
                app,
                known.name if known else app,
                known.category if known else "",
                f"{scheme} {app}",
            )
        host = clean_host(authority)
        if not host:
            return None
        known = self.lookup_host(host)
        return Resolved(
            host, known.name if known else host, known.category if known else "", f"referrer {host}"
        )

    def sizes(self) -> dict[str, int]:
        """How many domains, wildcards, aliases and apps the table holds (for tests/diagnostics)."""
        return {
            "domains": len(self._exact),
            "wildcards": len(self._wild),
            "aliases": len(self._alias),
            "apps": len(self._apps),
        }
