"""Tests for the traffic-source classifier (processors/classify.py, its rule table in
processors/attribution_rules.py, its command in processors/classify_cli.py).

Sources of the expected values, cited per case:
  GA4       "[GA4] Default channel group", support.google.com/analytics/answer/9756891
  PostHog   posthog/hogql/database/schema/channel_type.py and posthog.com/docs/data/channel-type
  Snowplow  snowplow/referer-parser referers.yml and the Snowplow referer-parser enrichment docs
  Matomo    matomo-org/searchengine-and-social-list
"""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.attribution_rules import ATTRIBUTION_PATH, Channel, RuleError
from processors.classify import (
    CLASSIFIER_VERSION,
    Classification,
    Classifier,
    default_classifier,
)
from processors.classify_cli import run_classify_cli
from processors.referrers import Referrers, clean_host

SITE = "https://shop.example/landing"
CHANNELS = set(get_args(Channel))


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return default_classifier()


# One row per built-in rule: (rule id, url, referrer, channel, source, medium).
RULE_ROWS = [
    # GA4: Direct = source (direct) and medium (none)/(not set).
    ("ga4.direct", SITE, None, "Direct", "(direct)", "(none)"),
    # GA4 reads the ad network of a dclid (CM360/DV360) as DISPLAY.
    ("click.google_display", f"{SITE}?dclid=CJ1x", None, "Display", "google", "cpc"),
    # GA4/PostHog: gclid means a Google Ads click even with an organic-looking referrer.
    (
        "click.google_ads",
        f"{SITE}?gclid=EAIaIQ",
        "https://www.google.com/",
        "Paid Search",
        "google",
        "cpc",
    ),
    # Microsoft Ads auto-tagging (msclkid), treated like gclid.
    ("click.bing_yandex_ads", f"{SITE}?msclkid=9f8e", None, "Paid Search", "bing", "cpc"),
    # GA4: campaign name contains "cross-network".
    (
        "ga4.cross_network",
        f"{SITE}?utm_source=google&utm_medium=cpc&utm_campaign=Q3_Cross-Network",
        None,
        "Cross-network",
        "google",
        "cpc",
    ),
    # GA4 Paid Shopping: shopping source + paid medium regex.
    (
        "ga4.paid_shopping.source",
        f"{SITE}?utm_source=amazon&utm_medium=cpc",
        None,
        "Paid Shopping",
        "amazon",
        "cpc",
    ),
    # GA4 Paid Shopping: campaign regex ^(.*(([^a-df-z]|^)shop|shopping).*)$ + paid medium.
    (
        "ga4.paid_shopping.campaign",
        f"{SITE}?utm_source=adnet&utm_medium=paid&utm_campaign=summer-shop",
        None,
        "Paid Shopping",
        "adnet",
        "paid",
    ),
    (
        "ga4.paid_search",
        f"{SITE}?utm_source=bing&utm_medium=ppc",
        None,
        "Paid Search",
        "bing",
        "ppc",
    ),
    (
        "ga4.paid_social",
        f"{SITE}?utm_source=facebook&utm_medium=paid_social&fbclid=IwAR1",
        None,
        "Paid Social",
        "facebook",
        "paid_social",
    ),
    # GA4 paid regex ^(.*cp.*|...)$ matches "cpv".
    (
        "ga4.paid_video",
        f"{SITE}?utm_source=youtube&utm_medium=cpv",
        None,
        "Paid Video",
        "youtube",
        "cpv",
    ),
    (
        "ga4.display",
        f"{SITE}?utm_source=dv360&utm_medium=banner",
        None,
        "Display",
        "dv360",
        "banner",
    ),
    (
        "ga4.paid_other",
        f"{SITE}?utm_source=adnet&utm_medium=cpa",
        None,
        "Paid Other",
        "adnet",
        "cpa",
    ),
    # Not a GA4 default rule: the project's "AI Assistants" channel (see the rule's why).
    ("ai.assistant", SITE, "https://chatgpt.com/", "AI Assistants", "chatgpt", "referral"),
    # Snowplow referer-parser lists mail.google.com under medium "email".
    ("email.webmail", SITE, "https://mail.google.com/mail/u/0/", "Email", "gmail", "referral"),
    (
        "ga4.organic_shopping.source",
        SITE,
        "https://www.amazon.de/dp/B0",
        "Organic Shopping",
        "amazon",
        "referral",
    ),
    (
        "ga4.organic_shopping.campaign",
        f"{SITE}?utm_source=partner&utm_campaign=Holiday%20Shop",
        None,
        "Organic Shopping",
        "partner",
        "(not set)",
    ),
    (
        "ga4.organic_social.source",
        SITE,
        "https://t.co/abc",
        "Organic Social",
        "twitter",
        "referral",
    ),
    (
        "ga4.organic_social.medium",
        f"{SITE}?utm_source=forum&utm_medium=social",
        None,
        "Organic Social",
        "forum",
        "social",
    ),
    (
        "ga4.organic_video.source",
        SITE,
        "https://www.youtube.com/watch?v=x",
        "Organic Video",
        "youtube",
        "referral",
    ),
    (
        "ga4.organic_video.medium",
        f"{SITE}?utm_source=partner&utm_medium=video_embed",
        None,
        "Organic Video",
        "partner",
        "video_embed",
    ),
    (
        "ga4.organic_search.source",
        SITE,
        "https://duckduckgo.com/",
        "Organic Search",
        "duckduckgo",
        "organic",
    ),
    (
        "ga4.organic_search.medium",
        f"{SITE}?utm_source=directory&utm_medium=organic",
        None,
        "Organic Search",
        "directory",
        "organic",
    ),
    (
        "ga4.referral",
        SITE,
        "https://news.example.org/a/1",
        "Referral",
        "news.example.org",
        "referral",
    ),
    (
        "ga4.email.source",
        f"{SITE}?utm_source=email&utm_campaign=june",
        None,
        "Email",
        "email",
        "(not set)",
    ),
    (
        "ga4.email.medium",
        f"{SITE}?utm_source=newsletter&utm_medium=e-mail",
        None,
        "Email",
        "newsletter",
        "e-mail",
    ),
    (
        "ga4.affiliates",
        f"{SITE}?utm_source=partner&utm_medium=affiliate",
        None,
        "Affiliates",
        "partner",
        "affiliate",
    ),
    ("ga4.audio", f"{SITE}?utm_source=spotify&utm_medium=audio", None, "Audio", "spotify", "audio"),
    ("ga4.sms.source", f"{SITE}?utm_source=sms", None, "SMS", "sms", "(not set)"),
    ("ga4.sms.medium", f"{SITE}?utm_source=twilio&utm_medium=sms", None, "SMS", "twilio", "sms"),
    (
        "ga4.push.medium_suffix",
        f"{SITE}?utm_source=app&utm_medium=web-push",
        None,
        "Mobile Push Notifications",
        "app",
        "web-push",
    ),
    (
        "ga4.push.medium_contains",
        f"{SITE}?utm_source=app&utm_medium=notification",
        None,
        "Mobile Push Notifications",
        "app",
        "notification",
    ),
    (
        "ga4.push.source",
        f"{SITE}?utm_source=firebase",
        None,
        "Mobile Push Notifications",
        "firebase",
        "(not set)",
    ),
    # GA4: an unknown source with an unknown medium is Unassigned.
    ("ga4.unassigned", f"{SITE}?utm_source=foo&utm_medium=bar", None, "Unassigned", "foo", "bar"),
]


