"""The imported referrer lists (processors/referrer_data/) and the hand-kept table over them.

Cases come from the lists themselves: Snowplow's own referer-tests.json, entries of Matomo's
SearchEngines.yml / Socials.yml / AIAssistants.yml, rows of GA4's source-category list, and
the Android package ids Snowplow lists; never from an evaluation set.
"""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import pytest

from processors.classify import Classifier, default_classifier
from processors.classify_cli import run_classify_cli
from processors.referrers import CATEGORIES, HAND, LISTS_PATH, REFERRERS_PATH, Known, Referrers

SITE = "https://shop.example/"
DATA = Path(__file__).parents[1] / "processors" / "referrer_data"
# Snowplow medium -> the channel it means here (its "paid" section is not imported).
SNOWPLOW_CHANNEL = {
    "search": "Organic Search",
    "social": "Organic Social",
    "email": "Email",
    "chatbot": "AI Assistants",
    "unknown": "Referral",
}
SNOWPLOW_CASES = [
    pytest.param(case["uri"], SNOWPLOW_CHANNEL[case["medium"]], id=f"{case['spec']}-{n}")
    for n, case in enumerate(json.loads((DATA / "snowplow" / "referer-tests.json").read_text()))
    if case["medium"] in SNOWPLOW_CHANNEL
]


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return default_classifier()


def test_lists_json_is_current() -> None:
    from processors.referrer_import import build, render

    assert LISTS_PATH.read_text("utf-8") == render(build()), (
        "run `python -m processors.referrer_import` after changing a pinned list or referrers.toml"
    )


@pytest.mark.parametrize(("referrer", "channel"), SNOWPLOW_CASES)
def test_snowplow_documented_referrers(clf: Classifier, referrer: str, channel: str) -> None:
    # Snowplow's own test file: regional webmail and deref redirectors (GMX, Web.de, 1und1,
    # Orange, Bluewin, Ionos, TIM, Vodafone...), legacy search engines, social networks.
    c = clf.classify(SITE, referrer)
    assert c.channel == channel, c.why


@pytest.mark.parametrize(
    ("referrer", "channel", "source"),
    [
        # Matomo SearchEngines.yml: regional and legacy engines.
        ("https://www.abacho.de/", "Organic Search", "abacho"),
        ("https://so.360.cn/s?q=x", "Organic Search", "so360"),  # our name for 360 Search
        ("https://search.centrum.cz/?q=x", "Organic Search", "centrum"),
        ("https://search.nate.com/search/all.html?q=x", "Organic Search", "nate"),
        ("https://busca.uol.com.br/web/?q=x", "Organic Search", "uol_com_br"),
        ("https://pesquisa.sapo.pt/?q=x", "Organic Search", "sapo"),
        ("https://suche.freenet.de/suche/?query=x", "Organic Search", "freenet"),
        ("https://search.free.fr/google.pl?q=x", "Organic Search", "free"),
        ("https://search.tiscali.it/?q=x", "Organic Search", "tiscali"),
        ("https://kvasir.no/alle?q=x", "Organic Search", "kvasir"),
        ("https://www.neti.ee/cgi-bin/otsing?query=x", "Organic Search", "neti"),
        ("https://www.search.ch/?q=x", "Organic Search", "search_ch"),
        # Matomo Socials.yml: regional networks.
        ("https://badoo.com/", "Organic Social", "badoo"),
        ("https://www.meinvz.net/", "Organic Social", "meinvz"),
        ("https://nk.pl/", "Organic Social", "nasza_klasa_pl"),
        ("https://mixi.jp/", "Organic Social", "mixi"),
        ("https://www.tuenti.com/", "Organic Social", "tuenti"),
        ("https://www.viadeo.com/", "Organic Social", "viadeo"),
        ("https://moikrug.ru/", "Organic Social", "moikrug_ru"),
        ("https://renren.com/", "Organic Social", "renren"),
        # Matomo AIAssistants.yml; yiyan.baidu.com is more specific than our baidu.com.
        ("https://chatplus.com/", "AI Assistants", "chat"),
        ("https://app.jasper.ai/", "AI Assistants", "jasper"),
        ("https://app.writesonic.com/", "AI Assistants", "writesonic"),
        ("https://yiyan.baidu.com/", "AI Assistants", "baidu_ai"),
        # Snowplow "unknown": sites it knows that carry no channel stay Referral, named.
        ("https://maps.google.com/maps?q=x", "Referral", "google"),
        ("https://news.yahoo.com/x", "Referral", "yahoo"),
        ("https://maps.yandex.ru/", "Referral", "yandex_maps"),
        # GA4 source categories (rows of the CSV).
        ("https://www.360.cn/", "Organic Search", "so360"),  # named by our "360" alias
        ("https://biglobe.ne.jp/", "Organic Search", "biglobe"),
        ("https://iq.com/play/x", "Organic Video", "iq.com"),
        ("https://d.tube/", "Organic Video", "d.tube"),
        ("https://www.academia.edu/123", "Organic Social", "academia.edu"),
        ("https://checkout.stripe.com/c/pay", "Organic Shopping", "stripe"),
    ],
)
def test_list_referrers(clf: Classifier, referrer: str, channel: str, source: str) -> None:
    c = clf.classify(SITE, referrer)
    assert (c.channel, c.source) == (channel, source), c.why


