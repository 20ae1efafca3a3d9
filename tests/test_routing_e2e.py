"""Routes, splits and countries end to end: HTTP requests to the service,
records read back from Apache Kafka by id; SIGHUP brings them in; check
names what is wrong."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import httpx
import trio

from brokers import Broker
from support import (
    ANDROID,
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
    write_country_db,
)

APP = {
    "name": "app",
    "path": "/app",
    "target": "https://example.com/app",
    "routes": [
        {"os": ["iOS"], "target": "https://apps.apple.com/app/id1"},
        {"name": "android", "os": ["Android"], "target": "https://play.google.com/store"},
        {"countries": ["DE"], "languages": ["de"], "target": "https://example.com/de/app"},
    ],
}
LANDING = {
    "name": "landing",
    "path": "/landing",
    "target": "https://example.com/landing",
    "split": [
        {"name": "a", "weight": 1, "target": "https://example.com/a"},
        {"name": "b", "weight": 1, "target": "https://example.com/b"},
    ],
}


def country_db(tmp_path: Path) -> Path:
    # Only the full loopback address is German: its anonymised form
    # (127.0.0.0) has no country, so a "DE" shows the lookup came first.
    return write_country_db(tmp_path / "countries.mmdb", {"127.0.0.1/32": "DE"})


async def test_routes_splits_and_countries_are_recorded_as_answered(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    topic = unique_topic()
    config = service_config(
        kafka_broker.bootstrap,
        topic,
        rules=[APP, LANDING],
        records={"ip": "anonymized", "geoip_database": str(country_db(tmp_path))},
    )
    asked: list[tuple[str, dict[str, str]]] = [
        ("/app", {"user-agent": IPHONE}),
        ("/app?x=1", {"user-agent": ANDROID}),
        ("/app", {"user-agent": WINDOWS, "accept-language": "fr, de;q=0.5"}),
        ("/app", {"user-agent": WINDOWS, "accept-language": "en"}),
    ]
    answers: dict[str, tuple[str, str | None]] = {}  # id -> (Location, Set-Cookie)
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                for url, headers in asked:
                    response = await client.get(url, headers=headers)
                    answers[response.headers["x-hit-id"]] = (response.headers["location"], None)
                # Ten clients without a cookie, each then coming back with its own.
                for _ in range(10):
                    first = await client.get("/landing")
                    set_cookie = first.headers["set-cookie"]
                    answers[first.headers["x-hit-id"]] = (first.headers["location"], set_cookie)
                    value = set_cookie.split(";")[0].split("=")[1]
                    client.cookies.clear()
                    client.cookies.set("rl_landing", value)
                    again = await client.get("/landing")
                    assert "set-cookie" not in again.headers
                    assert again.headers["location"] == first.headers["location"]
                    answers[again.headers["x-hit-id"]] = (again.headers["location"], None)
                    client.cookies.clear()
            stop.set()
    assert codes == [0]
    assert service.ledger_snapshot() == ledger_counts(received=24, delivered=24)
    records = await trio.to_thread.run_sync(
        lambda: read_topic(kafka_broker.bootstrap, topic, expected=24)
    )
    by_id = {record["id"]: record for record in records}
    assert set(by_id) == set(answers) and len(records) == 24
    for record in records:
        check_record_schema(record)
        assert (record["location"], record["country"], record["client_ip"]) == (
            answers[record["id"]][0],
            "DE",
            "127.0.0.0",
        )
    app = [by_id[hit_id] for hit_id in list(answers)[:4]]
    assert [(r["location"], r["route"], r["variant"], r["v"]) for r in app] == [
        ("https://apps.apple.com/app/id1", 0, None, 3),
        ("https://play.google.com/store?x=1", "android", None, 3),
        ("https://example.com/de/app", 2, None, 3),
        ("https://example.com/app", None, None, 3),
    ]
    for hit_id, (location, set_cookie) in list(answers.items())[4:]:
        record = by_id[hit_id]
        assert record["route"] is None
        assert location == f"https://example.com/{record['variant']}"
        if set_cookie is not None:
            assert set_cookie == (
                f"rl_landing={record['variant']}; Max-Age=2592000; Path=/landing; "
                "SameSite=Lax; HttpOnly"
            )


async def test_sighup_brings_in_routes_a_split_and_the_country_database(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    topic = unique_topic()
    base = service_config(kafka_broker.bootstrap, topic, rules=[{**APP, "routes": []}])
    path = write_config(tmp_path / "c.toml", base)
    service = ServiceProcess.cli(path)
    answered: dict[str, str] = {}
    try:
        url = await trio.to_thread.run_sync(service.url)
        async with httpx.AsyncClient(base_url=url) as client:

            async def get(target: str, **headers: str) -> httpx.Response:
                response = await client.get(target, headers=headers)
                answered[response.headers["x-hit-id"]] = response.headers["location"]
                return response

            before = await get("/app", **{"user-agent": IPHONE})
            routed = {"geoip_database": str(country_db(tmp_path))}
            write_config(
                path, {**base, "rules": [APP, LANDING], "records": {**base["records"], **routed}}
            )
            service.process.send_signal(signal.SIGHUP)
            await trio.to_thread.run_sync(
                lambda: service.wait_for(re.compile("rules reloaded: 2 rules"), timeout=30)
            )
            after = await get("/app", **{"user-agent": IPHONE})
            german = await get("/app", **{"accept-language": "de"})
            split = await get("/landing")
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    assert before.headers["location"] == "https://example.com/app"
    assert after.headers["location"] == "https://apps.apple.com/app/id1"
    assert german.headers["location"] == "https://example.com/de/app"
    assert split.headers["set-cookie"].startswith("rl_landing=")
    assert "changed, but applied only at the next start" not in service.output
    [ledger] = service.ledgers()
    assert ledger == ledger_counts(received=4, delivered=4)
    records = await trio.to_thread.run_sync(
        lambda: read_topic(kafka_broker.bootstrap, topic, expected=4)
    )
    summary = {r["id"]: (r["location"], r["route"], r["variant"], r["country"]) for r in records}
    variant = split.headers["set-cookie"].split(";")[0].split("=")[1]
    assert summary == {
        before.headers["x-hit-id"]: ("https://example.com/app", None, None, None),
        after.headers["x-hit-id"]: ("https://apps.apple.com/app/id1", 0, None, "DE"),
        german.headers["x-hit-id"]: ("https://example.com/de/app", 2, None, "DE"),
        split.headers["x-hit-id"]: (f"https://example.com/{variant}", None, variant, "DE"),
    }


def test_check_names_the_key_of_each_mistake_and_warns(tmp_path: Path) -> None:
    config: dict[str, Any] = service_config("127.0.0.1:9", "t", rules=[LANDING])
    config["rules"] = [{**LANDING, "split": [{**LANDING["split"][0], "weight": 0}]}]  # type: ignore[index]
    result = run_cli("check", "--config", str(write_config(tmp_path / "w.toml", config)))
    assert result.returncode == 2, result.stderr
    assert "rules.0: split: the weights must add up to more than 0" in result.stderr

    config["rules"] = [{**APP, "routes": [{"os": ["iOS"]}]}]
    result = run_cli("check", "--config", str(write_config(tmp_path / "t.toml", config)))
    assert result.returncode == 2
    assert "rules.0.routes.0.target: required key is missing" in result.stderr

    config["rules"] = [{**APP, "routes": [{"countries": ["DE"], "target": "https://e.example/"}]}]
    result = run_cli("check", "--config", str(write_config(tmp_path / "c.toml", config)))
    assert result.returncode == 2
    assert "rules.0.routes.0.countries: needs records.geoip_database" in result.stderr

    routes = [{"os": ["iOS", "iPadOS"], "target": "https://apps.apple.com/app/id1"}]
    config["rules"] = [{**APP, "routes": routes}]
    result = run_cli("check", "--config", str(write_config(tmp_path / "o.toml", config)))
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^warning: \S+o\.toml: rules\.0\.routes\.0\.os: 'iPadOS' is not an OS family",
        result.stderr,
        re.M,
    ), result.stderr
