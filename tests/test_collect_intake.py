"""The collect endpoint's intake (issue 15) against Apache Kafka: compressed
bodies, client event ids, the dead-letter topic and the byte budget.

Every accepted event and every refused body is read back from Kafka by id.
"""

from __future__ import annotations

import base64
import gzip
import uuid
import zlib
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from backports import zstd

from brokers import Broker
from redirect_logger.decoding import Refused, decoded
from support import (
    check_record_schema,
    ledger_counts,
    read_topic,
    service_config,
    start_service,
    unique_topic,
    unreachable_config,
    until_replayed,
)
from test_collect import JSON, NDJSON, TEXT, event_outcomes, ndjson, raw_exchange, rejections

COMPRESS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "zstd": zstd.compress,
}


def collect_config(bootstrap: str, **collect: Any) -> dict[str, Any]:
    return service_config(
        bootstrap, unique_topic(), collect={"enabled": True, "topic": unique_topic("ev"), **collect}
    )


def forms(n: int) -> list[tuple[str, bytes, list[dict[str, Any]]]]:
    """The four JSON forms, numbering their events from ``n``: content type,
    body, its events."""
    one, two, three = {"n": n, "kind": "one"}, {"n": n + 1}, {"n": n + 2, "t": "é"}
    four, five, six = {"n": n + 3}, {"n": n + 4, "a": [1, None]}, {"n": n + 5, "beacon": True}
    return [
        (JSON, orjson.dumps(one), [one]),
        (JSON, orjson.dumps({"events": [two, three]}), [two, three]),
        (NDJSON, ndjson(four, five), [four, five]),
        (TEXT, orjson.dumps(six), [six]),
    ]


async def test_compressed_bodies_of_each_form_bombs_and_broken_streams(
    kafka_broker: Broker,
) -> None:
    """gzip, deflate (zlib and raw) and zstd bodies of every form are read as
    the same body uncompressed; an unlisted coding is 415 naming it; a 10 MiB
    gzip bomb in 10 KiB, 413; a cut or corrupt stream, 400. Nothing refused
    is recorded."""
    config = collect_config(
        kafka_broker.bootstrap, encodings=["gzip", "deflate", "zstd"], max_body_bytes=65_536
    )
    events_topic = config["collect"]["topic"]
    bomb = gzip.compress(b" " * (10 * 1024 * 1024), compresslevel=9)
    assert 9_000 < len(bomb) < 11_000  # 10 MiB in about 10 KiB
    sent: dict[int, dict[str, Any]] = {}  # each event by its n
    posts: list[tuple[str, str, bytes, list[dict[str, Any]]]] = []
    for index, (coding, compress) in enumerate(COMPRESS.items()):
        for content_type, body, events in forms(10 * index):
            posts.append((coding, content_type, compress(body), events))
    raw_deflate = zlib.compress(b'{"n": 1000}')[2:-4]  # no zlib header: raw deflate
    posts.append(("deflate", JSON, raw_deflate, [{"n": 1000}]))
    posts.append(("GZip", JSON, gzip.compress(b'{"n": 1001}'), [{"n": 1001}]))  # any case
    two_members = gzip.compress(b'{"n": 1003}\n') + gzip.compress(b'{"n": 1004}\n')
    posts.append(("gzip", NDJSON, two_members, [{"n": 1003}, {"n": 1004}]))
    refused = [
        ("br", JSON, b"\x0b\x02\x80{}\x03", 415, "encoding"),
        ("gzip, zstd", JSON, b"{}", 415, "encoding"),
        ("gzip", JSON, bomb, 413, "body_too_large"),
        ("zstd", JSON, zstd.compress(b" " * (10 * 1024 * 1024)), 413, "body_too_large"),
        (
            "gzip",
            JSON,
            gzip.compress(b'{"n": 2000, "pad": "' + b"x" * 5000 + b'"}')[:-30],
            400,
            "undecodable",
        ),
        ("zstd", JSON, zstd.compress(b'{"n": 2001}' * 100)[:-4], 400, "undecodable"),
        ("deflate", JSON, zlib.compress(b'{"n": 2002}' * 50)[:-6], 400, "undecodable"),
        ("gzip", JSON, b"not gzip at all", 400, "undecodable"),
    ]
    answers = []
    stop = trio.Event()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                for coding, content_type, body, events in posts:
                    response = await client.post(
                        "/collect",
                        content=body,
                        headers={"content-type": content_type, "content-encoding": coding},
                    )
                    answers.append((response.status_code, response.json()))
                    sent.update((event["n"], event) for event in events)
                refusals = []
                for coding, content_type, body, _, _ in refused:
                    response = await client.post(
                        "/collect",
                        content=body,
                        headers={"content-type": content_type, "content-encoding": coding},
                    )
                    refusals.append((response.status_code, response.json()["error"]))
            stop.set()
    assert codes == [0]
    assert answers == [(202, {"accepted": len(events)}) for *_, events in posts]
    assert refusals == [
        (415, "Content-Encoding br is not accepted (accepted: deflate, gzip, zstd)"),
        (415, "one Content-Encoding at most, not gzip, zstd"),
        (413, "the body is larger than 65536 bytes decompressed"),
        (413, "the body is larger than 65536 bytes decompressed"),
        (400, "the body is not valid gzip: the compressed stream ends early"),
        (400, "the body is not valid zstd: the compressed stream ends early"),
        (400, "the body is not valid deflate: the compressed stream ends early"),
        (
            400,
            "the body is not valid gzip: Error -3 while decompressing data: incorrect header check",
        ),
    ]
    assert rejections(service) == {"encoding": 2, "body_too_large": 2, "undecodable": 4}
    total = len(sent)
    assert service.ledger_snapshot() == ledger_counts(received=total, delivered=total)
    records = await trio.to_thread.run_sync(
        read_topic, kafka_broker.bootstrap, events_topic, 60.0, total
    )
    assert len(records) == total
    assert {record["data"]["n"]: record["data"] for record in records} == sent
    for record in records:
        check_record_schema(record)
        assert record["kind"] == "event"


