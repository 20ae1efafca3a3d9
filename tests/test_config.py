"""Settings: every invalid case names its key and the reason; the CLI's ``check``."""

from __future__ import annotations

import ipaddress
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from redirect_logger.config import (
    KAFKA_DEFAULTS,
    ConfigError,
    RecordsSettings,
    Settings,
    load_settings,
    parse_settings,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
BOOTSTRAP = "127.0.0.1:9"


def config(**tables: Any) -> dict[str, Any]:
    """Minimal valid data plus the given top-level tables (kafka is merged)."""
    kafka = {"bootstrap.servers": BOOTSTRAP, **tables.pop("kafka", {})}
    return {"kafka": kafka, **tables}


def rule(**fields: Any) -> dict[str, Any]:
    return {"name": "r", "path": "/r", "target": "https://t.example/", **fields}


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    return str(info.value)


INVALID = [
    pytest.param(
        config(server={"max_connections": 0}),
        "server.max_connections",
        "greater than or equal to 1",
        id="max-connections-zero",
    ),
    pytest.param(
        config(server={"max_connections": 10.5}),
        "server.max_connections",
        "valid integer",
        id="max-connections-float",
    ),
    pytest.param(
        config(server={"max_connections_per_ip": -1}),
        "server.max_connections_per_ip",
        "greater than or equal to 0",
        id="max-connections-per-ip-negative",
    ),
    pytest.param(
        config(server={"send_timeout": 0}),
        "server.send_timeout",
        "greater than 0",
        id="send-timeout-zero",
    ),
    pytest.param(
        config(server={"idle_timeout": 3601}),
        "server.idle_timeout",
        "less than or equal to 3600",
        id="idle-timeout-too-long",
    ),
    pytest.param(
        config(server={"h2_max_concurrent_streams": 0}),
        "server.h2_max_concurrent_streams",
        "greater than or equal to 1",
        id="h2-streams-zero",
    ),
    pytest.param(
        config(server={"h2_max_resets_per_second": 0}),
        "server.h2_max_resets_per_second",
        "greater than or equal to 1",
        id="h2-resets-zero",
    ),
    pytest.param(
        config(server={"max_conections": 10}),
        "server.max_conections",
        "unknown key",
        id="max-connections-misspelt",
    ),
    pytest.param(
        {**config(), "serverr": {}},
        "serverr",
        "unknown key",
        id="unknown-top-level-table",
    ),
    pytest.param(
        config(records={"queue_sise": 10}),
        "records.queue_sise",
        "unknown key",
        id="unknown-records-key",
    ),
    pytest.param(
        config(server={"bind": ["127.0.0.1:8080"], "graceful": 5}),
        "server.graceful",
        "unknown key",
        id="unknown-server-key",
    ),
    pytest.param(
        config(rules=[rule(forward_paths=True)]),
        "rules.0.forward_paths",
        "unknown key",
        id="unknown-rule-key",
    ),
    pytest.param(
        config(records={"when_full": "wait"}),
        "records.when_full",
        "'block', 'drop', 'shed' or 'spill'",
        id="bad-when-full",
    ),
    pytest.param(
        config(rules=[rule(status=303)]),
        "rules.0.status",
        "must be one of 301, 302, 307, 308",
        id="status-303",
    ),
    pytest.param(
        config(rules=[rule(), rule(name="s", path="/s", status=200)]),
        "rules.1.status",
        "must be one of 301, 302, 307, 308",
        id="status-200-second-rule",
    ),
    pytest.param(
        config(rules=[rule(target="/elsewhere")]),
        "rules.0.target",
        "must be an absolute http:// or https:// URL",
        id="relative-target",
    ),
    pytest.param(
        config(rules=[rule(target="example.com/x")]),
        "rules.0.target",
        "must be an absolute http:// or https:// URL",
        id="schemeless-target",
    ),
    pytest.param(
        config(rules=[rule(target="ftp://t.example/")]),
        "rules.0.target",
        "must be an absolute http:// or https:// URL",
        id="ftp-target",
    ),
    pytest.param(
        config(rules=[rule(target="javascript:alert(1)")]),
        "rules.0.target",
        "must be an absolute http:// or https:// URL",
        id="javascript-target",
    ),
    pytest.param(
        config(rules=[rule(target="https://t.example/a b")]),
        "rules.0.target",
        "must not contain spaces, backslashes or control characters",
        id="target-with-space",
    ),
    pytest.param(
        config(rules=[rule(target="https://t.example/\r\nSet-Cookie:a=1")]),
        "rules.0.target",
        "must not contain spaces, backslashes or control characters",
        id="target-with-crlf",
    ),
    pytest.param(
        config(rules=[rule(target="https://t.example\\@evil.com/")]),
        "rules.0.target",
        "must not contain spaces, backslashes or control characters",
        id="target-with-backslash",
    ),
    pytest.param(
        config(rules=[rule(target="https://t.example/caf\u00e9")]),
        "rules.0.target",
        "must be ASCII",
        id="non-ascii-target",
    ),
    pytest.param(
        config(rules=[rule(path="docs")]),
        "rules.0.path",
        'must start with "/"',
        id="path-without-slash",
    ),
    pytest.param(
        config(rules=[rule(path="/a/*/b")]),
        "rules.0.path",
        '"*" is only allowed as a final "/*" (a prefix rule)',
        id="star-in-the-middle",
    ),
    pytest.param(
        config(rules=[rule(path="/a*")]),
        "rules.0.path",
        '"*" is only allowed as a final "/*" (a prefix rule)',
        id="star-without-slash",
    ),
    pytest.param(
        config(rules=[rule(path="/a b")]),
        "rules.0.path",
        "must not contain spaces or control characters",
        id="path-with-space",
    ),
    pytest.param(
        config(rules=[rule(path="/docs", forward_path=True)]),
        "rules.0",
        'forward_path: needs a prefix rule (a path ending in "/*")',
        id="forward-path-on-exact-rule",
    ),
    pytest.param(
        config(rules=[rule(name="a", path="/a"), rule(name="a", path="/b")]),
        "rules.1.name",
        "duplicate rule name 'a'",
        id="duplicate-names",
    ),
    pytest.param(
        config(rules=[rule(name="a", path="/a/*"), rule(name="b", path="/a/*")]),
        "rules.1.path",
        "duplicate path '/a/*'",
        id="duplicate-paths",
    ),
    pytest.param(
        config(rules=[rule(path="/metrics")]),
        "rules.0.path",
        "/metrics is reserved for the admin endpoints",
        id="admin-metrics",
    ),
    pytest.param(
        config(rules=[rule(path="/healthz")]),
        "rules.0.path",
        "/healthz is reserved for the admin endpoints",
        id="admin-healthz",
    ),
    pytest.param(
        config(rules=[rule(path="/readyz")]),
        "rules.0.path",
        "/readyz is reserved for the admin endpoints",
        id="admin-readyz",
    ),
    pytest.param(
        config(fallback={"status": 404, "target": "https://t.example/"}),
        "fallback",
        "target: not allowed with status 404",
        id="fallback-404-with-target",
    ),
    pytest.param(
        config(fallback={"status": 302}),
        "fallback",
        "target: required with status 302",
        id="fallback-302-without-target",
    ),
    pytest.param(
        config(fallback={"status": 303, "target": "https://t.example/"}),
        "fallback",
        "status: must be 404 or one of 301, 302, 307, 308",
        id="fallback-303",
    ),
    pytest.param(
        {"kafka": {"acks": "all"}},
        "kafka",
        '"bootstrap.servers" is required',
        id="missing-bootstrap-servers",
    ),
    pytest.param(
        {"kafka": {"bootstrap.servers": "  "}},
        "kafka",
        '"bootstrap.servers" is required',
        id="blank-bootstrap-servers",
    ),
    pytest.param({}, "kafka", "required key is missing", id="missing-kafka-table"),
    pytest.param(
        config(kafka={"on_delivery": "x"}),
        "kafka",
        "'on_delivery' takes a callback and cannot be configured",
        id="kafka-on-delivery",
    ),
    pytest.param(
        config(kafka={"error_cb": "x"}),
        "kafka",
        "'error_cb' takes a callback and cannot be configured",
        id="kafka-error-cb",
    ),
    pytest.param(
        config(kafka={"queue.buffering.max.messages": 499}),
        'kafka."queue.buffering.max.messages"',
        "499 is smaller than records.batch_size (500): a batch could never fit",
        id="librdkafka-queue-smaller-than-batch",
    ),
    pytest.param(
        config(kafka={"statistics.interval.ms": 0}),
        'kafka."statistics.interval.ms"',
        "must be > 0",
        id="statistics-off",
    ),
    pytest.param(
        config(kafka={"acks": 1}),
        'kafka."acks"',
        "1 contradicts enable.idempotence = true",
        id="acks-1-with-idempotence",
    ),
    pytest.param(
        config(kafka={"acks": "0", "enable.idempotence": "true"}),
        'kafka."acks"',
        "'0' contradicts enable.idempotence = true",
        id="acks-0-with-idempotence-string",
    ),
    pytest.param(
        config(kafka={"linger.ms": 10_000}),
        'kafka."linger.ms"',
        "10000 ms is not shorter than shutdown.flush_timeout (10.0 s)",
        id="linger-equals-flush-timeout",
    ),
    pytest.param(
        config(kafka={"linger.ms": 600}, shutdown={"flush_timeout": 0.5}),
        'kafka."linger.ms"',
        "600 ms is not shorter than shutdown.flush_timeout (0.5 s)",
        id="linger-longer-than-flush-timeout",
    ),
    pytest.param(
        config(kafka={"linger.ms": "soon"}),
        'kafka."linger.ms"',
        "'soon' is not an integer",
        id="linger-not-an-integer",
    ),
    pytest.param(
        config(records={"max_block": 6}),
        "records.max_block",
        "6.0 s is longer than server.graceful_timeout (5.0 s)",
        id="max-block-over-graceful-timeout",
    ),
    pytest.param(
        config(records={"topic": "a/b"}),
        "records.topic",
        "must be 1-249 characters of A-Z a-z 0-9 . _ -",
        id="bad-topic",
    ),
    pytest.param(
        config(server={"bind": ["8080"]}),
        "server.bind",
        "'8080' is not HOST:PORT",
        id="bind-without-host",
    ),
    pytest.param(
        config(server={"bind": ["127.0.0.1:65536"]}),
        "server.bind",
        "'127.0.0.1:65536' is not HOST:PORT",
        id="bind-port-out-of-range",
    ),
    pytest.param(
        config(server={"bind": ["127.0.0.1:\u00b2"]}),
        "server.bind",
        "'127.0.0.1:\u00b2' is not HOST:PORT",
        id="bind-port-superscript-digit",
    ),
    pytest.param(
        config(kafka={"delivery.report.only.error": True}),
        'kafka."delivery.report.only.error"',
        "must be false: the ledger counts a record delivered on its success report",
        id="success-reports-off",
    ),
    pytest.param(
        config(server={"bind": ["0.0.0.0:8080"], "admin_bind": ["127.0.0.1:8080"]}),
        "server",
        "admin_bind: port 8080 is also in bind; the admin port must be its own",
        id="admin-port-shared",
    ),
    pytest.param(
        config(server={"admin_bind": ["localhost"]}),
        "server.admin_bind",
        "'localhost' is not HOST:PORT",
        id="admin-bind-without-port",
    ),
    pytest.param(
        config(records={"workers": True}),
        "records.workers",
        "Input should be a valid integer",
        id="bool-is-not-an-integer",
    ),
    pytest.param(
        config(records={"queue_size": "5"}),
        "records.queue_size",
        "Input should be a valid integer",
        id="string-is-not-an-integer",
    ),
    pytest.param(
        config(rules=[rule(forward_query="yes")]),
        "rules.0.forward_query",
        "Input should be a valid boolean",
        id="string-is-not-a-boolean",
    ),
    pytest.param(
        config(records={"bot_detection": 1}),
        "records.bot_detection",
        "Input should be a valid boolean",
        id="number-is-not-a-boolean",
    ),
    pytest.param(
        config(server={"trusted_proxies": [5]}),
        "server.trusted_proxies",
        "5 is not a CIDR string",
        id="proxy-is-not-a-string",
    ),
    pytest.param(
        config(server={"trusted_proxies": ["10.0.0.1/8"]}),
        "server.trusted_proxies",
        "'10.0.0.1/8' is not an IP network (CIDR): 10.0.0.1/8 has host bits set",
        id="proxy-with-host-bits",
    ),
    pytest.param(
        config(spill={"max_bytes": 1 << 20, "segment_bytes": 2 << 20}),
        "spill.segment_bytes",
        "2097152 is larger than spill.max_bytes (1048576)",
        id="segment-larger-than-the-cap",
    ),
    pytest.param(
        config(spill={"fsync": "sometimes"}),
        "spill.fsync",
        "Input should be 'always', 'interval' or 'never'",
        id="bad-fsync-policy",
    ),
    pytest.param(
        config(records={"when_full": "spill"}, spill={"enabled": False}),
        "records.when_full",
        '"spill" needs the spill journal: spill.enabled is false',
        id="spill-policy-without-a-journal",
    ),
    pytest.param(
        config(records={"durability": "journal"}, spill={"enabled": False}),
        "records.durability",
        '"journal" writes every record to the spill journal before answering: '
        "spill.enabled is false",
        id="journal-durability-without-a-journal",
    ),
    pytest.param(
        config(records={"durability": "kafka", "ack_timeout": 4.0}),
        "records.ack_timeout",
        "records.ack_timeout (4.0 s) + records.max_block (1.0 s) is not shorter than "
        "server.graceful_timeout (5.0 s): a request waiting for Kafka would be cut off at "
        "shutdown, unanswered",
        id="ack-timeout-past-the-graceful-timeout",
    ),
    pytest.param(
        config(records={"durability": "kafka", "when_full": "drop", "ack_timeout": 5.0}),
        "records.ack_timeout",
        "records.ack_timeout (5.0 s) is not shorter than server.graceful_timeout (5.0 s)",
        id="ack-timeout-as-long-as-the-graceful-timeout",
    ),
    pytest.param(
        config(records={"durability": "always"}),
        "records.durability",
        "Input should be 'memory', 'journal' or 'kafka'",
        id="bad-durability",
    ),
    pytest.param(
        config(shutdown={"flush_timeout": 29.0}),
        "shutdown.flush_timeout",
        "29.0 s (+ 3.0 s for the drain's last steps) does not fit in "
        "shutdown.grace_period (30.0 s)",
        id="flush-longer-than-the-grace-period",
    ),
    pytest.param(
        config(server={"graceful_timeout": 15.0, "shutdown_delay": 10.0}),
        "shutdown.grace_period",
        "30.0 s is shorter than a shutdown can take: server.shutdown_delay (10.0 s) + "
        "server.graceful_timeout (15.0 s) + shutdown.flush_timeout (10.0 s) + 3.0 s for "
        "the drain's last steps = 38.0 s; records would be lost to SIGKILL",
        id="shutdown-longer-than-the-grace-period",
    ),
    pytest.param(
        config(spill={"enabled": False}, kafka={"message.timeout.ms": 60000}),
        'kafka."message.timeout.ms"',
        "60000 ms is shorter than records.outage_tolerance (300.0 s) while spill.enabled is false",
        id="message-timeout-shorter-than-the-outage-tolerance",
    ),
    pytest.param(
        config(spill={"enabled": False}, kafka={"delivery.timeout.ms": "1000"}),
        'kafka."delivery.timeout.ms"',
        "1000 ms is shorter than records.outage_tolerance",
        id="alias-delivery-timeout-shorter-than-the-outage-tolerance",
    ),
    pytest.param(
        config(spill={"enabled": False}, records={"outage_tolerance": 600.0}),
        'kafka."message.timeout.ms"',
        "300000 ms is shorter than records.outage_tolerance (600.0 s)",
        id="librdkafka-default-timeout-shorter-than-the-outage-tolerance",
    ),
    pytest.param(
        config(collect={"enabled": True, "path": "/metrics"}),
        "collect.path",
        "/metrics is reserved for the admin endpoints",
        id="collect-path-admin",
    ),
    pytest.param(
        config(collect={"path": "collect"}),
        "collect.path",
        'must start with "/"',
        id="collect-path-relative",
    ),
    pytest.param(
        config(collect={"path": "/c?x=1"}),
        "collect.path",
        "without spaces, *, ?, #, % or backslashes",
        id="collect-path-query",
    ),
    pytest.param(
        config(collect={"enabled": True}, rules=[rule(path="/collect")]),
        "rules.0.path",
        "'/collect' is collect.path: the collect endpoint answers it",
        id="rule-on-the-collect-path",
    ),
    pytest.param(
        config(collect={"enabled": True, "max_events": 101}, records={"queue_size": 100}),
        "collect.max_events",
        "101 is larger than records.queue_size (100)",
        id="collect-more-events-than-the-channel-holds",
    ),
    pytest.param(
        config(collect={"max_body_bytes": 524_289}),
        "collect.max_body_bytes",
        "less than or equal to 524288",
        id="collect-body-over-512-kib",
    ),
    pytest.param(
        config(collect={"encodings": ["gzip", "br"]}),
        "collect.encodings.1",
        "'gzip', 'deflate' or 'zstd'",
        id="collect-unknown-encoding",
    ),
    pytest.param(
        config(collect={"encodings": ["gzip", "gzip"]}),
        "collect.encodings",
        "lists an encoding twice",
        id="collect-encoding-twice",
    ),
    pytest.param(
        config(collect={"bad_topic": "bad topic"}),
        "collect.bad_topic",
        "",
        id="collect-bad-topic-name",
    ),
    pytest.param(
        config(collect={"id_field": ""}),
        "collect.id_field",
        "at least 1 character",
        id="collect-empty-id-field",
    ),
    pytest.param(
        config(collect={"enabled": True, "max_bytes_in_flight": 4096}),
        "collect.max_bytes_in_flight",
        "4096 is smaller than collect.max_body_bytes (65536)",
        id="collect-budget-below-one-body",
    ),
    pytest.param(
        config(collect={"max_events": 0}),
        "collect.max_events",
        "greater than or equal to 1",
        id="collect-no-events",
    ),
    pytest.param(
        config(collect={"content_types": ["Text/Plain"]}),
        "collect.content_types",
        "'Text/Plain' is not a lower-case media type",
        id="collect-content-type-case",
    ),
    pytest.param(
        config(collect={"content_types": ["text/plain; charset=utf-8"]}),
        "collect.content_types",
        "is not a lower-case media type (type/subtype, no parameters)",
        id="collect-content-type-parameters",
    ),
    pytest.param(
        config(collect={"content_types": []}),
        "collect.content_types",
        "at least 1 item",
        id="collect-no-content-types",
    ),
    pytest.param(
        config(collect={"cors_origins": ["https://Shop.example"]}),
        "collect.cors_origins",
        "'https://Shop.example' is not an origin as browsers send it",
        id="collect-origin-upper-case",
    ),
    pytest.param(
        config(collect={"cors_origins": ["https://shop.example/"]}),
        "collect.cors_origins",
        "is not an origin as browsers send it",
        id="collect-origin-with-path",
    ),
    pytest.param(
        config(collect={"cors_origins": ["https://shop.example:443"]}),
        "collect.cors_origins",
        "no default port",
        id="collect-origin-default-port",
    ),
    pytest.param(
        config(collect={"required_fields": [""]}),
        "collect.required_fields.0",
        "at least 1 character",
        id="collect-empty-required-field",
    ),
    pytest.param(
        config(collect={"topic": "a b"}),
        "collect.topic",
        "must be 1-249 characters",
        id="collect-topic",
    ),
    pytest.param(
        config(collect={"body_timeout": 0}),
        "collect.body_timeout",
        "greater than 0",
        id="collect-body-timeout-zero",
    ),
    pytest.param(
        config(collect={"enabled": "yes"}),
        "collect.enabled",
        "valid boolean",
        id="collect-enabled-string",
    ),
    pytest.param(
        config(collect={"cors_origin": []}),
        "collect.cors_origin",
        "unknown key",
        id="collect-unknown-key",
    ),
]


@pytest.mark.parametrize(("data", "key", "reason"), INVALID)
def test_invalid_settings_name_the_key_and_the_reason(
    data: dict[str, Any], key: str, reason: str
) -> None:
    message = config_error(data)
    assert message.startswith(f"config: {key}: "), message
    assert reason in message


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(config(kafka={"acks": 1, "enable.idempotence": False}), id="acks-1-no-idem"),
        pytest.param(config(kafka={"acks": -1}), id="acks-minus-1"),
        pytest.param(config(kafka={"acks": "all"}), id="acks-all"),
        pytest.param(config(kafka={"linger.ms": 9_999}), id="linger-just-under-flush"),
        pytest.param(config(kafka={"queue.buffering.max.messages": 500}), id="queue-eq-batch"),
        pytest.param(config(records={"max_block": 5}), id="max-block-eq-graceful"),
        pytest.param(
            config(records={"max_block": 10, "when_full": "drop"}), id="max-block-under-drop"
        ),
        pytest.param(
            config(server={"max_connections": 1, "max_connections_per_ip": 1}),
            id="one-connection",
        ),
        pytest.param(config(server={"max_connections_per_ip": 0}), id="no-limit-per-ip"),
        pytest.param(
            config(server={"max_connections": 100}), id="max-connections-below-the-default-per-ip"
        ),
        pytest.param(
            config(server={"max_connections": 100, "max_connections_per_ip": 101}),
            id="max-connections-per-ip-above-max-connections",
        ),
        pytest.param(config(rules=[rule(path="/*", forward_path=True)]), id="root-prefix"),
        pytest.param(
            config(rules=[rule(name="a", path="/docs/*"), rule(name="b", path="/docs")]),
            id="prefix-and-its-bare-form",
        ),
        pytest.param(config(rules=[rule(path="/metrics/x")]), id="under-admin-path"),
        pytest.param(
            config(collect={"enabled": False}, rules=[rule(path="/collect")]),
            id="rule-on-the-collect-path-while-collect-is-off",
        ),
        pytest.param(
            config(
                collect={
                    "enabled": True,
                    "path": "/e/v1",
                    "max_events": 100,
                    "cors_origins": ["*", "http://127.0.0.1:8080", "https://[2001:db8::1]:8443"],
                    "content_types": ["application/vnd.events+json"],
                },
                records={"queue_size": 100},
            ),
            id="collect-at-the-boundaries",
        ),
        pytest.param(
            config(fallback={"status": 308, "target": "http://t.example:8080/x?y=1#z"}),
            id="redirect-fallback",
        ),
    ],
)
def test_boundary_cases_are_accepted(data: dict[str, Any]) -> None:
    assert isinstance(parse_settings(data), Settings)