@pytest.mark.parametrize(
    ("rule_id", "url", "referrer", "channel", "source", "medium"),
    RULE_ROWS,
    ids=[row[0] for row in RULE_ROWS],
)
def test_each_rule(
    clf: Classifier,
    rule_id: str,
    url: str,
    referrer: str | None,
    channel: str,
    source: str,
    medium: str,
) -> None:
    c = clf.classify(url, referrer)
    assert (c.source_rule_id, c.channel, c.source, c.medium) == (rule_id, channel, source, medium)
    assert c.why.startswith(next(r["why"] for r in _builtin_rules() if r["id"] == rule_id))


def _builtin_rules() -> list[dict]:
    return tomllib.loads(ATTRIBUTION_PATH.read_text("utf-8"))["rules"]


def test_every_builtin_rule_has_a_row() -> None:
    assert {r["id"] for r in _builtin_rules()} == {row[0] for row in RULE_ROWS}


def test_version_and_channels() -> None:
    table = tomllib.loads(ATTRIBUTION_PATH.read_text("utf-8"))
    assert CLASSIFIER_VERSION == table["version"] == default_classifier().version
    assert {r["channel"] for r in table["rules"]} == CHANNELS  # every channel is reachable


@pytest.mark.parametrize(
    ("url", "referrer", "expected"),
    [
        # PostHog channel_type.py: fbclid is added to paid and organic clicks -> Organic Social.
        (
            f"{SITE}?fbclid=IwAR0abc",
            None,
            ("facebook", "referral", "Organic Social", "IwAR0abc", "facebook"),
        ),
        (
            f"{SITE}?fbclid=IwAR0abc",
            "https://l.facebook.com/",
            ("facebook", "referral", "Organic Social", "IwAR0abc", "facebook"),
        ),
        # GA4 social list includes "fb"; paid needs a paid medium.
        (
            f"{SITE}?utm_source=fb&utm_medium=paid&fbclid=x1",
            None,
            ("fb", "paid", "Paid Social", "x1", "facebook"),
        ),
        # utm beats click ids: the id is still recorded.
        (
            f"{SITE}?gclid=g1&utm_source=newsletter&utm_medium=email",
            None,
            ("newsletter", "email", "Email", "g1", "google_ads"),
        ),
        (f"{SITE}?gbraid=b1", None, ("google", "cpc", "Paid Search", "b1", "google_ads")),
        (f"{SITE}?wbraid=w1", None, ("google", "cpc", "Paid Search", "w1", "google_ads")),
        (f"{SITE}?gad_source=1", None, ("google", "cpc", "Paid Search", "1", "google_ads")),
        (
            f"{SITE}?gad_source=1&gclid=g2",
            None,
            ("google", "cpc", "Paid Search", "g2", "google_ads"),
        ),
        (f"{SITE}?yclid=y1", None, ("yandex", "cpc", "Paid Search", "y1", "yandex_direct")),
        (f"{SITE}?ttclid=t1", None, ("tiktok", "referral", "Organic Social", "t1", "tiktok")),
        (
            f"{SITE}?li_fat_id=l1",
            None,
            ("linkedin", "referral", "Organic Social", "l1", "linkedin"),
        ),
        (f"{SITE}?mc_cid=m1", None, ("mailchimp", "email", "Email", "m1", "mailchimp")),
        (
            f"{SITE}?irclickid=i1",
            "https://deals.example.net/",
            ("impact", "affiliate", "Affiliates", "i1", "impact"),
        ),
        (
            f"{SITE}?twclid=w2",
            "https://blog.example.net/",  # a real referrer beats an organic id
            ("blog.example.net", "referral", "Referral", "w2", "twitter"),
        ),
        (f"{SITE}?gclid=", None, ("(direct)", "(none)", "Direct", "", "")),  # empty id is no id
    ],
)
def test_click_ids(clf: Classifier, url: str, referrer: str | None, expected: tuple) -> None:
    c = clf.classify(url, referrer)
    assert (c.source, c.medium, c.channel, c.click_id, c.click_id_network) == expected


