"""The hit record: raw capture on the request path, enrichment and JSON in the workers.

The request path only builds a ``Hit`` (a tuple of values it already has);
header lookups, client-IP resolution, the bot flag, timestamps and
serialization happen in ``Enricher.encode``, which runs in the worker pool.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import os
import socket
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from uuid_utils import uuid7

from .bots import Agents, BotDetector
from .commit import Commit
from .config import RecordsSettings, Rule, ServerSettings
from .rules import query_pairs

if TYPE_CHECKING:
    from .geo import Countries

SCHEMA_VERSION = 3  # docs/records.md, "Schema versions"

# Longest text kept per field (characters); longer values are cut and the
# field is named in the record's "truncated" list. Keeps a record well under
# librdkafka's message.max.bytes whatever a request carries.
FIELD_LIMITS = {
    "host": 255,
    "path": 2048,
    "query": 4096,
    "location": 4096,
    "user_agent": 1024,
    "referer": 2048,
}

_LIMITS = tuple(FIELD_LIMITS.items())
_SHORTEST_LIMIT = min(FIELD_LIMITS.values())  # no text this long: nothing to cut
_AGENT_LIMIT = FIELD_LIMITS["user_agent"]

Headers = list[tuple[bytes, bytes]]
# Kafka message headers, as confluent-kafka's produce() takes them.
MessageHeaders = list[tuple[str, bytes]]
# The HTTP scheme of a WebSocket scope's (docs/records.md: "scheme")
_HTTP_SCHEMES = {"ws": "http", "wss": "https"}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Hit(NamedTuple):
    """What the request path captures: no I/O, no parsing, no JSON. Also one
    event of a collect request (collect.py), which has ``data``."""

    id: str
    ts: float  # request time, seconds since the epoch
    method: str
    scheme: str
    path: str  # decoded path as the server saw it
    query: bytes  # raw query string
    headers: Headers  # the request's header list, as received
    client: tuple[str, int] | None  # peer address
    status: int  # status answered
    location: str | None
    rule: str | None  # rule name; None for the fallback
    # An event: the event object as JSON, written on the request path
    # (collect.written); a refused collect request (status 4xx): the fields
    # of its "bad" record as a JSON object; None for a hit
    data: bytes | None = None
    # The group commit its request awaits (records.durability "journal" or
    # "kafka"); set by the intake, None under "memory"
    commit: Commit | None = None
    # "expired" (outside its rule's window), why a dynamic target was
    # refused (links.REASONS), or None
    detail: str | None = None
    route: int | str | None = None  # the route that chose the target (routing.py)
    variant: str | None = None  # the split's variant that did

    @classmethod
    def from_scope(
        cls,
        scope: dict[str, Any],
        hit_id: str,
        ts: float,
        status: int,
        location: str | None = None,
        rule: str | None = None,
        data: bytes | None = None,
        detail: str | None = None,
        route: int | str | None = None,
        variant: str | None = None,
    ) -> Hit:
        """The hit of an ASGI HTTP request, answered ``status``: the one place
        a hit (or a collect event) is built from a request. A WebSocket
        upgrade (``websocket`` scope: no method, scheme ``ws``/``wss``) is
        the GET it was sent as (RFC 6455 4.1), on ``http``/``https``."""
        method = scope.get("method")
        scheme = scope["scheme"]
        if method is None:  # a WebSocket upgrade
            method, scheme = "GET", _HTTP_SCHEMES.get(scheme, scheme)
        return cls(
            hit_id,
            ts,
            method,
            scheme,
            scope["path"],
            scope["query_string"],
            scope["headers"],
            scope.get("client"),
            status,
            location,
            rule,
            data,
            None,
            detail,
            route,
            variant,
        )

    @classmethod
    def events_of(
        cls,
        scope: dict[str, Any],
        ts: float,
        status: int,
        data: list[bytes],
        ids: list[str | None] | None = None,
    ) -> list[Hit]:
        """The events of one collect request, answered ``status``: ``from_scope``
        for each event's JSON in ``data``, each with its id from ``ids`` (the
        client's, collect.id_field) or, for None, an id of its own. The
        request's fields are read once (a request may carry a thousand events)."""
        # all but id, data, commit, detail, route and variant
        request = cls.from_scope(scope, "", ts, status)[1:11]
        new = tuple.__new__
        if ids is None:
            return [
                new(cls, (str(uuid7()), *request, event, None, None, None, None)) for event in data
            ]
        return [
            new(cls, (given or str(uuid7()), *request, event, None, None, None, None))
            for event, given in zip(data, ids, strict=True)
        ]


_new_tuple = tuple.__new__


