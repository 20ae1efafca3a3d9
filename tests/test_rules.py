"""RuleTable, Target and merge_query, built from validated config.

The safety property under test: a Location always starts with the rule
target's own ``scheme://netloc/``, and request bytes only ever land there
percent-encoded, in the path after it or in the query.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from redirect_logger.config import ConfigError, parse_settings
from redirect_logger.links import answer
from redirect_logger.rules import RuleTable, Target, merge_query, quote_path, request_host

KAFKA = {"bootstrap.servers": "127.0.0.1:9"}


def build_table(
    rules: list[dict[str, Any]] | None = None, fallback: dict[str, Any] | None = None
) -> RuleTable:
    data: dict[str, Any] = {"kafka": dict(KAFKA), "rules": rules or []}
    if fallback is not None:
        data["fallback"] = fallback
    return RuleTable.from_settings(parse_settings(data))


HIT_ID = "019ad3c2-5c1e-7a00-8000-00000000000a"


def resolve(table: RuleTable, path: str, query: bytes = b"") -> tuple[Target, str | None]:
    """The answering target and the Location, as the service works them out
    (a rule with macros through links.py, its hit id ``HIT_ID``)."""
    found = answer(table, path, query, hit_id=HIT_ID)
    return found.target, found.location


def byte_pairs(query: bytes) -> list[tuple[bytes, bytes]]:
    """The form-encoded (key, value) pairs of a query, decoded to exact bytes.

    Latin-1 maps each byte to one character and back, so parse_qsl's
    percent-decoding yields the bytes themselves, whatever they are.
    """
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return [(key.encode("latin-1"), value.encode("latin-1")) for key, value in pairs]


def documented_merge(target_query: bytes, request_query: bytes) -> list[tuple[bytes, bytes]]:
    """merge_query's docstring: the target's pairs whose key the request does not
    set, in order, then the request's pairs in order."""
    request = byte_pairs(request_query)
    overridden = {key for key, _ in request}
    return [pair for pair in byte_pairs(target_query) if pair[0] not in overridden] + request


def assert_on_origin(location: str | None, target_url: str) -> None:
    assert location is not None
    expected = urlsplit(target_url)
    parts = urlsplit(location)
    assert (parts.scheme, parts.netloc) == (expected.scheme, expected.netloc)
    assert location.startswith(f"{expected.scheme}://{expected.netloc}/")
    # Printable ASCII without space: no CR, LF, NUL, DEL, other controls or non-ASCII.
    assert all("\x21" <= char <= "\x7e" for char in location), location
    assert "\\" not in location


def has_dot_segments(path: str) -> bool:
    return any(segment in (".", "..") for segment in path.split("/"))


def assert_forwarded(location: str, base: str, remainder: str) -> None:
    """The decoded Location path is ``joined_path``; with dot segments in the
    remainder, it stays under ``base`` and keeps none of them."""
    decoded = unquote(urlsplit(location).path, errors="strict")
    if not has_dot_segments(remainder):
        assert decoded == joined_path(base, remainder)
        return
    assert decoded.startswith(base)
    assert not has_dot_segments(decoded[len(base) :])


def joined_path(base: str, remainder: str) -> str:
    """The decoded path a forwarded remainder should produce: one "/" between
    a base ending in "/" and the remainder, the remainder's own slashes kept
    after a base that does not end in "/"."""
    if not remainder:
        return base
    if base.endswith("/"):
        return base + remainder.lstrip("/")
    return base + (remainder if remainder.startswith("/") else "/" + remainder)


NASTY_PATHS = [
    "//evil.com",
    "/\\evil.com",
    "\\\\evil.com",
    "%2F%2Fevil.com",
    "/%2F%2Fevil.com",
    "@evil.com",
    "/@evil.com",
    ":@evil.com",
    "/\r\nSet-Cookie: a=1",
    "/\x00",
    "/a b?c=d#e",
    "/caf\u00e9/\u65e5\u672c/\U0001f600",
    "/" + "a" * 10_000,
    "/" + "\u00e9/" * 3_000,
]
NASTY_QUERIES = [
    b"",
    b"x=1",
    b"%0D%0A=%0D%0A",
    b"a=\r\nLocation: https://evil.com",
    b"a=\xff",
    b"\x00=\x00",
    b"q=caf%C3%A9",
    b"#frag=1",
    b"a=1&&&b=2&=&",
    b"%zz=%",
]

EXACT_URL = "https://exact.example/landing?src=x#top"
PREFIX_URL = "https://docs.example.com/base"
FALLBACK_URL = "http://fallback.example:8080/f/?z=1"
# Macros fill query values only: the origin and path are the target's.
MACRO_URL = "https://macro.example/m/?id={hit_id}&r={rule}&k=1#f"