@pytest.mark.parametrize(
    ("url", "referrer", "source", "channel"),
    [
        # Internal referrers never make a source; like Snowplow (internalDomains must be listed)
        # only the landing host itself, ignoring "www.", is internal - not its sub-domains.
        ("https://www.shop.example/", "https://shop.example/cart", "(direct)", "Direct"),
        ("https://shop.example/", "http://WWW.SHOP.EXAMPLE:8080/x", "(direct)", "Direct"),
        ("https://shop.example/", "https://blog.shop.example/", "blog.shop.example", "Referral"),
        # utm always beats the referrer (GA4 manual tagging precedence).
        (
            f"{SITE}?utm_source=Newsletter&utm_medium=Email",
            "https://www.google.com/",
            "newsletter",
            "Email",
        ),
        # No scheme, mixed case keys and values.
        ("shop.example/p?UTM_SOURCE=Google&Utm_Medium=CPC", None, "google", "Paid Search"),
        (
            "HTTPS://SHOP.EXAMPLE/",
            "HTTPS://WWW.GOOGLE.CO.UK/search?q=x",
            "google",
            "Organic Search",
        ),
        # utm in the fragment, also behind a hash-router path.
        ("https://shop.example/#utm_source=news&utm_medium=email", None, "news", "Email"),
        ("https://shop.example/#/p?utm_source=bing&utm_medium=cpc", None, "bing", "Paid Search"),
        ("https://shop.example/#utm_source=news&utm_medium=email?x=1", None, "news", "Email"),
        # Percent-encoded keys/values, HTML-escaped separators, fully encoded URL.
        (f"{SITE}?utm%5Fsource=news%20letter&utm_medium=e%2Dmail", None, "news letter", "Email"),
        (f"{SITE}?a=1&amp;utm_source=z&amp;utm_medium=sms", None, "z", "SMS"),
        ("https%3A%2F%2Fshop.example%2F%3Futm_source%3Dy%26utm_medium%3Daudio", None, "y", "Audio"),
        # Android app referrers: the package id maps to the app's web source (GA4 would report
        # e.g. com.google.android.gm / referral; we follow the Email/Search meaning instead).
        (SITE, "android-app://com.google.android.gm/", "gmail", "Email"),
        (
            SITE,
            "android-app://com.google.android.googlequicksearchbox/https/www.google.com",
            "google",
            "Organic Search",
        ),
        (SITE, "android-app://com.facebook.katana/", "facebook", "Organic Social"),
        (SITE, "android-app://org.example.reader/", "org.example.reader", "Referral"),
        # IDN hosts: punycode and Unicode spellings give the same Unicode source.
        (SITE, "https://xn--bcher-kva.example/", "bücher.example", "Referral"),
        (SITE, "https://Bücher.example/", "bücher.example", "Referral"),
        ("https://bücher.example/", "https://xn--bcher-kva.example/", "(direct)", "Direct"),
        # Junk referrers count as none.
        (SITE, "about:blank", "(direct)", "Direct"),
        (SITE, "null", "(direct)", "Direct"),
        (SITE, "javascript:alert(1)", "(direct)", "Direct"),
        # GA4: source-list rules also apply to utm_source with no medium.
        (f"{SITE}?utm_source=google", None, "google", "Organic Search"),
        (f"{SITE}?utm_source=unknown-thing", None, "unknown-thing", "Unassigned"),
        (f"{SITE}?utm_medium=email", None, "(not set)", "Email"),
    ],
)
def test_resolution(
    clf: Classifier, url: str, referrer: str | None, source: str, channel: str
) -> None:
    c = clf.classify(url, referrer)
    assert (c.source, c.channel) == (source, channel), c.why