class Encoded(NamedTuple):
    """A hit ready for Kafka."""

    topic: str
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: MessageHeaders  # may be shared between records: never mutated


@functools.lru_cache(maxsize=4096)
def message_headers(kind: str, rule: str | None, version: int = SCHEMA_VERSION) -> MessageHeaders:
    """The headers of a record's Kafka message (docs/records.md): its schema
    version, kind and rule name, UTF-8; ``rule`` is empty for the fallback.

    They depend on the record's ``v``, ``kind`` and ``rule`` alone, so one list
    per combination is shared by every record that has it (confluent-kafka
    copies headers at produce time); callers never mutate it.
    """
    return [
        ("schema-version", str(version).encode()),
        ("kind", kind.encode()),
        ("rule", b"" if rule is None else rule.encode()),
    ]


def headers_of_value(value: bytes) -> MessageHeaders:
    """The headers of the record a message value holds (see ``restored``)."""
    return _restore(value)[0]


def restored(topic: str, key: bytes | None, value: bytes) -> Encoded:
    """The message of a record whose headers and timestamp were not kept:
    librdkafka's failed delivery reports carry neither (the timestamp is -1).
    Both follow from the record: its ``v``, ``kind`` and ``rule`` give the
    headers (records older than ``kind`` get the kind their ``location``
    implies), its ``ts`` the timestamp. A value that is not a record gets no
    headers and the timestamp 0 (the broker's "now")."""
    headers, timestamp_ms = _restore(value)
    return Encoded(topic, key, value, timestamp_ms, headers)


def _restore(value: bytes) -> tuple[MessageHeaders, int]:
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError:
        return [], 0
    if not isinstance(record, dict):
        return [], 0
    timestamp_ms = 0
    ts = record.get("ts")
    if isinstance(ts, str):
        with contextlib.suppress(ValueError):
            timestamp_ms = round(datetime.fromisoformat(ts).timestamp() * 1000)
    version, kind, rule = record.get("v"), record.get("kind"), record.get("rule")
    if kind is None and "location" in record:
        kind = "miss" if record["location"] is None else "redirect"
    if (
        type(version) is not int
        or not isinstance(kind, str)
        or not (rule is None or isinstance(rule, str))
    ):
        return [], timestamp_ms
    return message_headers(kind, rule, version), timestamp_ms


_ID_FIRST = b'{"v":%d,"id":"' % SCHEMA_VERSION  # how every record this version writes begins


def record_id(value: bytes) -> bytes | None:
    """The ``id`` of the record a message value holds, as its UTF-8 bytes;
    None for a value without one. Quick for the records this version writes,
    whose id comes right after ``v``: the acknowledgement marks of the journal
    name records by it (spill.py)."""
    if value.startswith(_ID_FIRST):
        end = value.find(b'"', len(_ID_FIRST))
        if end >= 0:
            return value[len(_ID_FIRST) : end]
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    found = record.get("id") if isinstance(record, dict) else None
    return found.encode() if isinstance(found, str) else None


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def rfc3339_ms(ts: float) -> str:
    """UTC time with millisecond precision, e.g. ``2026-11-24T17:22:05.123Z``."""
    fraction, whole = math.modf(ts)
    second, micros = int(whole), round(fraction * 1_000_000)  # as datetime rounds
    if micros == 1_000_000:
        second, micros = second + 1, 0
    return f"{_utc_second(second)}.{micros // 1000:03d}Z"  # a second's text is shared


class Millisecond:
    """``rfc3339_ms`` of the last millisecond asked for, kept: a worker encodes
    many hits within one (a millisecond of requests, and a batch's
    ``logged_at``), and telling the millisecond costs less than writing it."""

    __slots__ = ("_high", "_low", "_ms", "_text")

    def __init__(self) -> None:
        self._ms, self._text = -1, ""
        # Times well inside the kept millisecond, away from the edges where
        # rounding to the microsecond could carry into the next one: for
        # these a comparison is the whole cost.
        self._low = self._high = 0.0

    def text(self, ts: float) -> str:
        if self._low <= ts < self._high:
            return self._text
        fraction, whole = math.modf(ts)
        # As rfc3339_ms rounds: a fraction that rounds to 1 s is the next second's .000.
        ms = int(whole) * 1000 + round(fraction * 1_000_000) // 1000
        if ms != self._ms:
            self._ms, self._text = ms, rfc3339_ms(ts)
            margin = 4e-6 + 16 * math.ulp(ts)
            self._low, self._high = ms / 1000 + margin, (ms + 1) / 1000 - margin
        return self._text