def test_the_source_names_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^site\.toml: records\.queue_sise: unknown key$"):
        parse_settings(config(records={"queue_sise": 1}), "site.toml")


# --- property tests ---

KEY_TEXT = st.text(min_size=1, max_size=30)


@given(path=st.text(max_size=40))
@example(path="/docs/*")
@example(path="/a/*/b")
@example(path="/*")
@example(path="/\x00")
@example(path="/metrics")
def test_any_rule_path_is_accepted_only_in_its_documented_form(path: str) -> None:
    data = config(rules=[rule(path=path)])
    valid = (
        path.startswith("/")
        and "*" not in path.removesuffix("/*")
        and not any(char <= " " or char == "\x7f" for char in path)
        and path not in ("/healthz", "/readyz", "/metrics")
    )
    if valid:
        assert parse_settings(data).rules[0].path == path
    else:
        assert config_error(data).startswith("config: rules.0.path: ")


@given(key=KEY_TEXT.filter(lambda key: key not in RecordsSettings.model_fields))
@example(key="queue_sise")
@example(key="batch.size")
def test_any_unknown_records_key_is_named(key: str) -> None:
    shown = f'"{key}"' if "." in key else key
    message = config_error(config(records={"queue_size": 10, key: 1}))
    assert message == f"config: records.{shown}: unknown key"


