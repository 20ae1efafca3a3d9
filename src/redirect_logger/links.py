"""Rules that answer by more than their path: validity windows, click-id
macros, and dynamic targets restricted to an allow-list.

A plain rule never comes here on the request path: its ``Target.live`` is
None. A rule that uses one of these features has a ``Live`` that answers
each hit (``Live.resolve``) from the clock, the hit id and the query; when
the rule also has routes or a split, its ``Routing`` (routing.py) picks the
target inside the window (docs/configuration.md, "Routes and splits with
windows, macros and target_param").

Safety property (that of rules.py, extended): a ``Location`` starts with the
``scheme://host`` of a configured target, or, for a dynamic target, with that
of a URL whose host, as a browser's parser (WHATWG, through ``ada-url``)
reads it, is in the rule's ``allowed_hosts``; the URL sent is the one that
parser serialized, so the browser reads the same host again.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl, quote, urlsplit

from ada_url import URL

if TYPE_CHECKING:
    from .config import Fallback, Rule
    from .routing import Clients, Routing
    from .rules import Reply, RuleTable, Target

MACROS = ("{hit_id}", "{rule}")
_MACRO_RE = re.compile(r"\{(?:hit_id|rule)\}")
_HIT_ID = b"{hit_id}"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")

_DEFAULT_PORTS = {"http:": "80", "https:": "443"}

# Why a dynamic target was refused: the record's "reason" (docs/records.md).
REASONS = ("missing", "repeated", "malformed", "scheme", "userinfo", "host", "port")


def macro_problem(target: str, *, allowed: bool = True) -> str | None:
    """Why the macros in ``target`` are misplaced, or None when they are not.

    Macros may stand in the values of the query only; with ``allowed`` False
    nowhere. Braces that do not spell a macro are left alone.
    """
    found = _MACRO_RE.search(target)
    if found is None:
        return None
    if not allowed:
        return f"{found.group()}: macros are replaced in [[rules]] targets only"
    parts = urlsplit(target)
    for where, text in (
        ("scheme", parts.scheme),
        ("host", parts.netloc),
        ("path", parts.path),
        ("fragment", parts.fragment),
    ):
        found = _MACRO_RE.search(text)
        if found is not None:
            return f"{found.group()} in the {where}: macros are replaced in query values only"
    for pair in parts.query.split("&"):
        found = _MACRO_RE.search(pair.partition("=")[0])
        if found is not None:
            return f"{found.group()} in a query key: macros are replaced in query values only"
    return None


def allowed_host(entry: str) -> str | None:
    """An ``allowed_hosts`` entry normalized (``name``, ``*.domain``, either
    with ``:port``): the name as a browser reads it (IDNA, lower case, no
    final dot); None when it is not a host name (an IP address, a URL, a
    user, a path, an empty label)."""
    host, colon, port = entry.rpartition(":")
    if not colon:
        host, port = entry, ""
    elif not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return None
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if not name or any(c in name for c in "/\\@?#%[]:* ") or not name.isprintable():
        return None
    try:
        parsed = URL(f"http://{name}/").hostname
    except ValueError:
        return None
    parsed = parsed.removesuffix(".")
    if not _NAME_RE.match(parsed) or _is_ip(parsed):
        return None
    normalized = f"*.{parsed}" if wildcard else parsed
    return f"{normalized}:{int(port)}" if port else normalized


def _is_ip(name: str) -> bool:
    """Whether a browser takes ``name`` for an IPv4 address (its last label numeric)."""
    last = name.rpartition(".")[2]
    if last.isdigit() or last.startswith("0x"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class AllowList:
    """``allowed_hosts``: exact names, and ``*.domain`` for the names below
    ``domain``, each with the ports it allows ("" for none, or the scheme's
    default)."""

    def __init__(self, entries: list[str]) -> None:
        exact: dict[str, set[str]] = {}
        below: dict[str, set[str]] = {}
        for entry in entries:
            host, colon, port = entry.rpartition(":")
            if not colon:
                host, port = entry, ""
            if host.startswith("*."):
                below.setdefault(host[2:], set()).add(port)
            else:
                exact.setdefault(host, set()).add(port)
        self._exact = {host: frozenset(ports) for host, ports in exact.items()}
        self._below = {host: frozenset(ports) for host, ports in below.items()}

    def refusal(self, host: str, port: str, default: str) -> str | None:
        """None when ``host`` with ``port`` (as the WHATWG parser gives them:
        "" for the scheme's ``default`` port) is allowed; otherwise
        ``"host"``, or ``"port"`` when only the port is not. An entry that
        lists the default port allows it, written or not."""
        host = host.removesuffix(".")
        wanted = (port, default) if port == "" else (port,)
        listed = False
        ports = self._exact.get(host)
        if ports is not None:
            if not ports.isdisjoint(wanted):
                return None
            listed = True
        dot = host.find(".")
        while dot != -1:
            ports = self._below.get(host[dot + 1 :])
            if ports is not None:
                if not ports.isdisjoint(wanted):
                    return None
                listed = True
            dot = host.find(".", dot + 1)
        return "port" if listed else "host"


def given_url(query: bytes, param: str, allow: AllowList) -> tuple[URL, bool] | str:
    """The URL the query's ``param`` gives, parsed as a browser would, when
    it may be redirected to, and whether the query has other keys; otherwise
    the reason it may not (``REASONS``)."""
    pairs = parse_qsl(query.decode("utf-8", "replace"), keep_blank_values=True, errors="replace")
    values = [value for key, value in pairs if key == param]
    if not values or not values[0]:
        return "missing" if len(values) < 2 else "repeated"
    if len(values) > 1:
        return "repeated"
    try:
        url = URL(values[0])
    except ValueError:
        return "malformed"
    if url.protocol not in ("http:", "https:"):
        return "scheme"
    if url.username or url.password:
        return "userinfo"
    refused = allow.refusal(url.hostname, url.port, _DEFAULT_PORTS[url.protocol])
    if refused is not None:
        return refused
    if not url.href.isascii():  # the parser percent-encodes: never seen
        return "malformed"
    return url, len(values) < len(pairs)


class Answer(NamedTuple):
    """How a live rule answers one hit."""

    target: Target  # its status, Cache-Control and (rule) name answer
    location: str | None
    detail: str | None  # "expired", a refusal's reason, or None


class Live:
    """A rule's window, macros or dynamic target, compiled, with its routes
    and split when it has them."""

    __slots__ = (
        "_dynamic",
        "_end",
        "_expired",
        "_fallback",
        "_forward_fallback_path",
        "_param",
        "_refused",
        "_routing",
        "_start",
        "_target",
    )

    def __init__(
        self,
        rule: Rule,
        compile_target: Callable[[Rule | Fallback], Target],
        fallback: Target,
        routing: Callable[[Target], Routing] | None = None,
    ) -> None:
        """``routing``: builds the rule's ``Routing`` around its default
        target (None for a rule without routes or a split)."""
        self._start = -float("inf") if rule.valid_from is None else rule.valid_from.timestamp()
        self._end = float("inf") if rule.valid_until is None else rule.valid_until.timestamp()
        if rule.target_param is None:
            target = configured(rule, rule.target, rule.status, compile_target)
        else:  # the origin, path and query are the request's: stand-ins for now
            spec = rule.model_copy(update={"target": "https://dynamic.invalid/"})
            target = compile_target(spec)
        self._dynamic = None if rule.target_param is None else AllowList(rule.allowed_hosts)
        self._param = rule.target_param or ""
        if rule.target_param is not None:
            target = replace(target, query_drop=target.query_drop | {rule.target_param})
        self._target = target
        self._expired = configured(rule, rule.expired_target, rule.expired_status, compile_target)
        if rule.on_refused == "fallback":
            self._refused = replace(fallback, name=rule.name)
        else:
            self._refused = replace(target, status=400, static_location=None)
        self._fallback = rule.on_refused == "fallback"
        self._forward_fallback_path = fallback.forward_path
        # A dynamic rule's routes and split answer what it refuses (config.py
        # asks for on_refused = "fallback"); the [fallback] answers when none does.
        self._routing = None
        if routing is not None:
            self._routing = routing(self._refused if self._dynamic is not None else target)

    def resolve(
        self,
        scope: dict[str, Any],
        remainder: str,
        clients: Clients,
        hit_id: str,
        now: float,
    ) -> Reply:
        """The answer to one hit at ``now`` (seconds since the epoch), as
        ``RuleTable.answer`` gives it: outside the window the expired answer
        (no route, no variant, no cookie); an allowed dynamic target; a
        refused one, with its reason, as a 400 or else by the routes and
        split, or the fallback; otherwise the routes' and split's target
        or the rule's own, macros filled in."""
        query_string = scope["query_string"]
        if not self._start <= now < self._end:
            expired = self._expired
            location = (
                None
                if expired.static_location is None
                else _filled(expired, remainder, query_string, hit_id)
            )
            return expired, location, "expired", None, None, None
        detail = None
        if self._dynamic is not None:
            given = given_url(query_string, self._param, self._dynamic)
            if not isinstance(given, str):
                url, others = given
                target = self._target
                location = target.location_at(
                    f"{url.protocol}//{url.host}",
                    url.pathname,
                    url.search[1:].encode("ascii"),
                    url.hash,
                    "",
                    query_string if others else b"",  # its own query as the parser wrote it
                )
                return target, location, None, None, None, None
            if not self._fallback:
                return self._refused, None, given, None, None, None
            detail = given
        if self._routing is not None:
            target, route, variant, cookie = self._routing.choose(scope, clients)
            if self._dynamic is None or route is not None or variant is not None:
                location = _filled(target, remainder, query_string, hit_id)
                return target, location, detail, route, variant, cookie
        elif self._dynamic is None:
            target = self._target
            return target, _filled(target, remainder, query_string, hit_id), None, None, None, None
        else:
            target = self._refused
        rest = scope["path"] if self._forward_fallback_path else ""
        return target, target.location(rest, query_string), detail, None, None, None


def configured(
    rule: Rule,
    url: str | None,
    status: int,
    compile_target: Callable[[Rule | Fallback], Target],
) -> Target:
    """A configured URL of ``rule`` (its target, expired target, or a route's
    or variant's) compiled with the rule's forwarding and ``status``: its
    ``{rule}`` replaced, its query cut at each ``{hit_id}`` (``pieces``),
    and the query keys whose values hold macros never taken from the request."""
    name = quote(rule.name, safe="")
    spec = rule.model_copy(
        update={
            "target": None if url is None else url.replace("{rule}", name),
            "status": status,
            "routes": [],
            "split": [],
        }
    )
    return _with_macros(compile_target(spec), url)


def _with_macros(target: Target, url: str | None) -> Target:
    """The target with the keys whose values hold macros in ``url`` (its
    configured form) kept from the request (a request never overrides a
    macro's value), and its query cut at each ``{hit_id}`` (``pieces``)."""
    if url is None or _MACRO_RE.search(url) is None:
        return target
    keys = {
        key
        for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True, encoding="latin-1")
        if _MACRO_RE.search(value)
    }
    target = replace(target, query_drop=target.query_drop | keys)
    if _HIT_ID not in target.query:
        return target
    return replace(target, pieces=tuple(target.query.split(_HIT_ID)))