def test_decoding_holds_no_more_than_the_limit() -> None:
    """The bomb is refused after at most the limit and one byte of output:
    a limit of 1 byte refuses it at once."""
    bomb = gzip.compress(b"{}" + b" " * (10 * 1024 * 1024))
    with pytest.raises(Refused, match="larger than 1 bytes decompressed"):
        decoded(bomb, "gzip", 1)
    assert decoded(gzip.compress(b"{}"), "gzip", 2) == b"{}"


def test_a_zstd_frame_asking_for_a_window_over_8_mib_is_refused() -> None:
    body = b'{"n": 1}' + b" " * (12 * 1024 * 1024)
    wide = zstd.compress(body, options={zstd.CompressionParameter.window_log: 25})
    with pytest.raises(Refused) as caught:
        decoded(wide, "zstd", 65_536)
    assert (caught.value.status, caught.value.reason) == (400, "undecodable")
    assert "too much memory" in str(caught.value)
    assert decoded(zstd.compress(b'{"n": 1}', level=19), "zstd", 65_536) == b'{"n": 1}'


def uuid4() -> str:
    return str(uuid.uuid4())


@pytest.mark.parametrize("durability", ["memory", "kafka"])
async def test_client_ids_become_record_ids_and_a_retry_leaves_the_same_ids(
    kafka_broker: Broker, durability: str
) -> None:
    """collect.id_field: an event's UUID is its record's id (lower case);
    an event without one gets a UUIDv7; a value that is not a UUID is 400
    naming the field; a request sent twice leaves two records of each id.
    Under durability "kafka" the request and its retry are sent at once, so
    that records of one id can share a batch awaiting its acknowledgements."""
    config = collect_config(kafka_broker.bootstrap, id_field="event_id")
    config["records"]["durability"] = durability
    topic = config["collect"]["topic"]
    first, second = uuid4(), uuid4().upper()
    body = orjson.dumps(
        {"events": [{"event_id": first, "n": 1}, {"event_id": second, "n": 2}, {"n": 3}]}
    )
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                answers: list[tuple[int, Any]] = []

                async def post_body() -> None:
                    response = await client.post(
                        "/collect", content=body, headers={"content-type": JSON}
                    )
                    answers.append((response.status_code, response.json()))

                async with trio.open_nursery() as posts:
                    posts.start_soon(post_body)
                    posts.start_soon(post_body)  # the client retries: the same ids
                for content in (
                    orjson.dumps({"events": [{"n": 4}, {"event_id": "not-a-uuid"}]}),
                    orjson.dumps({"event_id": 7}),
                    orjson.dumps({"event_id": None}),
                ):
                    response = await client.post(
                        "/collect", content=content, headers={"content-type": JSON}
                    )
                    answers.append((response.status_code, response.json()))
            stop.set()
    assert codes == [0]
    refusal = 'field "event_id" is not a UUID'
    assert answers == [
        (202, {"accepted": 3}),
        (202, {"accepted": 3}),
        (400, {"error": f"event 1: {refusal}", "event": 1, "field": "event_id"}),
        (400, {"error": f"event 0: {refusal}", "event": 0, "field": "event_id"}),
        (400, {"error": f"event 0: {refusal}", "event": 0, "field": "event_id"}),
    ]
    assert rejections(service) == {"bad_id": 3}
    ledger = service.ledger_snapshot()
    # Under "kafka", records the broker did not acknowledge within ack_timeout
    # (or while it was not reachable yet) are journaled first, then delivered.
    journaled = ledger.pop("journaled")
    assert journaled == 0 if durability == "memory" else 0 <= journaled <= 6
    expected = ledger_counts(received=6, delivered=6)
    del expected["journaled"]
    assert ledger == expected
    records = await trio.to_thread.run_sync(read_topic, kafka_broker.bootstrap, topic, 60.0, 6)
    ids = sorted((record["data"]["n"], record["id"]) for record in records)
    assert ids[:4] == [(1, first), (1, first), (2, second.lower()), (2, second.lower())]
    generated = [record_id for n, record_id in ids if n == 3]
    assert len(set(generated)) == 2 and all(i not in (first, second.lower()) for i in generated)
    for record in records:
        check_record_schema(record)


