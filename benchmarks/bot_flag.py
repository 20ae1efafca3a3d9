"""The bot flag's cost per User-Agent, and the detectors it was chosen from.

    python benchmarks/bot_flag.py [--agents 20000]

Classifies each agent once, without a cache, with the detector the service
uses (uap-core's device patterns through ua-parser-rs), and with
crawlerdetect and ua-parser's pure-Python resolver when they are installed
(``pip install crawlerdetect``; neither is a dependency). Agents: --agents
distinct browser-shaped ones (as pipeline_capacity.py --distinct-agents
makes), 500 of 1024 random characters (the length the record keeps), and
lists of known crawlers, tools and browsers, whose verdicts are printed.
Then the service's cached ``BotDetector.is_bot`` on repeated agents, and
``Enricher.encode`` per record with records.bot_detection off and on.
Bounded: a fixed number of agents.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from pipeline_capacity import distinct_agents
from redirect_logger.bots import BotDetector
from redirect_logger.config import parse_settings
from redirect_logger.hits import Enricher, Hit

BOTS = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like"
    " Gecko) Chrome/131.0.6778.204 Mobile Safari/537.36 (compatible; Googlebot/2.1;"
    " +http://www.google.com/bot.html)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0;"
    " +http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "Slackbot 1.0 (+https://api.slack.com/robots)",
    "Twitterbot/1.0",
    "LinkedInBot/1.0 (compatible; Mozilla/5.0; Apache-HttpClient +http://www.linkedin.com)",
    "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
    "WhatsApp/2.23.20.0",
    "TelegramBot (like TwitterBot)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) AppleWebKit/605.1.15 (KHTML, like Gecko)"
    " Version/13.1.1 Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2;"
    " +https://openai.com/gptbot)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ClaudeBot/1.0;"
    " +claudebot@anthropic.com)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)",
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    "DuckDuckBot/1.1; (+http://duckduckgo.com/duckduckbot.html)",
    "Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)",
    "Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)",
    "Scrapy/2.11.2 (+https://scrapy.org)",
    "Java/17.0.12",
]
TOOLS = [  # HTTP client libraries, command-line tools, headless browsers
    "curl/8.5.0",
    "Wget/1.21.4",
    "python-requests/2.32.3",
    "python-httpx/0.27.2",
    "Python/3.11 aiohttp/3.10.5",
    "Go-http-client/2.0",
    "okhttp/4.12.0",
    "axios/1.7.7",
    "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
    "libwww-perl/6.77",
    "PostmanRuntime/7.42.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " HeadlessChrome/131.0.0.0 Safari/537.36",
]
BROWSERS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like"
    " Gecko) Version/18.1.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
    " Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko)"
    " SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/130.0.0.0 Safari/537.36 OPR/115.0.0.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like"
    " Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like"
    " Gecko) Mobile/15E148 Instagram 352.0.0.20.108 (iPhone14,5; iOS 17_6_1; en_US; en;"
    " scale=3.00; 1170x2532; 657480226)",
]


def detectors() -> dict[str, Callable[[str], bool]]:
    """The detectors installed here, each a verdict function without a cache."""
    found: dict[str, Callable[[str], bool]] = {}
    service = BotDetector(cache_size=1)
    found["ua-parser-rs (the service's)"] = service._match
    try:
        from crawlerdetect import CrawlerDetect
    except ImportError:
        pass
    else:
        crawlers = CrawlerDetect()
        found["crawlerdetect"] = lambda agent: crawlers._check_crawler(agent.strip())[0]
    try:
        from ua_parser import Domain, load_builtins
        from ua_parser.basic import Resolver
    except ImportError:
        pass
    else:
        basic = Resolver(load_builtins())

        def spider(agent: str) -> bool:
            device = basic(agent, Domain.DEVICE).device
            return device is not None and device.family == "Spider"

        found["ua-parser, pure Python"] = spider
    return found


def timed(verdict: Callable[[str], bool], agents: list[str]) -> str:
    times = []
    for agent in agents:
        start = time.perf_counter_ns()
        verdict(agent)
        times.append(time.perf_counter_ns() - start)
    times.sort()
    mean, p50 = statistics.fmean(times) / 1000, times[len(times) // 2] / 1000
    p99, top = times[int(len(times) * 0.99)] / 1000, times[-1] / 1000
    return f"mean {mean:,.1f}  p50 {p50:,.1f}  p99 {p99:,.1f}  max {top:,.1f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=20_000)
    args = parser.parse_args()
    browsers = [agent.decode() for agent in distinct_agents(args.agents)]
    rng = random.Random(7)
    text = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ;/()._-"
    noise = ["".join(rng.choices(text, k=1024)) for _ in range(500)]
    for name, verdict in detectors().items():
        print(f"{name}:")
        verdict(BROWSERS[0])  # compiles what is compiled lazily
        print(f"  {len(browsers):,} distinct browser agents: {timed(verdict, browsers)}")
        print(f"  {len(noise)} agents of 1024 random characters: {timed(verdict, noise)}")
        for label, agents in [("crawlers", BOTS), ("tools", TOOLS), ("browsers", BROWSERS)]:
            missed = [agent[:40] for agent in agents if not verdict(agent)]
            print(f"  {label}: {len(agents) - len(missed)} of {len(agents)} flagged")
            if label != "browsers" and missed:
                print(f"    not flagged: {missed}")
    cached = BotDetector()
    repeated = BROWSERS * 10_000
    start = time.perf_counter()
    for agent in repeated:
        cached.is_bot("GET", agent)
    per_agent = (time.perf_counter() - start) / len(repeated) * 1e6
    print(f"BotDetector.is_bot, {len(BROWSERS)} agents repeated (cached): {per_agent:.2f} µs")
    workloads = {
        "one agent, repeated": [BROWSERS[0]] * len(browsers),
        "distinct browser agents": browsers,
        "1024 random characters": noise,
    }
    for name, agents in workloads.items():
        costs = [f"{encode_cost(agents, on):.2f}" for on in (False, True)]
        print(f"Enricher.encode, {name}: {costs[0]} µs (bot_detection off), {costs[1]} µs (on)")


def encode_cost(agents: list[str], bot_detection: bool) -> float:
    """µs per record of ``Enricher.encode``, best of 3 runs, each with a cold cache."""
    settings = parse_settings(
        {
            "kafka": {"bootstrap.servers": "127.0.0.1:9"},
            "records": {"bot_detection": bot_detection, "instance": "bench"},
        }
    )
    hits = [
        Hit(
            "01a20e9d-83a8-729b-bc18-e7921e0374f1",
            time.time(),
            "GET",
            "http",
            "/",
            b"n=1",
            [
                (b"host", b"bench.local"),
                (b"user-agent", agent.encode()),
                (b"referer", b"https://r/"),
            ],
            ("127.0.0.1", 40000),
            302,
            "https://example.com/",
            "home",
        )
        for agent in agents
    ]
    best = float("inf")
    for _ in range(3):
        enricher = Enricher(settings.records, settings.server)
        start = time.perf_counter()
        for hit in hits:
            enricher.encode(hit)
        best = min(best, (time.perf_counter() - start) / len(hits) * 1e6)
    return best


if __name__ == "__main__":
    main()
