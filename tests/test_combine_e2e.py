"""Routes and splits combined with windows, macros and target_param, end to
end: HTTP requests to the service, each answer's record read back from
Apache Kafka by id, its Vary header, and /metrics' routed and split counts
equal to the records'. SIGHUP brings a combined rule in; check accepts the
combinations and names the key of a bad one."""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from brokers import Broker
from support import (
    IPHONE,
    WINDOWS,
    ServiceProcess,
    check_record_schema,
    ledger_counts,
    read_topic,
    run_cli,
    service_config,
    start_service,
    unique_topic,
    write_config,
)

PAST = "2020-01-01T00:00:00Z"
FUTURE = "2100-01-01T00:00:00Z"

AB = {  # a time-limited A/B test, in its window; variant a passes the click on
    "name": "ab",
    "path": "/ab",
    "target": "https://example.com/ab",
    "valid_from": PAST,
    "valid_until": FUTURE,
    "split": [
        {"name": "a", "weight": 1, "target": "https://example.com/a?click={hit_id}"},
        {"name": "b", "weight": 1, "target": "https://example.com/b"},
    ],
}
ENDED = {  # the same test after its end
    **AB,
    "name": "ended",
    "path": "/ended",
    "valid_until": "2020-06-01T00:00:00Z",
    "expired_status": 410,
}
APP = {  # an app link whose routes pass the click on
    "name": "app",
    "path": "/app",
    "target": "https://example.com/app?click={hit_id}",
    "routes": [
        {"os": ["iOS"], "target": "https://apps.example.com/id1?ct={hit_id}&pt={rule}"},
        {"name": "de", "languages": ["de"], "target": "https://example.com/de/app"},
    ],
}
OUT = {  # a dynamic target whose refusals go to a split
    "name": "out",
    "path": "/out",
    "target_param": "u",
    "allowed_hosts": ["example.com"],
    "on_refused": "fallback",
    "split": [
        {"name": "x", "weight": 1, "target": "https://example.com/x?click={hit_id}"},
        {"name": "y", "weight": 1, "target": "https://example.com/y"},
    ],
}
ALLOWED = "/out?u=" + quote("https://example.com/page?p=1", safe="")


def choices(exposition: str) -> dict[tuple[str, str, str], float]:
    """(metric, rule, route or variant) -> count of the routed and split totals."""
    found = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "redirect_logger_routed_total":
                found["routed", sample.labels["rule"], sample.labels["route"]] = sample.value
            elif sample.name == "redirect_logger_split_total":
                found["split", sample.labels["rule"], sample.labels["variant"]] = sample.value
    return found


def counted(records: list[dict[str, Any]]) -> Counter[tuple[str, str, str]]:
    """The records' routes and variants, counted as /metrics counts them."""
    found: Counter[tuple[str, str, str]] = Counter()
    for record in records:
        if record["route"] is not None:
            found["routed", record["rule"], str(record["route"])] += 1
        elif record["variant"] is not None:
            found["split", record["rule"], record["variant"]] += 1
    return found