async def test_client_ids_are_kept_through_spill_and_replay(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """Events taken while Kafka is unreachable are journaled with their client
    ids; the next start replays them to Kafka with the same ids."""
    spill = tmp_path / "spill"
    events_topic = unique_topic("ev")
    collect = {"enabled": True, "topic": events_topic, "id_field": "eid"}
    ids = [uuid4() for _ in range(5)]
    body = ndjson(*({"eid": event_id, "n": n} for n, event_id in enumerate(ids)))
    down = unreachable_config(spill={"directory": str(spill)}, collect=collect)
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, down, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                response = await client.post(
                    "/collect", content=body, headers={"content-type": NDJSON}
                )
            stop.set()
    assert codes == [0]
    assert (response.status_code, response.json()) == (202, {"accepted": 5})
    assert service.ledger_snapshot() == ledger_counts(received=5, spilled=5)

    up = service_config(
        kafka_broker.bootstrap,
        unique_topic(),
        spill={"directory": str(spill)},
        collect=collect,
    )
    stop = trio.Event()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, up, stop)
            await trio.to_thread.run_sync(until_replayed, spill)
            stop.set()
    assert codes == [0]
    assert service.ledger.replayed == 5
    records = await trio.to_thread.run_sync(
        read_topic, kafka_broker.bootstrap, events_topic, 60.0, 5
    )
    assert sorted((r["data"]["n"], r["id"]) for r in records) == list(enumerate(ids))