MIXED = build_table(
    rules=[
        {"name": "exact", "path": "/go", "target": EXACT_URL},
        {"name": "prefix", "path": "/docs/*", "target": PREFIX_URL, "forward_path": True},
        {"name": "macro", "path": "/m/*", "target": MACRO_URL, "forward_path": True},
    ],
    fallback={"status": 302, "target": FALLBACK_URL, "forward_path": True},
)
URL_BY_NAME = {"exact": EXACT_URL, "prefix": PREFIX_URL, "macro": MACRO_URL, None: FALLBACK_URL}

any_path = st.one_of(
    st.text(),
    st.text().map(lambda text: "/" + text),
    st.text().map(lambda text: "/docs/" + text),
    st.text().map(lambda text: "/m/" + text),
    st.sampled_from(["/go", "/docs", "/docs/", "/m", *NASTY_PATHS]),
)
# Query-shaped bytes that hit the separators and escapes, next to arbitrary bytes.
query_pieces = st.sampled_from(
    [b"a", b"b", b"=", b"&", b"+", b" ", b"%", b"%0D%0A", b"%FF", b"%26", b"%3D", b"#", b"\xff"]
)
any_query = st.one_of(st.binary(), st.lists(query_pieces).map(b"".join))


def nasty_examples(test: Any) -> Any:
    for path in NASTY_PATHS:
        test = example(path=path, query=b"a=1")(test)
        test = example(path="/docs/" + path, query=b"")(test)
        test = example(path="/m/" + path, query=b"id=%2F%2Fevil.com")(test)
    for query in NASTY_QUERIES:
        test = example(path="/go", query=query)(test)
        test = example(path="/m/x", query=query)(test)
        test = example(path="/docs//evil.com", query=query)(test)
    return test


@given(path=any_path, query=any_query)
@nasty_examples
def test_any_request_stays_on_the_rule_targets_origin(path: str, query: bytes) -> None:
    target, location = resolve(MIXED, path, query)
    assert_on_origin(location, URL_BY_NAME[target.name])
    if target.name == "macro":  # the macros' values, whatever the request says
        assert location is not None
        pairs = parse_qsl(urlsplit(location).query)
        assert pairs[:2] == [("id", HIT_ID), ("r", "macro")]
        assert [key for key, _ in pairs].count("id") == 1
        assert urlsplit(location).path.startswith("/m/")
        assert location.endswith("#f")


@pytest.mark.parametrize("query", NASTY_QUERIES)
@pytest.mark.parametrize("path", ["/go", "/docs/x", "/docs//evil.com", "//evil.com", "/m/x"])
def test_nasty_queries_stay_on_origin(path: str, query: bytes) -> None:
    target, location = resolve(MIXED, path, query)
    assert_on_origin(location, URL_BY_NAME[target.name])


# The path side on its own (query empty), so a query failure cannot mask it.
@pytest.mark.parametrize(
    "target_url",
    [
        "https://docs.example.com",
        "https://docs.example.com/",
        "https://docs.example.com/base",
        "http://docs.example.com:8080/base/?a=1#frag",
    ],
)
@given(remainder=st.text())
@example(remainder="")
@example(remainder="//evil.com")
@example(remainder="/\\evil.com")
@example(remainder="%2F%2Fevil.com")
@example(remainder="@evil.com")
@example(remainder="/\r\n\x00")
@example(remainder="?#%")
@example(remainder="\u00e9" * 5_000)
def test_forwarded_prefix_remainder_lands_encoded_in_the_path(
    target_url: str, remainder: str
) -> None:
    table = build_table(
        rules=[{"name": "docs", "path": "/docs/*", "target": target_url, "forward_path": True}]
    )
    target, location = resolve(table, "/docs/" + remainder)
    assert target.name == "docs"
    assert_on_origin(location, target_url)
    assert location is not None
    assert_forwarded(location, urlsplit(target_url).path or "/", remainder)
    assert urlsplit(location).query == urlsplit(target_url).query
    assert urlsplit(location).fragment == urlsplit(target_url).fragment


PATH_SAFE = "/-._~!$&'()*+,;=:@"  # the forwarded path's kept characters, as rules.py has them


@given(
    text=st.one_of(
        st.text(),
        st.text(st.characters(max_codepoint=0x7F)),
        st.text(st.characters(max_codepoint=0xFF)),
        st.text(
            st.sampled_from(["%", "/", '"', "\x00", "\x7f", "\x80", "\xff", "a", "~", "\u0100"])
        ),
    )
)
@example(text="")
@example(text='"' * 16_000)
@example(text="a/b c/%41/\u00e9/\U0001f600/\x00")
@example(text="".join(map(chr, range(256))))
def test_quote_path_is_quote_character_for_character(text: str) -> None:
    assert quote_path(text) == quote(text, safe=PATH_SAFE)