@pytest.mark.parametrize(
    ("referrer", "source", "channel"),
    [
        # AI assistants (vendor domains); the longest listed suffix beats the google.* wildcard.
        ("https://chat.openai.com/", "chatgpt", "AI Assistants"),
        ("https://www.perplexity.ai/search/x", "perplexity", "AI Assistants"),
        ("https://claude.ai/chat/1", "claude", "AI Assistants"),
        ("https://gemini.google.com/app", "gemini", "AI Assistants"),
        ("https://copilot.microsoft.com/", "copilot", "AI Assistants"),
        # Webmail (Snowplow "email" medium).
        ("https://outlook.live.com/mail/0/", "outlook", "Email"),
        ("https://mail.yahoo.com/d/folders/1", "yahoo_mail", "Email"),
        # Search (GA4 / Matomo lists), wildcard TLDs.
        ("https://www.google.com.br/", "google", "Organic Search"),
        ("https://www.bing.com/search?q=x", "bing", "Organic Search"),
        ("https://yandex.ru/search/", "yandex", "Organic Search"),
        ("https://search.yahoo.co.jp/", "yahoo", "Organic Search"),
        ("https://google.evil.com/", "google.evil.com", "Referral"),
        # Social (GA4 social list).
        ("https://m.facebook.com/", "facebook", "Organic Social"),
        ("https://lm.facebook.com/l.php", "facebook", "Organic Social"),
        ("https://out.reddit.com/t3_x", "reddit", "Organic Social"),
        ("https://www.linkedin.com/feed/", "linkedin", "Organic Social"),
        ("https://news.ycombinator.com/item?id=1", "hacker_news", "Organic Social"),
        ("https://youtu.be/abc", "youtube", "Organic Video"),
        ("https://www.ebay.co.uk/itm/1", "ebay", "Organic Shopping"),
    ],
)
def test_referrer_table(clf: Classifier, referrer: str, source: str, channel: str) -> None:
    c = clf.classify(SITE, referrer)
    assert (c.source, c.channel) == (source, channel)