async def test_each_refusal_for_the_content_leaves_one_bad_record(kafka_broker: Broker) -> None:
    """With collect.bad_topic: each request refused for its body (400, 413,
    415) is one record of kind "bad" with its reason, status, error and the
    start of its body (base64, at most 4 KiB), counted in the ledger; 403,
    405 and 408 leave none."""
    bad_topic = unique_topic("bad")
    config = collect_config(
        kafka_broker.bootstrap,
        bad_topic=bad_topic,
        id_field="eid",
        max_body_bytes=8192,
        max_events=3,
        required_fields=["type"],
        encodings=["gzip"],
        cors_origins=["https://shop.example"],
        body_timeout=0.5,
    )
    big = b'{"type": "t", "pad": "' + b"x" * 9000 + b'"}'
    cut_gzip = gzip.compress(b'{"type": "t"}' * 200)[:-10]
    cases: list[tuple[dict[str, str], bytes, int, str]] = [
        ({"content-type": JSON}, b'{"type": "t",}', 400, "malformed"),
        ({"content-type": JSON}, b"[1]", 400, "not_an_object"),
        ({"content-type": JSON}, b'{"kind": "k"}', 400, "missing_field"),
        ({"content-type": JSON}, b'{"type": "t", "eid": "x"}', 400, "bad_id"),
        (
            {"content-type": JSON},
            b'{"type": "t", "a": ' + b"[" * 254 + b"]" * 254 + b"}",
            400,
            "too_deep",
        ),
        ({"content-type": JSON, "content-encoding": "gzip"}, cut_gzip, 400, "undecodable"),
        ({"content-type": JSON}, big, 413, "body_too_large"),
        ({"content-type": NDJSON}, ndjson(*[{"type": "t"}] * 4), 413, "too_many_events"),
        ({"content-type": "image/png"}, b"\x89PNG\r\n" + b"\0" * 5000, 415, "content_type"),
        ({"content-type": JSON, "content-encoding": "zstd"}, b"(\xb5/\xfd", 415, "encoding"),
    ]
    stop = trio.Event()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            url = service.binds[0]
            answers = []
            async with httpx.AsyncClient(base_url=url) as client:
                for headers, body, _, _ in cases:
                    response = await client.post("/collect", content=body, headers=headers)
                    answers.append((response.status_code, response.json()["error"]))
                # Refused for something else than the body: no bad record.
                for method, headers in (
                    ("PUT", {"content-type": JSON}),
                    ("POST", {"content-type": JSON, "origin": "https://evil.example"}),
                ):
                    response = await client.request(
                        method, "/collect", content=b'{"type": "t"}', headers=headers
                    )
                    answers.append((response.status_code, response.json()["error"]))
                ok = await client.post(
                    "/collect", content=b'{"type": "t"}', headers={"content-type": JSON}
                )
                assert ok.status_code == 202
            # 408: a body that trickles in past body_timeout
            head = b"POST /collect HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            status, _, _, _ = await raw_exchange(
                url, head + b"content-length: 100\r\n\r\n", [b" "] * 10, pause=0.1
            )
            assert status == 408
            # 413 by Content-Length, refused before the body: its start is read
            announced = b'{"type": "t", "pad": "' + b"y" * 20_000 + b'"}'
            status, _, _, _ = await raw_exchange(
                url, head + b"content-length: %d\r\n\r\n" % len(announced), [announced]
            )
            assert status == 413
            stop.set()
    assert codes == [0]
    assert [status for status, _ in answers] == [s for _, _, s, _ in cases] + [405, 403]
    refused = len(cases) + 1
    assert service.ledger_snapshot() == ledger_counts(received=refused + 1, delivered=refused + 1)
    records = await trio.to_thread.run_sync(
        read_topic, kafka_broker.bootstrap, bad_topic, 60.0, refused
    )
    assert len(records) == refused
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        check_record_schema(record)
        by_reason.setdefault(record["reason"], []).append(record)
    expected = [(headers, body, status, reason) for headers, body, status, reason in cases]
    expected.append(({"content-type": JSON}, announced, 413, "body_too_large"))
    assert sorted(by_reason) == sorted({reason for *_, reason in expected})
    assert {reason: len(found) for reason, found in by_reason.items()} == {
        reason: sum(1 for *_, r in expected if r == reason) for reason in by_reason
    }
    errors = dict(zip([r for *_, r in cases], [e for _, e in answers], strict=False))
    for headers, body, status, reason in expected:
        found = [
            r
            for r in by_reason[reason]
            if base64.b64decode(r["body"]) == body[:4096] and r["status"] == status
        ]
        assert len(found) == 1, reason
        record = found[0]
        assert record["kind"] == "bad" and record["path"] == "/collect"
        assert record["method"] == "POST" and record["client_ip"] == "127.0.0.1"
        assert record["content_type"] == headers["content-type"]
        assert record["content_encoding"] == headers.get("content-encoding")
        if reason in errors and reason != "body_too_large":
            assert record["error"] == errors[reason]
    assert len(base64.b64decode(by_reason["body_too_large"][0]["body"])) == 4096
    counted = rejections(service)
    assert counted["body_timeout"] == 1 and counted["method"] == 1 and counted["origin"] == 1