def test_quote_path_refuses_a_lone_surrogate_as_quote_does() -> None:
    with pytest.raises(UnicodeEncodeError):
        quote("a\udcff", safe=PATH_SAFE)
    with pytest.raises(UnicodeEncodeError):
        quote_path("a\udcff")


@pytest.mark.parametrize(
    "target_url", ["https://f.example", "https://f.example/", "https://f.example/f?z=1#end"]
)
@given(path=st.one_of(st.text(), st.text().map(lambda text: "/" + text)))
@example(path="//evil.com")
@example(path="/\\evil.com")
@example(path="%2F%2Fevil.com")
@example(path="@evil.com")
@example(path="/\r\n")
@example(path="/\x00")
@example(path="/" + "x" * 10_000)
def test_forwarded_fallback_path_lands_encoded_in_the_path(target_url: str, path: str) -> None:
    table = build_table(fallback={"status": 302, "target": target_url, "forward_path": True})
    target, location = resolve(table, path)
    assert (target.name, target.status) == (None, 302)
    assert_on_origin(location, target_url)
    assert location is not None
    assert_forwarded(location, urlsplit(target_url).path or "/", path)


@pytest.mark.parametrize(
    "target_url",
    ["https://t.example", "https://t.example/p?a=1&b=2", "https://t.example/p?b=2&b=3&c=#frag"],
)
@given(query=any_query)
@example(query=b"b=9&c=3")
@example(query=b"k%0D%0A=v%0D%0A&sp=a b&amp=x%26y")
@example(query=b"raw=\xff&nul=\x00")
@example(query=b"q=caf%C3%A9")
@example(query=b"a=%FF")
@example(query=b"#=#")
def test_query_merge_round_trips_to_the_documented_pairs(target_url: str, query: bytes) -> None:
    table = build_table(rules=[{"name": "q", "path": "/q", "target": target_url}])
    _, location = resolve(table, "/q", query)
    assert_on_origin(location, target_url)
    assert location is not None
    parts = urlsplit(location)
    target_query = urlsplit(target_url).query.encode("ascii")
    assert byte_pairs(parts.query.encode("ascii")) == documented_merge(target_query, query)
    assert parts.fragment == urlsplit(target_url).fragment


# --- merge semantics, exactly ---


def exact_location(target_url: str, query: bytes, **options: Any) -> str | None:
    table = build_table(rules=[{"name": "r", "path": "/r", "target": target_url, **options}])
    return resolve(table, "/r", query)[1]


def test_request_wins_per_key_and_adds_its_keys_after_the_targets() -> None:
    location = exact_location("https://t.example/p?a=1&b=2", b"b=9&c=3")
    assert location == "https://t.example/p?a=1&b=9&c=3"


def test_repeated_request_keys_replace_all_of_the_targets_values() -> None:
    location = exact_location("https://t.example/p?a=1&b=2&b=3&c=4", b"b=7&x=0&b=8")
    assert location == "https://t.example/p?a=1&c=4&b=7&x=0&b=8"


def test_forward_query_false_ignores_the_request_query() -> None:
    location = exact_location(
        "https://t.example/p?a=1", b"a=2&evil=%0D%0A&raw=\xff", forward_query=False
    )
    assert location == "https://t.example/p?a=1"


def test_control_characters_spaces_and_ampersands_are_percent_encoded() -> None:
    location = exact_location("https://t.example/p?a=1", b"k%0D%0A=v%0D%0A&sp=a b&amp=x%26y")
    assert location == "https://t.example/p?a=1&k%0D%0A=v%0D%0A&sp=a%20b&amp=x%26y"
    assert byte_pairs(urlsplit(location).query.encode("ascii")) == [
        (b"a", b"1"),
        (b"k\r\n", b"v\r\n"),
        (b"sp", b"a b"),
        (b"amp", b"x&y"),
    ]


def test_raw_non_ascii_bytes_are_percent_encoded() -> None:
    location = exact_location("https://t.example/p?a=1", b"raw=\xff&sp=a b&amp=x%26y%0D%0A")
    assert location == "https://t.example/p?a=1&raw=%FF&sp=a%20b&amp=x%26y%0D%0A"
    assert byte_pairs(urlsplit(location).query.encode("ascii")) == [
        (b"a", b"1"),
        (b"raw", b"\xff"),
        (b"sp", b"a b"),
        (b"amp", b"x&y\r\n"),
    ]


def test_percent_encoded_utf8_in_the_request_query_is_kept() -> None:
    assert exact_location("https://t.example/", b"q=caf%C3%A9") == "https://t.example/?q=caf%C3%A9"


def test_a_hash_in_the_request_query_cannot_start_a_fragment() -> None:
    location = exact_location("https://t.example/p#sec", b"a=#x")
    assert location == "https://t.example/p?a=%23x#sec"