def test_chatgpt_utm_source(clf: Classifier) -> None:
    # ChatGPT appends utm_source=chatgpt.com to outbound links (no medium).
    c = clf.classify(f"{SITE}?utm_source=chatgpt.com", None)
    assert (c.source, c.medium, c.channel) == ("chatgpt.com", "(not set)", "AI Assistants")


def test_campaign_beside_the_url_counts_as_utm_unless_the_url_has_its_own(clf: Classifier) -> None:
    campaign = {"utm_source": "Newsletter", "utm_medium": "email", "utm_campaign": "spring"}
    c = clf.classify("https://shop.example/", "https://www.google.com/", campaign)
    assert (c.source, c.medium, c.campaign, c.channel) == ("newsletter", "email", "spring", "Email")
    tagged = "https://shop.example/?utm_source=facebook&utm_medium=cpc"
    c = clf.classify(tagged, None, campaign)
    assert (c.source, c.medium, c.campaign) == ("facebook", "cpc", "")


def test_long_and_malformed_urls(clf: Classifier) -> None:
    long_url = f"{SITE}?{'x=1&' * 25_000}utm_source=bing&utm_medium=cpc&utm_campaign={'c' * 5000}"
    c = clf.classify(long_url, "h" * 100_000)
    assert (c.source, c.channel) == ("bing", "Paid Search")
    assert len(c.campaign) == 500  # capped
    for junk in ("", "?", "%", "http://[::1", "://", "#&=&==", "http://exa mple.com/?utm_source"):
        assert clf.classify(junk, junk).channel in CHANNELS


def test_extra_rules_run_first() -> None:
    clf = Classifier(
        [
            {
                "id": "project.newsletter",
                "channel": "Email",
                "confidence": 1.0,
                "utm_source": ["newsletter"],
                "why": "Our newsletter tool sets no medium.",
            }
        ]
    )
    c = clf.classify(f"{SITE}?utm_source=Newsletter&utm_medium=cpc", None)
    assert (c.channel, c.source_rule_id, c.source_confidence) == (
        "Email",
        "project.newsletter",
        1.0,
    )
    assert c.why.startswith("Our newsletter tool")
    assert clf.classify(f"{SITE}?utm_source=bing&utm_medium=cpc", None).channel == "Paid Search"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"id": "p.x", "channel": "Nope", "confidence": 1, "medium": ["a"], "why": "w"}, "channel"),
        (
            {"id": "p.x", "channel": "Email", "confidence": 2, "medium": ["a"], "why": "w"},
            "confidence",
        ),
        (
            {"id": "p.x", "channel": "Email", "confidence": 1, "medium_regex": "(", "why": "w"},
            "invalid regex",
        ),
        ({"id": "p.x", "channel": "Email", "confidence": 1, "mediun": ["a"], "why": "w"}, "mediun"),
        ({"id": "p.x", "channel": "Email", "confidence": 1, "why": "w"}, "no condition"),
        (
            {"id": "ga4.direct", "channel": "Email", "confidence": 1, "medium": ["a"], "why": "w"},
            "unique",
        ),
    ],
)
def test_bad_extra_rule_is_a_clear_error(rule: dict, message: str) -> None:
    with pytest.raises(RuleError, match=message) as info:
        Classifier([rule])
    assert "p.x" in str(info.value) or message == "unique"


def test_bad_builtin_table_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "attribution.toml"
    bad.write_text(
        'version = "x"\nclick_ids = []\n[[rules]]\nid = "r"\nchannel = "Email"\n'
        'confidence = 1.0\nwhy = "w"\nsource_category = ["webmail"]\n'
    )
    with pytest.raises(RuleError, match="source_category"):
        Classifier(rules_path=bad)


def test_referrer_table_loads_and_is_large() -> None:
    sizes = Referrers().sizes()
    assert sizes["domains"] + sizes["wildcards"] >= 300
    assert sizes["apps"] >= 20