async def bytes_in_flight(service: Any) -> float:
    value = service.metrics.registry.get_sample_value("redirect_logger_bytes_in_flight")
    assert value is not None
    return float(value)


def event_of(n: int) -> dict[str, Any]:
    """An event of exactly 100 bytes as JSON."""
    event = {"n": n, "pad": ""}
    event["pad"] = "x" * (100 - len(orjson.dumps(event)))
    assert len(orjson.dumps(event)) == 100
    return event


@pytest.mark.parametrize("policy", ["shed", "drop", "block", "spill"])
async def test_the_byte_budget_follows_when_full_and_the_ledger_matches_the_answers(
    policy: str,
) -> None:
    """Kafka is down: librdkafka holds 1 record, the worker 1, the channel
    the rest; the channel has room for 100 records, the budget for 1,536
    bytes. Events are 100 bytes each. With 300 bytes held, 10 events are
    taken (1,300); then a request of 12 finds room for 2: shed answers 503
    and sheds all 12; drop and block (after max_block) take 2 and drop 10;
    spill journals the 10. What the answers say is exactly what the ledger
    counts."""
    config = unreachable_config(
        records={
            "queue_size": 100,
            "workers": 1,
            "batch_size": 1,
            "when_full": policy,
            "max_block": 0.05,
        },
        kafka={"queue.buffering.max.messages": 1},
        spill={"queue_full_timeout": 60.0},
        collect={
            "enabled": True,
            "max_events": 12,
            "max_body_bytes": 1536,
            "max_bytes_in_flight": 1536,  # at least max_body_bytes
        },
    )
    first = ndjson(*(event_of(n) for n in range(4)))
    second = ndjson(*(event_of(n) for n in range(100, 110)))
    third = ndjson(*(event_of(n) for n in range(200, 212)))
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            pipeline = service.pipeline
            assert pipeline is not None
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                answers = []
                response = await client.post(
                    "/collect", content=first, headers={"content-type": NDJSON}
                )
                answers.append((response.status_code, response.json()))
                while not (pipeline.queue_depth() == 2 and pipeline.held == 1):  # noqa: ASYNC110
                    await trio.sleep(0.01)  # 1 in librdkafka, 1 in the worker's hands
                held_before = await bytes_in_flight(service)
                for body in (second, third):
                    response = await client.post(
                        "/collect", content=body, headers={"content-type": NDJSON}
                    )
                    answers.append((response.status_code, response.json()))
                held_after = await bytes_in_flight(service)
            stop.set()
    assert codes == [0]
    assert held_before == 300  # 1 in the worker's batch, 2 in the channel; 1 handed over
    assert answers[0] == (202, {"accepted": 4})
    ledger = service.ledger_snapshot()
    clients_accepted = sum(body.get("accepted", 0) for _, body in answers)
    clients_dropped = sum(body.get("dropped", 0) for _, body in answers)
    clients_shed = sum(
        n for (status, _), n in zip(answers, [4, 10, 12], strict=True) if status == 503
    )
    # What the clients were told is exactly what the ledger counts.
    assert ledger["received"] == 26
    assert ledger["dropped"] == clients_dropped
    assert ledger["shed"] == clients_shed
    assert ledger["spilled"] + ledger["delivered"] == clients_accepted
    assert ledger["in_flight"] == 0
    # 300 held, 1,536 allowed: 12 events of 100 bytes fit (1,500), 10 do.
    if policy == "shed":
        assert answers[1:] == [
            (202, {"accepted": 10}),
            (503, {"error": "overloaded, retry later", "accepted": 0}),
        ]
        assert held_after == 1300
        assert event_outcomes(service) == {"accepted": 14, "dropped": 0, "shed": 12}
    elif policy == "spill":
        assert answers[1:] == [(202, {"accepted": 10}), (202, {"accepted": 12})]
        assert 1500 <= held_after <= 2500  # the 10 spilled count until journaled
        assert event_outcomes(service) == {"accepted": 26, "dropped": 0, "shed": 0}
    else:
        assert answers[1:] == [(202, {"accepted": 10}), (202, {"accepted": 2, "dropped": 10})]
        assert held_after == 1500
        assert event_outcomes(service) == {"accepted": 16, "dropped": 10, "shed": 0}