def test_the_targets_fragment_stays_after_the_merged_query() -> None:
    location = exact_location("https://t.example/p?a=1#sec", b"b=2")
    assert location == "https://t.example/p?a=1&b=2#sec"


_PLAIN = st.text(alphabet="abcXYZ019_.~-", max_size=4)


@given(
    pairs=st.lists(st.tuples(_PLAIN.filter(bool), _PLAIN), max_size=6),
    allow=st.none() | st.frozensets(st.sampled_from(["a", "b", "x", "_"])),
    drop=st.frozensets(st.sampled_from(["a", "b", "x", "_"])),
    spoiler=st.sampled_from(["", "%41", "+", " ", "=", "&&", "\xe9"]),
)
def test_plain_queries_merge_as_the_general_path_does(
    pairs: list[tuple[str, str]], allow: frozenset[str] | None, drop: frozenset[str], spoiler: str
) -> None:
    """The plain-query shortcut gives what parsing and encoding give; a query
    with anything else in it (the spoiler) takes the general path."""
    query = "&".join(f"{key}={value}" for key, value in pairs).encode()
    if spoiler and pairs:
        query += spoiler.encode("latin-1")
    general = urlencode(
        [
            pair
            for pair in parse_qsl(
                query.decode("latin-1"), keep_blank_values=True, encoding="latin-1"
            )
            if (allow is None or pair[0] in allow) and pair[0] not in drop
        ],
        quote_via=quote,
        safe="",
        encoding="latin-1",
    ).encode("ascii")
    assert merge_query(b"", query, allow, drop) == general


def test_merge_query_directly() -> None:
    assert merge_query(b"a=1&b=2", b"b=9&c=3") == b"a=1&b=9&c=3"
    assert merge_query(b"", b"x=1&x=2") == b"x=1&x=2"
    assert merge_query(b"a=1", b"&&") == b"a=1"
    assert merge_query(b"", b"") == b""
    assert merge_query(b"a=1", b"a") == b"a="


# --- forward_path ---


DOCS = build_table(
    rules=[
        {
            "name": "docs",
            "path": "/docs/*",
            "target": "https://docs.example.com/",
            "forward_path": True,
        },
        {"name": "base", "path": "/b/*", "target": "https://d.example/base", "forward_path": True},
        {
            "name": "frag",
            "path": "/f/*",
            "target": "https://d.example/base?v=1#top",
            "forward_path": True,
        },
    ]
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/docs/a/b", "https://docs.example.com/a/b"),
        ("/docs", "https://docs.example.com/"),
        ("/docs/", "https://docs.example.com/"),
        ("/docs//a", "https://docs.example.com/a"),
        ("/docs/a b/\u00fc?#%", "https://docs.example.com/a%20b/%C3%BC%3F%23%25"),
        ("/docs/\\evil.com", "https://docs.example.com/%5Cevil.com"),
        ("/b/a/b", "https://d.example/base/a/b"),
        ("/b/a", "https://d.example/base/a"),
        ("/b", "https://d.example/base"),
        ("/b/", "https://d.example/base"),
        ("/f/x/y", "https://d.example/base/x/y?v=1#top"),
    ],
)
def test_forward_path_joins_the_remainder(path: str, expected: str) -> None:
    assert resolve(DOCS, path)[1] == expected


def test_forward_path_and_query_keep_the_fragment_last() -> None:
    assert resolve(DOCS, "/f/x/y", b"q=1")[1] == "https://d.example/base/x/y?v=1&q=1#top"


def test_prefix_rule_without_forward_path_ignores_the_remainder() -> None:
    table = build_table(rules=[{"name": "p", "path": "/p/*", "target": "https://t.example/x"}])
    assert resolve(table, "/p/a/b")[1] == "https://t.example/x"


# --- precedence ---


def test_exact_beats_prefix() -> None:
    for rules in (
        [
            {"name": "docs", "path": "/docs/*", "target": "https://d.example/"},
            {"name": "api", "path": "/docs/api", "target": "https://a.example/"},
        ],
        [
            {"name": "api", "path": "/docs/api", "target": "https://a.example/"},
            {"name": "docs", "path": "/docs/*", "target": "https://d.example/"},
        ],
    ):
        table = build_table(rules=rules)
        assert [(t.name, rest) for t, rest in map(table.match, ["/docs/api", "/docs/api/x"])] == [
            ("api", ""),
            ("docs", "api/x"),
        ]


