"""The User-Agent rule tables: bot tokens, and device types by ua-parser device family, device
brand, UA substring and OS family. Data only; processors/useragent.py applies them.

ua-parser 1.x resolves browser/OS/device *families*; it does not say what kind of device
sent the request, so ``device_type`` is derived from the data tables below, checked
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

from typing import Final

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
