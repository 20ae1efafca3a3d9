"""``redirect-logger --version``, and ``tail``'s choice of topics."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from brokers import Broker
from redirect_logger import __version__
from redirect_logger.config import parse_settings
from support import ROOT, UNREACHABLE, run_cli, service_config, unique_topic, write_config


def test_version_prints_the_package_version_and_exits_0() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]
    for args in (["--version"], ["--version", "serve"]):  # no command, no config needed
        result = run_cli(*args)
        assert (result.returncode, result.stdout, result.stderr) == (
            0,
            f"redirect-logger {__version__}\n",
            "",
        )


# --- tail: --topic and --all-topics ---


def _produce(bootstrap: str, records: dict[str, dict[str, str]]) -> None:
    """One JSON record per topic, acknowledged (the topics are created on the way)."""
    producer = Producer({"bootstrap.servers": bootstrap, "log_level": 0})
    for topic, record in records.items():
        producer.produce(topic, orjson.dumps(record))
    assert producer.flush(30) == 0


def _tail(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("tail", "--config", str(path), "--from-beginning", *args)


def _config(tmp_path: Path, bootstrap: str, topics: list[str]) -> Path:
    records, rule, fallback, events, *bad = topics
    return write_config(
        tmp_path / "c.toml",
        service_config(
            bootstrap,
            records,
            rules=[
                {"name": "a", "path": "/a", "target": "https://a.example/", "topic": rule},
                {"name": "b", "path": "/b", "target": "https://b.example/", "topic": records},
            ],
            fallback={"status": 404, "topic": fallback},
            collect={"enabled": True, "topic": events, "bad_topic": (bad or [events])[0]},
        ),
    )


def test_the_topics_a_config_can_write_to() -> None:
    data = service_config(UNREACHABLE, "hits")
    assert parse_settings(data).topics() == ["hits"]
    data["rules"][1]["topic"] = "docs"
    data["fallback"] = {"status": 404, "topic": "misses"}
    data["collect"] = {"enabled": False, "topic": "events"}
    assert parse_settings(data).topics() == ["hits", "docs", "misses"]  # collect is off
    data["collect"]["enabled"] = True
    data["rules"][0]["topic"] = "misses"
    assert parse_settings(data).topics() == ["hits", "misses", "docs", "events"]
    data["collect"]["bad_topic"] = "refused"
    assert parse_settings(data).topics() == ["hits", "misses", "docs", "events", "refused"]


def test_tail_reads_the_topics_it_is_given(broker: Broker, tmp_path: Path) -> None:
    names = ("records", "rule", "fallback", "events", "bad", "other")
    topics = [unique_topic(name) for name in names]
    _produce(broker.bootstrap, {topic: {"topic": topic} for topic in topics})
    path = _config(tmp_path, broker.bootstrap, topics[:5])

    def read(*args: str) -> list[str]:
        result = _tail(path, "--idle-timeout", "4", *args)
        assert result.returncode == 0, result.stderr
        return sorted(orjson.loads(line)["topic"] for line in result.stdout.splitlines())

    assert read() == [topics[0]]  # records.topic, as before
    assert read("--all-topics") == sorted(topics[:5])  # collect.bad_topic too
    assert read("--topic", topics[5], "--topic", topics[1], "--topic", topics[5]) == sorted(
        [topics[1], topics[5]]
    )


def test_tail_waits_for_a_topic_that_appears_later(broker: Broker, tmp_path: Path) -> None:
    first, later = unique_topic("first"), unique_topic("later")
    _produce(broker.bootstrap, {first: {"topic": first}})
    path = _config(tmp_path, broker.bootstrap, [first, first, first, first])
    command = [sys.executable, "-m", "redirect_logger.cli", "tail", "--config", str(path)]
    command += ["--from-beginning", "--topic", first, "--topic", later, "--count", "2"]
    command += ["--idle-timeout", "30"]  # a bound on readline below
    tail = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert tail.stdout is not None
        assert orjson.loads(tail.stdout.readline()) == {"topic": first}
        _produce(broker.bootstrap, {later: {"topic": later}})
        stdout, stderr = tail.communicate(timeout=60)
    finally:
        tail.kill()
    assert tail.returncode == 0, stderr
    assert [orjson.loads(line) for line in stdout.splitlines()] == [{"topic": later}]


def test_tail_takes_topics_or_all_topics_not_both(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", service_config(UNREACHABLE, "hits"))
    result = _tail(path, "--topic", "hits", "--all-topics")
    assert (result.returncode, result.stdout) == (2, "")
    assert "argument --all-topics: not allowed with argument --topic" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "0"], "argument --count: 0 is not 1 or more"),
        (["--count", "-3"], "argument --count: -3 is not 1 or more"),
        (["--count", "ten"], "argument --count: 'ten' is not a whole number"),
        (["--idle-timeout", "0"], "argument --idle-timeout: 0 is not > 0"),
        (["--idle-timeout", "-1"], "argument --idle-timeout: -1 is not > 0"),
        (["--topic", ""], "argument --topic: a topic name cannot be empty"),
    ],
)
def test_tail_refuses_a_count_or_idle_timeout_that_cannot_stop_it(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """Before this was checked, --count 0 or -3 printed nothing and exited 0, and
    --idle-timeout 0 meant no limit: usage errors now, exit 2, nothing read."""
    path = write_config(tmp_path / "c.toml", service_config(UNREACHABLE, "hits"))
    result = _tail(path, *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert message in result.stderr