kafka_values = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.text(max_size=10), st.sampled_from(["all", "-1"])
)
checked_keys = st.sampled_from(
    [
        "acks",
        "enable.idempotence",
        "linger.ms",
        "queue.buffering.max.messages",
        "statistics.interval.ms",
    ]
)


@given(kafka=st.dictionaries(checked_keys, kafka_values, max_size=5))
@example(kafka={"linger.ms": float("inf")})
@example(kafka={"statistics.interval.ms": float("inf")})
@example(kafka={"queue.buffering.max.messages": float("-inf")})
@example(kafka={"linger.ms": float("nan")})
def test_any_cross_checked_kafka_value_is_accepted_or_a_config_error(
    kafka: dict[str, Any],
) -> None:
    """TOML allows inf and nan; whatever the value, the answer is Settings or ConfigError."""
    data = config(kafka=kafka)
    try:
        settings = parse_settings(data)
    except ConfigError as exc:
        assert str(exc).startswith("config: kafka"), exc
    else:
        assert settings.kafka == {**KAFKA_DEFAULTS, "bootstrap.servers": BOOTSTRAP, **kafka}


# --- defaults and full files ---


def test_kafka_defaults_are_merged_and_overridable() -> None:
    before = dict(KAFKA_DEFAULTS)
    settings = parse_settings(
        config(kafka={"linger.ms": 50, "compression.type": "zstd", "client.id": "edge-1"})
    )
    assert settings.kafka == {
        **before,
        "bootstrap.servers": BOOTSTRAP,
        "linger.ms": 50,
        "compression.type": "zstd",
        "client.id": "edge-1",
    }
    assert before == KAFKA_DEFAULTS  # not mutated by the merge
    assert parse_settings(config()).kafka == {**before, "bootstrap.servers": BOOTSTRAP}


