"""The HTTP surface from raw sockets: no open redirect, no reflected bytes, no 500."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from brokers import Broker
from redirect_logger.hits import record_id
from redirect_logger.spill import read_segment
from support import ledger_counts, service_config, start_service, unique_topic, unreachable_config

SAFE_ORIGIN = "https://safe.example"

HOSTILE_TARGETS = [
    b"//evil.com",
    b"//evil.com/%2F..",
    b"/%2F%2Fevil.com",
    b"/\\evil.com",
    b"/\\\\evil.com",
    b"/@evil.com",
    b"/docs//evil.com",
    b"/docs/%2F%2Fevil.com",
    b"/docs/%5C%5Cevil.com",
    b"/docs/@evil.com:80",
    b"/docs/%0d%0aSet-Cookie:%20pwned=1",
    b"/%0D%0ALocation:%20https://evil.com",
    b"/docs/%00",
    b"/docs/caf%C3%A9",
    b"/docs/%FF%FE",
    b"/?next=//evil.com&%0d%0a=1",
    b"/?a=%0D%0ASet-Cookie:%20x=1",
    b"/?q=caf%C3%A9&r=%FF&s=a+b",
    b"/docs/x?url=https://evil.com/&q=\xc3\xa9",
    b"/docs/caf\xc3\xa9",
    b"/docs/%",
    b"/docs/%zz",
    b"/" + b"a" * 4000,
]


def journaled_ids(spill: Path) -> list[str]:
    """The record ids in every slot's journal segments, in order, repeats kept."""
    ids = []
    for path in sorted(spill.glob("slot-*/segment-*.log")):
        for record in read_segment(path).records:
            found = record_id(record.value)
            assert found is not None
            ids.append(found.decode())
    return ids


async def raw_request(
    url: str, target: bytes, method: bytes = b"GET"
) -> tuple[int, dict[bytes, bytes], bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        assert name.lower() not in headers or name.lower() == b"set-cookie", line
        headers[name.lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def fallback_redirect(bootstrap: str) -> dict[str, object]:
    return service_config(
        bootstrap,
        unique_topic(),
        fallback={"status": 302, "target": f"{SAFE_ORIGIN}/landing/", "forward_path": True},
        rules=[
            {"name": "home", "path": "/", "target": f"{SAFE_ORIGIN}/?src=home", "status": 302},
            {
                "name": "docs",
                "path": "/docs/*",
                "target": f"{SAFE_ORIGIN}/d/",
                "status": 301,
                "forward_path": True,
            },
        ],
    )


async def test_hostile_targets_never_leave_the_rule_origin(broker: Broker) -> None:
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, fallback_redirect(broker.bootstrap), stop)
            answered = 0
            for target in HOSTILE_TARGETS:
                status, headers, _ = await raw_request(service.binds[0], target)
                assert b"set-cookie" not in headers, target
                if not target.isascii():  # raw non-ASCII: Hypercorn refuses the request line
                    assert status == 400, target
                    continue
                assert status == (301 if target.startswith(b"/docs") else 302), target
                answered += 1
                location = headers[b"location"].decode("ascii")
                assert location.startswith(f"{SAFE_ORIGIN}/"), (target, location)
                assert all(0x21 <= ord(char) < 0x7F and char != "\\" for char in location), location
                assert len(headers[b"x-hit-id"]) == 36
            stop.set()
    assert codes == [0]
    assert answered == sum(target.isascii() for target in HOSTILE_TARGETS)
    assert service.ledger_snapshot() == ledger_counts(received=answered, delivered=answered)


async def test_head_is_get_without_a_body_and_404_has_one(broker: Broker) -> None:
    stop = trio.Event()
    config = service_config(broker.bootstrap, unique_topic())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            url = service.binds[0]
            get = await raw_request(url, b"/nowhere")
            head = await raw_request(url, b"/nowhere", b"HEAD")
            assert (get[0], get[2]) == (404, b"not found\n")
            assert (head[0], head[2]) == (404, b"")
            assert get[1][b"content-length"] == head[1][b"content-length"] == b"10"
            redirect = await raw_request(url, b"/docs/a", b"HEAD")
            assert (redirect[0], redirect[1][b"location"], redirect[2]) == (
                301,
                b"https://docs.example.com/a",
                b"",
            )
            post = await raw_request(url, b"/?x=1", b"POST")
            assert (post[0], post[1][b"location"]) == (302, b"https://example.com/?x=1")
            # A browser may keep a 301 for [redirects] permanent_max_age; a 302
            # or a 404 it must ask for again, so that every click is a hit.
            assert redirect[1][b"cache-control"] == b"max-age=3600"
            assert post[1][b"cache-control"] == get[1][b"cache-control"] == b"no-store"
            stop.set()
    assert codes == [0]
    assert service.ledger_snapshot()["delivered"] == 4


@pytest.mark.parametrize("policy", ["shed", "drop", "block", "spill"])
async def test_full_queue_while_kafka_is_down_matches_what_clients_saw(policy: str) -> None:
    """librdkafka's queue holds 1, a worker 1, the channel 1: the rest meets the policy.

    Clients see a 503 exactly for each shed hit and a redirect for every other;
    the ledger accounts for each: dropped under drop and block (after waiting
    max_block), journaled under spill, and the 3 taken in are journaled at exit.
    The journal holds exactly the ids the ledger counts as spilled, each once,
    each one answered with a redirect.

    Under spill a hit is dropped when the overflow channel (1 record) is full
    too, which a slow journal write on a loaded machine allows (documented):
    each request waits until the two channels hold at most 1 hit, so each one
    finds room in one of them and none may be dropped.
    """
    config = unreachable_config(
        records={
            "queue_size": 1,
            "workers": 1,
            "batch_size": 1,
            "when_full": policy,
            "max_block": 0.05,
        },
        kafka={"queue.buffering.max.messages": 1},
        spill={"queue_full_timeout": 60.0},  # the workers keep waiting: the channel stays full
    )
    stop = trio.Event()
    answers: dict[str, int] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            pipeline = service.pipeline
            assert pipeline is not None
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                for _ in range(40):
                    while pipeline.queue_depth() > 1:  # noqa: ASYNC110
                        await trio.sleep(0.005)  # the spill writer has the overflow hit
                    response = await client.get("/")
                    answers[response.headers["x-hit-id"]] = response.status_code
                    if response.status_code == 503:
                        assert response.headers["retry-after"] == "1"
                    await trio.sleep(0.01)
            stop.set()
    ledger = service.ledger_snapshot()
    statuses = list(answers.values())
    assert len(answers) == 40  # an id each
    refused = statuses.count(503)
    assert statuses.count(302) == 40 - refused
    assert (ledger["received"], ledger["failed"], ledger["in_flight"]) == (40, 0, 0)
    assert codes == [0]
    journaled = journaled_ids(Path(config["spill"]["directory"]))
    assert len(journaled) == len(set(journaled)) == ledger["spilled"]
    assert {answers.get(id_) for id_ in journaled} == {302}
    if policy == "shed":
        assert (refused, ledger["shed"], ledger["dropped"], ledger["spilled"]) == (37, 37, 0, 3)
    elif policy == "spill":
        assert (refused, ledger["shed"], ledger["dropped"], ledger["spilled"]) == (0, 0, 0, 40)
        assert set(journaled) == set(answers)
    else:
        assert (refused, ledger["shed"], ledger["dropped"], ledger["spilled"]) == (0, 0, 37, 3)
