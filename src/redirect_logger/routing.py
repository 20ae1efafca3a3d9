"""Routes and splits: which of a rule's targets answers a request.

A rule with ``[[rules.routes]]`` or ``[[rules.split]]`` carries a ``Routing``
on its compiled target (``Target.routing``); every other rule has None there,
and the request path pays one attribute test for it. docs/configuration.md
(``[[rules.routes]]``, ``[[rules.split]]``) describes the behaviour.

Every target here is a compiled ``Target`` of the rule's own status and
forwarding, so the Location of a route or a variant keeps the no-open-redirect
property of rules.py: it starts with a configured target's ``scheme://host``.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from werkzeug.datastructures import LanguageAccept
from werkzeug.http import parse_accept_header

from .bots import Agents
from .config import RecordsSettings, RedirectsSettings, Rule, ServerSettings

if TYPE_CHECKING:
    from .geo import Countries
    from .rules import Target

Headers = list[tuple[bytes, bytes]]
Label = int | str  # a route's name, else its index
# (target, route, variant, Set-Cookie value or None)
Choice = tuple["Target", Label | None, str | None, bytes | None]

# The longest User-Agent looked at: as the bot flag classifies it (hits.FIELD_LIMITS)
_AGENT_LIMIT = 1024
# Characters a cookie's Path attribute keeps as they are (no ";" or ",")
_COOKIE_PATH_SAFE = "/-._~!$&'()*+=:@"


class Clients:
    """What routes and splits need to know of a request's client: its agent
    (parsed once per distinct agent, in the cache the bot flag shares), its
    country, whether it came over TLS. One per process."""

    def __init__(
        self,
        agents: Agents,
        records: RecordsSettings,
        server: ServerSettings,
        client_ip: Callable[[str | None, Headers], str | None],
    ) -> None:
        self.agents = agents
        self.countries: Countries | None = None  # set by the service
        # records.ip = "none": no client may be recognised again, so no cookie
        self.anonymous = records.ip == "none"
        self._client_ip = client_ip
        self._trusted = tuple(server.trusted_proxies)

    def os(self, headers: Headers) -> str:
        """uap-core's OS family of the request's (last) User-Agent; ``"Other"``
        for none."""
        agent = next((v for k, v in reversed(headers) if k == b"user-agent"), b"")
        text = agent.decode("utf-8", "backslashreplace")[:_AGENT_LIMIT]
        return self.agents.get(text).os

    def country(self, scope: dict[str, Any]) -> str | None:
        """The country of the request's client (its full address, resolved
        through ``server.trusted_proxies``); None when unknown."""
        if self.countries is None:
            return None
        client = scope.get("client")
        ip = self._client_ip(client[0] if client else None, scope["headers"])
        return None if ip is None else self.countries.of(ip)

    def secure(self, scope: dict[str, Any]) -> bool:
        """Whether the request came over TLS: to this server, or, as a trusted
        proxy says (``X-Forwarded-Proto`` or ``Forwarded: proto=``), to it."""
        if scope["scheme"] in ("https", "wss"):
            return True
        client = scope.get("client")
        if not self._trusted or not client or not self._trusted_peer(client[0]):
            return False
        for name, value in scope["headers"]:
            if name == b"x-forwarded-proto":
                return bool(value.strip().lower() == b"https")
            if name == b"forwarded" and b"proto=https" in value.lower().replace(b'"', b""):
                return True
        return False

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - one Clients per process
    def _trusted_peer(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)


@functools.cache
def default_clients() -> Clients:
    """The ``Clients`` of the default settings (no country database, the
    peer's address as the client's): for tests and benchmarks."""
    return Clients(Agents(), RecordsSettings(), ServerSettings(), lambda peer, _: peer)


@functools.lru_cache(maxsize=4096)
def languages_of(accept_language: bytes) -> tuple[str, ...]:
    """The primary tags of an ``Accept-Language`` value, lower case, in the
    client's order of preference (q, as werkzeug sorts it); without those of
    q=0 and ``*``."""
    accepted = parse_accept_header(accept_language.decode("latin-1"), LanguageAccept)
    tags = (tag.partition("-")[0].lower() for tag, q in accepted if q > 0 and tag != "*")
    return tuple(dict.fromkeys(tags))


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled ``[[rules.routes]]``: its conditions (None: not asked)."""

    label: Label
    target: Target
    os: frozenset[str] | None
    languages: frozenset[str] | None
    countries: frozenset[str] | None
    query: frozenset[tuple[str, str]] | None  # pairs as query_pairs decodes them