def test_referrer_table_rejects_duplicates(tmp_path: Path) -> None:
    bad = tmp_path / "referrers.toml"
    bad.write_text(
        'apps = {}\nsearch = { a = { entries = ["x.com"], why = "vendor site: search engine" } }\n'
        'social = { b = { entries = ["x.com"], why = "vendor site: a social network" } }\n'
        "video = {}\nshopping = {}\nemail = {}\nai_assistant = {}\n"
    )
    with pytest.raises(ValueError, match=r"x\.com"):
        Referrers(bad)


def test_clean_host() -> None:
    assert clean_host("User:pw@WWW.Example.COM.:443") == "example.com"
    assert clean_host("localhost") == ""  # a dotless host is not a usable source


def test_as_dict_is_json_ready(clf: Classifier) -> None:
    c = clf.classify(f"{SITE}?gclid=abc", None)
    d = clf.as_dict(c)
    assert json.loads(json.dumps(d)) == d
    assert d["classifier_version"] == CLASSIFIER_VERSION
    assert set(d) == {*Classification.__dataclass_fields__, "classifier_version"}
    with pytest.raises(AttributeError):
        c.source = "x"  # type: ignore[misc]


def test_cli_single_url() -> None:
    out = io.StringIO()
    assert run_classify_cli(f"{SITE}?utm_source=z&utm_medium=sms", None, io.StringIO(), out) == 0
    assert json.loads(out.getvalue())["channel"] == "SMS"


def test_cli_json_lines_keeps_order_and_reports_bad_lines() -> None:
    lines = [
        json.dumps({"url": SITE, "referrer": "https://www.google.com/"}),
        "{not json",
        "",
        json.dumps([1]),
        json.dumps({"url": 5}),
        json.dumps({"url": f"{SITE}?gclid=1"}),
        "[" * 100_000,
    ]
    out = io.StringIO()
    assert run_classify_cli(None, None, io.StringIO("\n".join(lines) + "\n"), out) == 1
    results = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r.get("channel", "error" if "error" in r else None) for r in results] == [
        "Organic Search",
        "error",
        "error",
        "error",
        "Paid Search",
        "error",
    ]
    assert [r["line"] for r in results if "error" in r] == [2, 4, 5, 7]


_URLISH = st.builds(
    lambda scheme, host, sep, params, tail: f"{scheme}{host}{sep}{params}{tail}",
    st.sampled_from(["", "http://", "https://", "//", "android-app://", "HTTPS://", "ftp:/"]),
    st.one_of(
        st.sampled_from(
            [
                "www.google.com",
                "xn--bcher-kva.example",
                "bücher.example",
                "[::1]:80",
                "chatgpt.com",
                "a..b",
                "shop.example",
                "",
            ]
        ),
        st.text(max_size=30),
    ),
    st.sampled_from(["", "/", "?", "#", "/p?", "#/r?", "%3F"]),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "utm_source",
                    "UTM_MEDIUM",
                    "utm_campaign",
                    "gclid",
                    "fbclid",
                    "dclid",
                    "utm%5Fsource",
                    "amp;utm_medium",
                ]
            ),
            st.text(max_size=20),
        ),
        max_size=5,
    ).map(lambda kv: "&".join(f"{k}={v}" for k, v in kv)),
    st.text(max_size=20),
)


@settings(max_examples=400, deadline=None)
@given(
    url=st.one_of(st.none(), st.text(), _URLISH), referrer=st.one_of(st.none(), st.text(), _URLISH)
)
def test_never_raises(url: str | None, referrer: str | None) -> None:
    clf = default_classifier()
    c = clf.classify(url, referrer)
    assert c.channel in CHANNELS and 0.0 <= c.source_confidence <= 1.0
    assert c.source and c.medium and c.source_rule_id
    json.dumps(clf.as_dict(c))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n\r")), max_size=8))
def test_cli_never_crashes(lines: list[str]) -> None:
    out = io.StringIO()
    run_classify_cli(None, None, io.StringIO("".join(f"{line}\n" for line in lines)), out)
    assert len(out.getvalue().splitlines()) == sum(1 for line in lines if line.strip())
