"""The sample consumer (docs/examples/consume.py, docs/consuming.md) and
``tail --all-topics``, on records the service wrote to its four kinds of
topic on Apache Kafka, one of them twice, as a replay after a kill can."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import trio

from brokers import Broker
from redirect_logger.hits import Encoded
from redirect_logger.spill import Journal
from support import (
    ROOT,
    read_messages,
    read_topic,
    run_cli,
    service_config,
    start_service,
    unique_topic,
    write_config,
)

CONSUME = ROOT / "docs" / "examples" / "consume.py"
BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"}


def consume(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CONSUME), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


async def test_the_sample_consumer_counts_each_click_once_on_every_topic(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    hits, docs, misses, events = (unique_topic(name) for name in ("hits", "docs", "miss", "ev"))
    config = service_config(
        kafka_broker.bootstrap,
        hits,  # records.topic: the "home" rule's records
        fallback={"status": 404, "topic": misses},
        collect={"enabled": True, "topic": events},
        redirects={"no_track_param": "nt"},
    )
    config["rules"][1]["topic"] = docs  # a per-rule topic
    path = write_config(tmp_path / "c.toml", config)

    stop = trio.Event()
    answered: list[str] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0], headers=BROWSER) as http:
                requests = [
                    *[("GET", "/docs/a", 301)] * 3,  # clicks on "docs"
                    ("HEAD", "/docs/b", 301),  # a bot: HEAD
                    ("GET", "/docs/c?nt=1", 301),  # untracked
                    *[("GET", "/", 302)] * 2,  # clicks on "home"
                    ("GET", "/nothing", 404),  # a miss
                ]
                for method, url, status in requests:
                    response = await http.request(method, url)
                    assert response.status_code == status
                    answered.append(response.headers["x-hit-id"])
                event = await http.post("/collect", json={"type": "signup"})
                assert (event.status_code, event.json()) == (202, {"accepted": 1})
            while service.ledger.delivered < len(answered) + 1:  # noqa: ASYNC110
                await trio.sleep(0.05)
            stop.set()
    assert codes == [0]

    # A copy of one "docs" click, journaled as a kill under durability can
    # leave an acknowledged record, and delivered again by a replay.
    [first, *_] = await trio.to_thread.run_sync(
        lambda: read_messages(kafka_broker.bootstrap, docs, expected=5)
    )
    copied = first.record["id"]
    journal = Journal(tmp_path / "spill" / "slot-0", max_bytes=10**6, segment_bytes=10**6)
    value = orjson.dumps(first.record)  # the service writes it with orjson
    journal.append([Encoded(docs, first.key, value, first.timestamp_ms, first.headers)])
    journal.close()
    replay_config = write_config(
        tmp_path / "replay.toml", {**config, "spill": {"directory": str(tmp_path / "spill")}}
    )
    replayed = await trio.to_thread.run_sync(run_cli, "replay", "--config", str(replay_config))
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 records; 0 still journaled" in replayed.stderr
    [posted] = await trio.to_thread.run_sync(
        lambda: read_topic(kafka_broker.bootstrap, events, expected=1)
    )
    assert posted["data"] == {"type": "signup"}
    written = [*answered, posted["id"], copied]

    # tail --all-topics: every record of every topic, the per-rule topic's too.
    options = ["--all-topics", "--from-beginning", "--count", str(len(written))]
    tail = await trio.to_thread.run_sync(
        lambda: run_cli("tail", "--config", str(path), *options, "--idle-timeout", "30")
    )
    assert tail.returncode == 0, tail.stderr
    tailed = [json.loads(line) for line in tail.stdout.splitlines()]
    assert sorted(record["id"] for record in tailed) == sorted(written)
    assert [r["rule"] for r in tailed if r["id"] == copied] == ["docs", "docs"]

    result = await trio.to_thread.run_sync(consume, "--config", str(path), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "records": 10,
        "duplicates": 1,
        "clicks": {"docs": 3, "home": 2},
        "bots": {"docs": 1},
        "untracked": {"docs": 1},
        "misses": 1,
        "events": 1,
    }

    # Named topics, without the service's package config: only the per-rule topic.
    result = await trio.to_thread.run_sync(
        lambda: consume("--bootstrap-servers", kafka_broker.bootstrap, "--topic", docs)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "records": 6,
        "duplicates": 1,
        "clicks": {"docs": 3},
        "bots": {"docs": 1},
        "untracked": {"docs": 1},
        "misses": 0,
        "events": 0,
    }


def test_the_sample_consumer_refuses_bad_usage(tmp_path: Path) -> None:
    missing = consume("--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"error: {tmp_path / 'none.toml'}: cannot read")
    no_topic = consume("--bootstrap-servers", "127.0.0.1:9")
    assert (no_topic.returncode, no_topic.stderr) == (
        2,
        "error: --topic is required with --bootstrap-servers\n",
    )