@pytest.mark.parametrize("reverse", [False, True])
def test_longest_prefix_wins(reverse: bool) -> None:
    rules = [
        {"name": "a", "path": "/a/*", "target": "https://a.example/"},
        {"name": "ab", "path": "/a/b/*", "target": "https://ab.example/"},
        {"name": "root", "path": "/*", "target": "https://root.example/"},
    ]
    table = build_table(rules=rules[::-1] if reverse else rules)
    paths = ["/a/b/c", "/a/b/", "/a/b", "/a/bc", "/a/", "/a", "/ab", "/", "/x/y"]
    assert [(t.name, rest) for t, rest in map(table.match, paths)] == [
        ("ab", "c"),
        ("ab", ""),
        ("ab", ""),
        ("a", "bc"),
        ("a", ""),
        ("a", ""),
        ("root", "ab"),
        ("root", ""),
        ("root", "x/y"),
    ]


@pytest.mark.parametrize("reverse", [False, True])
def test_explicit_exact_rule_beats_the_bare_form_of_a_prefix(reverse: bool) -> None:
    rules = [
        {"name": "docs", "path": "/docs/*", "target": "https://d.example/", "forward_path": True},
        {"name": "bare", "path": "/docs", "target": "https://bare.example/"},
    ]
    table = build_table(rules=rules[::-1] if reverse else rules)
    target, location = resolve(table, "/docs", b"")
    assert (target.name, location) == ("bare", "https://bare.example/")
    assert table.match("/docs/")[0].name == "docs"
    assert resolve(table, "/docs/x")[1] == "https://d.example/x"


def test_unmatched_goes_to_a_404_fallback() -> None:
    table = build_table(rules=[{"name": "docs", "path": "/docs/*", "target": "https://d.example/"}])
    for path in ["/docsx", "/", "", "/doc", "//docs/x"]:
        target, location = resolve(table, path, b"a=1")
        assert (target.name, target.status, location) == (None, 404, None)
    assert table.fallback.static_location is None


def test_unmatched_goes_to_a_redirect_fallback() -> None:
    table = build_table(
        rules=[{"name": "docs", "path": "/docs/*", "target": "https://d.example/"}],
        fallback={"status": 307, "target": "https://f.example/home"},
    )
    target, location = resolve(table, "/docsx/y")
    assert (target.name, target.status, location) == (None, 307, "https://f.example/home")
    assert resolve(table, "/nope", b"x=1")[1] == "https://f.example/home?x=1"


def test_rule_status_and_name_are_compiled() -> None:
    table = build_table(
        rules=[{"name": "home", "path": "/", "target": "https://t.example/", "status": 308}]
    )
    target, remainder = table.match("/")
    assert (target.name, target.status, remainder) == ("home", 308, "")


# --- static location ---


def test_static_location_is_returned_when_nothing_is_forwarded() -> None:
    url = "https://t.example/p?a=1#s"
    table = build_table(
        rules=[
            {"name": "e", "path": "/e", "target": url},
            {"name": "n", "path": "/n", "target": url, "forward_query": False},
            {"name": "p", "path": "/p/*", "target": url, "forward_path": True},
        ]
    )
    cases = [("/e", b""), ("/n", b"a=2&b=3"), ("/p", b""), ("/p/", b"")]
    for path, query in cases:
        target, remainder = table.match(path)
        assert target.static_location == url
        location = target.location(remainder, query)
        assert location == url
        assert location is target.static_location


@pytest.mark.parametrize(
    ("path", "location"),
    [
        ("/docs/../../admin/keys", "https://cdn.example/public/admin/keys"),
        ("/docs/a/./b/../c", "https://cdn.example/public/a/c"),
        ("/docs/..", "https://cdn.example/public/"),
        ("/docs/a/..%2F..", "https://cdn.example/public/a/..%252F.."),
    ],
)
def test_dot_segments_cannot_climb_above_the_target_path(path: str, location: str) -> None:
    table = build_table(
        rules=[
            {
                "name": "docs",
                "path": "/docs/*",
                "target": "https://cdn.example/public/",
                "forward_path": True,
            }
        ]
    )
    assert resolve(table, path)[1] == location


# --- query allow-list and Cache-Control ---


def test_query_allow_forwards_only_the_listed_request_keys() -> None:
    location = exact_location(
        "https://t.example/p?a=1&keep=0",
        b"utm_source=mail&gclid=xyz&a=2&utm_source=again&evil=%0D%0A",
        query_allow=["utm_source", "a"],
    )
    assert location == "https://t.example/p?keep=0&utm_source=mail&a=2&utm_source=again"


def test_query_drop_never_forwards_the_listed_keys_even_encoded() -> None:
    location = exact_location(
        "https://t.example/p?gclid=keep",
        b"a=1&gclid=x&%66bclid=y&b=2&gclid=z",
        query_drop=["gclid", "fbclid"],
    )
    assert location == "https://t.example/p?gclid=keep&a=1&b=2"


def test_query_drop_applies_after_query_allow() -> None:
    location = exact_location(
        "https://t.example/p", b"a=1&b=2&c=3", query_allow=["a", "b"], query_drop=["b"]
    )
    assert location == "https://t.example/p?a=1"


