"""Typed, validated settings loaded from a TOML file.

Every key is checked; a misspelled or unknown key is an error that names it.
librdkafka properties pass through verbatim in ``[kafka]``; we only add
defaults (``KAFKA_DEFAULTS``) and refuse combinations that contradict each other.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .links import allowed_host, macro_problem
from .tls import tls_problem

ADMIN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
REDIRECT_STATUSES = (301, 302, 307, 308)
EXPIRED_STATUSES = (404, 410, *REDIRECT_STATUSES)

KAFKA_DEFAULTS: dict[str, str | int | float | bool] = {
    "acks": "all",
    "enable.idempotence": True,
    "compression.type": "lz4",
    "linger.ms": 5,
    # Bounded on purpose: a full librdkafka queue is backpressure, not growth.
    "queue.buffering.max.messages": 100_000,
    # Readiness reads broker states from the statistics callback.
    "statistics.interval.ms": 1000,
}

# librdkafka aliases of the properties we default or check: setting either name counts.
KAFKA_ALIASES = {
    "acks": "request.required.acks",
    "linger.ms": "queue.buffering.max.ms",
    "compression.type": "compression.codec",
    "message.timeout.ms": "delivery.timeout.ms",
}

# librdkafka's default message.max.bytes: the largest message produce() takes.
MESSAGE_MAX_BYTES = 1_000_000

# librdkafka's default message.timeout.ms (0 means no limit).
LIBRDKAFKA_MESSAGE_TIMEOUT_MS = 300_000

# Substrings that mark a librdkafka property as a secret.
_SECRET_MARKERS = ("password", "secret", "sasl.oauthbearer.config", "ssl.key.pem", "ssl_key")

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*$")
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")

KafkaValue = str | int | float | bool
PositiveSeconds = Annotated[float, Field(gt=0, le=3600)]

# Producer-only librdkafka properties, left out of a consumer's config (``tail``).
PRODUCER_ONLY = frozenset(
    {
        "acks",
        "request.required.acks",
        "enable.idempotence",
        "compression.type",
        "compression.codec",
        "linger.ms",
        "queue.buffering.max.ms",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "batch.num.messages",
        "batch.size",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "retries",
        "message.send.max.retries",
        "enable.gapless.guarantee",
        "partitioner",
        "statistics.interval.ms",
    }
)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ServerSettings(_Section):
    bind: list[str] = Field(default_factory=lambda: ["127.0.0.1:8080"], min_length=1)
    graceful_timeout: PositiveSeconds = 5.0  # s for in-flight requests after SIGTERM
    # s between readiness turning false and the listeners closing (serve only)
    shutdown_delay: float = Field(0.0, ge=0, le=300)
    # HOST:PORT for /healthz, /readyz and /metrics alone; empty: served on `bind`
    admin_bind: list[str] = Field(default_factory=list)
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list
    )
    # Single-value client-IP headers (e.g. "CF-Connecting-IP"), believed from
    # trusted proxies only, before Forwarded and X-Forwarded-For; first one wins
    client_ip_headers: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,100}$")]] = Field(
        default_factory=list
    )
    # Limits for the open internet (docs/configuration.md#connection-limits), per process
    max_connections: int = Field(10_000, ge=1, le=1_000_000)  # open at once; more: closed at once
    # open at once from one peer address; 0: no limit (behind a load balancer, say)
    max_connections_per_ip: int = Field(256, ge=0, le=1_000_000)
    send_timeout: PositiveSeconds = 10.0  # s an answer may wait for the client to read it
    idle_timeout: PositiveSeconds = 30.0  # s a connection may wait for its (next) request
    h2_max_concurrent_streams: int = Field(100, ge=1, le=10_000)  # per HTTP/2 connection
    # stream resets per second on one HTTP/2 connection; more: GOAWAY, closed
    h2_max_resets_per_second: int = Field(200, ge=1, le=1_000_000)
    # PEM certificate (chain) and its unencrypted key; both set: HTTPS on `bind`
    # (HTTP/2 by ALPN), `admin_bind` stays plain HTTP; both empty: plain HTTP
    certfile: str = ""
    keyfile: str = ""

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_networks(cls, networks: object) -> object:
        return _networks(networks)

    @field_validator("bind", "admin_bind")
    @classmethod
    def _check_bind(cls, binds: list[str]) -> list[str]:
        for bind in binds:
            host, sep, port = bind.rpartition(":")
            if not sep or not host or not (port.isascii() and port.isdigit()):
                raise ValueError(f"{bind!r} is not HOST:PORT")
            if not 0 <= int(port) <= 65535:
                raise ValueError(f"{bind!r} is not HOST:PORT")
        return binds

    @model_validator(mode="after")
    def _check_ports(self) -> ServerSettings:
        admin = {port_of(bind) for bind in self.admin_bind} - {0}
        shared = admin & {port_of(bind) for bind in self.bind}
        if shared:
            raise ValueError(
                f"admin_bind: port {min(shared)} is also in bind; the admin port must be its own"
            )
        problem = tls_problem(self.certfile, self.keyfile)
        if problem is not None:
            raise _KeyError(f"server.{problem[0]}", problem[1])
        return self


def _networks(networks: object) -> object:
    """A TOML list of CIDR strings as IP networks (other values: left to pydantic)."""
    if not isinstance(networks, list):
        return networks
    parsed = []
    for network in networks:
        if not isinstance(network, str):
            raise ValueError(f"{network!r} is not a CIDR string")
        try:
            parsed.append(ipaddress.ip_network(network))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{network!r} is not an IP network (CIDR): {exc}") from None
    return parsed


def port_of(bind: str) -> int:
    """The port of a validated HOST:PORT."""
    return int(bind.rpartition(":")[2])


class _Target(_Section):
    status: int = 302
    target: str | None = None
    forward_query: bool = True  # merge the request's query into the target's
    # Only these request query keys are forwarded (with forward_query); None: all
    query_allow: list[str] | None = None
    # These request query keys are never forwarded (e.g. "fbclid", "gclid")
    query_drop: list[str] = Field(default_factory=list)
    forward_path: bool = False  # append what matched "*" to the target's path
    # The redirect's Cache-Control; None: [redirects]' default for its status
    cache_control: str | None = Field(None, min_length=1, max_length=200)
    topic: str | None = None  # the Kafka topic of this rule's records; None: records.topic

    @field_validator("topic")
    @classmethod
    def _check_rule_topic(cls, topic: str | None) -> str | None:
        return None if topic is None else _topic_name(topic)

    @field_validator("cache_control")
    @classmethod
    def _check_cache_control(cls, value: str | None) -> str | None:
        return None if value is None else _header_value(value)

    @model_validator(mode="after")
    def _check_query_allow(self) -> _Target:
        if self.query_allow is not None and not self.forward_query:
            raise ValueError("query_allow: needs forward_query = true")
        if self.query_drop and not self.forward_query:
            raise ValueError("query_drop: needs forward_query = true")
        return self

    @field_validator("target")
    @classmethod
    def _check_target(cls, target: str | None) -> str | None:
        return _target_url(target)


def _target_url(target: str | None) -> str | None:
    """A redirect target as it may be configured (docs/configuration.md#rules)."""
    if target is None:
        return None
    if _CONTROL_RE.search(target) or "\\" in target:
        raise ValueError("must not contain spaces, backslashes or control characters")
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an absolute http:// or https:// URL")
    if not target.isascii():
        raise ValueError("must be ASCII (percent-encode anything else)")
    problem = macro_problem(target)
    if problem is not None:
        raise ValueError(problem)
    return target


def _offset_datetime(value: object) -> object:
    """A TOML offset date-time, or its RFC 3339 text (what a reload's dump and
    an interpolated string give); a date-time without an offset is refused."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a date-time such as 2026-12-01T00:00:00Z") from None
    if isinstance(value, datetime) and value.utcoffset() is None:
        raise ValueError("needs a UTC offset (2026-12-01T00:00:00Z or 2026-12-01T01:00:00+01:00)")
    return value


# Names that may appear in a cookie (rl_<rule>=<variant>) as they are.
_COOKIE_TOKEN = r"^[A-Za-z0-9._-]{1,64}$"


class Route(_Section):
    """``[[rules.routes]]``: a target for the requests that meet every condition
    given (docs/configuration.md#rulesroutes); routing.py applies them."""

    # Recorded as "route"; None: the route's index (0 for the first)
    name: str | None = Field(None, min_length=1, max_length=200)
    os: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        None, min_length=1
    )  # ua-parser OS families ("iOS", "Android")
    # Accept-Language primary tags ("de"), lower-cased
    languages: list[str] | None = Field(None, min_length=1)
    # ISO 3166-1 alpha-2 codes ("DE"), upper-cased; needs records.geoip_database
    countries: list[str] | None = Field(None, min_length=1)
    query: dict[str, str] | None = Field(None, min_length=1)  # keys and values present
    target: str

    @field_validator("languages")
    @classmethod
    def _check_languages(cls, languages: list[str] | None) -> list[str] | None:
        if languages is None:
            return None
        for language in languages:
            if not re.fullmatch(r"[A-Za-z]{1,8}", language):
                raise ValueError(
                    f'{language!r} is not a primary language tag (1 to 8 letters, as "de")'
                )
        return [language.lower() for language in languages]

    @field_validator("countries")
    @classmethod
    def _check_countries(cls, countries: list[str] | None) -> list[str] | None:
        if countries is None:
            return None
        for country in countries:
            if not re.fullmatch(r"[A-Za-z]{2}", country):
                raise ValueError(f'{country!r} is not an ISO 3166-1 alpha-2 code (as "DE")')
        return [country.upper() for country in countries]

    @field_validator("target")
    @classmethod
    def _check_route_target(cls, target: str) -> str:
        _target_url(target)
        return target

    @model_validator(mode="after")
    def _check_conditions(self) -> Route:
        if (
            self.os is None
            and self.languages is None
            and self.countries is None
            and (self.query is None)
        ):
            raise ValueError(
                "a route needs a condition (os, languages, countries or query); "
                "the rule's own target is for every other request"
            )
        return self


class Variant(_Section):
    """``[[rules.split]]``: one variant of a weighted split (routing.py)."""

    name: str = Field(pattern=_COOKIE_TOKEN)  # recorded as "variant"; the cookie's value
    weight: int = Field(ge=0, le=1_000_000)  # relative to the other variants' weights
    target: str

    @field_validator("target")
    @classmethod
    def _check_variant_target(cls, target: str) -> str:
        _target_url(target)
        return target


# s a split's sticky cookie lives by default: 30 days
SPLIT_COOKIE_MAX_AGE = 30 * 86_400


class Rule(_Target):
    name: str = Field(min_length=1, max_length=200)
    path: str
    # Exactly one of target and target_param
    target: str | None = None
    # The rule answers only from valid_from on and before valid_until; None: no bound
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    # The answer outside the window: 404, 410, or a redirect to expired_target
    expired_status: int = 404
    expired_target: str | None = None
    # A query key whose value is the target (an absolute http(s) URL) whose
    # host must be in allowed_hosts
    target_param: str | None = Field(None, pattern=r"^[A-Za-z0-9._~-]{1,100}$")
    # "host", "*.domain", either with ":port"; IDNA names in any form
    allowed_hosts: list[str] = Field(default_factory=list)
    # A dynamic target refused: a 400 ("reject"), or [fallback]'s answer ("fallback")
    on_refused: Literal["reject", "fallback"] = "reject"
    # The request Host this rule answers: "go.example.com", or "*.example.com"
    # for any name below example.com; None: any host. Compared without port.
    host: str | None = Field(None, max_length=253)
    case_insensitive: bool = False  # compare the path's ASCII letters without case
    trailing_slash: bool = False  # "/a" also answers "/a/", and "/a/" also "/a"
    # Routes by device, language, country or query, tried in order; then the split
    routes: list[Route] = Field(default_factory=list)
    split: list[Variant] = Field(default_factory=list)  # weighted variants, sticky per client
    # s the split's cookie (rl_<name>) keeps a client on its variant
    split_cookie_max_age: int = Field(SPLIT_COOKIE_MAX_AGE, ge=60, le=34_560_000)

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str | None) -> str | None:
        if host is None:
            return None
        folded = host.lower().removesuffix(".")
        if not _HOST_RE.match(folded):
            raise ValueError(
                'must be a host name ("go.example.com") or a wildcard ("*.example.com"): '
                "ASCII letters, digits, hyphens and dots, without a port (IDNA-encode others)"
            )
        return folded

    @field_validator("status")
    @classmethod
    def _check_status(cls, status: int) -> int:
        if status not in REDIRECT_STATUSES:
            raise ValueError(f"must be one of {', '.join(map(str, REDIRECT_STATUSES))}")
        return status

    @field_validator("expired_status")
    @classmethod
    def _check_expired_status(cls, status: int) -> int:
        if status not in EXPIRED_STATUSES:
            raise ValueError(f"must be one of {', '.join(map(str, EXPIRED_STATUSES))}")
        return status

    @field_validator("valid_from", "valid_until", mode="before")
    @classmethod
    def _parse_datetime(cls, value: object) -> object:
        return _offset_datetime(value)

    @field_validator("expired_target")
    @classmethod
    def _check_expired_target(cls, target: str | None) -> str | None:
        return _target_url(target)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, hosts: list[str]) -> list[str]:
        normalized = []
        for entry in hosts:
            host = allowed_host(entry)
            if host is None:
                raise ValueError(
                    f'{entry!r} is not a host: a name ("example.com") or a wildcard '
                    '("*.example.com"), optionally with a port (":8443"); no scheme, '
                    "path, user or IP address"
                )
            normalized.append(host)
        return normalized

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError('must start with "/"')
        if "*" in path.removesuffix("/*"):
            raise ValueError('"*" is only allowed as a final "/*" (a prefix rule)')
        if _CONTROL_RE.search(path):
            raise ValueError("must not contain spaces or control characters")
        if path in ADMIN_PATHS:
            raise ValueError(f"{path} is reserved for the admin endpoints")
        return path

    @model_validator(mode="after")
    def _check_links(self) -> Rule:
        if (self.target is None) == (self.target_param is None):
            raise ValueError("target: exactly one of target and target_param is required")
        if self.target_param is not None:
            if not self.allowed_hosts:
                raise ValueError("allowed_hosts: target_param needs at least one allowed host")
            if self.forward_path:
                raise ValueError("forward_path: not with target_param (its target has a path)")
        elif self.allowed_hosts:
            raise ValueError("allowed_hosts: only with target_param")
        elif self.on_refused != "reject":
            raise ValueError("on_refused: only with target_param")
        if (
            self.valid_from is not None
            and self.valid_until is not None
            and self.valid_until <= self.valid_from
        ):
            raise ValueError(
                f"valid_until: {self.valid_until.isoformat()} is not after "
                f"valid_from ({self.valid_from.isoformat()})"
            )
        redirect = self.expired_status in REDIRECT_STATUSES
        if redirect and self.expired_target is None:
            raise ValueError(f"expired_target: required with expired_status {self.expired_status}")
        if not redirect and self.expired_target is not None:
            raise ValueError(
                f"expired_target: not allowed with expired_status {self.expired_status}"
            )
        return self

    @model_validator(mode="after")
    def _check_forward_path(self) -> Rule:
        if self.forward_path and not self.path.endswith("/*"):
            raise ValueError('forward_path: needs a prefix rule (a path ending in "/*")')
        if self.trailing_slash and self.path.endswith("/*"):
            raise ValueError(
                "trailing_slash: only for exact rules; a prefix rule already answers "
                "its path with and without the trailing slash"
            )
        return self

    @model_validator(mode="after")
    def _check_split(self) -> Rule:
        if not self.split:
            return self
        if not re.fullmatch(_COOKIE_TOKEN, self.name):
            raise ValueError(
                f"split: the rule's name {self.name!r} names its cookie (rl_<name>): "
                "1 to 64 letters, digits, '.', '_' or '-'"
            )
        names = [variant.name for variant in self.split]
        if len(set(names)) != len(names):
            raise ValueError("split: variant names must be unique")
        if sum(variant.weight for variant in self.split) <= 0:
            raise ValueError("split: the weights must add up to more than 0")
        return self


