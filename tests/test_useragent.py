"""User-Agent enrichment: real-world UA table, junk robustness, cache bound."""

from __future__ import annotations

import time

import pytest
import ua_parser
import ua_parser.regex
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.useragent import MAX_UA_LENGTH, UserAgentInfo, UserAgentParser

DEVICE_TYPES = {"desktop", "mobile", "tablet", "bot", "other"}


@pytest.fixture(scope="module")
def parser() -> UserAgentParser:
    return UserAgentParser()  # compiling the regex set takes ~0.2 s: share it


# Sources: browser UAs follow MDN "User-Agent" header examples
# (developer.mozilla.org/en-US/docs/Web/HTTP/Headers/User-Agent) with Chrome's reduced
# UA format (chromium.org/updates/ua-reduction, "Android 10; K") and Samsung's UA docs
# (developer.samsung.com/internet/user-agent-string-format); bot UAs are the ones
# published by their operators: Google (developers.google.com/search/docs/crawling-
# indexing/overview-google-crawlers), Bing (bing.com/webmasters/help/which-crawlers-does-
# bing-use-8c184ec0), OpenAI (platform.openai.com/docs/bots), Anthropic
# (support.anthropic.com, ClaudeBot), Perplexity (docs.perplexity.ai/guides/bots),
# UptimeRobot and Pingdom support pages, Datadog Synthetics docs; CLI/library UAs are the
# defaults sent by curl 8, Wget 1.21, requests 2.31 and Go's net/http.
UA_CASES: list[tuple[str, str | None, UserAgentInfo]] = [
    (
        "chrome-windows",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
        UserAgentInfo("desktop", "Chrome", "Windows", False),
    ),
    (
        "safari-macos",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like "
        "Gecko) Version/17.4.1 Safari/605.1.15",
        UserAgentInfo("desktop", "Safari", "Mac OS X", False),
    ),
    (
        "safari-iphone",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1",
        UserAgentInfo("mobile", "Mobile Safari", "iOS", False),
    ),
    (
        "safari-ipad",
        "Mozilla/5.0 (iPad; CPU OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
        "Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1",
        UserAgentInfo("tablet", "Mobile Safari", "iOS", False),
    ),
    (
        "chrome-android-phone-reduced",
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Mobile Safari/537.36",
        UserAgentInfo("mobile", "Chrome Mobile", "Android", False),
    ),
    (
        "chrome-android-tablet-reduced",
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
        UserAgentInfo("tablet", "Chrome", "Android", False),
    ),
    (
        "chrome-android-galaxy-tab",
        "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
        UserAgentInfo("tablet", "Chrome", "Android", False),
    ),
    (
        "firefox-android-tablet",
        "Mozilla/5.0 (Android 14; Tablet; rv:125.0) Gecko/125.0 Firefox/125.0",
        UserAgentInfo("tablet", "Firefox Mobile", "Android", False),
    ),
    (
        "kindle-fire-silk",
        "Mozilla/5.0 (Linux; Android 11; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Silk/124.2.1 like Chrome/124.0.6367.179 Safari/537.36",
        UserAgentInfo("tablet", "Amazon Silk", "Android", False),
    ),
    (
        "samsung-internet",
        "Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like "
        "Gecko) SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36",
        UserAgentInfo("mobile", "Samsung Internet", "Android", False),
    ),
    (
        # "CUBOT" contains "bot": a phone brand must not be flagged as a crawler
        "cubot-phone",
        "Mozilla/5.0 (Linux; Android 9; CUBOT KING KONG CS) AppleWebKit/537.36 (KHTML, like "
        "Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
        UserAgentInfo("mobile", "Chrome Mobile", "Android", False),
    ),
    (
        "firefox-linux",
        "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
        UserAgentInfo("desktop", "Firefox", "Linux", False),
    ),
    (
        "firefox-ubuntu",
        "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
        UserAgentInfo("desktop", "Firefox", "Ubuntu", False),
    ),
    (
        "edge-windows",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.80",
        UserAgentInfo("desktop", "Edge", "Windows", False),
    ),
    (
        "chrome-os",
        "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
        UserAgentInfo("desktop", "Chrome", "Chrome OS", False),
    ),
    (
        "ie11-tablet-pc-token",
        "Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; SLCC2; Media Center PC 6.0; "
        "Tablet PC 2.0; rv:11.0) like Gecko",
        UserAgentInfo("desktop", "IE", "Windows", False),
    ),
    (
        "xbox",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox One) AppleWebKit/537.36 (KHTML, "
        "like Gecko) Chrome/70.0.3538.102 Safari/537.36 Edge/18.19041",
        UserAgentInfo("other", "Edge", "Windows", False),
    ),
    (
        "samsung-smart-tv",
        "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/4.0 Chrome/76.0.3809.146 TV Safari/537.36",
        UserAgentInfo("other", "Samsung Internet", "Tizen", False),
    ),
    (
        "windows-phone",
        "Mozilla/5.0 (Windows Phone 10.0; Android 6.0.1; Microsoft; Lumia 950) "
        "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/52.0.2743.116 Mobile Safari/537.36 "
        "Edge/15.14977",
        UserAgentInfo("mobile", "Edge Mobile", "Windows Phone", False),
    ),
    (
        "googlebot-desktop",
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        UserAgentInfo("bot", "Googlebot", "", True),
    ),
    (
        "googlebot-smartphone",
        "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, "
        "like Gecko) Chrome/124.0.6367.118 Mobile Safari/537.36 (compatible; Googlebot/2.1; "
        "+http://www.google.com/bot.html)",
        UserAgentInfo("bot", "Googlebot", "Android", True),
    ),
    (
        "bingbot",
        "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        UserAgentInfo("bot", "bingbot", "", True),
    ),
    (
        "gptbot",
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; "
        "+https://openai.com/gptbot)",
        UserAgentInfo("bot", "GPTBot", "", True),
    ),
    (
        # ua-parser names this "com/bot"; the bot table supplies the real name
        "chatgpt-user",
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ChatGPT-User/1.0; "
        "+https://openai.com/bot)",
        UserAgentInfo("bot", "ChatGPT-User", "", True),
    ),
    (
        "claudebot",
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ClaudeBot/1.0; "
        "+claudebot@anthropic.com)",
        UserAgentInfo("bot", "ClaudeBot", "", True),
    ),
    (
        "perplexitybot",
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; PerplexityBot/1.0; "
        "+https://perplexity.ai/perplexitybot)",
        UserAgentInfo("bot", "PerplexityBot", "", True),
    ),
    (
        "uptimerobot",
        "Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)",
        UserAgentInfo("bot", "UptimeRobot", "", True),
    ),
    (
        "pingdom",
        "Pingdom.com_bot_version_1.4_(http://www.pingdom.com/)",
        UserAgentInfo("bot", "Pingdom", "", True),
    ),
    (
        "datadog-synthetics",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/120.0.0.0 Safari/537.36 DatadogSynthetics",
        UserAgentInfo("bot", "Datadog Synthetics", "Linux", True),
    ),
    (
        "headless-chrome",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/124.0.0.0 Safari/537.36",
        UserAgentInfo("bot", "HeadlessChrome", "Linux", True),
    ),
    (
        # ua-parser's own "Spider" regexes catch crawlers missing from BOT_TOKENS
        "generic-crawler",
        "Mozilla/5.0 (compatible; ExampleCrawler/1.0; +https://example.com/crawler)",
        UserAgentInfo("bot", "ExampleCrawler", "", True),
    ),
    ("curl", "curl/8.5.0", UserAgentInfo("bot", "curl", "", True)),
    ("wget", "Wget/1.21.4", UserAgentInfo("bot", "Wget", "", True)),
    (
        "python-requests",
        "python-requests/2.31.0",
        UserAgentInfo("bot", "Python Requests", "", True),
    ),
    ("go-http-client", "Go-http-client/1.1", UserAgentInfo("bot", "Go-http-client", "", True)),
    ("none", None, UserAgentInfo("", "", "", False)),
    ("empty", "", UserAgentInfo("", "", "", False)),
    ("garbage", "\x00\x01\xff garbage \u2603", UserAgentInfo("other", "", "", False)),
    ("lone-surrogate", "\ud800Mozilla\udfff", UserAgentInfo("other", "", "", False)),
]