def test_minimal_settings_take_the_documented_defaults() -> None:
    settings = parse_settings(config())
    assert settings.server.bind == ["127.0.0.1:8080"]
    assert settings.server.graceful_timeout == 5.0
    server = settings.server
    assert (server.max_connections, server.max_connections_per_ip) == (10_000, 256)
    assert (server.send_timeout, server.idle_timeout) == (10.0, 30.0)
    assert (server.h2_max_concurrent_streams, server.h2_max_resets_per_second) == (100, 200)
    assert settings.rules == []
    assert (settings.fallback.status, settings.fallback.target) == (404, None)
    assert (settings.records.topic, settings.records.when_full) == ("redirect-hits", "block")
    assert (settings.records.queue_size, settings.records.batch_size) == (10_000, 500)
    assert (settings.records.user_agent, settings.records.bot_detection) == (True, True)
    assert settings.shutdown.flush_timeout == 10.0
    collect = settings.collect
    assert (collect.enabled, collect.path, collect.topic) == (False, "/collect", None)
    assert (collect.max_body_bytes, collect.max_events, collect.body_timeout) == (65_536, 100, 5.0)
    assert collect.content_types == ["application/json", "application/x-ndjson", "text/plain"]
    assert (collect.required_fields, collect.cors_origins, collect.cors_max_age) == ([], [], 600)


