"""User-Agent enrichment: browser / OS family, device type and bot detection.

Pure and synchronous: called once per event on the processor hot path, so parses are
memoised in a bounded LRU keyed on the (length-capped) User-Agent string.

ua-parser 1.x resolves browser/OS/device *families*; it does not say what kind of device
sent the request, so ``device_type`` is derived here from the data tables below, checked
in this order (first hit wins):

1. ``BOT_TOKENS`` substring of the lower-cased UA, or ua-parser device family ``Spider``
   -> ``"bot"``;
2. ``DEVICE_FAMILY_TYPES`` / ``DEVICE_BRAND_TYPES`` (ua-parser device family / brand);
3. ``UA_TOKEN_TYPES`` substrings of the lower-cased UA (TV/console, tablet, mobile);
4. ``OS_FAMILY_TYPES`` (ua-parser OS family; Android reaching this step sent no
   "Mobile" token, which is Google's documented tablet signal);
5. anything else -> ``"other"``.

Bot policy: every non-browser HTTP client counts as a bot - search/AI crawlers, uptime
and synthetic monitors, headless browsers *and* generic HTTP libraries/CLIs (curl, Wget,
python-requests, Go-http-client, okhttp, ...). The pipeline counts human page views, and a
library UA is never a person browsing; downstream may still keep bot rows separately.

Known limits: iPadOS 13+ Safari sends a Macintosh UA and is reported as desktop; Android
phones in "request desktop site" mode look like Linux desktops.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Final

from ua_parser import Domain, load_lazy_builtins
from ua_parser.regex import Resolver as RustResolver

if TYPE_CHECKING:
    from functools import _CacheInfo

    from ua_parser.core import OS, Device, PartialResult, UserAgent

__all__ = [
    "BOT_TOKENS",
    "DEVICE_BRAND_TYPES",
    "DEVICE_FAMILY_TYPES",
    "MAX_UA_LENGTH",
    "OS_FAMILY_TYPES",
    "UA_TOKEN_TYPES",
    "UserAgentInfo",
    "UserAgentParser",
]

# Real UAs are < 512 chars; capping bounds regex time and cache memory for abusive input.
MAX_UA_LENGTH: Final = 1024

# Lower-cased UA substring -> display name used as ``browser`` (overrides ua-parser, which
# e.g. names ChatGPT-User "com/bot"). Complements ua-parser's "Spider" device detection,
# which misses HTTP libraries, headless browsers and several monitors.
BOT_TOKENS: Final[dict[str, str]] = {
    # search engines
    "googlebot": "Googlebot",
    "adsbot-google": "AdsBot-Google",
    "mediapartners-google": "Mediapartners-Google",
    "storebot-google": "Storebot-Google",
    "google-inspectiontool": "Google-InspectionTool",
    "googleother": "GoogleOther",
    "bingbot": "bingbot",
    "bingpreview": "BingPreview",
    "yandexbot": "YandexBot",
    "baiduspider": "Baiduspider",
    "duckduckbot": "DuckDuckBot",
    "applebot": "Applebot",
    "petalbot": "PetalBot",
    "yahoo! slurp": "Yahoo! Slurp",
    # AI crawlers and AI assistants fetching pages
    "gptbot": "GPTBot",
    "chatgpt-user": "ChatGPT-User",
    "oai-searchbot": "OAI-SearchBot",
    "claudebot": "ClaudeBot",
    "claude-user": "Claude-User",
    "claude-searchbot": "Claude-SearchBot",
    "anthropic-ai": "anthropic-ai",
    "perplexitybot": "PerplexityBot",
    "perplexity-user": "Perplexity-User",
    "ccbot": "CCBot",
    "bytespider": "Bytespider",
    "amazonbot": "Amazonbot",
    "meta-externalagent": "meta-externalagent",
    # SEO tools and link previews
    "ahrefsbot": "AhrefsBot",
    "semrushbot": "SemrushBot",
    "mj12bot": "MJ12bot",
    "dotbot": "DotBot",
    "facebookexternalhit": "facebookexternalhit",
    "twitterbot": "Twitterbot",
    "linkedinbot": "LinkedInBot",
    "slackbot": "Slackbot",
    "discordbot": "Discordbot",
    "telegrambot": "TelegramBot",
    "whatsapp": "WhatsApp",
    # uptime / synthetic monitoring and audits
    "uptimerobot": "UptimeRobot",
    "pingdom": "Pingdom",
    "datadogsynthetics": "Datadog Synthetics",
    "site24x7": "Site24x7",
    "statuscake": "StatusCake",
    "newrelicpinger": "NewRelicPinger",
    "checkly": "Checkly",
    "betteruptime": "Better Uptime",
    "uptime-kuma": "Uptime Kuma",
    "chrome-lighthouse": "Lighthouse",
    # headless / automated browsers
    "headlesschrome": "HeadlessChrome",
    "phantomjs": "PhantomJS",
    # HTTP libraries and command-line clients
    "curl/": "curl",
    "wget/": "Wget",
    "python-requests": "Python Requests",
    "python-urllib": "Python urllib",
    "python-httpx": "httpx",
    "aiohttp/": "aiohttp",
    "scrapy": "Scrapy",
    "go-http-client": "Go-http-client",
    "okhttp/": "okhttp",
    "java/": "Java",
    "apache-httpclient": "Apache-HttpClient",
    "node-fetch": "node-fetch",
    "axios/": "axios",
    "undici": "undici",
    "libwww-perl": "libwww-perl",
    "httpie/": "HTTPie",
    "postmanruntime": "PostmanRuntime",
    "insomnia/": "Insomnia",
}

# ua-parser device family -> device type.
DEVICE_FAMILY_TYPES: Final[dict[str, str]] = {
    "Spider": "bot",
    "iPad": "tablet",
    "Kindle": "tablet",
    "Generic Tablet": "tablet",
    "iPhone": "mobile",
    "iPod": "mobile",
    "Generic Smartphone": "mobile",
    "Generic Feature Phone": "mobile",
}

# ua-parser device brand -> device type (brand carries the tablet hint for Android models).
DEVICE_BRAND_TYPES: Final[dict[str, str]] = {
    "Generic_Android_Tablet": "tablet",
}

# Lower-cased UA substrings -> device type, first match wins: TV/console before
# tablet before mobile, because iPad and smart-TV UAs also carry a "Mobile" token.
UA_TOKEN_TYPES: Final[tuple[tuple[str, str], ...]] = (
    ("tablet pc", "desktop"),  # Windows 7 IE tablet-capable PCs, not tablets
    ("smart-tv", "other"),
    ("smarttv", "other"),
    ("hbbtv", "other"),
    ("googletv", "other"),
    ("crkey", "other"),  # Chromecast
    ("web0s", "other"),  # LG TVs
    ("roku", "other"),
    ("xbox", "other"),
    ("playstation", "other"),
    ("nintendo", "other"),
    ("ipad", "tablet"),
    ("tablet", "tablet"),
    ("kindle", "tablet"),
    ("silk/", "tablet"),
    ("playbook", "tablet"),
    ("iphone", "mobile"),
    ("ipod", "mobile"),
    ("windows phone", "mobile"),
    ("iemobile", "mobile"),
    ("opera mini", "mobile"),
    ("blackberry", "mobile"),
    ("mobile", "mobile"),
)

# ua-parser OS family -> device type; families not listed (TV, watch, console OSes) -> other.
OS_FAMILY_TYPES: Final[dict[str, str]] = {
    # Android without a "Mobile" token (rule 3 did not match) is a tablet.
    "Android": "tablet",
    "BlackBerry Tablet OS": "tablet",
    **dict.fromkeys(
        (
            "iOS",
            "Windows Phone",
            "Windows Mobile",
            "BlackBerry OS",
            "Symbian OS",
            "Symbian^3",
            "Symbian^3 Anna",
            "Symbian^3 Belle",
            "Nokia Series 40",
            "Nokia Series 30 Plus",
            "KaiOS",
            "Firefox OS",
            "HarmonyOS",
            "Sailfish",
            "Bada",
            "MeeGo",
        ),
        "mobile",
    ),
    **dict.fromkeys(
        (
            "Windows",
            "Mac OS X",
            "Mac OS",
            "Chrome OS",
            "Linux",
            "Ubuntu",
            "Kubuntu",
            "Lubuntu",
            "Linux Mint",
            "Debian",
            "Fedora",
            "Red Hat",
            "CentOS",
            "Arch Linux",
            "Gentoo",
            "openSUSE",
            "SUSE",
            "Slackware",
            "Mageia",
            "PCLinuxOS",
            "Mandriva",
            "FreeBSD",
            "OpenBSD",
            "NetBSD",
            "Solaris",
        ),
        "desktop",
    ),
}

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
    """Apply rules 2-5 of the module docstring (the bot-token rule is the caller's)."""
    if device is not None:
        kind = DEVICE_FAMILY_TYPES.get(device.family) or DEVICE_BRAND_TYPES.get(device.brand or "")
        if kind is not None:
            return kind
    for token, kind in UA_TOKEN_TYPES:
        if token in lowered:
            return kind
    return OS_FAMILY_TYPES.get(os_family, "other")
