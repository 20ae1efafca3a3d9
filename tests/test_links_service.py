"""Validity windows, macros, dynamic targets and the pixel, end to end: the
service in-process against Apache Kafka, each answer's record read back by id."""

from __future__ import annotations

import re
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import trio

from brokers import Broker
from redirect_logger.config import parse_settings
from redirect_logger.pixel import GIF
from support import (
    ServiceProcess,
    check_record_schema,
    ledger_counts,
    read_messages,
    run_cli,
    service_config,
    start_service,
    unique_topic,
    write_config,
)

PAST = "2020-01-01T00:00:00Z"
FUTURE = "2100-01-01T00:00:00Z"


def rules(window_end: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "live",
            "path": "/live",
            "target": "https://shop.example/sale",
            "valid_from": PAST,
            "valid_until": window_end,
        },
        {
            "name": "gone",
            "path": "/gone",
            "target": "https://shop.example/old",
            "valid_until": PAST,
            "expired_status": 410,
        },
        {
            "name": "ended",
            "path": "/ended",
            "target": "https://shop.example/old",
            "valid_from": FUTURE,
            "expired_status": 302,
            "expired_target": "https://shop.example/ended?from={rule}&click={hit_id}",
        },
        {
            "name": "app",
            "path": "/app",
            "target": "https://example.com/app?click={hit_id}",
        },
        {
            "name": "out",
            "path": "/out",
            "target_param": "u",
            "allowed_hosts": ["example.com", "*.example.org"],
        },
        {
            "name": "out-soft",
            "path": "/soft",
            "target_param": "to",
            "allowed_hosts": ["example.com"],
            "on_refused": "fallback",
        },
    ]


def config(bootstrap: str, topic: str, window_end: str = FUTURE, **pixel: Any) -> dict[str, Any]:
    return service_config(
        bootstrap,
        topic,
        rules=rules(window_end),
        fallback={"status": 302, "target": "https://example.com/404", "forward_query": False},
        pixel={"enabled": True, **pixel},
    )


Sent = dict[str, tuple[str, str, int, str | None]]  # id -> (method, target, status, location)


async def hit(client: httpx.AsyncClient, sent: Sent, target: str, method: str = "GET") -> Any:
    response = await client.request(method, target)
    sent[response.headers["x-hit-id"]] = (
        method,
        target,
        response.status_code,
        response.headers.get("location"),
    )
    return response


def expected_record(hit_id: str, target: str) -> dict[str, Any]:
    """The fields this module's config gives each request's record."""
    click = f"https://shop.example/ended?from=ended&click={hit_id}"
    return {
        "/live": {"status": 302, "location": "https://shop.example/sale", "rule": "live"},
        "/gone": {"status": 410, "location": None, "rule": "gone", "expired": True},
        "/ended": {"status": 302, "location": click, "rule": "ended", "expired": True},
        "/app?click=mine": {
            "status": 302,
            "location": f"https://example.com/app?click={hit_id}",
            "rule": "app",
        },
        "/out?u=https%3A%2F%2Fa.example.org%2Fx%3Fy%3D1&z=2": {
            "status": 302,
            "location": "https://a.example.org/x?y=1&z=2",
            "rule": "out",
        },
        "/out?u=https://example.com\\@evil.com/": {
            "status": 302,
            "location": "https://example.com/@evil.com/",
            "rule": "out",
        },
        "/out?u=https://evil.com/": {
            "status": 400,
            "location": None,
            "rule": "out",
            "reason": "host",
        },
        "/out?u=https://user@example.com/": {
            "status": 400,
            "location": None,
            "rule": "out",
            "reason": "userinfo",
        },
        "/out": {"status": 400, "location": None, "rule": "out", "reason": "missing"},
        "/soft?to=https://example.com:8443/": {
            "status": 302,
            "location": "https://example.com/404",
            "rule": "out-soft",
            "reason": "port",
        },
        "/p.gif?c=spring&r=42&r=43": {
            "status": 200,
            "location": None,
            "rule": None,
            "data": {"c": "spring", "r": ["42", "43"]},
        },
    }[target]


def kind_of(fields: dict[str, Any]) -> str:
    if "data" in fields:
        return "pixel"
    if fields["location"] is not None:
        return "redirect"
    return "refused" if fields["status"] == 400 else "miss"