class Fallback(_Target):
    status: int = 404
    forward_path: bool = False  # append the whole request path to the target's path

    @model_validator(mode="after")
    def _check(self) -> Fallback:
        if self.target is not None and macro_problem(self.target, allowed=False) is not None:
            raise ValueError("target: {hit_id} and {rule} are replaced in [[rules]] targets only")
        if self.status == 404:
            if self.target is not None:
                raise ValueError("target: not allowed with status 404")
        elif self.status not in REDIRECT_STATUSES:
            raise ValueError("status: must be 404 or one of 301, 302, 307, 308")
        elif self.target is None:
            raise ValueError(f"target: required with status {self.status}")
        return self


class RedirectsSettings(_Section):
    # Cache-Control of temporary redirects (302, 307): "no-store", so that a
    # browser asks again, and each repeat click is a hit.
    temporary_cache_control: str = Field("no-store", min_length=1, max_length=200)
    # s a browser may cache a permanent redirect (301, 308) without asking again
    permanent_max_age: int = Field(3600, ge=0, le=31_536_000)
    # A request query key (e.g. "nt") that marks a hit not to be tracked: it is
    # never forwarded, and the record says "tracked": false. None: off.
    no_track_param: str | None = Field(None, pattern=r"^[A-Za-z0-9._~-]{1,100}$")

    @field_validator("temporary_cache_control")
    @classmethod
    def _check_cache_control(cls, value: str) -> str:
        return _header_value(value)