def test_example_config_loads() -> None:
    settings = load_settings(CONFIG_DIR / "example.toml")
    assert settings.server.bind == ["0.0.0.0:8080"]
    assert settings.server.trusted_proxies == [ipaddress.IPv4Network("10.0.0.0/8")]
    assert [(r.name, r.host, r.path, r.status) for r in settings.rules] == [
        ("home", None, "/", 301),
        ("docs", None, "/docs/*", 302),
        ("go-spring", "go.example.com", "/Spring", 302),
        ("app", None, "/app", 302),
    ]
    app = settings.rules[3]
    assert [(r.name, r.os, r.languages, r.query) for r in app.routes] == [
        ("ios", ["iOS"], None, None),
        (None, None, ["de"], {"ref": "newsletter"}),
    ]
    assert [(v.name, v.weight) for v in app.split] == [("a", 70), ("b", 30)]
    assert settings.rules[1].forward_path is True
    assert (settings.rules[2].case_insensitive, settings.rules[2].trailing_slash) == (True, True)
    assert settings.fallback.status == 404
    assert settings.kafka == {**KAFKA_DEFAULTS, "bootstrap.servers": "kafka-1:9092,kafka-2:9092"}


def test_quickstart_config_loads() -> None:
    settings = load_settings(CONFIG_DIR / "quickstart.toml")
    assert settings.server.bind == ["127.0.0.1:8080"]
    assert [r.name for r in settings.rules] == ["home", "docs"]
    assert settings.kafka == {**KAFKA_DEFAULTS, "bootstrap.servers": "127.0.0.1:19092"}


