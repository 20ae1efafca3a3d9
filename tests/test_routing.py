"""Routes and splits (routing.py), countries (geo.py): unit tests without a
broker. tests/test_routing_e2e.py reads their records back from Kafka."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st

from redirect_logger.bots import Agents, os_families
from redirect_logger.config import ConfigError, RecordsSettings, ServerSettings, parse_settings
from redirect_logger.geo import Countries
from redirect_logger.hits import Enricher, Hit
from redirect_logger.routing import Clients, Routing, languages_of, routing_warnings
from redirect_logger.rules import RuleTable
from support import ANDROID, IPHONE, WINDOWS, write_country_db

KAFKA = {"bootstrap.servers": "127.0.0.1:9"}
IPAD = "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"

APP = {
    "name": "app",
    "path": "/app",
    "target": "https://example.com/app",
    "routes": [
        {"os": ["iOS"], "target": "https://apps.apple.com/app/id1"},
        {"name": "android", "os": ["Android"], "target": "https://play.google.com/store"},
        {"languages": ["de"], "query": {"ref": "newsletter"}, "target": "https://example.com/de"},
        {"languages": ["fr"], "target": "https://example.com/fr"},
    ],
}
SPLIT = {
    "name": "landing",
    "path": "/landing",
    "target": "https://example.com/landing",
    "split": [
        {"name": "a", "weight": 70, "target": "https://example.com/a"},
        {"name": "b", "weight": 30, "target": "https://example.com/b"},
    ],
}


def settings(*rules: dict[str, Any], **records: Any) -> Any:
    return parse_settings({"kafka": dict(KAFKA), "rules": list(rules), "records": records})


def clients(
    records: RecordsSettings | None = None, server: ServerSettings | None = None
) -> Clients:
    return Clients(
        Agents(), records or RecordsSettings(), server or ServerSettings(), lambda peer, _: peer
    )


def scope(
    path: str,
    query: bytes = b"",
    *,
    agent: str | None = None,
    language: str | None = None,
    cookie: str | None = None,
    scheme: str = "http",
    client: str = "192.0.2.1",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:
    headers = [(b"host", b"go.example")]
    if agent is not None:
        headers.append((b"user-agent", agent.encode()))
    if language is not None:
        headers.append((b"accept-language", language.encode()))
    if cookie is not None:
        headers.append((b"cookie", cookie.encode()))
    headers += extra or []
    return {
        "type": "http",
        "method": "GET",
        "scheme": scheme,
        "path": path,
        "query_string": query,
        "headers": headers,
        "client": (client, 40000),
    }


def answer(table: RuleTable, request: dict[str, Any], who: Clients) -> tuple[Any, ...]:
    """(Location, route, variant, Set-Cookie) as app.Frontend gets them."""
    _, location, _, route, variant, cookie = table.answer(request, None, who, "", 0.0)
    return location, route, variant, cookie


# ------------------------------------------------------------------ routes


@pytest.mark.parametrize(
    ("agent", "language", "query", "expected"),
    [
        (IPHONE, None, b"", ("https://apps.apple.com/app/id1", 0)),
        (IPAD, "de", b"ref=newsletter", ("https://apps.apple.com/app/id1?ref=newsletter", 0)),
        (ANDROID, None, b"x=1", ("https://play.google.com/store?x=1", "android")),
        (
            WINDOWS,
            "de-AT,en;q=0.5",
            b"ref=newsletter",
            ("https://example.com/de?ref=newsletter", 2),
        ),
        # every condition must hold: German without the query is not route 2
        (WINDOWS, "de", b"ref=other", ("https://example.com/app?ref=other", None)),
        (WINDOWS, "fr-CA", b"", ("https://example.com/fr", 3)),
        (None, None, b"", ("https://example.com/app", None)),
        ("", "*", b"", ("https://example.com/app", None)),
    ],
)
def test_the_first_route_whose_conditions_all_hold_gives_the_target(
    agent: str | None, language: str | None, query: bytes, expected: tuple[str, Any]
) -> None:
    table = RuleTable.from_settings(settings(APP))
    location, route, variant, cookie = answer(
        table, scope("/app", query, agent=agent, language=language), clients()
    )
    assert (location, route) == expected
    assert (variant, cookie) == (None, None)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (
            "fr, de;q=0.8",
            "https://example.com/fr?ref=newsletter",
        ),  # the client's order, not the routes'
        ("da, de;q=0.8", "https://example.com/de?ref=newsletter"),  # da: no route names it
        ("de;q=0.5, fr;q=0.9", "https://example.com/fr?ref=newsletter"),
        ("fr;q=0, de", "https://example.com/de?ref=newsletter"),  # q=0: not acceptable
        ("en", "https://example.com/app?ref=newsletter"),
        (
            "xx;q=oops, fr",
            "https://example.com/fr?ref=newsletter",
        ),  # an invalid q: that entry is skipped
    ],
)
def test_languages_are_read_in_the_clients_order(accept: str, expected: str) -> None:
    table = RuleTable.from_settings(settings(APP))
    request = scope("/app", b"ref=newsletter", agent=WINDOWS, language=accept)
    assert answer(table, request, clients())[0] == expected


def test_accept_language_primary_tags() -> None:
    assert languages_of(b"de-AT, de;q=0.9, EN-us;q=0.8, *;q=0.1, it;q=0") == ("de", "en")
    assert languages_of(b"") == ()


def test_query_conditions_compare_decoded_values_and_ignore_other_keys() -> None:
    rule = {
        "name": "q",
        "path": "/q",
        "target": "https://example.com/",
        "routes": [{"query": {"ref": "caf\u00e9", "k": ""}, "target": "https://example.com/hit"}],
    }
    table = RuleTable.from_settings(settings(rule))
    who = clients()
    assert answer(table, scope("/q", b"x=1&ref=caf%C3%A9&k="), who)[:2] == (
        "https://example.com/hit?x=1&ref=caf%C3%A9&k=",
        0,
    )
    assert answer(table, scope("/q", b"ref=caf%C3%A9"), who)[1] is None  # k missing
    assert answer(table, scope("/q", b"ref=cafe&k="), who)[1] is None


def test_the_user_agent_is_parsed_once_per_distinct_agent_in_the_shared_cache() -> None:
    table = RuleTable.from_settings(settings(APP))
    who = clients()
    for agent in [IPHONE, ANDROID, IPHONE, IPHONE, ANDROID]:
        answer(table, scope("/app", agent=agent), who)
    assert who.agents.cached == 2
    enricher = Enricher(RecordsSettings(), ServerSettings(), agents=who.agents)
    hit = Hit.from_scope(scope("/app", agent=IPHONE), "id", 0.0, 302, "https://x/", "app")
    assert enricher.record(hit)["bot"] is False  # type: ignore[index]
    assert who.agents.cached == 2  # the bot flag read the same entry
    assert who.agents.get(IPHONE).spider is False


def test_a_rule_without_routes_or_split_has_no_routing() -> None:
    table = RuleTable.from_settings(settings({"name": "h", "path": "/", "target": "https://e/"}))
    assert table.match("/")[0].routing is None
    routed = RuleTable.from_settings(settings(APP)).match("/app")[0].routing
    assert isinstance(routed, Routing)
    assert routed.default.routing is None  # the rule's own target, when nothing applies


def test_route_targets_take_the_rules_status_and_forwarding() -> None:
    rule = {
        "name": "docs",
        "path": "/docs/*",
        "status": 307,
        "forward_path": True,
        "query_drop": ["fbclid"],
        "target": "https://docs.example.com/en/",
        "routes": [{"languages": ["de"], "target": "https://docs.example.com/de/"}],
    }
    table = RuleTable.from_settings(settings(rule))
    target, remainder = table.match("/docs/a/b")
    assert target.routing is not None
    chosen = target.routing.choose(scope("/docs/a/b", language="de"), clients())[0]
    assert chosen.status == 307
    assert chosen.location(remainder, b"fbclid=1&x=2") == "https://docs.example.com/de/a/b?x=2"


# ------------------------------------------------------------------ splits


def test_split_shares_are_within_two_percent_of_the_weights_over_10000_hits() -> None:
    rule = {
        **SPLIT,
        "split": [
            {"name": "a", "weight": 50, "target": "https://example.com/a"},
            {"name": "b", "weight": 30, "target": "https://example.com/b"},
            {"name": "c", "weight": 20, "target": "https://example.com/c"},
            {"name": "off", "weight": 0, "target": "https://example.com/off"},
        ],
    }
    table = RuleTable.from_settings(settings(rule))
    who = clients()
    drawn = Counter(answer(table, scope("/landing"), who)[2] for _ in range(10_000))
    shares = {name: count / 10_000 for name, count in drawn.items()}
    assert set(shares) == {"a", "b", "c"}
    for name, weight in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(shares[name] - weight) <= 0.02, shares


def test_a_drawn_variant_sets_the_sticky_cookie_and_the_cookie_keeps_it() -> None:
    table = RuleTable.from_settings(settings(SPLIT))
    who = clients()
    location, route, variant, cookie = answer(table, scope("/landing"), who)
    assert route is None and variant in ("a", "b")
    assert location == f"https://example.com/{variant}"
    assert (
        cookie
        == (
            f"rl_landing={variant}; Max-Age=2592000; Path=/landing; SameSite=Lax; HttpOnly"
        ).encode()
    )
    for name in ("a", "b"):  # kept whatever the draw would say, and not set again
        for _ in range(50):
            kept = answer(table, scope("/landing", cookie=f"x=1; rl_landing={name}"), who)
            assert kept == (f"https://example.com/{name}", None, name, None)


@pytest.mark.parametrize("cookie", ["rl_landing=zzz", "rl_landing=", "rl_other=a", "rl_landing"])
def test_a_cookie_naming_no_current_variant_is_drawn_again(cookie: str) -> None:
    table = RuleTable.from_settings(settings(SPLIT))
    _, _, variant, set_cookie = answer(table, scope("/landing", cookie=cookie), clients())
    assert variant in ("a", "b")
    assert set_cookie is not None and set_cookie.startswith(f"rl_landing={variant};".encode())


def test_a_variant_of_weight_zero_gets_nobody_and_its_cookie_is_drawn_again() -> None:
    rule = {**SPLIT, "split": [{**SPLIT["split"][0], "weight": 0}, SPLIT["split"][1]]}
    table = RuleTable.from_settings(settings(rule))
    who = clients()
    assert {answer(table, scope("/landing"), who)[2] for _ in range(200)} == {"b"}
    assert answer(table, scope("/landing", cookie="rl_landing=a"), who)[2:] == (
        "b",
        b"rl_landing=b; Max-Age=2592000; Path=/landing; SameSite=Lax; HttpOnly",
    )


def test_the_cookie_is_secure_over_tls_or_when_a_trusted_proxy_says_so() -> None:
    rule = {**SPLIT, "path": "/l/*", "split_cookie_max_age": 3600}
    table = RuleTable.from_settings(settings(rule))
    server = ServerSettings.model_validate({"trusted_proxies": ["10.0.0.0/8"]})
    who = clients(server=server)
    forwarded = [(b"x-forwarded-proto", b"https")]

    def cookie(**kwargs: Any) -> bytes:
        found = answer(table, scope("/l/x", **kwargs), who)[3]
        assert found is not None
        return bytes(found)

    attributes = b"; Max-Age=3600; Path=/l; SameSite=Lax; HttpOnly"
    assert cookie(scheme="https").endswith(attributes + b"; Secure")
    assert cookie(client="10.1.2.3", extra=forwarded).endswith(b"; Secure")
    standard = [(b"forwarded", b'for=192.0.2.9;proto="https"')]
    assert cookie(client="10.1.2.3", extra=standard).endswith(b"; Secure")
    assert cookie(client="192.0.2.1", extra=forwarded).endswith(attributes)  # not trusted
    http = [(b"x-forwarded-proto", b"http")]
    assert cookie(client="10.1.2.3", extra=http).endswith(attributes)
    assert cookie().endswith(attributes)


def test_with_ip_none_no_cookie_is_set_or_read_and_each_hit_is_drawn() -> None:
    table = RuleTable.from_settings(settings(SPLIT, ip="none"))
    who = clients(records=RecordsSettings(ip="none"))
    answers = [answer(table, scope("/landing", cookie="rl_landing=a"), who) for _ in range(400)]
    assert {cookie for *_, cookie in answers} == {None}
    assert {variant for _, _, variant, _ in answers} == {"a", "b"}  # the cookie is not read


def test_routes_come_before_the_split() -> None:
    rule = {**SPLIT, "routes": [{"os": ["iOS"], "target": "https://apps.apple.com/x"}]}
    table = RuleTable.from_settings(settings(rule))
    assert answer(table, scope("/landing", agent=IPHONE), clients()) == (
        "https://apps.apple.com/x",
        0,
        None,
        None,
    )
    assert answer(table, scope("/landing", agent=ANDROID), clients())[2] in ("a", "b")


# ------------------------------------------------------------------ config


def refused(*rules: dict[str, Any], **records: Any) -> str:
    with pytest.raises(ConfigError) as error:
        settings(*rules, **records)
    return str(error.value)


def test_each_bad_route_or_split_is_refused_naming_its_key(tmp_path: Path) -> None:
    route = {"os": ["iOS"], "target": "https://a.example/"}
    assert "rules.0.routes.0.target: required key is missing" in refused(
        {**APP, "routes": [{"os": ["iOS"]}]}
    )
    assert "rules.0.routes.0: Value error, a route needs a condition" in refused(
        {**APP, "routes": [{"target": "https://a.example/"}]}
    ).replace("rules.0.routes.0: a route", "rules.0.routes.0: Value error, a route")
    assert "rules.0.routes.0.target: must be an absolute" in refused(
        {**APP, "routes": [{**route, "target": "javascript:alert(1)"}]}
    )
    assert "rules.0.routes.0.languages: 'de_DE' is not a primary language tag" in refused(
        {**APP, "routes": [{**route, "languages": ["de_DE"]}]}
    )
    assert "rules.0.routes.0.countries: 'DEU' is not an ISO 3166-1 alpha-2 code" in refused(
        {**APP, "routes": [{**route, "countries": ["DEU"]}]}
    )
    assert "rules.0.routes.0.countries: needs records.geoip_database" in refused(
        {**APP, "routes": [{**route, "countries": ["DE"]}]}
    )
    zero = [{**variant, "weight": 0} for variant in SPLIT["split"]]  # type: ignore[attr-defined]
    assert "rules.0: split: the weights must add up to more than 0" in refused(
        {**SPLIT, "split": zero}
    )
    assert "rules.0.split.0.weight: Input should be greater than or equal to 0" in refused(
        {**SPLIT, "split": [{**SPLIT["split"][0], "weight": -1}]}  # type: ignore[index]
    )
    twice = [SPLIT["split"][0], SPLIT["split"][0]]  # type: ignore[index]
    assert "rules.0: split: variant names must be unique" in refused({**SPLIT, "split": twice})
    assert "rules.0.split.0.name: String should match pattern" in refused(
        {**SPLIT, "split": [{**SPLIT["split"][0], "name": "a b"}]}  # type: ignore[index]
    )
    assert "names its cookie (rl_<name>)" in refused({**SPLIT, "name": "landing page"})
    assert "rules.0.split_cookie_max_age: Input should be greater than or equal to 60" in refused(
        {**SPLIT, "split_cookie_max_age": 0}
    )
    missing = tmp_path / "missing.mmdb"
    assert f"records.geoip_database: {str(missing)!r}: no such file" in refused(
        geoip_database=str(missing)
    )
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"not a database")
    assert f"records.geoip_database: {str(junk)!r}: not a MaxMind DB" in refused(
        geoip_database=str(junk)
    )


def test_warnings_name_unknown_os_families_and_permanent_statuses() -> None:
    rules = settings(
        {**APP, "routes": [{"os": ["iOS", "iPadOS", "android"], "target": "https://a.example/"}]},
        {**SPLIT, "status": 301},
    ).rules
    warnings = routing_warnings(rules)
    assert len(warnings) == 3
    assert warnings[0].startswith("rules.0.routes.0.os: 'iPadOS' is not an OS family")
    assert warnings[1].startswith("rules.0.routes.0.os: 'android' is not an OS family")
    assert '(did you mean "Android"?)' in warnings[1]
    assert warnings[2].startswith("rules.1.status: 301 is permanent")
    assert routing_warnings(settings(APP, SPLIT).rules) == []


def test_the_os_families_uap_core_names() -> None:
    families = os_families()
    assert {"iOS", "Android", "Windows", "Mac OS X", "Linux", "Chrome OS", "Other"} <= families
    assert {"Ubuntu", "FreeBSD", "OpenBSD", "HarmonyOS", "Tizen"} <= families
    assert "iPadOS" not in families


# ------------------------------------------------------------------ countries


@pytest.fixture
def country_db(tmp_path: Path) -> Path:
    return write_country_db(
        tmp_path / "countries.mmdb",
        {"198.51.100.0/24": "DE", "203.0.113.0/25": "AT", "2001:db8:1::/48": "FR"},
    )


def test_countries_from_a_maxmind_db_cached_per_address(country_db: Path) -> None:
    countries = Countries(str(country_db))
    assert [
        countries.of(ip)
        for ip in ["198.51.100.7", "203.0.113.1", "203.0.113.200", "2001:db8:1::5", "192.0.2.1"]
    ] == ["DE", "AT", None, "FR", None]
    assert countries.of("not an address") is None
    countries.of("198.51.100.7")
    info = countries.of.cache_info()  # type: ignore[attr-defined]
    assert (info.hits, info.currsize) == (1, 6)


@pytest.mark.parametrize(
    ("ip", "recorded"), [("full", "198.51.100.77"), ("anonymized", "198.51.100.0"), ("none", None)]
)
def test_the_record_country_uses_the_full_address_before_it_is_cut(
    country_db: Path, ip: str, recorded: str | None
) -> None:
    # 203.0.113.200 is outside the AT /25, but its /24 (203.0.113.0) is in it:
    # no country shows the lookup took the full address, whatever records.ip.
    records = RecordsSettings(ip=ip)  # type: ignore[arg-type]
    enricher = Enricher(records, ServerSettings())
    enricher.countries = Countries(str(country_db))
    for client, country in (("198.51.100.77", "DE"), ("203.0.113.200", None)):
        request = scope("/x", client=client)
        record = enricher.record(Hit.from_scope(request, "id", 0.0, 404))
        assert record is not None
        assert record["country"] == country
    request = scope("/x", client="198.51.100.77")
    record = enricher.record(Hit.from_scope(request, "id", 0.0, 404))
    assert record is not None and record["client_ip"] == recorded


def test_a_country_route(country_db: Path) -> None:
    rule = {
        **APP,
        "routes": [
            {"countries": ["de", "AT"], "languages": ["de"], "target": "https://example.com/dach"}
        ],
    }
    table = RuleTable.from_settings(settings(rule, geoip_database=str(country_db)))
    who = clients()
    who.countries = Countries(str(country_db))
    german = {"language": "de", "client": "203.0.113.9"}
    assert answer(table, scope("/app", **german), who)[:2] == ("https://example.com/dach", 0)
    assert answer(table, scope("/app", language="de", client="192.0.2.1"), who)[1] is None
    assert answer(table, scope("/app", language="fr", client="203.0.113.9"), who)[1] is None


# ------------------------------------------------------------------ combined

HIT_ID = "019ad3c2-5c1e-7a00-8000-00000000000a"
INSIDE, AFTER = 1_796_000_000.0, 1_800_000_000.0  # 2026-11-29, 2027-01-15
WINDOW = {"valid_until": "2027-01-01T00:00:00Z"}


def full(table: RuleTable, request: dict[str, Any], who: Clients, now: float) -> tuple[Any, ...]:
    """(status, Location, detail, route, variant, Set-Cookie, Vary)."""
    target, location, detail, route, variant, cookie = table.answer(request, None, who, HIT_ID, now)
    return target.status, location, detail, route, variant, cookie, target.vary


def test_a_window_holds_the_whole_routed_rule() -> None:
    rule = {**SPLIT, **WINDOW, "expired_status": 302, "expired_target": "https://example.com/end"}
    rule["routes"] = [{"os": ["iOS"], "target": "https://apps.apple.com/x"}]
    table = RuleTable.from_settings(settings(rule))
    who = clients()
    # outside: the expired answer, no route drawn, no split cookie, no Vary
    for request in (scope("/landing", agent=IPHONE), scope("/landing")):
        assert full(table, request, who, AFTER) == (
            302,
            "https://example.com/end",
            "expired",
            None,
            None,
            None,
            None,
        )
    assert full(table, scope("/landing", agent=IPHONE), who, INSIDE) == (
        302,
        "https://apps.apple.com/x",
        None,
        0,
        None,
        None,
        b"User-Agent, Cookie",
    )
    status, location, detail, route, variant, cookie, vary = full(
        table, scope("/landing"), who, INSIDE
    )
    assert (status, detail, route, vary) == (302, None, None, b"User-Agent, Cookie")
    assert location == f"https://example.com/{variant}"
    assert cookie is not None and cookie.startswith(f"rl_landing={variant};".encode())
    kept = full(table, scope("/landing", cookie=f"rl_landing={variant}"), who, INSIDE)
    assert kept[1:6] == (location, None, None, variant, None)


def test_route_and_variant_targets_fill_their_macros_which_the_request_cannot_set() -> None:
    rule = {
        **APP,
        "routes": [
            {"os": ["iOS"], "target": "https://apps.apple.com/x?ct={hit_id}&pt={rule}"},
            {"name": "de", "languages": ["de"], "target": "https://example.com/de"},
        ],
        "split": [{"name": "only", "weight": 1, "target": "https://example.com/v?click={hit_id}"}],
    }
    table = RuleTable.from_settings(settings(rule))
    request = scope("/app", b"ct=forged&click=forged&utm=1", agent=IPHONE)
    assert full(table, request, clients(), 0.0)[1:5] == (
        f"https://apps.apple.com/x?ct={HIT_ID}&pt=app&click=forged&utm=1",
        None,
        0,
        None,
    )
    request = scope("/app", b"ct=kept&click=forged", language="de")
    assert full(table, request, clients(), 0.0)[1:5] == (
        "https://example.com/de?ct=kept&click=forged",
        None,
        "de",
        None,
    )
    assert full(table, scope("/app", b"click=forged"), clients(), 0.0)[1:5] == (
        f"https://example.com/v?click={HIT_ID}",
        None,
        None,
        "only",
    )


def test_an_allowed_target_param_wins_over_the_split_and_a_refused_one_takes_it() -> None:
    rule = {
        "name": "out",
        "path": "/out",
        "target_param": "u",
        "allowed_hosts": ["example.com"],
        "on_refused": "fallback",
        **WINDOW,
        "routes": [{"os": ["iOS"], "target": "https://apps.apple.com/x"}],
        "split": [
            {"name": "a", "weight": 1, "target": "https://example.com/a?c={hit_id}"},
            {"name": "b", "weight": 0, "target": "https://example.com/b"},
        ],
    }
    table = RuleTable.from_settings(settings(rule))
    who = clients()
    allowed = scope("/out", b"u=https%3A%2F%2Fexample.com%2Fp&k=1", agent=IPHONE)
    assert full(table, allowed, who, INSIDE) == (
        302,
        "https://example.com/p?k=1",
        None,
        None,
        None,
        None,
        None,
    )
    refused_ = scope("/out", b"u=https%3A%2F%2Fevil.example%2F&k=1")
    status, location, detail, route, variant, cookie, vary = full(table, refused_, who, INSIDE)
    assert (status, location, detail, route, variant, vary) == (
        302,
        f"https://example.com/a?c={HIT_ID}&k=1",  # the variant's; u is never forwarded
        "host",
        None,
        "a",
        b"User-Agent, Cookie",
    )
    assert cookie is not None and cookie.startswith(b"rl_out=a;")
    missing = scope("/out", b"k=1", agent=IPHONE)
    assert full(table, missing, who, INSIDE)[1:5] == (
        "https://apps.apple.com/x?k=1",
        "missing",
        0,
        None,
    )
    assert full(table, refused_, who, AFTER)[:5] == (404, None, "expired", None, None)


def test_a_refused_target_param_no_route_takes_gets_the_fallback() -> None:
    rule = {
        "name": "out",
        "path": "/out",
        "target_param": "u",
        "allowed_hosts": ["example.com"],
        "on_refused": "fallback",
        "routes": [{"os": ["iOS"], "target": "https://apps.apple.com/x"}],
    }
    config = {"kafka": dict(KAFKA), "rules": [rule]}
    config["fallback"] = {"status": 302, "target": "https://example.com/home"}
    table = RuleTable.from_settings(parse_settings(config))
    assert full(table, scope("/out", b"u=x"), clients(), 0.0) == (
        302,
        "https://example.com/home?u=x",
        "malformed",
        None,
        None,
        None,
        b"User-Agent",  # the routes were asked
    )


@pytest.mark.parametrize(
    ("routes", "split", "records", "vary"),
    [
        ([{"os": ["iOS"], "target": "https://a.example/"}], False, {}, b"User-Agent"),
        (
            [{"languages": ["de"], "target": "https://a.example/"}],
            True,
            {},
            b"Accept-Language, Cookie",
        ),
        ([{"query": {"ref": "x"}, "target": "https://a.example/"}], False, {}, None),
        ([], True, {}, b"Cookie"),
        ([], True, {"ip": "none"}, b"*"),  # drawn anew per hit
    ],
)
def test_vary_names_what_the_routes_and_split_read(
    routes: list[dict[str, Any]], split: bool, records: dict[str, Any], vary: bytes | None
) -> None:
    rule = {**SPLIT, "routes": routes} if split else {**APP, "routes": routes}
    table = RuleTable.from_settings(settings(rule, **records))
    who = clients(records=RecordsSettings(**records))
    request = scope(rule["path"], b"ref=x", agent=IPHONE, language="de")
    assert full(table, request, who, 0.0)[6] == vary
    assert RuleTable.from_settings(settings()).fallback.vary is None


def test_vary_is_a_star_for_a_country_route(country_db: Path) -> None:
    rule = {**APP, "routes": [{"countries": ["DE"], "target": "https://a.example/"}]}
    table = RuleTable.from_settings(settings(rule, geoip_database=str(country_db)))
    assert full(table, scope("/app"), clients(), 0.0)[6] == b"*"


def test_routes_and_splits_combine_and_bad_combinations_name_their_key() -> None:
    route = {"os": ["iOS"], "target": "https://a.example/?c={hit_id}"}
    for live in (
        {"valid_until": "2027-01-01T00:00:00Z"},
        {"valid_from": "2026-01-01T00:00:00Z"},
        {"target": "https://example.com/app?click={hit_id}"},
    ):
        settings({**APP, **live, "routes": [route]})
        settings({**SPLIT, **live})
    dynamic = {"target_param": "u", "allowed_hosts": ["example.com"]}
    app = {key: value for key, value in APP.items() if key != "target"}
    split = {key: value for key, value in SPLIT.items() if key != "target"}
    assert (
        "rules.0.on_refused: with target_param, routes and a split answer only a refused "
        'target: they need on_refused = "fallback"'
    ) in refused({**app, **dynamic, "routes": [route]})
    assert "rules.0.on_refused" in refused({**split, **dynamic})
    settings({**split, **dynamic, "on_refused": "fallback"})
    assert "rules.0.routes.0.target: {hit_id} in the path: macros are replaced in query values" in (
        refused({**APP, "routes": [{**route, "target": "https://a.example/{hit_id}"}]})
    )
    variants = [{**v, "target": "https://{rule}.example/"} for v in SPLIT["split"]]
    assert "rules.0.split.0.target: {rule} in the host" in refused({**SPLIT, "split": variants})
    variants = [{**v, "target": v["target"] + "?{rule}=1"} for v in SPLIT["split"]]
    assert "rules.0.split.0.target: {rule} in a query key" in refused({**SPLIT, "split": variants})


# ------------------------------------------------- no open redirect, routed

# Every origin a routed request may be sent to: the rules' own targets, their
# routes' and variants' (query, fragment and macros included), the expired
# answer, and the dynamic target's allow-list.
ROUTED_RULES = [
    {
        "name": "app",
        "path": "/app/*",
        "target": "https://example.com/app",
        "forward_path": True,
        "routes": [
            {"os": ["iOS"], "target": "https://apps.apple.com/x?ct={hit_id}&pt={rule}#f"},
            {"name": "de", "languages": ["de"], "target": "https://de.example.com/d/"},
            {"query": {"ref": "mail"}, "target": "http://mail.example:8080/m?k=1"},
        ],
        "split": [
            {"name": "a", "weight": 3, "target": "https://a.example.com/?c={hit_id}"},
            {"name": "b", "weight": 1, "target": "https://b.example.com/b"},
        ],
    },
    {
        "name": "out",
        "path": "/out",
        "target_param": "u",
        "allowed_hosts": ["example.org", "*.example.net"],
        "on_refused": "fallback",
        **WINDOW,
        "expired_status": 302,
        "expired_target": "https://ended.example.com/",
        "routes": [{"os": ["Android"], "target": "https://play.example.com/s"}],
        "split": [
            {"name": "x", "weight": 1, "target": "https://x.example.com/x?id={hit_id}"},
            {"name": "y", "weight": 1, "target": "https://y.example.com/y"},
        ],
    },
]
ROUTED_ORIGINS = {
    "app": {
        "https://example.com",
        "https://apps.apple.com",
        "https://de.example.com",
        "http://mail.example:8080",
        "https://a.example.com",
        "https://b.example.com",
    },
    "out": {
        "https://ended.example.com",
        "https://play.example.com",
        "https://x.example.com",
        "https://y.example.com",
    },
}
ROUTED_VARIANTS = {"app": {"a", "b"}, "out": {"x", "y"}}
ROUTED = RuleTable.from_settings(settings(*ROUTED_RULES))


def allowed_target(netloc: str) -> bool:
    """What ``allowed_hosts`` admits for rule ``out``: the host exactly, or a
    name below the wildcard's domain; no port, no userinfo. A final dot names
    the same host (the parser keeps it, as browsers do)."""
    netloc = netloc.removesuffix(".")
    return netloc == "example.org" or (
        netloc.endswith(".example.net") and ":" not in netloc and "@" not in netloc
    )


nasty_targets = st.sampled_from(
    [
        "https://example.org/p",
        "https://a.example.net:8443/p",
        "https://a.example.net/p?q=1",
        "https://evil.com/",
        "//evil.com",
        "https://example.org@evil.com/",
        "https://evil.com\\@example.org/",
        "https://example.org.evil.com/",
        "https://example.org:8443/",
        "https:/\\evil.com",
        "javascript:alert(1)",
        "https://EXAMPLE.org./x",
        "https://%65vil.com/",
        "https://\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.org/",  # fullwidth
    ]
)
routed_query = st.one_of(
    st.binary(max_size=60),
    st.tuples(nasty_targets, st.binary(max_size=20)).map(
        lambda pair: b"u=" + quote(pair[0], safe="").encode() + b"&" + pair[1]
    ),
    st.sampled_from([b"ref=mail", b"ct=forged&c=forged&id=forged", b"u=", b"%zz"]),
)
routed_agent = st.one_of(st.none(), st.text(max_size=30), st.sampled_from([IPHONE, ANDROID]))
routed_language = st.one_of(st.none(), st.text(max_size=20), st.sampled_from(["de", "de-AT"]))
routed_cookie = st.one_of(
    st.none(),
    st.text(max_size=30),
    st.sampled_from(["rl_app=b", "rl_out=y", "rl_app=zzz; rl_out=x", "rl_app=a\r\nX: 1"]),
)


@settings_(max_examples=400)
@given(
    path=st.one_of(
        st.text().map(lambda text: "/app/" + text),
        st.sampled_from(["/out", "/app/", "/app//evil.com", "/app/..%2F..%2Fevil"]),
    ),
    query=routed_query,
    agent=routed_agent,
    language=routed_language,
    cookie=routed_cookie,
    now=st.sampled_from([INSIDE, AFTER]),
)
def test_no_routed_request_leaves_its_rules_origins(
    path: str, query: bytes, agent: str | None, language: str | None, cookie: str | None, now: float
) -> None:
    """Routes, splits, macros, a window and a dynamic target together: the
    Location is on an origin of the rule's config (or, for a dynamic target,
    an allow-listed host), printable ASCII; a Set-Cookie names a configured
    variant of that rule; the route and variant are configured ones."""
    request = scope(path, query, agent=agent, language=language, cookie=cookie)
    target, location, _, route, variant, set_cookie = ROUTED.answer(
        request, None, clients(), HIT_ID, now
    )
    name = target.name
    assert name in ROUTED_ORIGINS
    if location is not None:
        assert all("\x21" <= char <= "\x7e" for char in location), location
        assert "\\" not in location
        parts = urlsplit(location)
        origin = f"{parts.scheme}://{parts.netloc}"
        assert location.startswith(origin + "/")
        assert origin in ROUTED_ORIGINS[name] or (
            name == "out" and parts.scheme in ("http", "https") and allowed_target(parts.netloc)
        ), location
    assert variant is None or variant in ROUTED_VARIANTS[name]
    assert route is None or route in (0, 1, 2, "de")
    if set_cookie is not None:
        assert variant is not None
        assert set_cookie.startswith(f"rl_{name}={variant};".encode())
        assert b"\r" not in set_cookie and b"\n" not in set_cookie