async def test_each_combination_answers_and_is_recorded_as_answered(
    kafka_broker: Broker,
) -> None:
    topic = unique_topic()
    config = service_config(kafka_broker.bootstrap, topic, rules=[AB, ENDED, APP, OUT])
    asked: list[tuple[str, dict[str, str]]] = [
        ("/ended", {}),
        ("/ended", {"cookie": "rl_ended=a"}),
        ("/app?ct=forged&x=1", {"user-agent": IPHONE}),
        ("/app?click=forged", {"user-agent": WINDOWS}),
        ("/app", {"user-agent": WINDOWS, "accept-language": "de-AT"}),
        (ALLOWED + "&k=1", {}),
        ("/out?u=https%3A%2F%2Fevil.example%2F&k=1", {}),
        ("/out?k=2", {}),
    ] + [("/ab?s=1", {})] * 8
    answers: dict[str, httpx.Response] = {}
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                for url, headers in asked:
                    response = await client.get(url, headers=headers)
                    client.cookies.clear()  # each request a new client
                    answers[response.headers["x-hit-id"]] = response
                kept = next(r for r in answers.values() if r.request.url.path == "/ab")
                variant = kept.headers["set-cookie"].split(";")[0].split("=")[1]
                again = await client.get("/ab", headers={"cookie": f"rl_ab={variant}"})
                answers[again.headers["x-hit-id"]] = again
                metrics = (await client.get("/metrics")).text
            stop.set()
    assert codes == [0]
    total = len(asked) + 1
    assert service.ledger_snapshot() == ledger_counts(received=total, delivered=total)
    records = await trio.to_thread.run_sync(
        lambda: read_topic(kafka_broker.bootstrap, topic, expected=total)
    )
    by_id = {record["id"]: record for record in records}
    assert set(by_id) == set(answers) and len(records) == total
    for hit_id, response in answers.items():
        record = by_id[hit_id]
        check_record_schema(record)
        assert (record["status"], record["location"]) == (
            response.status_code,
            response.headers.get("location"),
        )
    said = [
        (
            r["rule"],
            r["status"],
            r["location"],
            r["route"],
            r["variant"],
            r.get("expired"),
            r.get("reason"),
            answers[r["id"]].headers.get("vary"),
            "set-cookie" in answers[r["id"]].headers,
        )
        for r in (by_id[hit_id] for hit_id in list(answers)[:8])
    ]
    first = list(answers)[:8]
    assert said == [
        # outside the window: the expired answer, no variant, no cookie, no Vary
        ("ended", 410, None, None, None, True, None, None, False),
        ("ended", 410, None, None, None, True, None, None, False),
        # routes with macros: the click is the record's id, never the request's
        (
            "app",
            302,
            f"https://apps.example.com/id1?ct={first[2]}&pt=app&x=1",
            0,
            None,
            None,
            None,
            "User-Agent, Accept-Language",
            False,
        ),
        (
            "app",
            302,
            f"https://example.com/app?click={first[3]}",
            None,
            None,
            None,
            None,
            "User-Agent, Accept-Language",
            False,
        ),
        (
            "app",
            302,
            "https://example.com/de/app",
            "de",
            None,
            None,
            None,
            "User-Agent, Accept-Language",
            False,
        ),
        # target_param allowed: it wins over the split
        ("out", 302, "https://example.com/page?p=1&k=1", None, None, None, None, None, False),
        # refused: the split answers, with the reason
        (
            "out",
            302,
            by_id[first[6]]["location"],
            None,
            by_id[first[6]]["variant"],
            None,
            "host",
            "Cookie",
            True,
        ),
        (
            "out",
            302,
            by_id[first[7]]["location"],
            None,
            by_id[first[7]]["variant"],
            None,
            "missing",
            "Cookie",
            True,
        ),
    ]
    for hit_id, k in ((first[6], 1), (first[7], 2)):
        record = by_id[hit_id]
        assert record["variant"] in ("x", "y")
        click = f"click={hit_id}&" if record["variant"] == "x" else ""
        assert record["location"] == f"https://example.com/{record['variant']}?{click}k={k}"
    # inside the window: the split answers; a kept cookie keeps the variant
    for hit_id in list(answers)[8:-1]:
        record, response = by_id[hit_id], answers[hit_id]
        assert response.headers["set-cookie"].startswith(f"rl_ab={record['variant']};")
        assert (record["rule"], record["route"], record.get("expired")) == ("ab", None, None)
        assert response.headers["vary"] == "Cookie"
        click = f"click={hit_id}&" if record["variant"] == "a" else ""
        assert record["location"] == f"https://example.com/{record['variant']}?{click}s=1"
    assert "set-cookie" not in again.headers and again.headers["vary"] == "Cookie"
    assert by_id[again.headers["x-hit-id"]]["variant"] == variant
    # /metrics counts what the records say, and every configured name
    zeros = {
        ("routed", "app", "0"): 0,
        ("routed", "app", "de"): 0,
        **{
            ("split", rule, v): 0
            for rule, vs in (("ab", "ab"), ("ended", "ab"), ("out", "xy"))
            for v in vs
        },
    }
    assert choices(metrics) == {**zeros, **counted(records)}
    # all but the expired, the app's own target and the allowed target_param
    assert sum(counted(records).values()) == total - 4