@pytest.mark.parametrize(
    ("query", "channel"),
    [
        # GA4 Paid Shopping / Paid Video: a source of its shopping / video list and a paid
        # medium; all sources below are rows of GA4's list (IGShopping: Instagram shopping).
        ("utm_source=IGShopping&utm_medium=paid", "Paid Shopping"),
        ("utm_source=checkout.stripe.com&utm_medium=ppc", "Paid Shopping"),
        ("utm_source=shopping.naver.com&utm_medium=cpc", "Paid Shopping"),  # not naver search
        ("utm_source=shopping.yahoo.co.jp&utm_medium=cpc", "Paid Shopping"),  # not yahoo search
        ("utm_source=crackle&utm_medium=cpc", "Paid Video"),
        ("utm_source=curiositystream.com&utm_medium=cpc", "Paid Video"),
        ("utm_source=utreon&utm_medium=retargeting", "Paid Video"),
        ("utm_source=blogspot&utm_medium=cpc", "Paid Social"),
        ("utm_source=stripe", "Organic Shopping"),
    ],
)
def test_ga4_list_sources_in_utm(clf: Classifier, query: str, channel: str) -> None:
    c = clf.classify(f"{SITE}?{query}", None)
    assert c.channel == channel, c.why


@pytest.mark.parametrize(
    ("app", "channel", "source"),
    [
        # Android package ids listed in Snowplow's referers.yml (and Matomo's Socials.yml).
        ("com.aol.mobile.aolapp", "Email", "aol_mail"),
        ("com.earthlink.myearthlink", "Email", "earthlink"),
        ("com.mailchimp.mailchimp", "Email", "mailchimp"),
        ("com.laurencedawson.reddit_sync", "Organic Social", "reddit"),
        ("io.github.hidroh.materialistic", "Organic Social", "hacker_news"),
        ("org.telegram.messenger.web", "Organic Social", "telegram"),
        ("com.talklittle.android.tildes", "Organic Social", "tildes"),
        ("linkedin.android", "Organic Social", "linkedin"),
    ],
)
def test_android_app_ids_from_lists(clf: Classifier, app: str, channel: str, source: str) -> None:
    c = clf.classify(SITE, f"android-app://{app}/")
    assert (c.channel, c.source) == (channel, source), c.why