def _truncate(record: dict[str, object]) -> None:
    """Cut the record's texts to ``FIELD_LIMITS``, naming the fields cut in its
    ``truncated`` list (none cut: no list)."""
    truncated = []
    for field, limit in _LIMITS:
        text = record[field]
        if isinstance(text, str) and len(text) > limit:
            record[field] = text[:limit]
            truncated.append(field)
    if truncated:
        record["truncated"] = truncated


def _parse_ip(text: str) -> Address | None:
    """An IP from a forwarding header hop: strips quotes, brackets and a port."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` hops of an RFC 7239 ``Forwarded`` header, in order."""
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, hop = pair.partition("=")
            if name.strip().lower() == "for":
                hops.append(hop)
    return hops


@functools.lru_cache(maxsize=4096)
def anonymized(ip: str | None) -> str | None:
    """An IPv4 address cut to its /24, an IPv6 one to its /48 (the rest zero);
    None for None or what is not an IP address."""
    address = None if ip is None else _parse_ip(ip)
    if address is None:
        return None
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


def _within(ip: str, networks: tuple[Network, ...]) -> bool:
    address = _parse_ip(ip)
    return address is not None and any(address in network for network in networks)


def _kind(status: int, location: str | None, data: bytes | None) -> str:
    """The record's ``kind`` (docs/records.md#fields)."""
    if data is not None:  # an event, the pixel's query, or a refused body
        return "event" if status == 202 else "pixel" if status == 200 else "bad"
    if location is not None:
        return "redirect"
    return "refused" if status == 400 else "miss"


