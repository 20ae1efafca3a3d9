"""``[logging]``: text or one JSON object per line, at a level, in every command."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from brokers import Broker, free_port
from redirect_logger.config import ConfigError, parse_settings
from redirect_logger.logs import JsonFormatter
from support import (
    RFC3339_MS,
    ROOT,
    UNREACHABLE,
    ServiceProcess,
    ledger_counts,
    run_cli,
    service_config,
    unique_topic,
    unreachable_config,
    write_config,
)

TEXT_LINE = (
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) redirect_logger\.\S+ \[\d+\] "
)


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "redirect_logger.t", logging.WARNING, __file__, 1, message, args, None
    )
    record.__dict__.update(extra)
    return record


def test_a_json_line_has_the_fields_and_the_extras() -> None:
    record = _record("ledger %s", "{}", ledger={"received": 2}, rule="home")
    line = JsonFormatter().format(record)
    assert "\n" not in line
    fields = json.loads(line)
    assert RFC3339_MS.match(fields.pop("ts"))
    assert fields == {
        "level": "WARNING",
        "logger": "redirect_logger.t",
        "message": "ledger {}",
        "pid": os.getpid(),
        "ledger": {"received": 2},
        "rule": "home",
    }


def test_ts_is_utc_with_milliseconds() -> None:
    record = _record("x")
    record.created, record.msecs = 1_795_000_000.0456, 45.6
    assert json.loads(JsonFormatter().format(record))["ts"] == "2026-11-18T11:06:40.045Z"


def test_an_extra_cannot_replace_a_field_and_an_odd_one_is_its_repr() -> None:
    record = _record("m", level="fake", ts="fake", traceback="fake", big=2**70, thing=object)
    record.exc_info = (ValueError, ValueError("real"), None)
    fields = json.loads(JsonFormatter().format(record))
    assert (fields["level"], fields["ts"] != "fake") == ("WARNING", True)
    assert fields["traceback"] == "ValueError: real"
    assert fields["big"] == repr(2**70)
    assert fields["thing"] == repr(object)


def test_an_exception_is_a_traceback_field() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["message"] == "failed"
    assert fields["traceback"].startswith("Traceback (most recent call last):\n")
    assert fields["traceback"].endswith("ValueError: bad\nvalue")


def test_defaults_and_case() -> None:
    settings = parse_settings({"kafka": {"bootstrap.servers": "x:1"}})
    assert (settings.logging.format, settings.logging.level) == ("text", "INFO")
    data = {"kafka": {"bootstrap.servers": "x:1"}, "logging": {"level": "debug"}}
    assert parse_settings(data).logging.level == "DEBUG"


@pytest.mark.parametrize(
    ("logging_table", "message"),
    [
        ({"format": "JSON"}, "config: logging.format: Input should be 'text' or 'json'"),
        (
            {"level": "VERBOSE"},
            "config: logging.level: Input should be 'DEBUG', 'INFO', 'WARNING', 'ERROR' "
            "or 'CRITICAL'",
        ),
        ({"level": 10}, "config: logging.level: Input should be 'DEBUG', 'INFO', 'WARNING',"),
        ({"colour": True}, "config: logging.colour: unknown key"),
    ],
)
def test_invalid_values_name_the_key(logging_table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"kafka": {"bootstrap.servers": "x:1"}, "logging": logging_table})
    assert str(caught.value).startswith(message)


def test_serve_refuses_an_invalid_format_at_start(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", unreachable_config(logging={"format": "yaml"}))
    result = run_cli("serve", "--config", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {path}: logging.format: Input should be 'text' or 'json'\n"


def _json_lines(output: str) -> list[dict[str, Any]]:
    """Every line parsed; fails on one that is not a JSON object."""
    lines = [json.loads(line) for line in output.splitlines()]
    assert all(isinstance(line, dict) for line in lines)
    return lines


def _messages(lines: list[dict[str, Any]], start: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["message"].startswith(start)]


@pytest.mark.parametrize(
    ("mode", "processes"),
    [("serve", 1), ("serve", 2), ("hypercorn", 2), ("hypercorn-log-config", 2)],
)
async def test_every_launch_mode_logs_json_lines_down_to_librdkafka_and_the_ledger(
    tmp_path: Path, mode: str, processes: int
) -> None:
    """``serve`` (with Hypercorn's own lines) and its workers, or each of
    Hypercorn's workers: Hypercorn's own lines keep Hypercorn's format, unless
    ``--log-config json:config/hypercorn-logging.json`` makes them JSON too."""
    port = free_port()
    config = unreachable_config(
        server={"bind": [f"127.0.0.1:{port}"]}, logging={"format": "json", "level": "info"}
    )
    path = write_config(tmp_path / "c.toml", config)
    if mode.startswith("hypercorn"):
        options = ("--log-config", f"json:{ROOT / 'config' / 'hypercorn-logging.json'}")
        service = ServiceProcess.hypercorn(
            path, processes, (f"127.0.0.1:{port}",), options if mode != "hypercorn" else ()
        )
    else:
        service = ServiceProcess.cli(
            path, *(["--workers", str(processes)] if processes > 1 else [])
        )
    try:
        started = re.compile(r'"message":"pipeline running: ')
        await trio.to_thread.run_sync(lambda: service.wait_for(started, processes, 60))
        # serve logs "pipeline running" before its listeners are bound
        listening = re.compile(r"Running on http://")
        await trio.to_thread.run_sync(lambda: service.wait_for(listening, processes, 60))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/docs/a")).status_code == 301
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    output = service.output
    if mode == "hypercorn":  # Hypercorn's lines: "[2026-11-24 18:02:25 +0000] [pid] [INFO] …"
        output = "".join(line for line in service.lines if not line.startswith("["))
    lines = _json_lines(output)
    for line in lines:
        assert RFC3339_MS.match(line["ts"]), line
        assert line["level"] in ("INFO", "WARNING", "ERROR"), line
        assert line["logger"].startswith(("redirect_logger", "hypercorn.error")), line
        assert line["logger"].startswith("redirect_logger") or mode != "serve", line
        assert isinstance(line["pid"], int)
    ledgers = _messages(lines, "ledger ")
    assert len(ledgers) == processes
    assert sum(line["ledger"]["spilled"] for line in ledgers) == 1
    assert ledger_counts(received=1, spilled=1) in [line["ledger"] for line in ledgers]
    for line in ledgers:
        assert (line["level"], line["logger"]) == ("INFO", "redirect_logger.service")
        assert json.loads(line["message"].removeprefix("ledger ")) == line["ledger"]
    refused = [line for line in lines if line["logger"] == "redirect_logger.librdkafka"]
    assert refused, service.output
    assert "Connection refused" in refused[0]["message"]
    assert refused[0]["level"] == "ERROR"
    running = [line["logger"] for line in _messages(lines, "Running on http://")]
    if mode == "serve":
        assert running == ["redirect_logger.hypercorn"] * processes
    elif mode == "hypercorn-log-config":  # every line of the run was JSON
        assert running == ["hypercorn.error"] * processes


async def test_the_level_hides_info_and_the_environment_wins(tmp_path: Path) -> None:
    port = free_port()
    config = unreachable_config(
        server={"bind": [f"127.0.0.1:{port}"]}, logging={"level": "WARNING"}
    )
    path = write_config(tmp_path / "c.toml", config)
    for env, info in (({}, False), ({"REDIRECT_LOGGER_LOG_LEVEL": "info"}, True)):
        service = ServiceProcess.cli(path, env=env)
        try:
            await trio.to_thread.run_sync(service.url)
            code = await trio.to_thread.run_sync(service.terminate)
        finally:
            service.kill()
        assert code == 0, service.output
        assert ("INFO redirect_logger.service" in service.output) is info, service.output
        assert "WARNING redirect_logger.kafka" in service.output
        assert re.search(TEXT_LINE, service.output, re.M)


def test_an_unknown_environment_level_falls_back_to_the_configured_one(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml", unreachable_config(logging={"format": "json", "level": "ERROR"})
    )
    result = run_cli(
        "tail",
        "--config",
        str(path),
        "--idle-timeout",
        "1",
        env={"REDIRECT_LOGGER_LOG_LEVEL": "verbose"},
    )
    assert result.returncode == 0, result.stderr
    lines = _json_lines(result.stderr)
    assert (
        lines[0]["message"]
        == "REDIRECT_LOGGER_LOG_LEVEL='verbose' is not a level name; using ERROR"
    )
    assert (lines[0]["logger"], lines[0]["level"]) == ("redirect_logger", "ERROR")
    # ERROR: the WARNING "no metadata" lines are held back; librdkafka's ERROR lines are not
    assert {line["level"] for line in lines[1:]} <= {"ERROR"}
    assert {line["logger"] for line in lines[1:]} <= {"redirect_logger.librdkafka"}


async def test_replay_and_tail_log_json_lines(broker: Broker, tmp_path: Path) -> None:
    topic = unique_topic()
    spill = {"directory": str(tmp_path / "spill")}
    port = free_port()
    down = service_config(
        UNREACHABLE,
        topic,
        server={"bind": [f"127.0.0.1:{port}"]},
        shutdown={"flush_timeout": 1.0},
        spill=spill,
        logging={"format": "json"},
    )
    path = write_config(tmp_path / "down.toml", down)
    service = ServiceProcess.cli(path)
    try:
        await trio.to_thread.run_sync(service.url)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            hit_id = (await client.get("/docs/a")).headers["x-hit-id"]
        assert await trio.to_thread.run_sync(service.terminate) == 0, service.output
    finally:
        service.kill()
    up = write_config(
        tmp_path / "up.toml",
        service_config(broker.bootstrap, topic, spill=spill, logging={"format": "json"}),
    )
    result = await trio.to_thread.run_sync(lambda: run_cli("replay", "--config", str(up)))
    assert result.returncode == 0, result.stderr
    # the progress bar and the summary are not log lines; each log line is one of its own
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    others = [line for line in result.stderr.splitlines() if line.strip()[:1] not in ("{", "")]
    assert all(line.startswith(("replay: ", "replayed 1 records; ")) for line in others), others
    replayed = [line for line in logged if line["logger"] == "redirect_logger.replay"]
    assert replayed, result.stderr
    assert replayed[0]["message"].startswith("replayed 1 records from ")
    assert replayed[0]["level"] == "INFO"
    tailed = await trio.to_thread.run_sync(
        lambda: run_cli("tail", "--config", str(up), "--from-beginning", "--count", "1")
    )
    assert tailed.returncode == 0, tailed.stderr
    assert json.loads(tailed.stdout)["id"] == hit_id
    _json_lines(tailed.stderr)  # whatever it logged, if anything, is JSON