def test_query_allow_with_no_allowed_key_keeps_the_targets_query() -> None:
    location = exact_location("https://t.example/p?a=1", b"x=1&y=2", query_allow=["utm_source"])
    assert location == "https://t.example/p?a=1"


@pytest.mark.parametrize(
    ("status", "options", "redirects", "expected"),
    [
        (302, {}, {}, b"no-store"),
        (307, {}, {}, b"no-store"),
        (301, {}, {}, b"max-age=3600"),
        (308, {}, {"permanent_max_age": 0}, b"max-age=0"),
        (302, {}, {"temporary_cache_control": "private, max-age=0"}, b"private, max-age=0"),
        (301, {"cache_control": "no-cache"}, {}, b"no-cache"),
    ],
)
def test_cache_control_by_status_and_override(
    status: int, options: dict[str, Any], redirects: dict[str, Any], expected: bytes
) -> None:
    settings = parse_settings(
        {
            "kafka": {"bootstrap.servers": "127.0.0.1:9092"},
            "rules": [
                {"name": "r", "path": "/r", "target": "https://t/", "status": status, **options}
            ],
            "redirects": redirects,
        }
    )
    target, _ = RuleTable.from_settings(settings).match("/r")
    assert target.cache_control == expected


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {"query_allow": ["a"], "forward_query": False},
            "query_allow: needs forward_query = true",
        ),
        (
            {"query_drop": ["a"], "forward_query": False},
            "query_drop: needs forward_query = true",
        ),
        ({"cache_control": "no-store\r\nSet-Cookie: x=1"}, "must be printable ASCII"),
        ({"cache_control": "max-âge=1"}, "must be printable ASCII"),
    ],
)
def test_invalid_query_allow_and_cache_control_are_refused(
    rule: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(
            {
                "kafka": {"bootstrap.servers": "127.0.0.1:9092"},
                "rules": [{"name": "r", "path": "/r", "target": "https://t/", **rule}],
            }
        )


def test_the_no_track_key_is_never_forwarded() -> None:
    settings = parse_settings(
        {
            "kafka": dict(KAFKA),
            "rules": [{"name": "r", "path": "/r", "target": "https://t.example/p?nt=target"}],
            "redirects": {"no_track_param": "nt"},
        }
    )
    table = RuleTable.from_settings(settings)
    assert resolve(table, "/r", b"a=1&nt=1&n%74=2")[1] == "https://t.example/p?nt=target&a=1"


# --- hosts, case and trailing slashes ---


def names(table: RuleTable, requests: list[tuple[bytes | None, str]]) -> list[str | None]:
    return [table.match(path, host)[0].name for host, path in requests]


@pytest.mark.parametrize("reverse", [False, True])
def test_host_precedence_exact_host_then_wildcards_then_any_host(reverse: bool) -> None:
    rules = [
        {"name": "any-exact", "path": "/p", "target": "https://a.example/"},
        {"name": "any-prefix", "path": "/p/*", "target": "https://a.example/"},
        {"name": "go-prefix", "host": "go.example.com", "path": "/*", "target": "https://g/"},
        {"name": "go-exact", "host": "go.example.com", "path": "/p", "target": "https://g/"},
        {"name": "wild", "host": "*.example.com", "path": "/p", "target": "https://w/"},
        {"name": "wild-deep", "host": "*.eu.example.com", "path": "/p", "target": "https://w/"},
        {"name": "wild-x", "host": "*.example.com", "path": "/x", "target": "https://w/"},
    ]
    table = build_table(rules=rules[::-1] if reverse else rules)
    assert table.by_host
    assert names(
        table,
        [
            (b"go.example.com", "/p"),  # host + exact
            (b"GO.Example.COM:8443", "/p"),  # any case, port ignored
            (b"go.example.com.", "/p"),  # a final dot ignored
            (b"go.example.com", "/q"),  # host + prefix beats any-host rules
            (b"go.example.com", "/x"),  # ... and wildcard ones
            (b"a.example.com", "/p"),  # wildcard
            (b"a.b.example.com", "/p"),  # wildcards match any depth
            (b"a.eu.example.com", "/p"),  # the most specific wildcard wins
            (b"eu.example.com", "/p"),  # "*.eu.example.com" needs a name below it
            (b"example.com", "/p"),  # a wildcard never matches its apex
            (b"example.com", "/p/y"),
            (b"a.example.com", "/p/y"),  # no wildcard rule matches: any host
            (b"other.test", "/x"),
            (None, "/p"),  # no Host header (HTTP/1.0)
            (b"", "/x"),
        ],
    ) == [
        "go-exact",
        "go-exact",
        "go-exact",
        "go-prefix",
        "go-prefix",
        "wild",
        "wild",
        "wild-deep",
        "wild",
        "any-exact",
        "any-prefix",
        "any-prefix",
        None,
        "any-exact",
        None,
    ]


def test_without_host_rules_the_host_is_not_consulted() -> None:
    table = build_table(rules=[{"name": "a", "path": "/a", "target": "https://a.example/"}])
    assert not table.by_host
    assert names(table, [(b"x.test", "/a"), (None, "/a")]) == ["a", "a"]


def test_the_same_path_on_different_hosts_is_allowed_and_duplicates_are_refused() -> None:
    rules = [
        {"name": "a", "path": "/p", "target": "https://a.example/"},
        {"name": "b", "host": "b.example", "path": "/p", "target": "https://b.example/"},
        {"name": "c", "host": "C.Example.", "path": "/p", "target": "https://c.example/"},
    ]
    table = build_table(rules=rules)
    assert names(table, [(b"b.example", "/p"), (b"c.example", "/p"), (b"d", "/p")]) == [
        "b",
        "c",
        "a",
    ]
    duplicate = {"name": "d", "host": "c.example", "path": "/p", "target": "https://d.example/"}
    with pytest.raises(ConfigError) as caught:
        build_table(rules=[*rules, duplicate])
    assert str(caught.value) == "config: rules.3.path: duplicate path '/p' on host 'c.example'"


@pytest.mark.parametrize(
    "host",
    [
        "*",
        "*.",
        "a..b",
        "-a.example",
        "a_b.example",
        "a.example:80",
        "*.*.example",
        "a*.example",
        "ünï.example",
        "a b",
        "[::1]",
        "x" * 64 + ".example",
    ],
)
def test_invalid_hosts_are_refused(host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_table(rules=[{"name": "a", "host": host, "path": "/a", "target": "https://a/"}])
    assert str(caught.value).startswith("config: rules.0.host: must be a host name")


@pytest.mark.parametrize("reverse", [False, True])
def test_case_insensitive_and_trailing_slash_tolerant_rules(reverse: bool) -> None:
    rules = [
        {"name": "ci", "path": "/Promo", "target": "https://a/", "case_insensitive": True},
        {"name": "ts", "path": "/sale/", "target": "https://a/", "trailing_slash": True},
        {
            "name": "both",
            "path": "/Spring",
            "target": "https://a/",
            "case_insensitive": True,
            "trailing_slash": True,
        },
        {"name": "literal", "path": "/PROMO", "target": "https://a/"},
        {"name": "strict", "path": "/x", "target": "https://a/"},
        {"name": "docs", "path": "/Docs/*", "target": "https://a/", "case_insensitive": True},
    ]
    table = build_table(rules=rules[::-1] if reverse else rules)
    assert names(
        table,
        [
            (None, "/promo"),
            (None, "/PrOmO"),
            (None, "/PROMO"),  # a literal exact rule beats a tolerant one
            (None, "/promo/"),  # not trailing-slash tolerant
            (None, "/sale"),
            (None, "/sale/"),
            (None, "/Sale"),  # not case-insensitive
            (None, "/sale//"),  # one slash only
            (None, "/spring/"),
            (None, "/SPRING"),
            (None, "/x/"),
            (None, "/X"),
            (None, "/DOCS"),  # the bare form of a case-insensitive prefix
            (None, "/docs/A/b"),
        ],
    ) == [
        "ci",
        "ci",
        "literal",
        None,
        "ts",
        "ts",
        None,
        None,
        "both",
        "both",
        None,
        None,
        "docs",
        "docs",
    ]
    # The remainder keeps the request's case.
    assert table.match("/DOCS/A/b")[1] == "A/b"


def test_tolerant_rules_that_collide_answer_in_file_order() -> None:
    rules = [
        {"name": "first", "path": "/a", "target": "https://a/", "trailing_slash": True},
        {"name": "second", "path": "/A/", "target": "https://a/", "case_insensitive": True},
    ]
    assert names(build_table(rules=rules), [(None, "/a/"), (None, "/A/")]) == ["first", "second"]
    assert names(build_table(rules=rules[::-1]), [(None, "/a/"), (None, "/a")]) == [
        "second",
        "first",
    ]


def test_trailing_slash_on_a_prefix_rule_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        build_table(
            rules=[{"name": "p", "path": "/p/*", "target": "https://a/", "trailing_slash": True}]
        )
    assert str(caught.value) == (
        "config: rules.0: trailing_slash: only for exact rules; a prefix rule already "
        "answers its path with and without the trailing slash"
    )


@given(
    host=st.binary(max_size=80),
    path=st.text(max_size=40).map(lambda text: "/" + text),
)
def test_any_host_header_matches_without_error(host: bytes, path: str) -> None:
    table = build_table(
        rules=[
            {"name": "go", "host": "go.example.com", "path": "/*", "target": "https://g/"},
            {"name": "wild", "host": "*.example.com", "path": "/*", "target": "https://w/"},
        ]
    )
    name = request_host(host)
    expected = (
        "go" if name == "go.example.com" else "wild" if name.endswith(".example.com") else None
    )
    assert table.match(path, host)[0].name == expected


@given(
    label=st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z"),
    port=st.one_of(st.none(), st.integers(0, 65535)),
    upper=st.booleans(),
    final_dot=st.booleans(),
)
def test_a_rule_host_matches_in_any_case_with_any_port(
    label: str, port: int | None, upper: bool, final_dot: bool
) -> None:
    host = f"{label}.example.com" + ("." if final_dot else "")
    header = (host.upper() if upper else host) + ("" if port is None else f":{port}")
    table = build_table(
        rules=[{"name": "h", "host": f"{label}.example.com", "path": "/", "target": "https://h/"}]
    )
    assert request_host(header.encode()) == f"{label}.example.com"
    assert table.match("/", header.encode())[0].name == "h"


def test_case_insensitive_folds_ascii_letters_only_and_keeps_the_remainder_whole() -> None:
    rules = [
        {
            "name": "city",
            "path": "/İstanbul/*",
            "target": "https://x.example/t/",
            "case_insensitive": True,
            "forward_path": True,
        },
        {"name": "cafe", "path": "/Café", "target": "https://x.example/", "case_insensitive": True},
    ]
    table = build_table(rules=rules)
    # "İ".lower() is two characters: folding it would cut the remainder wrong.
    target, location = resolve(table, "/İSTANBUL/Page")
    assert (target.name, location) == ("city", "https://x.example/t/Page")
    assert names(table, [(None, "/i̇stanbul/page"), (None, "/CAFé"), (None, "/CAFÉ")]) == [
        None,
        "cafe",
        None,
    ]


# ---------------------------------------------------------------- routes and splits


ROUTED_URLS = {
    "https://exact.example/landing?src=x#top",
    "https://apps.apple.com/app/id1",
    "http://play.example:8080/store/?id=1",
    "https://de.example.com/base/",
    "https://a.example.com/variant-a",
    "https://b.example.com/b?v=b",
}
ROUTED = build_table(
    rules=[
        {
            "name": "routed",
            "path": "/r/*",
            "forward_path": True,
            "target": "https://exact.example/landing?src=x#top",
            "routes": [
                {"os": ["iOS"], "target": "https://apps.apple.com/app/id1"},
                {"os": ["Android"], "target": "http://play.example:8080/store/?id=1"},
                {
                    "languages": ["de"],
                    "query": {"a": "1"},
                    "target": "https://de.example.com/base/",
                },
            ],
            "split": [
                {"name": "a", "weight": 1, "target": "https://a.example.com/variant-a"},
                {"name": "b", "weight": 1, "target": "https://b.example.com/b?v=b"},
            ],
        }
    ],
)
any_header = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X)",
            b"Mozilla/5.0 (Linux; Android 14; Pixel 8)",
            b"de, fr;q=0.5",
            b"rl_routed=a",
            b"rl_routed=//evil.com",
            b"rl_routed=b; rl_routed=https://evil.com",
        ]
    ),
)