@pytest.mark.parametrize(
    ("app", "channel", "source"),
    [
        # App ids of PostHog's channel definitions (GA4's list with apps), in no other list.
        ("com.instagram.lite", "Organic Social", "instagram"),
        ("com.linkedin.android.learning", "Organic Social", "linkedin"),
        ("com.quoord.tapatalk", "Organic Social", "com.quoord.tapatalk"),
        ("com.google.android.apps.youtube.music", "Organic Video", "youtube"),
        ("tv.twitch.android.app", "Organic Video", "twitch"),
        ("in.amazon.mshop.android.shopping", "Organic Shopping", "amazon"),
        ("com.etsy.android", "Organic Shopping", "etsy"),
        ("ru.yandex.mobile.search", "Organic Search", "yandex"),
        ("com.microsoft.outlooklite", "Email", "com.microsoft.outlooklite"),
        ("com.apple.mobilemail", "Email", "com.apple.mobilemail"),
    ],
)
def test_posthog_app_ids(clf: Classifier, app: str, channel: str, source: str) -> None:
    c = clf.classify(SITE, f"android-app://{app}/")
    assert (c.channel, c.source) == (channel, source), c.why
    assert "PostHog channel definitions" in c.why


@pytest.mark.parametrize(
    ("source", "medium", "channel"),
    [
        # GA4's Paid Shopping / Paid Video over an app id PostHog lists as shopping / video.
        ("com.shopify.mobile", "cpc", "Paid Shopping"),
        ("com.netflix.mediaclient", "paid", "Paid Video"),
        ("com.pinterest.lite", "cpc", "Paid Social"),
    ],
)
def test_posthog_app_ids_in_utm(clf: Classifier, source: str, medium: str, channel: str) -> None:
    c = clf.classify(f"{SITE}?utm_source={source}&utm_medium={medium}", None)
    assert c.channel == channel, c.why


@pytest.mark.parametrize(
    ("host", "pattern"),
    [
        ("mail.isp.example", "mail.*"),
        ("mail07.isp.example", "mail[0-9]*.*"),
        ("webmail3.isp.example", "webmail*.*"),
        ("de.webmail.isp.example", "*.webmail.*"),
        ("lx1.mail.isp.example", "*.mail.*"),
        ("email.isp.example", "email.*"),
        ("deref-isp.example", "deref-*"),
    ],
)
def test_email_host_patterns(clf: Classifier, host: str, pattern: str) -> None:
    # Hosts in no list: the hand-kept pattern decides, and the source is the host itself.
    c = clf.classify(SITE, f"https://{host}/x")
    assert (c.channel, c.source) == ("Email", host)
    assert f"{HAND} {pattern!r}" in c.why


def test_patterns_come_after_the_lists(clf: Classifier) -> None:
    # go.mail.ru is a search engine (referrers.toml) and my.mail.ru a social network (Matomo),
    # though both match the "*.mail.*" pattern.
    assert clf.classify(SITE, "https://go.mail.ru/search?q=x").channel == "Organic Search"
    assert clf.classify(SITE, "https://my.mail.ru/").channel == "Organic Social"


def _lookup(refs: Referrers, kind: str, key: str) -> Known | None:
    """What the tables give for a list-style key: a stem under one ccTLD, an alias or a host."""
    if kind == "wildcards":
        return refs.lookup_host(f"{key}.de")
    return refs.lookup_source(key) if kind == "aliases" else refs.lookup_host(key)


def test_every_hand_kept_entry_wins() -> None:
    from processors.referrer_import import _key, groups

    refs, hand = Referrers(), Referrers(REFERRERS_PATH, lists_path=None)
    checked = 0
    for group in groups():
        for entry in group.entries:
            if (parsed := _key(entry)) is None or (known := hand.hand_entry(*parsed)) is None:
                continue
            assert _lookup(refs, *parsed) == known, (group, entry)
            checked += 1
    assert checked > 300  # e.g. mail.yandex.ru: Email here, SOURCE_CATEGORY_SEARCH in GA4's list


