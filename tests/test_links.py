"""Validity windows, macros and dynamic targets (links.py), from validated config.

The safety property under test: no request makes a dynamic rule answer with
a ``Location`` whose host, as a browser's parser reads it, is not in the
rule's ``allowed_hosts``; a macro fills query values and nothing else.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import jsonschema
import orjson
import pytest
from ada_url import URL
from hypothesis import example, given, settings
from hypothesis import strategies as st

from redirect_logger.config import ConfigError, parse_settings
from redirect_logger.hits import Enricher, Hit
from redirect_logger.links import REASONS, allowed_host, answer
from redirect_logger.pixel import GIF, query_object
from redirect_logger.rules import RuleTable
from support import check_record_schema

KAFKA = {"bootstrap.servers": "127.0.0.1:9"}
HIT_ID = "019ad3c2-5c1e-7a00-8000-00000000000a"
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC).timestamp()


def config(rules: list[dict[str, Any]], **tables: Any) -> dict[str, Any]:
    return {"kafka": dict(KAFKA), "rules": rules, **tables}


def table(rules: list[dict[str, Any]], **tables: Any) -> RuleTable:
    return RuleTable.from_settings(parse_settings(config(rules, **tables)))


def refused(rules: list[dict[str, Any]], **tables: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_settings(config(rules, **tables))
    return str(caught.value)


# ---------------------------------------------------------------- windows

CAMPAIGN = {
    "name": "camp",
    "path": "/c",
    "target": "https://shop.example/sale",
    "valid_from": datetime(2026, 12, 1, tzinfo=UTC),
    "valid_until": "2027-01-01T00:00:00Z",
}


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (DEC_1 - 0.001, (404, None, "expired")),
        (DEC_1, (302, "https://shop.example/sale", None)),
        (JAN_1 - 0.001, (302, "https://shop.example/sale", None)),
        (JAN_1, (404, None, "expired")),
    ],
)
def test_a_window_answers_from_its_start_until_its_end(
    now: float, expected: tuple[int, str | None, str | None]
) -> None:
    found = answer(table([CAMPAIGN]), "/c", now=now)
    assert (found.target.status, found.location, found.detail) == expected
    assert found.target.name == "camp"


def test_the_expired_answer_is_410_or_a_redirect_forwarded_as_the_rule_says() -> None:
    gone = table([{**CAMPAIGN, "expired_status": 410}])
    assert answer(gone, "/c", now=JAN_1)[1:] == (None, "expired")
    assert answer(gone, "/c", now=JAN_1).target.status == 410
    ended = table(
        [
            {
                **CAMPAIGN,
                "expired_status": 307,
                "expired_target": "https://shop.example/ended?from={rule}&id={hit_id}",
            }
        ]
    )
    found = answer(ended, "/c", b"x=1&id=mine", hit_id=HIT_ID, now=JAN_1)
    assert found.target.status == 307
    assert found.location == f"https://shop.example/ended?from=camp&id={HIT_ID}&x=1"
    assert found.detail == "expired"
    assert found.target.cache_control == b"no-store"


def test_an_open_ended_window() -> None:
    starts = table([{**CAMPAIGN, "valid_until": None}])
    assert answer(starts, "/c", now=1e12).detail is None
    assert answer(starts, "/c", now=0).detail == "expired"
    ends = table([{**CAMPAIGN, "valid_from": None}])
    assert answer(ends, "/c", now=0).detail is None
    assert answer(ends, "/c", now=JAN_1).detail == "expired"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"valid_until": "2026-11-01T00:00:00Z"},
            "rules.0: valid_until: 2026-11-01T00:00:00+00:00 is not after valid_from "
            "(2026-12-01T00:00:00+00:00)",
        ),
        ({"valid_until": CAMPAIGN["valid_from"]}, "rules.0: valid_until: 2026-12-01T00:00"),
        ({"valid_from": datetime(2026, 12, 1)}, "rules.0.valid_from: Value error, needs a UTC"),
        ({"valid_from": "2026-12-01T00:00:00"}, "rules.0.valid_from: Value error, needs a UTC"),
        ({"valid_from": "next week"}, "rules.0.valid_from: Value error, 'next week' is not a"),
        ({"expired_status": 307}, "rules.0: expired_target: required with expired_status 307"),
        (
            {"expired_target": "https://shop.example/x"},
            "rules.0: expired_target: not allowed with expired_status 404",
        ),
        ({"expired_status": 200}, "rules.0.expired_status: must be one of 404, 410, 301"),
        (
            {"expired_status": 301, "expired_target": "ftp://x/"},
            "rules.0.expired_target: must be an absolute http:// or https:// URL",
        ),
    ],
)
def test_bad_windows_are_refused_naming_the_key(change: dict[str, Any], message: str) -> None:
    assert message.replace("Value error, ", "") in refused([{**CAMPAIGN, **change}])


def test_a_reload_keeps_the_window() -> None:
    running = parse_settings(config([]))
    reloaded = running.with_rules_of(parse_settings(config([CAMPAIGN])))
    assert reloaded.rules[0].valid_from == datetime(2026, 12, 1, tzinfo=UTC)
    assert reloaded.rules[0].valid_until == datetime(2027, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------- macros

APP = {
    "name": "summer sale/2",
    "path": "/app",
    "target": "https://example.com/app?click={hit_id}&src={rule}&k={x}#top",
}


def test_macros_fill_query_values_and_the_request_cannot_set_them() -> None:
    rules = table([APP])
    expected = f"https://example.com/app?click={HIT_ID}&src=summer%20sale%2F2&k={{x}}#top"
    assert answer(rules, "/app", hit_id=HIT_ID).location == expected
    found = answer(rules, "/app", b"click=forged&src=x&utm=1&k=y", hit_id=HIT_ID)
    assert found.location == (
        f"https://example.com/app?click={HIT_ID}&src=summer%20sale%2F2&utm=1&k=y#top"
    )
    assert found.detail is None and found.target.name == "summer sale/2"


def test_a_prefix_rule_with_macros_forwards_its_path() -> None:
    rules = table(
        [
            {
                "name": "p",
                "path": "/p/*",
                "target": "https://example.com/base/?id={hit_id}",
                "forward_path": True,
            }
        ]
    )
    found = answer(rules, "/p/a/../../b", b"", hit_id=HIT_ID)
    assert found.location == f"https://example.com/base/b?id={HIT_ID}"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("https://{hit_id}.example.com/", "{hit_id} in the host"),
        ("https://example.com:{rule}/", "{rule} in the host"),
        ("https://example.com/{hit_id}", "{hit_id} in the path"),
        ("https://example.com/?{rule}=1", "{rule} in a query key"),
        ("https://example.com/?a=1&{hit_id}", "{hit_id} in a query key"),
        ("https://example.com/#{hit_id}", "{hit_id} in the fragment"),
    ],
)
def test_a_macro_outside_query_values_is_refused(target: str, message: str) -> None:
    error = refused([{"name": "m", "path": "/m", "target": target}])
    assert f"rules.0.target: {message}: macros are replaced in query values only" in error
    error = refused(
        [{**CAMPAIGN, "expired_status": 302, "expired_target": target}],
    )
    assert f"rules.0.expired_target: {message}" in error


def test_macros_are_refused_in_the_fallback() -> None:
    error = refused([], fallback={"status": 302, "target": "https://x.example/?id={hit_id}"})
    assert "fallback: target: {hit_id} and {rule} are replaced in [[rules]] targets only" in error


def test_a_rule_without_features_has_no_live_part() -> None:
    rules = table(
        [
            {"name": "plain", "path": "/p", "target": "https://example.com/?a={id}"},
            {**CAMPAIGN, "name": "w", "path": "/w"},
            APP,
        ]
    )
    assert rules.match("/p")[0].live is None
    assert rules.match("/w")[0].live is not None
    assert rules.match("/app")[0].live is not None


# ---------------------------------------------------------------- dynamic targets

ALLOWED = ["example.com", "*.Example.org", "bücher.example", "app.example.net:8443"]
OUT = {"name": "out", "path": "/out", "target_param": "u", "allowed_hosts": ALLOWED}
DYNAMIC = table([OUT])
FALLING = table(
    [{**OUT, "on_refused": "fallback", "forward_query": False}],
    fallback={"status": 302, "target": "https://example.com/sorry", "forward_query": False},
)


def dynamic(query: bytes | str, rules: RuleTable = DYNAMIC) -> tuple[int, str | None, Any]:
    raw = query.encode() if isinstance(query, str) else query
    found = answer(rules, "/out", raw, hit_id=HIT_ID)
    return found.target.status, found.location, found.detail


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://example.com/a?b=1#c", (302, "https://example.com/a?b=1#c", None)),
        ("HTTPS://EXAMPLE.COM", (302, "https://example.com/", None)),
        ("https://example.com.", (302, "https://example.com./", None)),
        ("http://example.com:80/x", (302, "http://example.com/x", None)),
        ("https://a.b.example.org/", (302, "https://a.b.example.org/", None)),
        ("https://Bücher.Example/ü", (302, "https://xn--bcher-kva.example/%C3%BC", None)),
        ("https://ex%61mple.com/", (302, "https://example.com/", None)),
        ("https://app.example.net:8443/", (302, "https://app.example.net:8443/", None)),
        ("https://example.com\\@evil.com/", (302, "https://example.com/@evil.com/", None)),
        ("https://example.com/ a\r\n", (302, "https://example.com/%20a", None)),
        ("https:example.com", (302, "https://example.com/", None)),
        ("https://evil.com/", (400, None, "host")),
        ("https://example.org/", (400, None, "host")),
        ("https://example.com.evil.com/", (400, None, "host")),
        ("https://evil.com\\.example.com/", (400, None, "host")),
        ("https://evil.com%2F.example.com/", (400, None, "malformed")),
        ("https://127.0.0.1/", (400, None, "host")),
        ("https://example.com:8443/", (400, None, "port")),
        ("https://app.example.net/", (400, None, "port")),
        ("http://app.example.net:8443/", (302, "http://app.example.net:8443/", None)),
        ("https://example.com@evil.com/", (400, None, "userinfo")),
        ("https://evil.com@example.com/", (400, None, "userinfo")),
        ("//example.com/", (400, None, "malformed")),
        ("/path", (400, None, "malformed")),
        ("javascript:alert(1)//example.com", (400, None, "scheme")),
        ("ftp://example.com/", (400, None, "scheme")),
        ("https://exa mple.com/", (400, None, "malformed")),
        ("", (400, None, "missing")),
    ],
)
def test_dynamic_targets(value: str, expected: tuple[int, str | None, str | None]) -> None:
    assert dynamic("u=" + quote(value, safe="")) == expected
    assert expected[2] in (None, *REASONS)


def test_the_target_param_is_read_once_and_the_rest_is_forwarded() -> None:
    assert dynamic(b"") == (400, None, "missing")
    assert dynamic(b"x=1") == (400, None, "missing")
    assert dynamic(b"u=https://example.com/&u=https://evil.com/") == (400, None, "repeated")
    assert dynamic(b"u=&u=https://evil.com/") == (400, None, "repeated")
    assert dynamic(b"a=1&u=https%3A%2F%2Fexample.com%2Fp%3Fq%3D1&b=%0D%0A") == (
        302,
        "https://example.com/p?q=1&a=1&b=%0D%0A",
        None,
    )
    # A raw (not percent-encoded) "?" and "&" in the value: "&x" is the request's own key.
    assert dynamic(b"u=https://example.com/p?q=1&x=2") == (
        302,
        "https://example.com/p?q=1&x=2",
        None,
    )


def test_a_refused_target_can_go_to_the_fallback_with_its_reason() -> None:
    assert dynamic(b"u=https://evil.com/&x=1", FALLING) == (
        302,
        "https://example.com/sorry",
        "host",
    )
    found = answer(FALLING, "/out", b"u=https://evil.com/")
    assert found.target.name == "out"  # recorded under the rule that refused it
    assert dynamic(b"u=https://example.com/ok&x=1", FALLING) == (
        302,
        "https://example.com/ok",
        None,
    )


@pytest.mark.parametrize(
    ("entry", "normalized"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.com.", "example.com"),
        ("*.Example.org", "*.example.org"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("app.example.net:8443", "app.example.net:8443"),
        ("*.example.net:08443", "*.example.net:8443"),
        ("https://example.com", None),
        ("example.com/path", None),
        ("user@example.com", None),
        ("127.0.0.1", None),
        ("[::1]", None),
        ("a..b", None),
        ("exa mple.com", None),
        ("ex_ample.com", None),
        ("*", None),
        ("*.", None),
        ("a.*.example.com", None),
        ("example.com:0", None),
        ("example.com:65536", None),
        ("example.com:", None),
        ("", None),
    ],
)
def test_allowed_hosts_entries(entry: str, normalized: str | None) -> None:
    assert allowed_host(entry) == normalized
    rule = {**OUT, "allowed_hosts": [entry]}
    if normalized is None:
        assert f"rules.0.allowed_hosts: {entry!r} is not a host" in refused([rule])
    else:
        assert parse_settings(config([rule])).rules[0].allowed_hosts == [normalized]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": "https://example.com/"}, "rules.0: target: exactly one of target and"),
        ({"target_param": None}, "rules.0: target: exactly one of target and target_param"),
        ({"allowed_hosts": []}, "rules.0: allowed_hosts: target_param needs at least one"),
        (
            {"path": "/out/*", "forward_path": True},
            "rules.0: forward_path: not with target_param",
        ),
        ({"target_param": "a b"}, "rules.0.target_param: String should match pattern"),
        ({"on_refused": "404"}, "rules.0.on_refused: Input should be 'reject' or 'fallback'"),
    ],
)
def test_bad_dynamic_rules_are_refused_naming_the_key(change: dict[str, Any], message: str) -> None:
    assert message in refused([{**OUT, **change}])


def test_allowed_hosts_and_on_refused_need_target_param() -> None:
    plain = {"name": "p", "path": "/p", "target": "https://example.com/"}
    error = refused([{**plain, "allowed_hosts": ["example.com"]}])
    assert "rules.0: allowed_hosts: only with target_param" in error
    assert "rules.0: on_refused: only with target_param" in refused(
        [{**plain, "on_refused": "fallback"}]
    )


# ---------------------------------------------------------------- no open redirect


def allowed(url: str) -> bool:
    """The allow-list ALLOWED, written out by hand: is the browser's host of
    ``url`` (and its port) one of them?"""
    parsed = URL(url)
    host = parsed.hostname.removesuffix(".")
    port = parsed.port or {"http:": "80", "https:": "443"}[parsed.protocol]
    if host in ("example.com", "xn--bcher-kva.example") or host.endswith(".example.org"):
        return parsed.port == ""  # the scheme's default port (the parser drops it)
    return host == "app.example.net" and port == "8443"


SCHEMES = ["https://", "http://", "HTTPS://", "hTtP://", "//", "https:", "https:/", "https:\\\\",
           "\\\\", "/\\", "javascript:", "data:", "", " https://", "\thttps://"]  # fmt: skip
USERS = ["", "@", "user@", "u:p@", "example.com@", "evil.com@", "example.com%40", ":@"]
HOSTS = [
    "example.com", "EXAMPLE.COM", "example.com.", "example.com..", "ex%61mple.com",
    "example%2Ecom", "example%252Ecom", "evil.com", "evil.com.", "example.com.evil.com",
    "evilexample.com", "evil.com#.example.com", "evil.com?.example.com", "evil.com/.example.com",
    "evil.com\\.example.com", "evil.com%5C.example.com", "evil.com%2F.example.com",
    "a.example.org", "A.B.EXAMPLE.ORG.", "example.org", "xexample.org", "a.example.org.evil.com",
    "bücher.example", "BÜCHER.example", "xn--bcher-kva.example",
    "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",
    "example。com", "examp\u00adle.com", "app.example.net", "127.0.0.1", "[::1]", "0x7f.1",
    "2130706433", "",
]  # fmt: skip
PORTS = ["", ":", ":443", ":80", ":8443", ":08443", ":0", ":99999", ":abc", ":8443@evil.com"]
TAILS = ["", "/", "//evil.com", "/\\evil.com", "\\evil.com", "?", "?x=//evil.com", "#",
         "#@evil.com", "@evil.com", "\\@evil.com", "%2F%2Fevil.com", "/%2e%2e/evil.com",
         ".evil.com", "\r\nLocation: https://evil.com", "\x00evil.com"]  # fmt: skip

TEXT = st.characters(exclude_categories=("Cs",))  # what a UTF-8 query can carry
composed = st.tuples(
    st.sampled_from(SCHEMES),
    st.sampled_from(USERS),
    st.sampled_from(HOSTS),
    st.sampled_from(PORTS),
    st.sampled_from(TAILS),
    st.text(TEXT, max_size=20),
).map("".join)
any_value = st.one_of(composed, st.text(TEXT))
# How the value is put in the query: percent-encoded whole, as sent, or with a raw "+".
encodings = st.sampled_from(
    [
        lambda value: quote(value, safe="").encode(),
        str.encode,
        lambda value: quote(value, safe=":/?#@\\").encode(),
    ]
)
extra_pairs = st.lists(st.sampled_from([b"x=1", b"u", b"a=%0D%0A", b"x=//evil.com", b"&"]))


def assert_safe(found: tuple[int, str | None, Any]) -> None:
    status, location, detail = found
    if detail is not None:  # refused: a 400, or (FALLING) its fallback
        assert detail in REASONS
        assert (status, location) in ((400, None), (302, "https://example.com/sorry"))
        return
    assert status == 302 and location is not None
    assert all("\x21" <= char <= "\x7e" for char in location), location
    assert allowed(location), location
    # Python's own parser finds the same host and port, so no reader disagrees.
    parsed, browser = urlsplit(location), URL(location)
    assert parsed.hostname == browser.hostname
    assert ("" if parsed.port is None else str(parsed.port)) == browser.port


@settings(max_examples=2000)
@given(value=any_value, encode=encodings, before=extra_pairs, after=extra_pairs)
@example(value="https://example.com\\@evil.com", encode=str.encode, before=[], after=[])
@example(value="https://evil.com%2F@example.com", encode=str.encode, before=[], after=[])
@example(value="https:\\\\evil.com", encode=str.encode, before=[], after=[])
def test_no_dynamic_request_leaves_the_allow_list(
    value: str, encode: Any, before: list[bytes], after: list[bytes]
) -> None:
    query = b"&".join([*before, b"u=" + encode(value), *after])
    assert_safe(dynamic(query))
    assert_safe(dynamic(query, FALLING))


@given(query=st.binary())
def test_no_byte_string_leaves_the_allow_list(query: bytes) -> None:
    assert_safe(dynamic(query))


@given(value=composed)
def test_an_allowed_answer_is_the_parsed_url(value: str) -> None:
    status, location, _ = dynamic(b"u=" + quote(value, safe="").encode())
    if location is not None:
        assert status == 302
        given, sent = URL(value), URL(location)
        parts = ("protocol", "host", "pathname", "search", "hash")
        assert [getattr(sent, part) for part in parts] == [getattr(given, part) for part in parts]


# ---------------------------------------------------------------- records


def record_of(status: int, location: str | None, rule: str | None, **fields: Any) -> Any:
    settings = parse_settings(config([]))
    enricher = Enricher(settings.records, settings.server)
    hit = Hit(
        HIT_ID,
        1795541533.608,
        "GET",
        "https",
        "/out",
        b"u=https://evil.com/",
        [(b"host", b"t.example")],
        ("192.0.2.1", 4000),
        status,
        location,
        rule,
        **fields,
    )
    encoded = enricher.encode(hit)
    assert encoded is not None
    record = orjson.loads(encoded.value)
    check_record_schema(record)
    return record, dict(encoded.headers)


@pytest.mark.parametrize(
    ("status", "location", "rule", "detail", "kind", "extra"),
    [
        (400, None, "out", "host", "refused", {"reason": "host"}),
        (302, "https://example.com/sorry", "out", "port", "redirect", {"reason": "port"}),
        (404, None, "out", "missing", "miss", {"reason": "missing"}),
        (410, None, "camp", "expired", "miss", {"expired": True}),
        (404, None, "camp", "expired", "miss", {"expired": True}),
        (307, "https://x.example/ended", "camp", "expired", "redirect", {"expired": True}),
        (302, "https://x.example/", "camp", None, "redirect", {}),
    ],
)
def test_records_say_expired_or_why_refused(
    status: int,
    location: str | None,
    rule: str,
    detail: str | None,
    kind: str,
    extra: dict[str, Any],
) -> None:
    record, headers = record_of(status, location, rule, detail=detail)
    assert (record["status"], record["location"], record["rule"]) == (status, location, rule)
    assert record["kind"] == kind and headers["kind"] == kind.encode()
    assert record["v"] == 3 and headers["schema-version"] == b"3"
    assert {key: record[key] for key in ("expired", "reason") if key in record} == extra


def test_the_schema_holds_the_new_fields_to_their_kinds() -> None:
    record, _ = record_of(400, None, "out", detail="host")
    for wrong in (
        {**record, "reason": "because"},
        {key: value for key, value in record.items() if key != "reason"},
        {**record, "expired": False},
        {**record, "rule": None},
        {**record, "kind": "pixel"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            check_record_schema(wrong)
    expired, _ = record_of(410, None, "camp", detail="expired")
    with pytest.raises(jsonschema.ValidationError):
        check_record_schema({**expired, "kind": "refused", "status": 400})


@pytest.mark.parametrize(
    ("query", "data"),
    [
        (b"", {}),
        (b"c=spring&r=42", {"c": "spring", "r": "42"}),
        (b"t=a&t=b&t=c&x", {"t": ["a", "b", "c"], "x": ""}),
        (
            b"q=caf%C3%A9+au+lait&e=%FF&raw=\xff",
            {"q": "café au lait", "e": "\\xff", "raw": "\\xff"},
        ),
        (b"a=%26%3D&&=v", {"a": "&=", "": "v"}),
    ],
)
def test_the_pixel_records_its_query_as_an_object(query: bytes, data: dict[str, Any]) -> None:
    assert query_object(query) == data
    record, headers = record_of(200, None, None, data=orjson.dumps(query_object(query)))
    assert record["kind"] == "pixel" and headers["kind"] == b"pixel"
    assert record["data"] == data and record["status"] == 200
    assert "expired" not in record and "reason" not in record


def test_the_pixels_data_is_cut_as_its_query_is() -> None:
    data = query_object(b"a=" + b"x" * 5000 + b"&b=1")
    assert data == {"a": "x" * 4094}


def test_the_pixel_is_a_one_by_one_transparent_gif() -> None:
    assert GIF[:6] == b"GIF89a" and GIF[-1:] == b";"
    assert int.from_bytes(GIF[6:8], "little") == int.from_bytes(GIF[8:10], "little") == 1
    flags = GIF[10]
    assert flags & 0x80  # a global colour table of 2 ** ((flags & 7) + 1) colours
    table_end = 13 + 3 * 2 ** ((flags & 7) + 1)
    control = GIF[table_end : table_end + 8]
    assert control[:3] == b"!\xf9\x04" and control[3] & 1  # transparent colour index...
    assert control[6] == GIF[11] == 0  # ...0, also the background
    assert len(GIF) == 43


@given(entry=st.text(TEXT, max_size=40))
@example(entry="*.B\u00fccher.example.:443")
@example(entry="\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com")
def test_an_accepted_allowed_host_is_normalized_for_good(entry: str) -> None:
    """Whatever is accepted comes out lower-case ASCII, stays the same when
    normalized again, and allows exactly the host a browser reads in it."""
    normalized = allowed_host(entry)
    if normalized is None:
        return
    assert normalized.isascii() and normalized == normalized.lower()
    assert allowed_host(normalized) == normalized
    host, _, port = normalized.removeprefix("*.").partition(":")
    url = f"https://{'a.' if normalized.startswith('*.') else ''}{host}:{port or 443}/"
    rules = table([{**OUT, "allowed_hosts": [entry]}])
    sent = answer(rules, "/out", b"u=" + quote(url, safe="").encode()).location
    assert sent is not None and URL(sent).hostname.endswith(host)


@pytest.mark.parametrize(
    ("pixel", "rules", "message"),
    [
        ({"path": "/"}, [], "pixel.path: Value error, must start with"),
        ({"path": "/healthz"}, [], "pixel.path: Value error, /healthz is reserved"),
        ({"path": "/p?x"}, [], "pixel.path: Value error, must be printable ASCII"),
        ({"enabled": True}, [{**OUT, "path": "/p.gif"}], "rules.0.path: '/p.gif' is pixel.path"),
    ],
)
def test_bad_pixel_settings_are_refused_naming_the_key(
    pixel: dict[str, Any], rules: list[dict[str, Any]], message: str
) -> None:
    assert message.replace("Value error, ", "") in refused(rules, pixel=pixel)


def test_the_pixel_and_collect_cannot_share_a_path() -> None:
    error = refused(
        [], pixel={"enabled": True, "path": "/e"}, collect={"enabled": True, "path": "/e"}
    )
    assert "pixel.path: '/e' is collect.path too" in error
    # Off, its path is anybody's.
    parse_settings(config([{**OUT, "path": "/p.gif"}], pixel={"enabled": False}))