def _header_value(value: str) -> str:
    if not value.isascii() or re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError("must be printable ASCII (a Cache-Control header value)")
    return value


class RecordsSettings(_Section):
    topic: str = "redirect-hits"
    key: Literal["client_ip", "path", "rule", "none"] = "client_ip"
    queue_size: int = Field(10_000, ge=1, le=10_000_000)  # records in the bounded channel
    when_full: Literal["block", "drop", "shed", "spill"] = "block"
    max_block: float = Field(1.0, ge=0, le=60)  # s a request may wait for room
    workers: int = Field(2, ge=1, le=64)
    batch_size: int = Field(500, ge=1, le=100_000)  # records
    batch_linger: float = Field(0.02, gt=0, le=10)  # s
    instance: str | None = Field(None, min_length=1)  # defaults to "<hostname>:<pid>"
    # Privacy: client_ip and remote_address in full, anonymized (IPv4 to /24,
    # IPv6 to /48) or left out; user_agent and referer recorded or not.
    ip: Literal["full", "anonymized", "none"] = "full"
    user_agent: bool = True
    referer: bool = True
    # The record's "bot" flag (null when off); worked out from the User-Agent
    # even when user_agent = false leaves the agent out of the record.
    bot_detection: bool = True
    # Clients (by client_ip) whose hits are redirected but not recorded: counted "excluded"
    exclude_ips: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    # What must hold before a hit's response is sent: nothing ("memory"), its
    # record written to the journal ("journal"), or acknowledged by Kafka ("kafka")
    durability: Literal["memory", "journal", "kafka"] = "memory"
    # s a response may wait for Kafka under "kafka" before the record is journaled instead
    ack_timeout: float = Field(2.0, gt=0, le=60)
    # s of broker outage during which no record may expire in librdkafka when
    # spilling is off; it makes no room: the channel and librdkafka's queue fill
    # (librdkafka's message.timeout.ms must be at least this long)
    outage_tolerance: float = Field(300.0, ge=0, le=86_400)
    # A MaxMind DB (GeoLite2-Country, say): records gain "country"; routes may
    # use countries. None: no country lookups. Reopened by a reload.
    geoip_database: str | None = Field(None, min_length=1)

    @field_validator("geoip_database")
    @classmethod
    def _check_geoip_database(cls, path: str | None) -> str | None:
        if path is not None:
            from .geo import database_problem  # maxminddb, loaded only when used

            problem = database_problem(path)
            if problem is not None:
                raise ValueError(problem)
        return path

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, topic: str) -> str:
        return _topic_name(topic)

    @field_validator("exclude_ips", mode="before")
    @classmethod
    def _parse_excluded(cls, networks: object) -> object:
        return _networks(networks)