class Routing:
    """The routes and the split of one rule, and its own target."""

    def __init__(
        self,
        rule: Rule,
        default: Target,
        routes: list[Route],
        variants: list[tuple[str, int, Target]],
    ) -> None:
        self.default = default
        self.routes = routes
        # Every language some route names: the client's first of these decides
        self.offered = frozenset().union(*(r.languages or () for r in routes))
        self.needs_query = any(route.query is not None for route in routes)
        self.variants = {name: target for name, weight, target in variants if weight > 0}
        self._names = [name for name, _, _ in variants]
        self._targets = [target for _, _, target in variants]
        self._cumulative: list[int] = []
        total = 0
        for _, weight, _ in variants:
            total += weight
            self._cumulative.append(total)
        self._total = total
        self.cookie_name = f"rl_{rule.name}"
        path = rule.path.removesuffix("*").removesuffix("/") or "/"
        attributes = (
            f"; Max-Age={rule.split_cookie_max_age}; "
            f"Path={quote(path, safe=_COOKIE_PATH_SAFE)}; SameSite=Lax; HttpOnly"
        )
        # Set-Cookie values by (variant, secure)
        self._cookies = {
            (
                name,
                secure,
            ): f"{self.cookie_name}={name}{attributes}{'; Secure' if secure else ''}".encode(
                "ascii"
            )
            for name in self._names
            for secure in (False, True)
        }
        self._cookie_marker = f"{self.cookie_name}=".encode("ascii")

    @classmethod
    def compile(
        cls,
        rule: Rule,
        default: Target,
        redirects: RedirectsSettings | None,
        *,
        anonymous: bool = False,
    ) -> Routing:
        """The rule's routes and split around ``default``, the target when
        none applies; each target with the rule's status and forwarding, its
        macros as the rule's own target's (links.configured), never
        forwarding ``target_param``, and the rule's ``Vary``. ``anonymous``:
        ``records.ip = "none"``."""
        from .links import configured
        from .rules import Target  # rules.py builds routings: imported when it does

        compile_target = functools.partial(Target.compile, rule.name, redirects=redirects)
        vary = vary_of(rule, anonymous=anonymous)
        param = frozenset(() if rule.target_param is None else (rule.target_param,))

        def target(url: str) -> Target:
            compiled = configured(rule, url, rule.status, compile_target)
            return replace(compiled, query_drop=compiled.query_drop | param, vary=vary)

        routes = [
            Route(
                index if route.name is None else route.name,
                target(route.target),
                None if route.os is None else frozenset(route.os),
                None if route.languages is None else frozenset(route.languages),
                None if route.countries is None else frozenset(route.countries),
                None
                if route.query is None
                else frozenset((_as_latin1(k), _as_latin1(v)) for k, v in route.query.items()),
            )
            for index, route in enumerate(rule.routes)
        ]
        variants = [(v.name, v.weight, target(v.target)) for v in rule.split]
        return cls(rule, replace(default, routing=None, vary=vary), routes, variants)

    def choose(self, scope: dict[str, Any], clients: Clients) -> Choice:
        """The target that answers this request, the route that chose it, the
        split's variant, and a ``Set-Cookie`` value when a new variant was
        drawn for a client that can be recognised again."""
        if self.routes:
            found = self._route(scope, clients)
            if found is not None:
                return found.target, found.label, None, None
        if not self._total:
            return self.default, None, None, None
        if clients.anonymous:
            name, target = self._draw()
            return target, None, name, None
        kept = self._kept(scope["headers"])
        if kept is not None:
            return self.variants[kept], None, kept, None
        name, target = self._draw()
        return target, None, name, self._cookies[name, clients.secure(scope)]

    def _route(self, scope: dict[str, Any], clients: Clients) -> Route | None:
        headers = scope["headers"]
        os = language = country = None
        pairs: frozenset[tuple[str, str]] | None = None
        asked_language = asked_country = False
        for route in self.routes:
            if route.os is not None:
                if os is None:
                    os = clients.os(headers)
                if os not in route.os:
                    continue
            if route.languages is not None:
                if not asked_language:
                    asked_language, language = True, self._language(headers)
                if language not in route.languages:
                    continue
            if route.countries is not None:
                if not asked_country:
                    asked_country, country = True, clients.country(scope)
                if country not in route.countries:
                    continue
            if route.query is not None:
                if pairs is None:
                    from .rules import query_pairs

                    pairs = frozenset(query_pairs(scope["query_string"]))
                if not route.query <= pairs:
                    continue
            return route
        return None

    def _language(self, headers: Headers) -> str | None:
        """The client's most preferred language that some route names."""
        values = [v for k, v in headers if k == b"accept-language"]
        if not values:
            return None
        for tag in languages_of(b",".join(values)):
            if tag in self.offered:
                return tag
        return None

    def _kept(self, headers: Headers) -> str | None:
        """The variant the client's cookie names, when it is still one drawn.

        The ``Cookie`` header's pairs are split as RFC 6265 (5.2) says: on
        ";", then at the first "="; whitespace around them dropped. Our
        values are tokens, which need no unquoting, so this is all the
        parsing the cookie needs (werkzeug's ``parse_cookie`` took 2 to 4 us
        for one pair). The first ``rl_<rule>`` counts, as a browser sends
        the most specific one first."""
        marker = self._cookie_marker
        for name, value in headers:
            if name == b"cookie" and marker in value:
                for pair in value.split(b";"):
                    key, _, kept = pair.strip().partition(b"=")
                    if key == marker[:-1]:
                        text = kept.decode("latin-1")
                        return text if text in self.variants else None
        return None

    def _draw(self) -> tuple[str, Target]:
        index = bisect_right(self._cumulative, random.random() * self._total)
        index = min(index, len(self._names) - 1)  # random() * total < total, but be safe
        return self._names[index], self._targets[index]