@pytest.mark.parametrize(
    ("user_agent", "expected"),
    [pytest.param(ua, expected, id=case_id) for case_id, ua, expected in UA_CASES],
)
def test_parse_real_world_user_agents(
    parser: UserAgentParser, user_agent: str | None, expected: UserAgentInfo
) -> None:
    assert parser.parse(user_agent) == expected


def test_rust_resolver_is_the_best_available() -> None:
    # ua-parser picks ua-parser-rs ("regex" resolver) when installed; the module uses it
    assert ua_parser.BestAvailableResolver is ua_parser.regex.Resolver


def test_huge_user_agent_is_capped_and_fast(parser: UserAgentParser) -> None:
    huge = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) " + "A" * 10_000
    start = time.perf_counter()
    info = parser.parse(huge)
    assert time.perf_counter() - start < 0.5
    assert info == UserAgentInfo("mobile", "Mobile Safari UI/WKWebView", "iOS", False)
    # the cap keeps different tails past MAX_UA_LENGTH on one cache entry
    assert parser.parse(huge[:MAX_UA_LENGTH] + "different tail") is info


def test_cache_is_bounded() -> None:
    small = UserAgentParser(cache_size=8)
    for i in range(100):
        small.parse(f"Mozilla/5.0 (X11; Linux x86_64; rv:{i}.0) Gecko/20100101 Firefox/{i}.0")
    info = small.cache_info()
    assert info.maxsize == 8
    assert info.currsize == 8
    assert info.misses == 100
    repeated = "Mozilla/5.0 (X11; Linux x86_64; rv:99.0) Gecko/20100101 Firefox/99.0"
    assert small.parse(repeated) is small.parse(repeated)
    assert small.cache_info().hits == 2


def test_negative_cache_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        UserAgentParser(cache_size=-1)


# Any code point, lone surrogates included (ASGI servers can hand those through).
_any_text = st.text(st.characters(exclude_categories=()), max_size=2_000)
_header_bytes = st.binary(max_size=2_000).map(lambda b: b.decode("utf-8", "surrogateescape"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), _any_text, _header_bytes))
def test_parse_never_raises(parser: UserAgentParser, user_agent: str | None) -> None:
    info = parser.parse(user_agent)
    assert info.device_type in DEVICE_TYPES or (not user_agent and info.device_type == "")
    assert info.is_bot == (info.device_type == "bot")