class Enricher:
    """Turns a ``Hit`` into the Kafka message: key, JSON value, timestamp, headers."""

    def __init__(
        self,
        records: RecordsSettings,
        server: ServerSettings,
        rules: list[Rule] | None = None,
        fallback_topic: str | None = None,
        no_track_param: str | None = None,
        event_topic: str | None = None,
        agents: Agents | None = None,
        bad_topic: str | None = None,
    ) -> None:
        self._key = records.key
        self._default_topic = records.topic
        self._event_topic = event_topic or records.topic  # collect.topic
        self._bad_topic = bad_topic or self._event_topic  # collect.bad_topic
        self.use_rules(rules or [], fallback_topic, no_track_param)
        self._ip = records.ip
        self._user_agent = records.user_agent
        self._referer = records.referer
        self._bots = BotDetector(agents=agents) if records.bot_detection else None
        # records.geoip_database, opened (and reopened on reload) by the service
        self.countries: Countries | None = None
        self._excluded: tuple[Network, ...] = tuple(records.exclude_ips)
        self._trusted: tuple[Network, ...] = tuple(server.trusted_proxies)
        self._ip_headers = tuple(name.lower().encode() for name in server.client_ip_headers)
        self.instance = records.instance or f"{socket.gethostname()}:{os.getpid()}"
        self._ts, self._logged = Millisecond(), Millisecond()

    def use_rules(
        self, rules: list[Rule], fallback_topic: str | None, no_track_param: str | None
    ) -> None:
        """Take the per-rule topics and the no-track key of a (re)loaded rule set.
        Called on the Trio thread, where ``encode`` runs too."""
        # Each rule's topic by rule name; None (the fallback) included.
        topics: dict[str | None, str] = {
            rule.name: rule.topic or self._default_topic for rule in rules
        }
        topics[None] = fallback_topic or self._default_topic
        self._topics = topics
        self._no_track = no_track_param

    def _trusted_hop(self, address: Address) -> bool:
        return any(address in network for network in self._trusted)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one Enricher per process
    def _trusted_peer(self, peer: str) -> bool:
        address = _parse_ip(peer)
        return address is not None and self._trusted_hop(address)

    def client_ip(self, peer: str | None, headers: Headers) -> str | None:
        """The client's IP: the peer, unless the peer is a trusted proxy.

        Behind a trusted proxy, the first of ``server.client_ip_headers`` that
        holds an IP address is the client. Otherwise the forwarding chain
        (``Forwarded``, else ``X-Forwarded-For``) is walked right to left; the
        first hop that is not a trusted proxy is the client. An unparsable hop
        ends the walk at the last trusted one.
        """
        if peer is None or not self._trusted or not self._trusted_peer(peer):
            return peer
        for name in self._ip_headers:
            value = next((v for k, v in reversed(headers) if k == name), None)
            given = None if value is None else _parse_ip(value.decode("latin-1"))
            if given is not None:
                return str(given)
        address = _parse_ip(peer)
        forwarded = [v for k, v in headers if k == b"forwarded"]
        if forwarded:
            hops = _forwarded_for(b",".join(forwarded).decode("latin-1"))
        else:
            xff = b",".join(v for k, v in headers if k == b"x-forwarded-for")
            hops = xff.decode("latin-1").split(",") if xff else []
        for hop in reversed(hops):
            hop_address = _parse_ip(hop)
            if hop_address is None:
                break
            address = hop_address
            if not self._trusted_hop(hop_address):
                break
        return str(address)

    def record(self, hit: Hit) -> dict[str, object] | None:
        """The record of docs/records.md (schema version ``v``), or None for a
        client in ``records.exclude_ips``."""
        # The hot path of every worker: fields unpacked once, and the field
        # limits looked at one by one only when some text is long.
        hit_id, ts, method, scheme, path, query, headers, client, status, location, rule, data = (
            hit[:12]
        )
        detail, route, variant = hit[13:16]
        host = user_agent = referer = None
        for name, value in headers:
            if name == b"host":
                host = value.decode("utf-8", "backslashreplace")
            elif name == b"user-agent":
                user_agent = value.decode("utf-8", "backslashreplace")
            elif name == b"referer":
                referer = value.decode("utf-8", "backslashreplace")
        if client is None:
            peer = remote = None
        else:
            peer = client[0]
            remote = f"[{peer}]:{client[1]}" if ":" in peer else f"{peer}:{client[1]}"
        client_ip = self.client_ip(peer, headers) if self._trusted else peer
        if self._excluded and client_ip is not None and _within(client_ip, self._excluded):
            return None
        # Looked up with the full address, before records.ip cuts or drops it
        country = None
        if self.countries is not None and client_ip is not None:
            country = self.countries.of(client_ip)
        if self._ip == "anonymized":  # and the peer's port left out
            client_ip, remote = anonymized(client_ip), anonymized(peer)
        elif self._ip == "none":
            client_ip = remote = None
        bot = None
        if self._bots is not None:  # the agent as recorded: cut to its limit
            bot = self._bots.is_bot(method, user_agent and user_agent[:_AGENT_LIMIT])
        query_text = query.decode("utf-8", "backslashreplace")
        record: dict[str, object] = {
            "v": SCHEMA_VERSION,
            "id": hit_id,
            "ts": self._ts.text(ts),
            "method": method,
            "scheme": scheme,
            "host": host,
            "path": path,
            "query": query_text,
            "status": status,
            "location": location,
            "rule": rule,
            "route": route,
            "variant": variant,
            "kind": _kind(status, location, data),
            "client_ip": client_ip,
            "remote_address": remote,
            "user_agent": user_agent if self._user_agent else None,
            "referer": referer if self._referer else None,
            "bot": bot,
            "country": country,
            "logged_at": self._logged.text(time.time()),
            "instance": self.instance,
        }
        if (
            len(path) > _SHORTEST_LIMIT
            or len(query_text) > _SHORTEST_LIMIT
            or (host is not None and len(host) > _SHORTEST_LIMIT)
            or (location is not None and len(location) > _SHORTEST_LIMIT)
            or (user_agent is not None and len(user_agent) > _SHORTEST_LIMIT)
            or (referer is not None and len(referer) > _SHORTEST_LIMIT)
        ):
            _truncate(record)
        if self._no_track is not None and self._untracked(query):
            record["tracked"] = False
        if data is not None:
            if status >= 400:  # a refused request's: reason, error, body, ...
                record.update(orjson.loads(data))
            else:
                record["data"] = orjson.Fragment(data)  # embedded as it is
        if detail is not None:
            if detail == "expired":
                record["expired"] = True
            else:
                record["reason"] = detail
        return record

    def _untracked(self, query: bytes) -> bool:
        """Whether the request's query has the no-track key (any value)."""
        assert self._no_track is not None
        if self._no_track.encode() not in query and b"%" not in query:
            return False  # the key cannot be there, even percent-encoded
        return any(key == self._no_track for key, _ in query_pairs(query))

    def encode(self, hit: Hit) -> Encoded | None:
        """The Kafka message of a hit or an event, or None when its client is
        excluded. Its headers follow from its kind and rule."""
        record = self.record(hit)
        if record is None:
            return None
        key = None if self._key == "none" else record[self._key]
        ts, status, rule, data = hit.ts, hit.status, hit.rule, hit.data
        if data is None:
            topic = self._topics.get(rule, self._default_topic)
        else:
            topic = self._bad_topic if status >= 400 else self._event_topic
        # tuple.__new__, not Encoded(...): a NamedTuple's __new__ is a Python
        # function (0.23 against 0.14 us a record).
        return _new_tuple(
            Encoded,
            (
                topic,
                key.encode() if isinstance(key, str) else None,  # the key fields are texts
                orjson.dumps(record),
                int(ts * 1000),
                message_headers(record["kind"], rule),
            ),
        )