def _topic_name(topic: str) -> str:
    if not _TOPIC_RE.match(topic) or topic in (".", ".."):
        raise ValueError("must be 1-249 characters of A-Z a-z 0-9 . _ -")
    return topic


class SpillSettings(_Section):
    enabled: bool = True
    # One slot-<n> directory per process is created under it; relative paths
    # are relative to the working directory.
    directory: str = Field("spill", min_length=1)
    fsync: Literal["always", "interval", "never"] = "interval"
    fsync_interval: float = Field(1.0, gt=0, le=60)  # s, for fsync = "interval"
    max_bytes: int = Field(1 << 30, ge=1 << 16)  # per process; past it records are dropped
    segment_bytes: int = Field(64 << 20, ge=1 << 12)  # a segment file's size
    # s a batch may wait for room in librdkafka's queue before it is spilled
    queue_full_timeout: float = Field(1.0, gt=0, le=3600)
    replay_rate: int = Field(20_000, ge=1, le=10_000_000)  # records/s replayed at most

    @model_validator(mode="after")
    def _check_segment(self) -> SpillSettings:
        if self.segment_bytes > self.max_bytes:
            raise _KeyError(
                "spill.segment_bytes",
                f"{self.segment_bytes} is larger than spill.max_bytes ({self.max_bytes})",
            )
        return self


