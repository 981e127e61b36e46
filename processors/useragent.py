"""User-Agent enrichment: browser / OS family, device type and bot detection.

Pure and synchronous: called once per event on the processor hot path, so parses are
memoised in a bounded LRU keyed on the (length-capped) User-Agent string.

``device_type`` comes from the rule tables of useragent_tables.py (whose docstring gives their
order and the bot policy), applied here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Final

from ua_parser import Domain, load_lazy_builtins
from ua_parser.regex import Resolver as RustResolver

from processors.useragent_tables import (
    BOT_TOKENS,
    DEVICE_BRAND_TYPES,
    DEVICE_FAMILY_TYPES,
    OS_FAMILY_TYPES,
    UA_TOKEN_TYPES,
)

if TYPE_CHECKING:
    from functools import _CacheInfo

    from ua_parser.core import OS, Device, PartialResult, UserAgent

__all__ = ["MAX_UA_LENGTH", "UserAgentInfo", "UserAgentParser"]

# Real UAs are < 512 chars; capping bounds regex time and cache memory for abusive input.
MAX_UA_LENGTH: Final = 1024

_UNKNOWN_FAMILY: Final = "Other"  # ua-parser's "no match" family, reported here as ""


@dataclass(frozen=True, slots=True)
class UserAgentInfo:
    """Enrichment result for one User-Agent header.

    ``device_type`` is one of "desktop", "mobile", "tablet", "bot", "other" ("" when no
    UA was sent); ``browser``/``os`` are ua-parser families ("" when unknown or no UA);
    ``is_bot`` is true exactly when ``device_type == "bot"``.
    """

    device_type: str
    browser: str
    os: str
    is_bot: bool


_NO_USER_AGENT: Final = UserAgentInfo(device_type="", browser="", os="", is_bot=False)


class UserAgentParser:
    """Parses User-Agent strings with ua-parser's Rust resolver and a bounded LRU cache.

    Building the resolver compiles the regex set (~0.2 s), so create one parser per
    process and reuse it.
    """

    def __init__(self, cache_size: int = 10_000) -> None:
        """Build the resolver; ``cache_size`` bounds memoised distinct UAs (0 disables)."""
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        # Explicitly the ua-parser-rs backed resolver: importing ua_parser.regex fails if
        # ua-parser-rs is missing, instead of silently degrading to the slow pure-Python one.
        self._resolver = RustResolver(load_lazy_builtins())
        # lru_cache is C-implemented and thread-safe: the cheapest bounded memo available.
        self._parse_cached = lru_cache(maxsize=cache_size)(self._parse_uncached)

    def parse(self, user_agent: str | None) -> UserAgentInfo:
        """Return the enrichment for ``user_agent``; never raises on junk input."""
        if not user_agent:
            return _NO_USER_AGENT
        return self._parse_cached(user_agent[:MAX_UA_LENGTH])

    def cache_info(self) -> _CacheInfo:
        """Return the LRU statistics (hits, misses, maxsize, currsize) for metrics."""
        return self._parse_cached.cache_info()

    def _resolve(self, user_agent: str) -> PartialResult:
        try:
            return self._resolver(user_agent, Domain.ALL)
        except UnicodeEncodeError:
            # Lone surrogates cannot cross into Rust as UTF-8; replace them and retry.
            clean = user_agent.encode("utf-8", "replace").decode("utf-8")
            return self._resolver(clean, Domain.ALL)

    def _parse_uncached(self, user_agent: str) -> UserAgentInfo:
        result = self._resolve(user_agent)
        browser = _family(result.user_agent)
        os_family = _family(result.os)
        lowered = user_agent.lower()
        bot_name = next((name for token, name in BOT_TOKENS.items() if token in lowered), None)
        if bot_name is not None:
            return UserAgentInfo("bot", bot_name, os_family, True)
        device_type = _device_type(lowered, result.device, os_family)
        return UserAgentInfo(device_type, browser, os_family, device_type == "bot")


def _family(part: UserAgent | OS | None) -> str:
    """ua-parser family, with its "Other" (no match) placeholder mapped to ""."""
    return "" if part is None or part.family == _UNKNOWN_FAMILY else part.family


def _device_type(lowered: str, device: Device | None, os_family: str) -> str:
    """Apply rules 2-5 of useragent_tables.py's docstring (the bot-token rule is the caller's)."""
    if device is not None:
        kind = DEVICE_FAMILY_TYPES.get(device.family) or DEVICE_BRAND_TYPES.get(device.brand or "")
        if kind is not None:
            return kind
    for token, kind in UA_TOKEN_TYPES:
        if token in lowered:
            return kind
    return OS_FAMILY_TYPES.get(os_family, "other")