@given(
    path=st.one_of(st.sampled_from(NASTY_PATHS), st.text()).map(lambda text: "/r/" + text),
    query=st.one_of(st.sampled_from([*NASTY_QUERIES, b"a=1"]), any_query),
    agent=any_header,
    language=any_header,
    cookie=any_header,
    secure=st.booleans(),
)
def test_routes_and_splits_never_leave_their_configured_targets(
    path: str, query: bytes, agent: bytes, language: bytes, cookie: bytes, secure: bool
) -> None:
    from redirect_logger.bots import Agents
    from redirect_logger.config import RecordsSettings, ServerSettings
    from redirect_logger.routing import Clients

    clients = Clients(Agents(64), RecordsSettings(), ServerSettings(), lambda peer, _: peer)
    scope = {
        "scheme": "https" if secure else "http",
        "path": path,
        "query_string": query,
        "headers": [(b"user-agent", agent), (b"accept-language", language), (b"cookie", cookie)],
        "client": ("192.0.2.1", 1),
    }
    target, remainder = ROUTED.match(path)
    assert target.routing is not None
    chosen, _, variant, set_cookie = target.routing.choose(scope, clients)
    location = chosen.location(remainder, query)
    assert location is not None
    assert any(urlsplit(location)[:2] == urlsplit(url)[:2] for url in ROUTED_URLS), location
    configured = next(url for url in ROUTED_URLS if urlsplit(url)[:2] == urlsplit(location)[:2])
    assert_on_origin(location, configured)
    if set_cookie is not None:  # only a configured variant's name goes back to the client
        assert set_cookie.split(b";")[0] in (b"rl_routed=a", b"rl_routed=b")
        assert variant in ("a", "b")
