"""The collect endpoint against a real broker: forms, limits, CORS, the full channel.

Also property tests of its body parser (no broker).
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import orjson
import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from brokers import Broker
from redirect_logger.collect import (
    ENVELOPE_BYTES,
    MAX_DEPTH,
    Rejected,
    parse_events,
    position,
    written,
)
from redirect_logger.config import RecordsSettings
from redirect_logger.hits import Hit
from redirect_logger.ledger import Ledger
from redirect_logger.metrics import COLLECT_EVENT_OUTCOMES, COLLECT_REJECTIONS
from redirect_logger.pipeline import Admission, Intake
from redirect_logger.service import Service
from support import (
    RFC3339_MS,
    UUID7,
    check_record_schema,
    ledger_counts,
    read_messages,
    read_topic,
    service_config,
    start_service,
    unique_topic,
    unreachable_config,
)

PAGE_ORIGIN = "https://shop.example"
JSON = "application/json"
NDJSON = "application/x-ndjson"
TEXT = "text/plain;charset=UTF-8"  # what navigator.sendBeacon(url, string) sends


def collect_config(bootstrap: str, records_topic: str, **collect: Any) -> dict[str, Any]:
    return service_config(
        bootstrap,
        records_topic,
        collect={"enabled": True, "cors_origins": [PAGE_ORIGIN], **collect},
    )


def rejections(service: Service) -> dict[str, int]:
    """The collect_rejected counter by reason (only the non-zero ones)."""
    registry = service.metrics.registry
    counts = {
        reason: registry.get_sample_value(
            "redirect_logger_collect_rejected_total", {"reason": reason}
        )
        for reason in COLLECT_REJECTIONS
    }
    return {reason: int(count) for reason, count in counts.items() if count}


def event_outcomes(service: Service) -> dict[str, int]:
    registry = service.metrics.registry
    return {
        outcome: int(
            registry.get_sample_value("redirect_logger_collect_events_total", {"outcome": outcome})
            or 0
        )
        for outcome in COLLECT_EVENT_OUTCOMES
    }


def ndjson(*events: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(event) + b"\n" for event in events)


async def test_each_form_is_one_record_per_event_with_the_hit_envelope(broker: Broker) -> None:
    """A JSON object, an events wrapper, NDJSON, and text/plain (a beacon) in both
    forms: 202 with the count at once, and in Kafka one record per event, on
    collect.topic, with the request's envelope and the event under ``data``."""
    topic, events_topic = unique_topic(), unique_topic("events")
    config = collect_config(broker.bootstrap, topic, topic=events_topic)
    posts = [
        (JSON, orjson.dumps({"n": 0, "type": "view", "nested": {"a": [1, 2.5, None, True]}})),
        (JSON, orjson.dumps({"events": [{"n": 1}, {"n": 2, "text": "café ☕"}, {"n": 3}]})),
        (NDJSON, ndjson({"n": 4}, {"n": 5})),
        (TEXT, orjson.dumps({"n": 6, "type": "beacon"})),
        (TEXT, b'{"n": 7}\r\n\r\n{"n": 8}\n'),  # NDJSON in a beacon, CRLF and a blank line
        (JSON, b'{"events": []}'),
    ]
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            base = service.binds[0]
            answers = []
            async with httpx.AsyncClient(base_url=base) as client:
                for content_type, body in posts:
                    response = await client.post(
                        "/collect?src=test",
                        content=body,
                        headers={
                            "content-type": content_type,
                            "user-agent": "ua/2",
                            "referer": f"{PAGE_ORIGIN}/cart",
                        },
                    )
                    answers.append(
                        (response.status_code, response.headers["content-type"], response.json())
                    )
                    assert response.headers["cache-control"] == "no-store"
                    assert response.headers["vary"] == "Origin"
                    assert "access-control-allow-origin" not in response.headers  # no Origin
                hit = await client.get("/docs/x")  # a hit alongside: its own topic and kind
            stop.set()
    assert codes == [0]
    counts = [1, 3, 2, 1, 2, 0]
    assert answers == [(202, JSON, {"accepted": n}) for n in counts]
    assert service.ledger_snapshot() == ledger_counts(received=10, delivered=10)
    assert event_outcomes(service) == {"accepted": 9, "dropped": 0, "shed": 0}
    assert rejections(service) == {}

    messages = await trio.to_thread.run_sync(read_messages, broker.bootstrap, events_topic, 30.0, 9)
    assert [message.headers for message in messages] == [
        [("schema-version", b"3"), ("kind", b"event"), ("rule", b"")]
    ] * 9
    records = [message.record for message in messages]
    assert sorted(record["data"]["n"] for record in records) == list(range(9))
    by_n = {record["data"]["n"]: record for record in records}
    assert by_n[0]["data"] == {"n": 0, "type": "view", "nested": {"a": [1, 2.5, None, True]}}
    assert by_n[2]["data"] == {"n": 2, "text": "café ☕"}
    assert by_n[6]["data"] == {"n": 6, "type": "beacon"}
    assert len({record["id"] for record in records}) == 9
    for record in records:
        check_record_schema(record)
        assert UUID7.match(record["id"])
        assert RFC3339_MS.match(record["ts"]) and record["logged_at"] >= record["ts"]
        envelope = {key: value for key, value in record.items() if key not in ("id", "ts", "data")}
        assert envelope == {
            "v": 3,
            "method": "POST",
            "scheme": "http",
            "host": base.removeprefix("http://"),
            "path": "/collect",
            "query": "src=test",
            "status": 202,
            "location": None,
            "rule": None,
            "route": None,
            "variant": None,
            "kind": "event",
            "client_ip": "127.0.0.1",
            "remote_address": envelope["remote_address"],
            "user_agent": "ua/2",
            "referer": f"{PAGE_ORIGIN}/cart",
            "bot": False,
            "country": None,
            "logged_at": record["logged_at"],
            "instance": service.enricher.instance,
        }
        assert re.match(r"^127\.0\.0\.1:\d+$", envelope["remote_address"])
    hits = await trio.to_thread.run_sync(read_topic, broker.bootstrap, topic, 30.0, 1)
    assert [(h["id"], h["kind"], h["status"]) for h in hits] == [
        (hit.headers["x-hit-id"], "redirect", 301)
    ]