def _filled(target: Target, remainder: str, query_string: bytes, hit_id: str) -> str | None:
    pieces = target.pieces
    if pieces is None:
        return target.location(remainder, query_string)
    # A hit id (a UUID) is all unreserved characters: it needs no encoding.
    query = hit_id.encode("ascii").join(pieces)
    return target.location_at(
        target.origin, target.path, query, target.fragment, remainder, query_string
    )


def is_live(rule: Rule) -> bool:
    """Whether the rule needs a ``Live``: a window, a target_param, or a
    macro in its target, expired target, or a route's or variant's target."""
    return (
        rule.valid_from is not None
        or rule.valid_until is not None
        or rule.target_param is not None
        or any(
            url is not None and _MACRO_RE.search(url) is not None
            for url in (
                rule.target,
                rule.expired_target,
                *(route.target for route in rule.routes),
                *(variant.target for variant in rule.split),
            )
        )
    )


def answer(
    table: RuleTable,
    path: str,
    query_string: bytes = b"",
    host: bytes | None = None,
    hit_id: str = "",
    now: float = 0.0,
) -> Answer:
    """How ``table`` answers a request without headers (``RuleTable.answer``,
    as the Frontend in app.py asks it): for tests, recipes and benchmarks,
    which set the hit id and the clock. A routed rule's route and variant are
    left out: ask ``RuleTable.answer`` with the request's headers."""
    from .routing import default_clients  # routing builds on rules, rules on links

    scope = {"path": path, "query_string": query_string, "headers": [], "scheme": "https"}
    found = table.answer(scope, host, default_clients(), hit_id, now)
    return Answer(found[0], found[1], found[2])
