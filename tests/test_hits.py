"""Record enrichment: timestamps, client IP behind trusted proxies, text decoding, bots."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

import jsonschema
import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from redirect_logger.bots import CACHE_SIZE, Agent, BotDetector, _devices
from redirect_logger.config import parse_settings
from redirect_logger.hits import (
    FIELD_LIMITS,
    Enricher,
    Hit,
    Millisecond,
    headers_of_value,
    rfc3339_ms,
)
from support import check_record_schema


def enricher(trusted: list[str], key: str = "client_ip") -> Enricher:
    settings = parse_settings(
        {
            "kafka": {"bootstrap.servers": "127.0.0.1:9"},
            "server": {"trusted_proxies": trusted},
            "records": {"key": key, "instance": "test-1"},
        }
    )
    return Enricher(settings.records, settings.server)


@given(ts=st.floats(min_value=0, max_value=2**33, allow_nan=False))
@example(ts=3373501067.0459995)
@example(ts=1.9999999)
def test_rfc3339_ms_matches_datetime(ts: float) -> None:
    moment = datetime.fromtimestamp(ts, tz=UTC)
    assert rfc3339_ms(ts) == f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


@given(
    start=st.floats(min_value=0, max_value=2**33, allow_nan=False),
    steps=st.lists(st.floats(min_value=0, max_value=0.002), max_size=20),
)
@example(start=1.9994995, steps=[0.0000004, 0.0000002, 0.0005])  # across a rounding edge
@example(start=1.9999994, steps=[0.0000002, 0.0000004])  # rounding into the next second
def test_a_kept_millisecond_is_written_as_rfc3339_ms_writes_it(
    start: float, steps: list[float]
) -> None:
    millisecond, ts = Millisecond(), start
    for step in [0.0, *steps]:
        ts += step
        assert millisecond.text(ts) == rfc3339_ms(ts)


@given(
    second=st.integers(min_value=0, max_value=2**33),
    ms=st.integers(min_value=0, max_value=999),
    offsets=st.lists(st.integers(min_value=-40, max_value=40), min_size=1, max_size=20),
)
def test_a_kept_millisecond_is_right_next_to_its_edges(
    second: int, ms: int, offsets: list[int]
) -> None:
    """Times a few float steps either side of a millisecond's rounding edges,
    after a time inside it has been kept."""
    millisecond = Millisecond()
    inside = second + (ms + 0.5) / 1000
    assert millisecond.text(inside) == rfc3339_ms(inside)
    for edge in (second + (ms - 0.0005) / 1000, second + (ms + 0.9995) / 1000):
        for offset in offsets:
            ts = edge + offset * math.ulp(edge)
            assert millisecond.text(ts) == rfc3339_ms(ts)
            assert millisecond.text(inside) == rfc3339_ms(inside)


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        # an untrusted peer is the client, whatever it claims
        ("203.0.113.9", [(b"x-forwarded-for", b"1.1.1.1")], "203.0.113.9"),
        # behind a trusted proxy: the rightmost untrusted hop
        ("10.0.0.2", [(b"x-forwarded-for", b"1.1.1.1, 198.51.100.7, 10.0.0.5")], "198.51.100.7"),
        # several X-Forwarded-For headers form one list
        (
            "10.0.0.2",
            [(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"10.0.0.9")],
            "1.1.1.1",
        ),
        # every hop trusted: the leftmost
        ("10.0.0.2", [(b"x-forwarded-for", b"10.0.0.7, 10.0.0.5")], "10.0.0.7"),
        # an unparsable hop ends the walk at the last trusted one
        ("10.0.0.2", [(b"x-forwarded-for", b"1.1.1.1, unknown, 10.0.0.5")], "10.0.0.5"),
        # Forwarded wins over X-Forwarded-For, with quoted IPv6 and ports
        (
            "10.0.0.2",
            [
                (b"x-forwarded-for", b"1.1.1.1"),
                (b"forwarded", b'for="[2001:db8::1]:4711";proto=https, for=10.0.0.5'),
            ],
            "2001:db8::1",
        ),
        ("10.0.0.2", [(b"forwarded", b'for="192.0.2.60:8080"')], "192.0.2.60"),
        # a trusted peer without forwarding headers is itself the client
        ("10.0.0.2", [], "10.0.0.2"),
    ],
)
def test_client_ip(peer: str, headers: list[tuple[bytes, bytes]], client: str) -> None:
    assert enricher(["10.0.0.0/8"]).client_ip(peer, headers) == client


def test_without_trusted_proxies_forwarding_headers_are_ignored() -> None:
    assert enricher([]).client_ip("10.0.0.2", [(b"x-forwarded-for", b"1.1.1.1")]) == "10.0.0.2"


def test_record_fields_and_key() -> None:
    hit = Hit(
        "01a20e9d-83a8-729b-bc18-e7921e0374f1",
        1795541533.6081,
        "GET",
        "https",
        "/docs/caf\u00e9",
        b"q=caf%C3%A9&raw=\xff",
        [(b"host", b"go.example"), (b"user-agent", b"ua\xff"), (b"referer", b"https://r/")],
        ("::1", 4711),
        301,
        "https://docs.example.com/caf%C3%A9",
        "docs",
    )
    encoded = enricher([], key="path").encode(hit)
    record = orjson.loads(encoded.value)
    logged_at = record.pop("logged_at")
    assert record == {
        "v": 3,
        "id": "01a20e9d-83a8-729b-bc18-e7921e0374f1",
        "ts": "2026-11-24T17:32:13.608Z",
        "method": "GET",
        "scheme": "https",
        "host": "go.example",
        "path": "/docs/caf\u00e9",
        "query": "q=caf%C3%A9&raw=\\xff",
        "status": 301,
        "location": "https://docs.example.com/caf%C3%A9",
        "rule": "docs",
        "route": None,
        "variant": None,
        "kind": "redirect",
        "client_ip": "::1",
        "remote_address": "[::1]:4711",
        "user_agent": "ua\\xff",
        "referer": "https://r/",
        "bot": False,
        "country": None,
        "instance": "test-1",
    }
    assert logged_at >= record["ts"]
    assert encoded.key == "/docs/caf\u00e9".encode()
    assert encoded.timestamp_ms == 1795541533608
    assert encoded.headers == [
        ("schema-version", b"3"),
        ("kind", b"redirect"),
        ("rule", b"docs"),
    ]


def test_over_long_fields_are_cut_to_their_limits_and_named() -> None:
    hit = Hit(
        "id-1",
        1795541533.6081,
        "GET",
        "http",
        "/p" + "a" * 5000,
        b"q=" + b"b" * 9000,
        [(b"host", b"h" * 300), (b"user-agent", b"u" * 1024), (b"referer", b"r" * 3000)],
        ("127.0.0.1", 1),
        302,
        "https://t.example/" + "c" * 5000,
        "r",
    )
    record = enricher([]).record(hit)
    assert {field: len(str(record[field])) for field in FIELD_LIMITS} == FIELD_LIMITS
    assert record["truncated"] == ["host", "path", "query", "location", "referer"]
    assert str(record["path"]).startswith("/paaa")
    assert record["user_agent"] == "u" * 1024  # exactly at its limit: kept whole


def test_a_record_within_the_limits_has_no_truncated_field() -> None:
    hit = Hit("id-2", 0.0, "GET", "http", "/", b"", [], None, 404, None, None)
    assert "truncated" not in enricher([]).record(hit)


@pytest.mark.parametrize(
    ("query", "tracked"),
    [
        (b"nt=1", False),
        (b"a=1&nt", False),
        (b"a=1&n%74=0", False),  # the key percent-encoded, any value
        (b"a=1", None),
        (b"", None),
        (b"ntx=1&xnt=2&a=nt", None),  # only the key itself counts
    ],
)
def test_the_no_track_key_marks_the_record_untracked(query: bytes, tracked: bool | None) -> None:
    settings = parse_settings({"kafka": {"bootstrap.servers": "127.0.0.1:9"}})
    enricher = Enricher(settings.records, settings.server, no_track_param="nt")
    hit = Hit("id", 0.0, "GET", "http", "/", query, [], None, 302, "https://t/", "r")
    assert orjson.loads(enricher.encode(hit).value).get("tracked") == tracked


def privacy_enricher(**records: object) -> Enricher:
    settings = parse_settings(
        {
            "kafka": {"bootstrap.servers": "127.0.0.1:9"},
            "server": {"trusted_proxies": ["10.0.0.0/8"]},
            "records": records,
        }
    )
    return Enricher(settings.records, settings.server)


def privacy_hit(peer: str, forwarded_for: bytes | None = None) -> Hit:
    headers = [(b"user-agent", b"ua/1"), (b"referer", b"https://r/")]
    if forwarded_for is not None:
        headers.append((b"x-forwarded-for", forwarded_for))
    return Hit("id", 0.0, "GET", "http", "/", b"", headers, (peer, 5000), 302, "https://t/", "r")


@pytest.mark.parametrize(
    ("ip", "peer", "forwarded", "client_ip", "remote_address"),
    [
        ("full", "198.51.100.77", None, "198.51.100.77", "198.51.100.77:5000"),
        ("anonymized", "198.51.100.77", None, "198.51.100.0", "198.51.100.0"),
        ("anonymized", "10.1.2.3", b"203.0.113.9", "203.0.113.0", "10.1.2.0"),
        ("anonymized", "2001:db8:abcd:12:1::5", None, "2001:db8:abcd::", "2001:db8:abcd::"),
        ("none", "198.51.100.77", None, None, None),
    ],
)
def test_ip_privacy(
    ip: str,
    peer: str,
    forwarded: bytes | None,
    client_ip: str | None,
    remote_address: str | None,
) -> None:
    record = privacy_enricher(ip=ip).record(privacy_hit(peer, forwarded))
    assert record is not None
    assert (record["client_ip"], record["remote_address"]) == (client_ip, remote_address)


def test_user_agent_and_referer_can_be_left_out() -> None:
    record = privacy_enricher(user_agent=False, referer=False).record(privacy_hit("192.0.2.1"))
    assert record is not None
    assert (record["user_agent"], record["referer"]) == (None, None)


@pytest.mark.parametrize(
    ("peer", "forwarded", "excluded"),
    [
        ("192.0.2.10", None, True),
        ("192.0.2.200", None, False),  # outside 192.0.2.0/25
        ("10.0.0.1", b"192.0.2.5", True),  # the client behind a trusted proxy counts
        ("192.0.2.10", b"198.51.100.1", True),  # an untrusted peer's header is ignored
    ],
)
def test_excluded_clients_get_no_record(peer: str, forwarded: bytes | None, excluded: bool) -> None:
    enricher = privacy_enricher(exclude_ips=["192.0.2.0/25"])
    assert (enricher.encode(privacy_hit(peer, forwarded)) is None) is excluded


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"ip": "anonymized"},
        {"ip": "none", "user_agent": False, "referer": False},
        {"bot_detection": False},
    ],
)
@pytest.mark.parametrize("location", ["https://t/", None])
def test_records_satisfy_the_published_json_schema(
    options: dict[str, object], location: str | None
) -> None:
    enricher = Enricher(
        parse_settings({"kafka": {"bootstrap.servers": "127.0.0.1:9"}, "records": options}).records,
        parse_settings({"kafka": {"bootstrap.servers": "127.0.0.1:9"}}).server,
        no_track_param="nt",
    )
    hit = Hit(
        "01a20e9d-83a8-729b-bc18-e7921e0374f1",
        1795541533.608,
        "GET",
        "http",
        "/" + "p" * 3000,
        b"nt=1&q=" + b"x" * 5000,
        [(b"host", b"h.example"), (b"user-agent", b"u" * 2000)],
        ("192.0.2.1", 4000),
        302 if location else 404,
        location,
        "r" if location else None,
    )
    record = orjson.loads(enricher.encode(hit).value)  # type: ignore[union-attr]
    assert record["tracked"] is False and "path" in record["truncated"]
    assert record["bot"] is (None if options.get("bot_detection") is False else False)
    check_record_schema(record)
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict
        check_record_schema({**record, "unexpected": 1})
    without_bot = {name: value for name, value in record.items() if name != "bot"}
    for wrong in (without_bot, {**record, "bot": "yes"}, {**record, "bot": 0}):
        with pytest.raises(jsonschema.ValidationError):
            check_record_schema(wrong)


def header_enricher() -> Enricher:
    settings = parse_settings(
        {
            "kafka": {"bootstrap.servers": "127.0.0.1:9"},
            "server": {
                "trusted_proxies": ["10.0.0.0/8"],
                "client_ip_headers": ["CF-Connecting-IP", "True-Client-IP"],
            },
        }
    )
    return Enricher(settings.records, settings.server)


@pytest.mark.parametrize(
    ("peer", "headers", "client_ip"),
    [
        # from a trusted proxy: the first configured header with an IP wins
        ("10.0.0.1", [(b"cf-connecting-ip", b"203.0.113.7")], "203.0.113.7"),
        (
            "10.0.0.1",
            [(b"true-client-ip", b"2001:db8::9"), (b"x-forwarded-for", b"198.51.100.1")],
            "2001:db8::9",
        ),
        # not an IP: the next header, then the forwarding chain
        (
            "10.0.0.1",
            [(b"cf-connecting-ip", b"unknown"), (b"x-forwarded-for", b"198.51.100.1")],
            "198.51.100.1",
        ),
        # from an untrusted peer the header is not believed
        ("192.0.2.50", [(b"cf-connecting-ip", b"203.0.113.7")], "192.0.2.50"),
    ],
)
def test_single_value_client_ip_headers_from_trusted_proxies(
    peer: str, headers: list[tuple[bytes, bytes]], client_ip: str
) -> None:
    assert header_enricher().client_ip(peer, headers) == client_ip


AGENTS = {
    "googlebot": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "googlebot-smartphone": "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P)"
    " AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.204 Mobile Safari/537.36"
    " (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "bingbot": "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0;"
    " +http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36",
    "facebookexternalhit": "facebookexternalhit/1.1"
    " (+http://www.facebook.com/externalhit_uatext.php)",
    "slackbot-link-expanding": "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "twitterbot": "Twitterbot/1.0",
    "linkedinbot": "LinkedInBot/1.0 (compatible; Mozilla/5.0; Apache-HttpClient"
    " +http://www.linkedin.com)",
    "gptbot": "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2;"
    " +https://openai.com/gptbot)",
    "curl": "curl/8.5.0",
    "python-requests": "python-requests/2.32.3",
    "headless-chrome": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " HeadlessChrome/131.0.0.0 Safari/537.36",
    "chrome": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Safari/537.36",
    "firefox": "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "safari-ios": "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1_1 like Mac OS X) AppleWebKit/605.1.15"
    " (KHTML, like Gecko) Version/18.1.1 Mobile/15E148 Safari/604.1",
}


def agent_hit(agent: str | bytes | None, method: str = "GET") -> Hit:
    headers = [(b"host", b"h.example")]
    if agent is not None:
        headers.append((b"user-agent", agent.encode() if isinstance(agent, str) else agent))
    hit_id = "01a20e9d-83a8-729b-bc18-e7921e0374f1"
    peer = ("192.0.2.1", 4000)
    return Hit(hit_id, 0.0, method, "http", "/", b"", headers, peer, 302, "https://t/", "r")


@pytest.mark.parametrize(
    ("name", "bot"),
    [
        ("googlebot", True),
        ("googlebot-smartphone", True),
        ("bingbot", True),
        ("facebookexternalhit", True),
        ("slackbot-link-expanding", True),
        ("twitterbot", True),
        ("linkedinbot", True),
        ("gptbot", True),
        # HTTP client libraries and headless browsers are not crawlers to
        # uap-core (docs/records.md): not flagged, unless they send HEAD.
        ("curl", False),
        ("python-requests", False),
        ("headless-chrome", False),
        ("chrome", False),
        ("firefox", False),
        ("safari-ios", False),
    ],
)
def test_bot_flag_of_known_agents(name: str, bot: bool) -> None:
    enricher = privacy_enricher()
    get, head = (
        enricher.record(agent_hit(AGENTS[name])),
        enricher.record(agent_hit(AGENTS[name], "HEAD")),
    )
    assert get is not None and head is not None
    assert (get["bot"], head["bot"]) == (bot, True)
    assert get["user_agent"] == AGENTS[name]
    check_record_schema(get)


@pytest.mark.parametrize(
    ("agent", "bot"),
    [
        (None, True),  # no User-Agent header: no browser omits it
        (b"", True),
        (b" \t", True),
        (b"Mozilla/5.0 " + b"x" * 1100 + b" Googlebot/2.1", False),  # the crawler's name is cut off
        (b"Googlebot/2.1 " + b"x" * 1100, True),
        (b"Googlebot/2.1 \xff\xfe", True),  # undecodable bytes, as recorded
    ],
)
def test_bot_flag_without_agent_and_of_the_agent_as_recorded(
    agent: bytes | None, bot: bool
) -> None:
    record = privacy_enricher().record(agent_hit(agent))
    assert record is not None
    assert record["bot"] is bot


def test_bot_flag_with_the_agent_left_out_and_without_detection() -> None:
    hidden = privacy_enricher(user_agent=False)
    record = hidden.record(agent_hit(AGENTS["googlebot"]))
    assert record is not None
    assert (record["user_agent"], record["bot"]) == (None, True)
    record = hidden.record(agent_hit(AGENTS["chrome"]))
    assert record is not None
    assert (record["user_agent"], record["bot"]) == (None, False)
    for method in ("GET", "HEAD"):
        record = privacy_enricher(bot_detection=False).record(
            agent_hit(AGENTS["googlebot"], method)
        )
        assert record is not None
        assert (record["user_agent"], record["bot"]) == (AGENTS["googlebot"], None)


def test_bot_verdict_cache_stays_within_its_bound() -> None:
    detector = BotDetector(cache_size=64)
    started = time.monotonic()
    for n in range(1000):
        agent = f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/131.0.{n}.0 Safari/537.36"
        assert detector.is_bot("GET", agent) is False
        assert detector.cached == min(n + 1, 64)
    # Evicted verdicts are worked out again, the same.
    for name, bot in [("googlebot", True), ("chrome", False)] * 100:
        assert detector.is_bot("GET", AGENTS[name]) is bot
    assert detector.cached == 64
    assert detector.is_bot("HEAD", AGENTS["chrome"]) is True  # HEAD needs no verdict
    default = BotDetector()
    for n in range(CACHE_SIZE + 500):
        default.is_bot("GET", f"agent-{n}")
    assert (CACHE_SIZE, default.cached) == (4096, 4096)
    assert time.monotonic() - started < 5.0  # ~15 ms here: ~2.5 µs per new agent


def uap_spider(agent: str) -> bool:
    """The verdict of every uap-core device pattern, in order, with no shortcut."""
    device = _devices().extract(agent)
    return device is not None and device.family == "Spider"


# Texts uap-core's device patterns are made of, for agents that come near them.
_AGENT_PARTS = [
    *(AGENTS.values()),
    "Mozilla/5.0 (",
    "Linux; Android 10; ",
    "iPhone; CPU iPhone OS 17_0 like Mac OS X",
    "; ",
    " Build/KOT49H",
    ") AppleWebKit/537.36",
    "Coolpad ",
    "Coolpad_",
    "Spider",
    "Spi",
    "der",
    "spider",
    "bot",
    "Bot-Mobile",
    "bots/2",
    "crawler.html",
    "PetalBot",
    " PTST/12",
    "X11; Datanyze; Linux",
    "LG-",
    "HUAWEI ",
    "Motorola ",
    "Sprint ",
    "Nokia",
    " ",
]


@pytest.mark.parametrize(
    "agent",
    [
        "Mozilla/5.0 (Linux; Android 10; Spider Build/QP1A)",  # "$1": the word whole
        "Mozilla/5.0 (Linux; Android 4.4; SpiCoolpad der Build/KOT49H)",  # "$1$2": split
        "Mozilla/5.0 (Linux; Android 4.4; Spi Coolpad der Build/KOT49H)",  # "Spi der"
        "Mozilla/5.0 (Linux; Android 4.4; Coolpad 8297 Build/KOT49H)",
        "Mozilla/5.0 (Linux; Android 6.0; Nexus 5X) AppleWebKit (compatible; Googlebot/2.1)",
    ],
)
def test_spider_shortcut_agrees_with_every_pattern_in_order(agent: str) -> None:
    assert Agent(agent).spider is uap_spider(agent)


@given(st.lists(st.sampled_from(_AGENT_PARTS), max_size=8).map("".join))
def test_spider_shortcut_agrees_with_every_pattern_on_made_up_agents(agent: str) -> None:
    assert Agent(agent).spider is uap_spider(agent)


def test_message_headers_name_the_kind_and_rule_and_are_shared() -> None:
    enricher = privacy_enricher()
    hits = [
        Hit("a", 0.0, "GET", "http", "/", b"", [], None, 302, "https://t/", "r\u00e9gle"),
        Hit("b", 0.0, "GET", "http", "/", b"", [], None, 302, "https://t/", "r\u00e9gle"),
        Hit("c", 0.0, "GET", "http", "/x", b"", [], None, 404, None, None),
        Hit("d", 0.0, "GET", "http", "/y", b"", [], None, 302, "https://f/", None),
    ]
    first, second, miss, fallback = (enricher.encode(hit) for hit in hits)
    assert first is not None and second is not None and miss is not None
    assert fallback is not None
    assert first.headers == [
        ("schema-version", b"3"),
        ("kind", b"redirect"),
        ("rule", b"r\xc3\xa9gle"),
    ]
    assert first.headers is second.headers  # one list per (kind, rule), not per record
    assert miss.headers == [("schema-version", b"3"), ("kind", b"miss"), ("rule", b"")]
    assert fallback.headers == [("schema-version", b"3"), ("kind", b"redirect"), ("rule", b"")]
    for encoded in (first, miss, fallback):  # what a delivery report gives back
        assert headers_of_value(encoded.value) == encoded.headers


@pytest.mark.parametrize(
    ("value", "headers"),
    [
        (b'{"v":1,"kind":"miss","rule":null}', [("kind", b"miss"), ("rule", b"")]),
        (b'{"v":2,"kind":"event","rule":"c"}', [("kind", b"event"), ("rule", b"c")]),
        # written before records had a kind: the location implies it
        (
            b'{"v":1,"rule":"home","location":"https://t/"}',
            [("kind", b"redirect"), ("rule", b"home")],
        ),
        (b'{"v":1,"rule":null,"location":null}', [("kind", b"miss"), ("rule", b"")]),
        # not a record: no headers
        (b"not json", None),
        (b"[1]", None),
        (b'{"id":"x","n":1}', None),
        (b'{"v":"1","kind":"miss","rule":null}', None),
        (b'{"v":true,"kind":"miss","rule":null}', None),
        (b'{"v":1,"kind":"miss","rule":7}', None),
    ],
)
def test_headers_of_a_value(value: bytes, headers: list[tuple[str, bytes]] | None) -> None:
    version = b"%d" % orjson.loads(value)["v"] if headers else b""
    expected = [] if headers is None else [("schema-version", version), *headers]
    assert headers_of_value(value) == expected


def test_the_events_of_a_request_are_its_hits_each_with_an_id_of_its_own() -> None:
    scope = {
        "method": "POST",
        "scheme": "https",
        "path": "/collect",
        "query_string": b"a=1",
        "headers": [(b"host", b"h"), (b"user-agent", b"ua")],
        "client": ("192.0.2.7", 4711),
    }
    events = Hit.events_of(scope, 1764694800.5, 202, [b'{"n":1}', b'{"n":2}'])
    assert [event.data for event in events] == [b'{"n":1}', b'{"n":2}']
    assert len({event.id for event in events}) == 2
    for event in events:
        assert type(event) is Hit
        assert event == Hit.from_scope(scope, event.id, 1764694800.5, 202, data=event.data)
        assert event.commit is None