async def raw_exchange(
    url: str, head: bytes, body_parts: list[bytes], pause: float = 0.0
) -> tuple[int, dict[bytes, bytes], bytes, bool]:
    """Send a request head and body parts (``pause`` s apart), then read until
    the server closes: status, headers, body, and whether it closed by itself."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(head)
        for part in body_parts:
            await trio.sleep(pause)
            try:
                await stream.send_all(part)
            except trio.BrokenResourceError:  # the server closed: it refused the rest
                break
        data = b""
        closed = False
        with trio.move_on_after(5):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:  # reset after a close with unread data
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload, closed


def post_head(length: int | None, content_type: bytes = b"application/json") -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return (
        b"POST /collect HTTP/1.1\r\nhost: x\r\ncontent-type: "
        + content_type
        + b"\r\n"
        + framing
        + b"\r\n\r\n"
    )


async def test_each_limit_answers_its_status_and_body_and_is_counted(broker: Broker) -> None:
    """Every refusal: exact status, JSON body and a count by reason; no record,
    nothing in the ledger; the pool still takes a valid request afterwards."""
    config = collect_config(
        broker.bootstrap,
        unique_topic(),
        max_body_bytes=1024,
        max_events=5,
        required_fields=["type"],
        body_timeout=0.5,
    )
    ok = {"type": "t"}
    cases: list[tuple[str, dict[str, str], bytes, int, dict[str, Any]]] = [
        ("GET", {}, b"", 405, {"error": "use POST"}),
        ("PUT", {"content-type": JSON}, b"{}", 405, {"error": "use POST"}),
        (
            "POST",
            {"content-type": "image/png"},
            b"{}",
            415,
            {
                "error": "Content-Type must be one of application/json, application/x-ndjson, "
                "text/plain"
            },
        ),
        (
            "POST",
            {},
            b"{}",
            415,
            {
                "error": "Content-Type must be one of application/json, application/x-ndjson, "
                "text/plain"
            },
        ),
        (
            "POST",
            {"content-type": JSON, "origin": "https://evil.example"},
            orjson.dumps(ok),
            403,
            {"error": "this origin may not post events"},
        ),
        (
            "POST",
            {"content-type": JSON},
            b'{"type": "t",}',
            400,
            {
                "error": "invalid JSON at line 1, column 13: trailing comma is not allowed",
                "line": 1,
                "column": 13,
            },
        ),
        (
            "POST",
            {"content-type": NDJSON},
            b'{"type": 1}\n{"type": 2}\n{"type" 3}\n',
            400,
            {
                "error": "invalid JSON at line 3, column 9: unexpected character, "
                "expected ':' after key",
                "line": 3,
                "column": 9,
            },
        ),
        (
            "POST",
            {"content-type": TEXT},
            b"\xff",
            400,
            {"error": "invalid JSON at line 1, column 1: not UTF-8", "line": 1, "column": 1},
        ),
        (
            "POST",
            {"content-type": JSON},
            b"[1, 2]",
            400,
            {"error": 'the body is not a JSON object, an {"events": [...]} object or NDJSON'},
        ),
        (
            "POST",
            {"content-type": JSON},
            orjson.dumps({"events": [ok, "x"]}),
            400,
            {"error": "event 1 is not a JSON object", "event": 1},
        ),
        (
            "POST",
            {"content-type": JSON},
            orjson.dumps({"events": [ok, ok, {"kind": "t"}]}),
            400,
            {"error": 'event 2: required field "type" is missing', "event": 2, "field": "type"},
        ),
        (
            "POST",
            {"content-type": JSON},
            b'{"type": "t", "a": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}",
            400,
            {"error": f"event 0 is nested deeper than {MAX_DEPTH}", "event": 0},
        ),
        (
            "POST",
            {"content-type": JSON},
            orjson.dumps({"events": [ok] * 6}),
            413,
            {"error": "more than 5 events"},
        ),
        ("POST", {"content-type": NDJSON}, ndjson(*[ok] * 6), 413, {"error": "more than 5 events"}),
        (
            "POST",
            {"content-type": JSON},
            orjson.dumps({"type": "x" * 1100}),
            413,
            {"error": "the body is larger than 1024 bytes"},
        ),
    ]
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            url = service.binds[0]
            async with httpx.AsyncClient(base_url=url) as client:
                for method, headers, body, status, expected in cases:
                    response = await client.request(
                        method, "/collect", content=body or None, headers=headers
                    )
                    assert (response.status_code, response.json()) == (status, expected), body
                    assert response.headers["connection"] == "close"
                    if status == 405:
                        assert response.headers["allow"] == "POST, OPTIONS"
                head = await client.head("/collect")
                assert (head.status_code, head.content) == (405, b"")

                async def chunks() -> Any:  # no Content-Length: refused as it arrives
                    for _ in range(4):
                        yield b" " * 512

                chunked = await client.post(
                    "/collect", content=chunks(), headers={"content-type": JSON}
                )
                assert (chunked.status_code, chunked.json()) == (
                    413,
                    {"error": "the body is larger than 1024 bytes"},
                )

            # 10 MB announced, 1 MiB sent: refused unread, and the connection closed.
            status, headers, payload, closed = await raw_exchange(
                url, post_head(10_000_000), [b" " * 65536] * 16
            )
            assert (status, orjson.loads(payload), closed) == (
                413,
                {"error": "the body is larger than 1024 bytes"},
                True,
            )
            # A body that trickles in: 408 at body_timeout, and the connection closed.
            started = trio.current_time()
            status, headers, payload, closed = await raw_exchange(
                url, post_head(100), [b" "] * 10, pause=0.1
            )
            assert (status, orjson.loads(payload), closed) == (
                408,
                {"error": "the body did not arrive within 0.5 s"},
                True,
            )
            assert headers[b"connection"] == b"close"
            assert 0.5 <= trio.current_time() - started < 3.0

            async with httpx.AsyncClient(base_url=url) as client:
                response = await client.post(
                    "/collect", content=ndjson(ok, ok), headers={"content-type": NDJSON}
                )
                assert (response.status_code, response.json()) == (202, {"accepted": 2})
            stop.set()
    assert codes == [0]
    assert rejections(service) == {
        "method": 3,
        "content_type": 2,
        "origin": 1,
        "malformed": 3,
        "not_an_object": 2,
        "missing_field": 1,
        "too_deep": 1,
        "too_many_events": 2,
        "body_too_large": 3,
        "body_timeout": 1,
    }
    assert service.ledger_snapshot() == ledger_counts(received=2, delivered=2)


async def test_cors_preflight_and_response_headers(broker: Broker) -> None:
    config = collect_config(broker.bootstrap, unique_topic(), cors_max_age=900)
    preflight = {
        "origin": PAGE_ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                allowed = await client.options("/collect", headers=preflight)
                refused = await client.options(
                    "/collect", headers={**preflight, "origin": "https://evil.example"}
                )
                plain = await client.options("/collect")
                post = await client.post(
                    "/collect",
                    content=b'{"a": 1}',
                    headers={"content-type": JSON, "origin": PAGE_ORIGIN},
                )
            stop.set()
    assert codes == [0]
    assert allowed.status_code == 204 and allowed.content == b""
    cors = {k: v for k, v in allowed.headers.items() if k.startswith("access-control-")}
    assert cors == {
        "access-control-allow-origin": PAGE_ORIGIN,
        "access-control-allow-credentials": "true",
        "access-control-allow-methods": "POST",
        "access-control-allow-headers": "Content-Type",
        "access-control-max-age": "900",
    }
    assert allowed.headers["vary"] == (
        "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    )
    assert "connection" not in allowed.headers  # the POST may follow on the same connection
    assert (refused.status_code, refused.json()) == (
        403,
        {"error": "this origin may not post events"},
    )
    assert not any(k.startswith("access-control-") for k in refused.headers)
    assert (plain.status_code, plain.headers["allow"]) == (204, "POST, OPTIONS")
    assert (post.status_code, post.json()) == (202, {"accepted": 1})
    assert post.headers["access-control-allow-origin"] == PAGE_ORIGIN
    assert post.headers["access-control-allow-credentials"] == "true"
    assert post.headers["vary"] == "Origin"
    assert rejections(service) == {"origin": 1}
    assert service.ledger_snapshot() == ledger_counts(received=1, delivered=1)


async def test_a_star_allows_any_origin_without_credentials(broker: Broker) -> None:
    """ "*" answers Access-Control-Allow-Origin: * and never allows credentials
    (echoing any origin with credentials would let every site post as the user);
    a listed origin is named, with credentials."""
    config = collect_config(
        broker.bootstrap, unique_topic(), cors_origins=["*", "https://listed.example"]
    )
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                answers = []
                origins = ("http://a.example", "https://b.example:8443", "null")
                for origin in (*origins, "https://listed.example"):
                    response = await client.post(
                        "/collect", content=b"{}", headers={"content-type": JSON, "origin": origin}
                    )
                    answers.append(
                        (
                            response.status_code,
                            response.headers.get("access-control-allow-origin"),
                            response.headers.get("access-control-allow-credentials"),
                        )
                    )
                preflight = await client.options(
                    "/collect",
                    headers={"origin": "http://a.example", "access-control-request-method": "POST"},
                )
            stop.set()
    assert codes == [0]
    assert answers == [
        (202, "*", None),
        (202, "*", None),
        (403, None, None),
        (202, "https://listed.example", "true"),
    ]
    assert preflight.status_code == 204
    assert "content-length" not in preflight.headers  # a 204 has none
    assert (
        preflight.headers["access-control-allow-origin"],
        preflight.headers.get("access-control-allow-credentials"),
    ) == ("*", None)
    assert service.ledger_snapshot() == ledger_counts(received=3, delivered=3)


async def test_collect_path_wins_over_rules_for_every_method_and_is_off_by_default(
    broker: Broker,
) -> None:
    """With a prefix rule for every path, collect.path is still the endpoint's
    (GET too: 405); without [collect] it is a hit like any other path."""
    every = [{"name": "all", "path": "/*", "target": "https://example.com/", "status": 302}]
    enabled = collect_config(broker.bootstrap, unique_topic())
    enabled["rules"] = every
    disabled = service_config(broker.bootstrap, unique_topic(), rules=every)
    answers = []
    services = []
    with trio.fail_after(60):
        for config in (enabled, disabled):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                service, codes = await start_service(nursery, config, stop)
                services.append((service, codes))
                async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                    for method in ("POST", "GET"):
                        response = await client.request(
                            method, "/collect", content=b"{}", headers={"content-type": JSON}
                        )
                        answers.append((response.status_code, response.headers.get("location")))
                    other = await client.get("/collect/x")
                    answers.append((other.status_code, other.headers.get("location")))
                stop.set()
    assert answers == [
        (202, None),
        (405, None),
        (302, "https://example.com/"),
        (302, "https://example.com/"),
        (302, "https://example.com/"),
        (302, "https://example.com/"),
    ]
    (on, on_codes), (off, off_codes) = services
    assert on_codes == off_codes == [0]
    assert on.ledger_snapshot() == ledger_counts(received=2, delivered=2)
    assert rejections(on) == {"method": 1}
    assert off.ledger_snapshot() == ledger_counts(received=3, delivered=3)


@pytest.mark.parametrize("policy", ["shed", "drop", "block", "spill"])
async def test_a_multi_event_request_meets_a_full_channel(policy: str) -> None:
    """Kafka is down; librdkafka holds 1 record, the worker 1, the channel 4.

    With 2 places left in the channel, a request of 4 events is shed whole
    (503, nothing accepted), or takes 2 and drops 2 (drop; block after
    max_block), or takes 2 and journals 2 (spill). The 202 says which.
    """
    config = unreachable_config(
        records={
            "queue_size": 4,
            "workers": 1,
            "batch_size": 1,
            "when_full": policy,
            "max_block": 0.05,
        },
        kafka={"queue.buffering.max.messages": 1},
        spill={"queue_full_timeout": 60.0},  # the worker keeps waiting: the channel stays full
        collect={"enabled": True, "max_events": 4},
    )
    body = ndjson(*({"n": n} for n in range(4)))
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            pipeline = service.pipeline
            assert pipeline is not None
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                first = await client.post(
                    "/collect", content=body, headers={"content-type": NDJSON}
                )
                while not (pipeline.queue_depth() == 2 and pipeline.held == 1):  # noqa: ASYNC110
                    await trio.sleep(0.01)  # 1 in librdkafka, 1 in the worker's hands
                second = await client.post(
                    "/collect", content=body, headers={"content-type": NDJSON}
                )
            stop.set()
    assert codes == [0]
    assert (first.status_code, first.json()) == (202, {"accepted": 4})
    ledger = service.ledger_snapshot()
    if policy == "shed":
        assert (second.status_code, second.json()) == (
            503,
            {"error": "overloaded, retry later", "accepted": 0},
        )
        assert second.headers["retry-after"] == "1"
        assert ledger == ledger_counts(received=8, shed=4, spilled=4)
        assert event_outcomes(service) == {"accepted": 4, "dropped": 0, "shed": 4}
        assert rejections(service) == {"overloaded": 1}
    elif policy == "spill":
        assert (second.status_code, second.json()) == (202, {"accepted": 4})
        assert ledger == ledger_counts(received=8, spilled=8)
        assert event_outcomes(service) == {"accepted": 8, "dropped": 0, "shed": 0}
    else:
        assert (second.status_code, second.json()) == (202, {"accepted": 2, "dropped": 2})
        assert ledger == ledger_counts(received=8, dropped=2, spilled=6)
        assert event_outcomes(service) == {"accepted": 6, "dropped": 2, "shed": 0}


def hit_of(name: str, data: bytes | None = None) -> Hit:
    return Hit(name, 0.0, "POST", "http", "/collect", b"", [], None, 202, None, None, data)


def block_intake(capacity: int) -> tuple[Intake, trio.MemoryReceiveChannel[Hit], Ledger]:
    send, receive = trio.open_memory_channel[Hit](capacity)
    overflow, _ = trio.open_memory_channel[Hit](0)
    ledger = Ledger()
    records = RecordsSettings(queue_size=capacity, when_full="block", max_block=1.0)
    return Intake(send, overflow, records, ledger), receive, ledger


async def test_under_block_room_that_comes_in_time_takes_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    intake, receive, ledger = block_intake(2)
    items = [hit_of(name) for name in "abcd"]
    async with trio.open_nursery() as nursery:

        async def take_one_later() -> None:
            await trio.sleep(0.5)
            await receive.receive()

        nursery.start_soon(take_one_later)
        started = trio.current_time()
        result = await intake.submit_all(items)
        waited = trio.current_time() - started
    assert (result, waited) == ((3, Admission.DROPPED), 1.0)  # one max_block for the request
    assert (ledger.received, ledger.dropped) == (4, 1)


async def test_under_block_a_cancelled_wait_counts_the_rest_dropped(
    autojump_clock: trio.abc.Clock,
) -> None:
    intake, _, ledger = block_intake(2)
    items = [hit_of(name) for name in "abcd"]
    with trio.move_on_after(0.3) as scope:
        await intake.submit_all(items)
    assert scope.cancelled_caught
    assert (ledger.received, ledger.dropped) == (4, 2)


# --- the body parser ---

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
events_strategy = st.lists(
    st.dictionaries(st.text(max_size=6).filter(lambda k: k != "events"), json_values, max_size=4),
    min_size=1,
    max_size=5,
)
MEDIA_TYPES = ["application/json", "application/x-ndjson", "text/plain", "application/ld+json"]


@given(body=st.binary(max_size=200), media_type=st.sampled_from(MEDIA_TYPES))
@example(body=b"[" * 2000, media_type="application/json")
@example(body=b"1e400", media_type="text/plain")
@example(body=b'"\\ud800"', media_type="text/plain")
@example(body=b"\xef\xbb\xbf{}", media_type="text/plain")
@example(body=b'{"events": {}}', media_type="application/json")
@example(body=b"{}\n[", media_type="text/plain")
def test_any_body_gives_events_or_a_rejection(body: bytes, media_type: str) -> None:
    try:
        events = parse_events(body, media_type, 100, ("a",))
    except Rejected as rejected:
        assert rejected.status in (400, 413)
        assert set(rejected.body) <= {"error", "line", "column", "event", "field"}
    else:
        assert all(isinstance(event, dict) and "a" in event for event in events)


@given(events=events_strategy)
def test_every_form_gives_back_the_events(events: list[dict[str, Any]]) -> None:
    lines = b"\n".join(orjson.dumps(event) for event in events)
    wrapped = orjson.dumps({"events": events})
    assert parse_events(wrapped, "application/json", 10) == events
    assert parse_events(wrapped, "text/plain", 10) == events
    assert parse_events(lines, "application/x-ndjson", 10) == events
    assert parse_events(lines + b"\n", "text/plain", 10) == events
    assert parse_events(orjson.dumps(events[0]), "text/plain", 10) == events[:1]
    pretty = json.dumps({"events": events}, indent=2).encode()
    assert parse_events(pretty, "text/plain", 10) == events


# What is checked is the error's position, not the parse time: no deadline per example.
@settings(deadline=None)
@given(events=events_strategy, data=st.data())
def test_an_ndjson_error_names_its_line_and_column(
    events: list[dict[str, Any]], data: st.DataObject
) -> None:
    """An "@" outside the strings of one line: that line, and the "@"'s column
    (between tokens), or the column of the number or literal it breaks."""
    lines = [orjson.dumps(event).decode() for event in events]
    bad = data.draw(st.integers(0, len(lines) - 1))
    places = [i for i in range(len(lines[bad]) + 1) if _outside_strings(lines[bad], i)]
    index = data.draw(st.sampled_from(places))
    lines[bad] = lines[bad][:index] + "@" + lines[bad][index:]
    body = "\n".join(lines).encode()
    with pytest.raises(Rejected) as info:
        parse_events(body, "application/x-ndjson", 10)
    assert (info.value.status, info.value.reason) == (400, "malformed")
    line = lines[bad]
    assert info.value.body["line"] == bad + 1
    if 0 < index < len(line) - 1 and line[index - 1] in TOKEN and line[index + 1] in TOKEN:
        start = index  # inside a number or literal: where it starts
        while start and line[start - 1] in TOKEN:
            start -= 1
        assert info.value.body["column"] in (start + 1, index + 1)
    else:
        assert info.value.body["column"] == index + 1


TOKEN = frozenset("0123456789+-.eEtruefalsn")


@given(events=events_strategy, data=st.data())
def test_a_document_error_names_the_line_and_column_of_the_bad_character(
    events: list[dict[str, Any]], data: st.DataObject
) -> None:
    text = json.dumps({"events": events}, indent=data.draw(st.sampled_from([None, 1, 2])))
    # Put "@" where a value starts: after a ": " or "[" the parser expects one.
    starts = [m.end() for m in re.finditer(r'(?<!\\)(?:": |\[)', text)]
    starts = [i for i in starts if _outside_strings(text, i)]
    index = data.draw(st.sampled_from(starts))
    body = (text[:index] + "@" + text[index:]).encode()
    with pytest.raises(Rejected) as info:
        parse_events(body, "application/json", 10)
    line, column = position(text, index)
    assert info.value.body == {
        "error": info.value.body["error"],
        "line": line,
        "column": column,
    }
    assert info.value.body["error"].startswith(f"invalid JSON at line {line}, column {column}: ")


def _outside_strings(text: str, index: int) -> bool:
    """Whether ``text[index]`` is outside JSON strings (``text`` is valid JSON)."""
    inside = escaped = False
    for char in text[:index]:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = inside
        elif char == '"':
            inside = not inside
    return not inside


@given(prefix=st.text(max_size=30), rest=st.binary(max_size=10))
def test_invalid_utf8_is_placed_at_its_byte(prefix: str, rest: bytes) -> None:
    body = prefix.encode() + b"\xff" + rest
    with pytest.raises(Rejected) as info:
        parse_events(body, "text/plain", 10)
    assert (info.value.body["line"], info.value.body["column"]) == position(prefix, len(prefix))
    assert info.value.body["error"].endswith(": not UTF-8")


async def test_over_http2_a_refused_body_ends_its_stream_only(broker: Broker) -> None:
    """Hypercorn 0.18 fails an HTTP/2 connection on data for an ended stream
    (a KeyError in its HTTP/2 code; a hit with a body meets it too): the
    refused stream stays open until its body is thrown away."""
    config = collect_config(broker.bootstrap, unique_topic(), max_body_bytes=1024)
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(
                base_url=service.binds[0], http1=False, http2=True
            ) as client:
                answers = []
                for body in (b" " * 500_000, orjson.dumps({"a": 1}), b"{", b"{}"):
                    response = await client.post(
                        "/collect", content=body, headers={"content-type": JSON}
                    )
                    assert response.http_version == "HTTP/2"
                    assert "connection" not in response.headers
                    answers.append((response.status_code, response.json()))
            stop.set()
    assert codes == [0]
    assert answers == [
        (413, {"error": "the body is larger than 1024 bytes"}),
        (202, {"accepted": 1}),
        (
            400,
            {
                "error": "invalid JSON at line 1, column 2: unexpected end of data",
                "line": 1,
                "column": 2,
            },
        ),
        (202, {"accepted": 1}),
    ]
    assert rejections(service) == {"body_too_large": 1, "malformed": 1}
    assert service.ledger_snapshot() == ledger_counts(received=2, delivered=2)


def test_written_events_are_checked_for_depth_and_size() -> None:
    deepest = {"a": orjson.loads(b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1))}
    assert written([{"type": "t"}, deepest], 10_000) == [
        b'{"type":"t"}',
        orjson.dumps(deepest),
    ]
    too_deep = {"a": orjson.loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)}
    with pytest.raises(Rejected) as caught:
        written([{}, too_deep], 10_000)
    assert (caught.value.status, caught.value.reason, caught.value.body) == (
        400,
        "too_deep",
        {"error": f"event 1 is nested deeper than {MAX_DEPTH}", "event": 1},
    )
    # What is written can be longer than what was sent: 1e15 is 1000000000000000.0.
    grown = parse_events(b'{"n": [' + b",".join([b"1e15"] * 100) + b"]}", JSON, 10)
    assert len(orjson.dumps(grown[0])) == 1_907
    assert len(written(grown, 1_907)[0]) == 1_907
    with pytest.raises(Rejected) as caught:
        written(grown, 1_906)
    assert (caught.value.status, caught.value.reason, caught.value.body) == (
        413,
        "event_too_large",
        {"error": "event 0 is larger than 1906 bytes as JSON", "event": 0},
    )


async def test_an_event_too_large_for_a_kafka_message_is_refused(broker: Broker) -> None:
    config = collect_config(broker.bootstrap, unique_topic(), max_body_bytes=65_536)
    config["kafka"]["message.max.bytes"] = ENVELOPE_BYTES + 20_000
    small = orjson.dumps({"type": "t", "n": [1] * 9_000})  # 18 kB as written
    grown = b'{"type": "t", "n": [' + b",".join([b"1e15"] * 2_000) + b"]}"  # 10 kB -> 36 kB
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                answers = []
                for body in (small, grown):
                    response = await client.post(
                        "/collect", content=body, headers={"content-type": JSON}
                    )
                    answers.append((response.status_code, response.json()))
            stop.set()
    assert codes == [0]
    assert answers == [
        (202, {"accepted": 1}),
        (413, {"error": "event 0 is larger than 20000 bytes as JSON", "event": 0}),
    ]
    assert rejections(service) == {"event_too_large": 1}
    assert service.ledger_snapshot() == ledger_counts(received=1, delivered=1)