async def test_sighup_brings_in_a_combined_rule_and_its_metrics(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    topic = unique_topic()
    plain = {"name": "ab", "path": "/ab", "target": "https://example.com/ab"}
    base = service_config(kafka_broker.bootstrap, topic, rules=[plain])
    path = write_config(tmp_path / "c.toml", base)
    service = ServiceProcess.cli(path)
    answered: dict[str, httpx.Response] = {}
    try:
        url = await trio.to_thread.run_sync(service.url)
        async with httpx.AsyncClient(base_url=url) as client:

            async def get(target: str) -> httpx.Response:
                response = await client.get(target)
                client.cookies.clear()
                answered[response.headers["x-hit-id"]] = response
                return response

            before = await get("/ab")
            metrics_before = choices((await client.get("/metrics")).text)
            write_config(path, {**base, "rules": [AB]})
            service.process.send_signal(signal.SIGHUP)
            await trio.to_thread.run_sync(
                lambda: service.wait_for(re.compile("rules reloaded: 1 rules"), timeout=30)
            )
            inside = [await get("/ab") for _ in range(4)]
            write_config(path, {**base, "rules": [{**AB, "valid_until": "2020-06-01T00:00:00Z"}]})
            service.process.send_signal(signal.SIGHUP)
            await trio.to_thread.run_sync(
                lambda: service.wait_for(re.compile("rules reloaded: 1 rules"), count=2, timeout=30)
            )
            after = await get("/ab")
            metrics_after = choices((await client.get("/metrics")).text)
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    [ledger] = service.ledgers()
    assert ledger == ledger_counts(received=6, delivered=6)
    records = await trio.to_thread.run_sync(
        lambda: read_topic(kafka_broker.bootstrap, topic, expected=6)
    )
    by_id = {record["id"]: record for record in records}
    assert set(by_id) == set(answered)
    assert before.headers["location"] == "https://example.com/ab"
    assert "vary" not in before.headers and "set-cookie" not in before.headers
    assert by_id[before.headers["x-hit-id"]]["variant"] is None
    for response in inside:
        hit_id = response.headers["x-hit-id"]
        variant = by_id[hit_id]["variant"]
        click = f"?click={hit_id}" if variant == "a" else ""
        assert response.headers["location"] == f"https://example.com/{variant}{click}"
        assert response.headers["set-cookie"].startswith(f"rl_ab={variant};")
        assert response.headers["vary"] == "Cookie"
    assert after.status_code == 404
    assert "set-cookie" not in after.headers and "vary" not in after.headers
    record = by_id[after.headers["x-hit-id"]]
    assert (record["expired"], record["variant"], record["route"]) == (True, None, None)
    assert metrics_before == {}
    assert metrics_after == {
        ("split", "ab", "a"): 0,
        ("split", "ab", "b"): 0,
        **counted(records),
    }


def test_check_accepts_combinations_and_names_the_key_of_a_bad_one(tmp_path: Path) -> None:
    config: dict[str, Any] = service_config("127.0.0.1:9", "t", rules=[AB, ENDED, APP, OUT])
    result = run_cli("check", "--config", str(write_config(tmp_path / "ok.toml", config)))
    assert result.returncode == 0, result.stderr

    config["rules"] = [{**OUT, "on_refused": "reject"}]
    result = run_cli("check", "--config", str(write_config(tmp_path / "r.toml", config)))
    assert result.returncode == 2
    assert "rules.0.on_refused: with target_param, routes and a split" in result.stderr

    routes = [{"os": ["iOS"], "target": "https://apps.example.com/{hit_id}"}]
    config["rules"] = [{**APP, "routes": routes}]
    result = run_cli("check", "--config", str(write_config(tmp_path / "m.toml", config)))
    assert result.returncode == 2
    assert "rules.0.routes.0.target: {hit_id} in the path" in result.stderr

    config["rules"] = [{**AB, "valid_until": "2019-01-01T00:00:00Z"}]
    result = run_cli("check", "--config", str(write_config(tmp_path / "w.toml", config)))
    assert result.returncode == 2
    assert "rules.0: valid_until: 2019-01-01T00:00:00+00:00 is not after valid_from" in (
        result.stderr
    )