# Media types whose body is NDJSON (one event per line); docs/configuration.md.
NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)
# Media types of protobuf bodies, taken whenever [collect.protobuf] is set.
PROTOBUF_TYPES = frozenset(
    {"application/x-protobuf", "application/protobuf", "application/vnd.google.protobuf"}
)
_MEDIA_TYPE_RE = re.compile(r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$")


class ProtobufSettings(_Section):
    """``[collect.protobuf]``: protobuf bodies (docs/configuration.md#collectprotobuf)."""

    descriptor_set: str = ""  # a FileDescriptorSet file; or proto_files
    proto_files: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    messages: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)  # first: default
    _schema: bytes = PrivateAttr(b"")

    @model_validator(mode="after")
    def _load_schema(self) -> ProtobufSettings:
        if bool(self.descriptor_set) == bool(self.proto_files):
            raise _KeyError(
                "collect.protobuf",
                "set descriptor_set (a FileDescriptorSet) or proto_files (.proto sources), "
                "one of the two",
            )
        from .protobuf import SchemaError, load_schema  # protobuf's runtime, only when used

        try:
            self._schema = load_schema(self.descriptor_set, self.proto_files, self.messages)
        except SchemaError as exc:
            raise _KeyError(f"collect.protobuf.{exc.key}", exc.reason) from None
        return self

    @property
    def loaded_schema(self) -> bytes:
        """The serialized FileDescriptorSet, loaded and checked when these settings were."""
        return self._schema


ContentCoding = Literal["gzip", "deflate", "zstd"]
CONTENT_CODINGS: tuple[ContentCoding, ...] = ("gzip", "deflate", "zstd")


class CollectSettings(_Section):
    """``POST /collect``: batched events, each one record (docs/configuration.md)."""

    enabled: bool = False
    path: str = "/collect"  # wins over [[rules]] for every method
    max_body_bytes: int = Field(65_536, ge=1, le=524_288)  # bytes; larger: 413 unread
    max_events: int = Field(100, ge=1, le=10_000)  # events per request; more: 413
    content_types: list[str] = Field(
        default_factory=lambda: ["application/json", "application/x-ndjson", "text/plain"],
        min_length=1,
    )
    # Top-level keys every event must have; a missing one: 400 naming it
    required_fields: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list
    )
    # Origins ("https://shop.example") whose pages may post; "*": any origin
    cors_origins: list[str] = Field(default_factory=list)
    cors_max_age: int = Field(600, ge=0, le=86_400)  # s a browser may cache a preflight
    topic: str | None = None  # the events' topic; None: records.topic
    body_timeout: PositiveSeconds = 5.0  # s for the whole body to arrive; then 408
    protobuf: ProtobufSettings | None = None  # [collect.protobuf]: protobuf bodies too
    # An event field holding a client-made id (a UUID); it becomes the record's id
    id_field: str | None = Field(None, min_length=1, max_length=200)
    bad_topic: str | None = None  # refused bodies are written there as "bad" records
    # bytes of event data the channel and workers may hold; past it, when_full applies
    max_bytes_in_flight: int = Field(67_108_864, ge=1024, le=2**40)
    # Content-Encoding values accepted; any other: 415
    encodings: list[ContentCoding] = Field(default_factory=lambda: list(CONTENT_CODINGS))

    @field_validator("path")
    @classmethod
    def _check_collect_path(cls, path: str) -> str:
        return _endpoint_path(path)

    @field_validator("content_types")
    @classmethod
    def _check_content_types(cls, types: list[str]) -> list[str]:
        for media_type in types:
            if not _MEDIA_TYPE_RE.match(media_type):
                raise ValueError(
                    f"{media_type!r} is not a lower-case media type (type/subtype, no parameters)"
                )
        return types

    @model_validator(mode="after")
    def _check_protobuf_types(self) -> CollectSettings:
        listed = sorted(PROTOBUF_TYPES & set(self.content_types))
        if listed:
            raise _KeyError(
                "collect.content_types",
                f"{listed[0]!r} is a protobuf type, read as such when [collect.protobuf] is set "
                "and never as JSON: leave it out",
            )
        return self

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and origin != _origin_form(origin):
                raise ValueError(
                    f"{origin!r} is not an origin as browsers send it: "
                    'scheme://host[:port] in lower case, no default port, no path (or "*")'
                )
        return origins

    @field_validator("topic")
    @classmethod
    def _check_collect_topic(cls, topic: str | None) -> str | None:
        return None if topic is None else _topic_name(topic)

    @field_validator("bad_topic")
    @classmethod
    def _check_bad_topic(cls, topic: str | None) -> str | None:
        return None if topic is None else _topic_name(topic)

    @field_validator("encodings")
    @classmethod
    def _check_encodings(cls, encodings: list[str]) -> list[str]:
        if len(set(encodings)) != len(encodings):
            raise ValueError("lists an encoding twice")
        return encodings


def _endpoint_path(path: str) -> str:
    """The path of an endpoint that wins over the rules (``collect.path``, ``pixel.path``)."""
    if not path.startswith("/") or path == "/":
        raise ValueError('must start with "/" and name a path below it')
    if not path.isascii() or _CONTROL_RE.search(path) or any(c in path for c in "*?#%\\"):
        raise ValueError("must be printable ASCII without spaces, *, ?, #, % or backslashes")
    if path in ADMIN_PATHS:
        raise ValueError(f"{path} is reserved for the admin endpoints")
    return path


def _origin_form(origin: str) -> str | None:
    """The origin as a browser serializes it (RFC 6454), or None if it is none."""
    if _CONTROL_RE.search(origin) or not origin.isascii():
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    default = 80 if parts.scheme == "http" else 443
    suffix = "" if port is None or port == default else f":{port}"
    return f"{parts.scheme}://{host}{suffix}"