def test_every_hand_kept_line_wins_and_says_why() -> None:
    # Every entry of every referrers.toml line (listed or not) and every app id resolves to
    # that line's source with the lists loaded; every line has its reason, and a line that
    # changes the category a list gives one of its keys says which list it overrides.
    from processors.referrer_import import LISTS, _key, groups

    table = tomllib.loads(REFERRERS_PATH.read_text("utf-8"))
    refs = Referrers()
    listed: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for group in groups():
        for entry in group.entries:
            if (parsed := _key(entry)) is not None:
                listed.setdefault(parsed, set()).add((group.list, group.category))
    overrides = 0
    for category in CATEGORIES:
        for name, line in table[category].items():
            why = refs.reasons[name]
            assert why == line["why"] and len(why) >= 10, name
            for entry in (name, *line["entries"]):
                kind, key = _key(entry.replace(".*", ".{}")) or ("", "")
                assert _lookup(refs, kind, key) == Known(name, category), (name, entry)
                others = {lid for lid, cat in listed.get((kind, key), ()) if cat != category}
                if kind == "wildcards":
                    others |= {lid for lid, cat in listed.get(("hosts", f"{key}.com"), ())
                               if cat != category}  # fmt: skip
                for lid in others:
                    assert why.startswith("overrides") and LISTS[lid].split()[0] in why, (
                        name, entry, lid, why)  # fmt: skip
                    overrides += 1
    for app, line in table["apps"].items():
        assert len(refs.reasons[app.lower()]) >= 10, app
        resolved = refs.resolve("android-app", app)
        assert resolved is not None and resolved.source == line["source"], (app, resolved)
    assert overrides >= 15  # e.g. youtube.com: social in Snowplow and Matomo, video here


def test_every_list_entry_is_reachable() -> None:
    # No list key is shadowed by another entry: each resolves to its own source.
    refs = Referrers()
    doc = json.loads(LISTS_PATH.read_text("utf-8"))
    for src in doc["sources"]:
        for host in src.get("hosts", []):
            got = refs.lookup_host(host) if "." in host else None
            assert got is not None and got.name == src["name"], (src["display"], host, got)
        for alias in src.get("aliases", []):
            assert refs.lookup_source(alias).name == src["name"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("url", "referrer", "channel"),
    [
        # Curated click-id and utm rules stay ahead of any list-derived referrer.
        (f"{SITE}?gclid=EAIa", "https://deref-gmx.net/mail/client/x", "Paid Search"),
        (f"{SITE}?utm_source=newsletter&utm_medium=email", "https://www.abacho.de/", "Email"),
        (f"{SITE}?utm_source=abacho.de&utm_medium=cpc", "https://www.abacho.de/", "Paid Search"),
    ],
)
def test_curated_rules_beat_list_referrers(
    clf: Classifier, url: str, referrer: str, channel: str
) -> None:
    assert clf.classify(url, referrer).channel == channel


def test_cli_names_the_list() -> None:
    out = io.StringIO()
    assert run_classify_cli(SITE, "https://deref-gmx.net/mail/client/x", io.StringIO(), out) == 0
    result = json.loads(out.getvalue())
    assert (result["channel"], result["source"]) == ("Email", "gmx")
    assert "Snowplow referer-parser: GMX" in result["why"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "lists.json"),
        ('{"lists": {}, "sources": [{"list": "x", "display": "X", "name": "x",'
         ' "category": "search", "hosts": ["x.example"]}]}', "unknown list 'x'"),
        ('{"lists": {"x": "X"}, "sources": [{"list": "x", "display": "X", "name": "x",'
         ' "category": "webmail"}]}', "category"),
    ],
)  # fmt: skip
def test_bad_lists_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "lists.json"
    bad.write_text(text)
    with pytest.raises(ValueError, match=message):
        Referrers(REFERRERS_PATH, bad)