def test_redacted_masks_secrets_only() -> None:
    settings = parse_settings(
        config(kafka={"sasl.username": "u", "sasl.password": "hunter2", "ssl.key.password": "k"})
    )
    kafka = settings.redacted()["kafka"]
    assert (kafka["sasl.password"], kafka["ssl.key.password"]) == ("***", "***")
    assert (kafka["sasl.username"], kafka["bootstrap.servers"]) == ("u", BOOTSTRAP)
    assert settings.kafka["sasl.password"] == "hunter2"


# --- load_settings ---


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[kafka]\n"bootstrap.servers" = "x:1"\n[records\nqueue_size = 1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[kafka]\n"bootstrap.servers" = "caf\xe9:1"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_settings(path)


def test_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('[records]\nqueue_sise = 10\n\n[kafka]\n"bootstrap.servers" = "x:1"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: records.queue_sise: unknown key"


# --- the CLI's check command ---

PASSWORD = "pw-9f3c1e7a-do-not-print"


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redirect_logger.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_rejects_an_invalid_file_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('[records]\nqueue_sise = 10\n\n[kafka]\n"bootstrap.servers" = "x:1"\n')
    result = check(path)
    assert result.returncode == 2, result.stderr
    assert f"error: {path}: records.queue_sise: unknown key" in result.stderr
    assert result.stdout == ""


def test_check_rejects_a_missing_file(tmp_path: Path) -> None:
    result = check(tmp_path / "nope.toml")
    assert result.returncode == 2, result.stderr
    assert "cannot read" in result.stderr


def test_check_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        "[kafka]\n"
        f'"bootstrap.servers" = "{BOOTSTRAP}"\n'
        '"security.protocol" = "SASL_PLAINTEXT"\n'
        '"sasl.mechanisms" = "PLAIN"\n'
        '"sasl.username" = "redirects"\n'
        f'"sasl.password" = "{PASSWORD}"\n'
    )
    result = check(path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["kafka"]["sasl.password"] == "***"
    assert printed["kafka"]["sasl.username"] == "redirects"
    assert printed["kafka"]["linger.ms"] == KAFKA_DEFAULTS["linger.ms"]
    assert printed["records"]["topic"] == "redirect-hits"
    assert PASSWORD not in result.stdout
    assert PASSWORD not in result.stderr


def test_check_rejects_an_unknown_librdkafka_property(tmp_path: Path) -> None:
    path = tmp_path / "unknown.toml"
    path.write_text(f'[kafka]\n"bootstrap.servers" = "{BOOTSTRAP}"\n"no.such.property" = 1\n')
    result = check(path)
    assert result.returncode == 2, result.stderr
    assert f"error: {path}: kafka: " in result.stderr
    assert "no.such.property" in result.stderr
    assert result.stdout == ""


def tail(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redirect_logger.cli", "tail", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_tail_rejects_an_unknown_librdkafka_property(tmp_path: Path) -> None:
    path = tmp_path / "unknown.toml"
    path.write_text(f'[kafka]\n"bootstrap.servers" = "{BOOTSTRAP}"\n"no.such.property" = 1\n')
    result = tail(path)
    assert result.returncode == 2, result.stderr
    assert f"error: {path}: kafka: " in result.stderr
    assert "no.such.property" in result.stderr


def test_tail_without_a_broker_gives_up_after_idle_timeout(tmp_path: Path) -> None:
    path = tmp_path / "nobroker.toml"
    path.write_text(f'[kafka]\n"bootstrap.servers" = "{BOOTSTRAP}"\n')
    result = tail(path, "--idle-timeout", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_check_rejects_a_property_value_of_the_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "wrongtype.toml"
    path.write_text(f'[kafka]\n"bootstrap.servers" = "{BOOTSTRAP}"\n"default.topic.config" = "x"\n')
    result = check(path)
    assert result.returncode == 2, result.stderr
    assert f"error: {path}: kafka: " in result.stderr
    assert "Traceback" not in result.stderr


def test_reloaded_rules_are_checked_against_the_tables_in_use() -> None:
    running = parse_settings(config(collect={"enabled": True}, rules=[rule()]))
    # The new file turns collect off and puts a rule on its path: the running
    # collect endpoint would shadow that rule, so the reload is refused.
    reloaded = parse_settings(config(rules=[rule(), rule(name="c", path="/collect")]))
    with pytest.raises(ConfigError) as caught:
        running.with_rules_of(reloaded)
    assert str(caught.value) == (
        "the rules with the settings in use: rules.1.path: "
        "'/collect' is collect.path: the collect endpoint answers it"
    )
    fine = parse_settings(
        config(rules=[rule(name="n", path="/n")], redirects={"no_track_param": "nt"})
    )
    merged = running.with_rules_of(fine)
    assert [r.name for r in merged.rules] == ["n"]
    assert merged.redirects.no_track_param == "nt"
    assert merged.collect == running.collect and merged.kafka == running.kafka


def test_collect_body_timeout_must_fit_in_the_graceful_timeout() -> None:
    data = config(collect={"enabled": True, "body_timeout": 6.0})
    assert config_error(data) == (
        "config: collect.body_timeout: 6.0 s is longer than server.graceful_timeout (5.0 s): "
        "a request still sending its body would be cut off at shutdown"
    )
    data["server"] = {"graceful_timeout": 6.0}
    assert parse_settings(data).collect.body_timeout == 6.0
    assert parse_settings(config(collect={"body_timeout": 60.0})).collect.enabled is False


def _check_with_fd_limit(path: Path, soft: int) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return subprocess.run(
        [sys.executable, "-m", "redirect_logger.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=limit,
    )


def test_check_warns_when_the_descriptor_limit_is_below_max_connections(tmp_path: Path) -> None:
    """max_connections + 100 descriptors are needed; below that ``check`` warns
    (and still exits 0: the file is valid)."""
    kafka = f'[kafka]\n"bootstrap.servers" = "{BOOTSTRAP}"\n'
    path = tmp_path / "site.toml"
    path.write_text(kafka)
    result = _check_with_fd_limit(path, 1000)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"warning: {path}: the file descriptor limit (RLIMIT_NOFILE, soft) is 1000, below"
        " server.max_connections (10000) + 100 = 10100: past it new connections wait"
        " unaccepted; raise it (LimitNOFILE=, ulimit -n, see"
        " docs/deployment.md#file-descriptors) or lower server.max_connections\n"
    )
    assert json.loads(result.stdout)["server"]["max_connections"] == 10_000
    path.write_text(f"[server]\nmax_connections = 900\nmax_connections_per_ip = 0\n{kafka}")
    result = _check_with_fd_limit(path, 1000)
    assert (result.returncode, result.stderr) == (0, "")


def test_check_refuses_a_bad_limit_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "limits.toml"
    path.write_text(
        f'[server]\nmax_connections = 0\n\n[kafka]\n"bootstrap.servers" = "{BOOTSTRAP}"\n'
    )
    result = check(path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: {path}: server.max_connections: Input should be greater than or equal to 1\n"
    )