# s a drain may take past flush_timeout: the last produce window (0.25 s), the
# purged records' reports (2 x 1 s, kafka.py) and journaling the leftovers.
PURGE_ALLOWANCE = 3.0


class ShutdownSettings(_Section):
    # s for the whole drain: channel, worker batches and librdkafka's flush.
    flush_timeout: PositiveSeconds = 10.0
    # s the deployment allows between SIGTERM and SIGKILL (e.g. Kubernetes'
    # terminationGracePeriodSeconds, systemd's TimeoutStopSec)
    grace_period: float = Field(30.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _check_flush(self) -> ShutdownSettings:
        if self.flush_timeout + PURGE_ALLOWANCE > self.grace_period:
            raise _KeyError(
                "shutdown.flush_timeout",
                f"{self.flush_timeout} s (+ {PURGE_ALLOWANCE} s for the drain's last steps) "
                f"does not fit in shutdown.grace_period ({self.grace_period} s)",
            )
        return self


class PixelSettings(_Section):
    """``GET pixel.path``: a 1x1 transparent GIF, one record per request
    (docs/configuration.md#pixel)."""

    enabled: bool = False
    path: str = "/p.gif"  # wins over [[rules]] for GET and HEAD

    @field_validator("path")
    @classmethod
    def _check_pixel_path(cls, path: str) -> str:
        return _endpoint_path(path)


class LoggingSettings(_Section):
    """Our own log lines (docs/configuration.md#logging): applied at start."""

    format: Literal["text", "json"] = "text"  # json: one JSON object per line
    # of the redirect_logger loggers; REDIRECT_LOGGER_LOG_LEVEL, when set, wins
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("level", mode="before")
    @classmethod
    def _fold_level(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level


# The tables a reload (SIGHUP) applies; the others need a restart.
RELOADED = ("rules", "fallback", "redirects", "pixel")


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    rules: list[Rule] = Field(default_factory=list)
    fallback: Fallback = Field(default_factory=Fallback)
    records: RecordsSettings = Field(default_factory=RecordsSettings)
    kafka: dict[str, KafkaValue]
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    spill: SpillSettings = Field(default_factory=SpillSettings)
    redirects: RedirectsSettings = Field(default_factory=RedirectsSettings)
    collect: CollectSettings = Field(default_factory=CollectSettings)
    pixel: PixelSettings = Field(default_factory=PixelSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @field_validator("kafka")
    @classmethod
    def _check_kafka(
        cls, kafka: dict[str, KafkaValue], info: ValidationInfo
    ) -> dict[str, KafkaValue]:
        if not str(kafka.get("bootstrap.servers", "")).strip():
            raise ValueError('"bootstrap.servers" is required')
        for key in kafka:
            if key in ("on_delivery", "logger") or key.endswith("_cb"):
                raise ValueError(f"{key!r} takes a callback and cannot be configured")
        records = info.data.get("records")
        defaults = {
            key: value
            for key, value in KAFKA_DEFAULTS.items()
            if key not in kafka and KAFKA_ALIASES.get(key) not in kafka
        }
        if "linger.ms" in defaults and getattr(records, "durability", None) == "kafka":
            defaults["linger.ms"] = 0  # every answer waits out librdkafka's linger
        return {**defaults, **kafka}

    @model_validator(mode="after")
    def _cross_check(self) -> Settings:
        seen_names: set[str] = set()
        seen_paths: set[tuple[str | None, str]] = set()
        for index, rule in enumerate(self.rules):
            if rule.name in seen_names:
                raise _KeyError(f"rules.{index}.name", f"duplicate rule name {rule.name!r}")
            if (rule.host, rule.path) in seen_paths:
                on = "any host" if rule.host is None else f"host {rule.host!r}"
                raise _KeyError(f"rules.{index}.path", f"duplicate path {rule.path!r} on {on}")
            seen_names.add(rule.name)
            seen_paths.add((rule.host, rule.path))
        _cross_check_kafka(self)
        _cross_check_collect(self)
        _cross_check_pixel(self)
        _cross_check_routes(self)
        records = self.records
        if records.when_full == "block" and records.max_block > self.server.graceful_timeout:
            raise _KeyError(
                "records.max_block",
                f"{records.max_block} s is longer than server.graceful_timeout "
                f"({self.server.graceful_timeout} s): a request blocked on a full queue "
                "would be cut off at shutdown",
            )
        if records.when_full == "spill" and not self.spill.enabled:
            raise _KeyError(
                "records.when_full", '"spill" needs the spill journal: spill.enabled is false'
            )
        _cross_check_durability(self)
        _check_shutdown_budget(self)
        return self

    def with_rules_of(self, other: Settings) -> Settings:
        """These settings with ``other``'s ``[[rules]]``, ``[fallback]``,
        ``[redirects]``, ``[pixel]`` and ``records.geoip_database``
        (``RELOADED``, what a reload applies), checked as a whole: raises
        ConfigError when those contradict the tables in use (a rule on the
        running ``collect.path``, say)."""
        data = self.model_dump(mode="json")
        for name in RELOADED:
            data[name] = other.model_dump(mode="json")[name]
        data["records"]["geoip_database"] = other.records.geoip_database
        return parse_settings(data, "the rules with the settings in use")

    def topics(self) -> list[str]:
        """Every topic these settings can write to, each once, in this order:
        ``records.topic``, the rules' topics, the fallback's, and
        ``collect.topic`` and ``collect.bad_topic`` when the collect endpoint
        is enabled."""
        topics = [self.records.topic, *(rule.topic for rule in self.rules), self.fallback.topic]
        if self.collect.enabled:
            topics += [self.collect.topic, self.collect.bad_topic]
        return list(dict.fromkeys(topic for topic in topics if topic is not None))

    def consumer_kafka(self) -> dict[str, KafkaValue]:
        """The ``[kafka]`` properties without the producer-only ones: what a
        consumer of these settings' topics connects with (``tail``)."""
        return {key: value for key, value in self.kafka.items() if key not in PRODUCER_ONLY}

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, with secret Kafka properties masked."""
        data = self.model_dump(mode="json")
        data["kafka"] = {
            key: ("***" if is_secret(key) else value) for key, value in data["kafka"].items()
        }
        return data


class _KeyError(ValueError):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")


def is_secret(kafka_key: str) -> bool:
    return any(marker in kafka_key.lower() for marker in _SECRET_MARKERS)


def _kafka_value(settings: Settings, key: str) -> tuple[str, KafkaValue | None]:
    """The property's value under its name or its librdkafka alias, and the name used."""
    alias = KAFKA_ALIASES.get(key)
    if key not in settings.kafka and alias is not None and alias in settings.kafka:
        return alias, settings.kafka[alias]
    return key, settings.kafka.get(key)


def _as_int(settings: Settings, key: str) -> int | None:
    key, value = _kafka_value(settings, key)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _KeyError(f'kafka."{key}"', f"{value!r} is not an integer") from None


def _truthy(value: KafkaValue | None) -> bool:
    return str(value).lower() in ("true", "1")


def _cross_check_kafka(settings: Settings) -> None:
    kafka = settings.kafka
    queue_max = _as_int(settings, "queue.buffering.max.messages")
    if queue_max is not None and queue_max < settings.records.batch_size:
        raise _KeyError(
            'kafka."queue.buffering.max.messages"',
            f"{queue_max} is smaller than records.batch_size ({settings.records.batch_size}): "
            "a batch could never fit",
        )
    if _truthy(kafka.get("delivery.report.only.error")):
        raise _KeyError(
            'kafka."delivery.report.only.error"',
            "must be false: the ledger counts a record delivered on its success report",
        )
    stats = _as_int(settings, "statistics.interval.ms")
    if stats is not None and stats <= 0:
        raise _KeyError(
            'kafka."statistics.interval.ms"',
            "must be > 0: readiness (/readyz) is computed from librdkafka's statistics",
        )
    acks_key, acks = _kafka_value(settings, "acks")
    if _truthy(kafka.get("enable.idempotence")) and str(acks) not in ("all", "-1"):
        raise _KeyError(
            f'kafka."{acks_key}"',
            f'{acks!r} contradicts enable.idempotence = true, which needs acks = "all"; set both',
        )
    linger_key, _ = _kafka_value(settings, "linger.ms")
    linger = _as_int(settings, "linger.ms")
    if linger is not None and linger / 1000 >= settings.shutdown.flush_timeout:
        raise _KeyError(
            f'kafka."{linger_key}"',
            f"{linger} ms is not shorter than shutdown.flush_timeout "
            f"({settings.shutdown.flush_timeout} s): the last batch could not leave in time",
        )
    timeout_key, _ = _kafka_value(settings, "message.timeout.ms")
    tolerance = settings.records.outage_tolerance
    if not settings.spill.enabled:
        timeout_ms = _as_int(settings, "message.timeout.ms")
        if timeout_ms is None:
            timeout_ms = LIBRDKAFKA_MESSAGE_TIMEOUT_MS
        if 0 < timeout_ms < tolerance * 1000:
            raise _KeyError(
                f'kafka."{timeout_key}"',
                f"{timeout_ms} ms is shorter than records.outage_tolerance ({tolerance} s) "
                "while spill.enabled is false: records would expire and be lost in such an "
                "outage; enable the spill journal, raise the timeout or lower the tolerance",
            )


def _cross_check_collect(settings: Settings) -> None:
    collect = settings.collect
    if not collect.enabled:
        return
    for index, rule in enumerate(settings.rules):
        if rule.path == collect.path:
            raise _KeyError(
                f"rules.{index}.path",
                f"{rule.path!r} is collect.path: the collect endpoint answers it",
            )
    graceful = settings.server.graceful_timeout
    if collect.body_timeout > graceful:
        raise _KeyError(
            "collect.body_timeout",
            f"{collect.body_timeout} s is longer than server.graceful_timeout ({graceful} s): "
            "a request still sending its body would be cut off at shutdown",
        )
    queue_size = settings.records.queue_size
    if collect.max_events > queue_size:
        raise _KeyError(
            "collect.max_events",
            f"{collect.max_events} is larger than records.queue_size ({queue_size}): "
            "a request's events could never all fit in the channel",
        )
    if collect.max_bytes_in_flight < collect.max_body_bytes:
        raise _KeyError(
            "collect.max_bytes_in_flight",
            f"{collect.max_bytes_in_flight} is smaller than collect.max_body_bytes "
            f"({collect.max_body_bytes}): a request's events could not fit in it",
        )


def _cross_check_pixel(settings: Settings) -> None:
    pixel = settings.pixel
    if not pixel.enabled:
        return
    if settings.collect.enabled and settings.collect.path == pixel.path:
        raise _KeyError("pixel.path", f"{pixel.path!r} is collect.path too")
    for index, rule in enumerate(settings.rules):
        if rule.path == pixel.path:
            raise _KeyError(
                f"rules.{index}.path",
                f"{rule.path!r} is pixel.path: the pixel answers it (GET and HEAD)",
            )


def _cross_check_routes(settings: Settings) -> None:
    for index, rule in enumerate(settings.rules):
        dynamic = rule.target_param is not None
        if dynamic and (rule.routes or rule.split) and rule.on_refused != "fallback":
            raise _KeyError(
                f"rules.{index}.on_refused",
                "with target_param, routes and a split answer only a refused target: "
                'they need on_refused = "fallback"',
            )
        if settings.records.geoip_database is not None:
            continue
        for number, route in enumerate(rule.routes):
            if route.countries is not None:
                raise _KeyError(
                    f"rules.{index}.routes.{number}.countries",
                    "needs records.geoip_database (a MaxMind DB to look countries up in)",
                )


def _cross_check_durability(settings: Settings) -> None:
    records, graceful = settings.records, settings.server.graceful_timeout
    if records.durability == "journal" and not settings.spill.enabled:
        raise _KeyError(
            "records.durability",
            '"journal" writes every record to the spill journal before answering: '
            "spill.enabled is false",
        )
    if records.durability != "kafka":
        return
    wait = records.ack_timeout
    parts = f"records.ack_timeout ({records.ack_timeout} s)"
    if records.when_full == "block":
        wait += records.max_block
        parts += f" + records.max_block ({records.max_block} s)"
    if wait >= graceful:
        raise _KeyError(
            "records.ack_timeout",
            f"{parts} is not shorter than server.graceful_timeout ({graceful} s): a request "
            "waiting for Kafka would be cut off at shutdown, unanswered",
        )


def _check_shutdown_budget(settings: Settings) -> None:
    server, shutdown = settings.server, settings.shutdown
    total = server.shutdown_delay + server.graceful_timeout + shutdown.flush_timeout
    if total + PURGE_ALLOWANCE > shutdown.grace_period:
        raise _KeyError(
            "shutdown.grace_period",
            f"{shutdown.grace_period} s is shorter than a shutdown can take: "
            f"server.shutdown_delay ({server.shutdown_delay} s) + server.graceful_timeout "
            f"({server.graceful_timeout} s) + shutdown.flush_timeout ({shutdown.flush_timeout} s)"
            f" + {PURGE_ALLOWANCE} s for the drain's last steps = {total + PURGE_ALLOWANCE} s; "
            "records would be lost to SIGKILL",
        )


def _error_location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        text = str(part)
        if "." in text:
            text = f'"{text}"'
        parts.append(text)
    return ".".join(parts) or "(top level)"


def parse_settings(data: dict[str, Any], source: str = "config") -> Settings:
    """Validate already-parsed TOML data.

    Raises ConfigError naming the first offending key (dotted path) and why.
    """
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            message = error["msg"].removeprefix("Value error, ")
            loc = error["loc"]
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            elif error["type"] == "missing":
                message = "required key is missing"
            if isinstance(error.get("ctx", {}).get("error"), _KeyError):
                lines.append(message)
            else:
                lines.append(f"{_error_location(loc)}: {message}")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


# ${NAME}, ${NAME:-default}, $$ (a literal "$"), or a "${" that is neither (an error);
# any other "$" is itself. docs/configuration.md#environment-variables
_ENV_REF_RE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|(\{))")


def interpolate(
    value: object, environ: Mapping[str, str], loc: tuple[int | str, ...] = ()
) -> object:
    """``value`` (parsed TOML) with ``${NAME}`` and ``${NAME:-default}`` in every
    string replaced from ``environ``, and ``$$`` by ``$``; keys are left as
    they are, and substituted text is not interpolated again.

    Raises ConfigError naming the key (dotted path) and the variable when a
    variable without a default is not set, or a ``${`` is malformed. The
    message never quotes the value.
    """
    if isinstance(value, str):
        return _substitute(value, environ, loc)
    if isinstance(value, dict):
        return {key: interpolate(item, environ, (*loc, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ, (*loc, index)) for index, item in enumerate(value)]
    return value


def _substitute(text: str, environ: Mapping[str, str], loc: tuple[int | str, ...]) -> str:
    if "$" not in text:
        return text

    def replace(match: re.Match[str]) -> str:
        dollar, name, default, malformed = match.groups()
        if dollar is not None:
            return "$"
        if malformed is not None:
            raise ConfigError(
                f'{_error_location(loc)}: the "${{" at character {match.start() + 1} is not '
                '${NAME} or ${NAME:-default} (NAME: letters, digits and "_", not first a '
                'digit); write "$${" for a literal "${"'
            )
        found = environ.get(name)
        if default is not None and not found:  # as in a shell: unset or empty
            return default
        if found is None:
            raise ConfigError(
                f"{_error_location(loc)}: the environment variable {name} is not set, and "
                f"${{{name}}} has no default (${{{name}:-default}})"
            )
        return found

    return _ENV_REF_RE.sub(replace, text)


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read a TOML config file, interpolate environment variables (``environ``,
    by default ``os.environ``) into its strings, and validate it.

    Raises ConfigError for a missing or unreadable file, invalid TOML (with its
    line and column), a missing or malformed ``${NAME}`` (naming the key and
    the variable) or an invalid setting (naming the key and the reason).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        interpolated = interpolate(data, os.environ if environ is None else environ)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    assert isinstance(interpolated, dict)
    return parse_settings(interpolated, str(path))