def vary_of(rule: Rule, *, anonymous: bool) -> bytes | None:
    """The ``Vary`` of a routed rule's answers: the request headers its
    routes read (``User-Agent`` for ``os``, ``Accept-Language`` for
    ``languages``) and ``Cookie`` for a sticky split; ``*`` when the answer
    depends on what no header names (a country: the client's address; a
    split drawn anew per hit); None when it depends on the URL alone."""
    if any(route.countries is not None for route in rule.routes) or (rule.split and anonymous):
        return b"*"
    names = []
    if any(route.os is not None for route in rule.routes):
        names.append("User-Agent")
    if any(route.languages is not None for route in rule.routes):
        names.append("Accept-Language")
    if rule.split:
        names.append("Cookie")
    return ", ".join(names).encode("ascii") if names else None


def _as_latin1(text: str) -> str:
    """A configured query text as ``rules.query_pairs`` decodes a request's:
    its UTF-8 bytes, one character each."""
    return text.encode("utf-8").decode("latin-1")


def routing_warnings(rules: list[Rule]) -> list[str]:
    """What in the rules' routes and splits is allowed but likely a mistake,
    each naming its key: an ``os`` name uap-core never gives (the comparison
    is exact), and a permanent status (301, 308) that browsers cache, so a
    client would keep its first answer whatever the routes or split say."""
    from .bots import os_families

    found = []
    families = os_families() if any(route.os for rule in rules for route in rule.routes) else ()
    for index, rule in enumerate(rules):
        for number, route in enumerate(rule.routes):
            for name in route.os or ():
                if name not in families:
                    near = [f for f in families if f.lower() == name.lower()]
                    hint = f' (did you mean "{near[0]}"?)' if near else ""
                    found.append(
                        f"rules.{index}.routes.{number}.os: {name!r} is not an OS family "
                        f'uap-core names{hint}; it never matches. iPads are "iOS" (or, '
                        'asking for desktop sites, "Mac OS X")'
                    )
        if (rule.routes or rule.split) and rule.status in (301, 308):
            found.append(
                f"rules.{index}.status: {rule.status} is permanent: browsers cache it, and "
                "a client keeps its first route or variant; 302 or 307 ask each time"
            )
    return found