async def test_each_feature_answers_and_is_recorded_once(kafka_broker: Broker) -> None:
    topic = unique_topic()
    stop = trio.Event()
    sent: Sent = {}
    requests = [
        "/live",
        "/gone",
        "/ended",
        "/app?click=mine",
        "/out?u=https%3A%2F%2Fa.example.org%2Fx%3Fy%3D1&z=2",
        "/out?u=https://example.com\\@evil.com/",
        "/out?u=https://evil.com/",
        "/out?u=https://user@example.com/",
        "/out",
        "/soft?to=https://example.com:8443/",
        "/p.gif?c=spring&r=42&r=43",
    ]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(
                nursery, config(kafka_broker.bootstrap, topic), stop
            )
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                for target in requests:
                    response = await hit(client, sent, target)
                    if target == "/gone":
                        assert response.text == "gone\n"
                        assert response.headers["cache-control"] == "no-store"
                    if target.startswith("/out?u=https://evil"):
                        assert response.text == "redirect target not allowed\n"
                        assert response.headers["cache-control"] == "no-store"
                    if target.startswith("/p.gif"):
                        assert response.content == GIF
                        assert response.headers["content-type"] == "image/gif"
                        assert response.headers["cache-control"] == "no-store"
                head = await hit(client, sent, "/p.gif?c=spring&r=42&r=43", "HEAD")
                assert head.status_code == 200 and head.content == b""
                assert head.headers["content-length"] == str(len(GIF))
                # Other methods on the pixel's path are hits the rules answer.
                posted = await client.post("/p.gif")
                assert (posted.status_code, posted.headers["location"]) == (
                    302,
                    "https://example.com/404",
                )
            stop.set()
    assert codes == [0]
    assert service.ledger_snapshot() == ledger_counts(
        received=len(requests) + 2, delivered=len(requests) + 2
    )
    messages = await trio.to_thread.run_sync(
        lambda: read_messages(kafka_broker.bootstrap, topic, expected=len(requests) + 2)
    )
    by_id = {message.record["id"]: message for message in messages}
    assert len(messages) == len(by_id) == len(requests) + 2
    assert set(sent) <= set(by_id)
    for hit_id, (method, target, status, location) in sent.items():
        message = by_id[hit_id]
        record = message.record
        check_record_schema(record)
        fields = expected_record(hit_id, target)
        assert (status, location) == (fields["status"], fields["location"]), target
        assert {key: record[key] for key in fields} == fields, target
        assert "expired" in record or "reason" in record or "data" in record or len(fields) == 3
        assert record["kind"] == kind_of(fields) and record["method"] == method
        assert dict(message.headers)["kind"] == record["kind"].encode()
    posted_record = next(m.record for m in messages if m.record["method"] == "POST")
    assert (posted_record["kind"], posted_record["rule"], posted_record["path"]) == (
        "redirect",
        None,
        "/p.gif",
    )


async def test_a_window_ends_on_the_clock_and_a_reload_applies_new_windows_and_pixel(
    kafka_broker: Broker,
) -> None:
    topic = unique_topic()
    stop = trio.Event()
    sent: Sent = {}
    ends = time.time() + 2.0
    window_end = datetime.fromtimestamp(ends, tz=UTC).isoformat()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(
                nursery, config(kafka_broker.bootstrap, topic, window_end), stop
            )
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                before = await hit(client, sent, "/live")
                await trio.sleep(max(0.0, ends - time.time()) + 0.05)  # the wall clock's end
                after = await hit(client, sent, "/live")
                assert (before.status_code, after.status_code) == (302, 404)
                # SIGHUP's reload: the window reopens, the pixel moves.
                reloaded = config(kafka_broker.bootstrap, topic, FUTURE, path="/o.gif")
                service.use_rules(parse_settings(reloaded))
                again = await hit(client, sent, "/live")
                moved = await hit(client, sent, "/o.gif?m=1")
                old = await hit(client, sent, "/p.gif")
                assert (again.status_code, moved.status_code, old.status_code) == (302, 200, 302)
            stop.set()
    assert codes == [0]
    assert service.ledger_snapshot() == ledger_counts(received=5, delivered=5)
    messages = await trio.to_thread.run_sync(
        lambda: read_messages(kafka_broker.bootstrap, topic, expected=5)
    )
    records = {message.record["id"]: message.record for message in messages}
    assert set(records) == set(sent)
    got = [
        (records[i]["path"], records[i]["status"], records[i].get("expired"), records[i]["kind"])
        for i in sent
    ]
    assert got == [
        ("/live", 302, None, "redirect"),
        ("/live", 404, True, "miss"),
        ("/live", 302, None, "redirect"),
        ("/o.gif", 200, None, "pixel"),
        ("/p.gif", 302, None, "redirect"),
    ]
    for record in records.values():
        check_record_schema(record)


def test_check_names_each_bad_key(tmp_path: Any) -> None:
    good = config("127.0.0.1:9", "t")
    cases = [
        (
            {**good["rules"][0], "valid_until": "2019-01-01T00:00:00Z"},
            "rules.0: valid_until: 2019-01-01T00:00:00+00:00 is not after valid_from",
        ),
        (
            {**good["rules"][4], "allowed_hosts": ["example.com/x"]},
            "rules.0.allowed_hosts: 'example.com/x' is not a host",
        ),
        (
            {**good["rules"][3], "target": "https://example.com/{hit_id}"},
            "rules.0.target: {hit_id} in the path: macros are replaced in query values only",
        ),
        (
            {**good["rules"][3], "path": "/p.gif"},
            "rules.0.path: '/p.gif' is pixel.path: the pixel answers it",
        ),
    ]
    for rule, message in cases:
        path = write_config(tmp_path / "c.toml", {**good, "rules": [rule]})
        result = run_cli("check", "--config", str(path))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr, result.stderr
    path = write_config(tmp_path / "ok.toml", good)
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr


async def test_sighup_reloads_windows_macros_allowed_hosts_and_the_pixel(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """``serve`` reads the file again on SIGHUP: a new allow-list, a window
    that has ended, a macro and the pixel's new path answer at once; a file
    with a bad allow-list entry keeps them."""
    topic = unique_topic()
    first = config(kafka_broker.bootstrap, topic)
    path = write_config(tmp_path / "c.toml", first)
    changed = config(kafka_broker.bootstrap, topic, "2020-06-01T00:00:00Z", path="/o.gif")
    changed["rules"][4]["allowed_hosts"] = ["evil.com"]  # "out"
    changed["rules"][3]["target"] = "https://example.com/app?id={hit_id}&r={rule}"  # "app"
    service = ServiceProcess.cli(path)
    sent: Sent = {}
    try:
        url = await trio.to_thread.run_sync(service.url)
        async with httpx.AsyncClient(base_url=url) as client:
            before = [
                await hit(client, sent, target)
                for target in ("/live", "/app", "/out?u=https://evil.com/", "/p.gif?a=1")
            ]
            write_config(path, changed)
            service.process.send_signal(signal.SIGHUP)
            await trio.to_thread.run_sync(
                lambda: service.wait_for(re.compile("rules reloaded"), timeout=30)
            )
            after = [
                await hit(client, sent, target)
                for target in ("/live", "/app", "/out?u=https://evil.com/", "/o.gif?a=1")
            ]
            bad = {**changed, "rules": [{**changed["rules"][4], "allowed_hosts": ["a b"]}]}
            write_config(path, bad)
            service.process.send_signal(signal.SIGHUP)
            await trio.to_thread.run_sync(
                lambda: service.wait_for(re.compile("reload refused"), timeout=30)
            )
            kept = await hit(client, sent, "/out?u=https://evil.com/")
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    assert "rules.0.allowed_hosts: 'a b' is not a host" in service.output
    assert [(r.status_code, r.headers.get("location")) for r in before] == [
        (302, "https://shop.example/sale"),
        (302, f"https://example.com/app?click={before[1].headers['x-hit-id']}"),
        (400, None),
        (200, None),
    ]
    assert [(r.status_code, r.headers.get("location")) for r in after] == [
        (404, None),
        (302, f"https://example.com/app?id={after[1].headers['x-hit-id']}&r=app"),
        (302, "https://evil.com/"),
        (200, None),
    ]
    assert (kept.status_code, kept.headers["location"]) == (302, "https://evil.com/")
    [ledger] = service.ledgers()
    assert ledger == ledger_counts(received=9, delivered=9)
    messages = await trio.to_thread.run_sync(
        lambda: read_messages(kafka_broker.bootstrap, topic, expected=9)
    )
    records = {message.record["id"]: message.record for message in messages}
    assert set(records) == set(sent) and len(messages) == 9
    for hit_id, (_, target, status, location) in sent.items():
        record = records[hit_id]
        check_record_schema(record)
        assert (record["status"], record["location"]) == (status, location), target
    kinds = [records[hit_id]["kind"] for hit_id in sent]
    assert kinds == [
        *("redirect", "redirect", "refused", "pixel"),  # before the reload
        *("miss", "redirect", "redirect", "pixel"),  # after it
        "redirect",  # after the refused one
    ]
    assert [records[hit_id].get("expired") for hit_id in sent][4] is True
