"""``${NAME}`` and ``${NAME:-default}`` in the config's strings, in every launch mode."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from brokers import free_port
from redirect_logger.config import ConfigError, interpolate, load_settings
from support import (
    ServiceProcess,
    ledger_counts,
    run_cli,
    unique_topic,
    unreachable_config,
    write_config,
)

SECRET = "pw-3e8a1f-from-the-environment"  # looked for in every output

SITE = """\
[server]
bind = ["${RL_TEST_HOST:-127.0.0.1}:${RL_TEST_PORT}"]

[[rules]]
name = "docs"
path = "/docs/*"
target = "${RL_TEST_TARGET}"
forward_path = true

[records]
topic = "hits-${RL_TEST_ENV:-dev}"
instance = "cost: $$5, ${RL_TEST_EMPTY:-fallback}, $${RL_TEST_PORT}, 100$"

[kafka]
"bootstrap.servers" = "${RL_TEST_BOOTSTRAP}"
"security.protocol" = "SASL_PLAINTEXT"
"sasl.mechanisms" = "PLAIN"
"sasl.username" = "${RL_TEST_USER:-redirects}"
"sasl.password" = "${RL_TEST_PASSWORD}"
"""

ENV = {
    "RL_TEST_PORT": "8081",
    "RL_TEST_TARGET": "https://docs.example.com/",
    "RL_TEST_ENV": "prod",
    "RL_TEST_EMPTY": "",
    "RL_TEST_BOOTSTRAP": "127.0.0.1:9",
    "RL_TEST_PASSWORD": SECRET,
}


def test_every_string_is_interpolated_at_load(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    settings = load_settings(path, ENV)
    assert settings.server.bind == ["127.0.0.1:8081"]
    assert settings.rules[0].target == "https://docs.example.com/"
    assert settings.records.topic == "hits-prod"
    # $$ is one $; an empty variable takes the default; a lone $ is itself
    assert settings.records.instance == "cost: $5, fallback, ${RL_TEST_PORT}, 100$"
    assert settings.kafka["bootstrap.servers"] == "127.0.0.1:9"
    assert settings.kafka["sasl.username"] == "redirects"
    assert settings.kafka["sasl.password"] == SECRET
    assert settings.redacted()["kafka"]["sasl.password"] == "***"


def test_a_set_but_empty_variable_without_a_default_is_empty() -> None:
    assert interpolate({"a": ["x${E}y"]}, {"E": ""}) == {"a": ["xy"]}


def test_substituted_text_is_not_interpolated_again() -> None:
    assert interpolate("${A}", {"A": "$${B}", "B": "no"}) == "$${B}"


def test_keys_and_other_types_are_left_alone() -> None:
    data = {"${A}": 1, "b": [True, 2.5, {"c": "${A}"}]}
    assert interpolate(data, {"A": "x"}) == {"${A}": 1, "b": [True, 2.5, {"c": "x"}]}


@given(text=st.text(max_size=40))
def test_any_text_written_with_doubled_dollars_reads_back_as_written(text: str) -> None:
    assert interpolate(text.replace("$", "$$"), {}) == text


@given(text=st.text(alphabet=st.characters(blacklist_characters="$"), max_size=40))
def test_text_without_a_dollar_is_unchanged(text: str) -> None:
    assert interpolate(text, {}) == text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(
            "${KAFKA_PASSWORD}",
            'kafka."sasl.password": the environment variable KAFKA_PASSWORD is not set, '
            "and ${KAFKA_PASSWORD} has no default (${KAFKA_PASSWORD:-default})",
            id="unset",
        ),
        pytest.param(
            "x${KAFKA-PASSWORD}",
            'kafka."sasl.password": the "${" at character 2 is not ${NAME} or '
            '${NAME:-default} (NAME: letters, digits and "_", not first a digit); '
            'write "$${" for a literal "${"',
            id="malformed",
        ),
        pytest.param(
            "${KAFKA_PASSWORD",
            'kafka."sasl.password": the "${" at character 1 is not ${NAME} or '
            '${NAME:-default} (NAME: letters, digits and "_", not first a digit); '
            'write "$${" for a literal "${"',
            id="unterminated",
        ),
    ],
)
def test_errors_name_the_key_and_the_variable(value: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(f'[kafka]\n"bootstrap.servers" = "x:1"\n"sasl.password" = "{value}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value) == f"{path}: {message}"


def test_an_unset_variable_in_a_rule_names_the_rule_key(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    env = {key: value for key, value in ENV.items() if key != "RL_TEST_TARGET"}
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env)
    assert str(caught.value) == (
        f"{path}: rules.0.target: the environment variable RL_TEST_TARGET is not set, "
        "and ${RL_TEST_TARGET} has no default (${RL_TEST_TARGET:-default})"
    )


def test_check_prints_interpolated_values_and_masks_secrets(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    result = run_cli("check", "--config", str(path), env=ENV)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["server"]["bind"] == ["127.0.0.1:8081"]
    assert printed["kafka"]["sasl.password"] == "***"
    assert printed["kafka"]["bootstrap.servers"] == "127.0.0.1:9"
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["serve", "check", "tail", "replay"])
def test_an_unset_variable_is_a_config_error_in_every_command(tmp_path: Path, command: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    env = {key: value for key, value in ENV.items() if key != "RL_TEST_PASSWORD"}
    result = run_cli(command, "--config", str(path), env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f'error: {path}: kafka."sasl.password": the environment variable RL_TEST_PASSWORD '
        "is not set, and ${RL_TEST_PASSWORD} has no default (${RL_TEST_PASSWORD:-default})\n"
    )


def _launch(mode: str, path: Path, port: int, env: dict[str, str]) -> ServiceProcess:
    if mode == "serve":
        command = [sys.executable, "-m", "redirect_logger.cli", "serve", "--config", str(path)]
    elif mode == "serve-workers":
        command = [sys.executable, "-m", "redirect_logger.cli", "serve", "--config", str(path)]
        command += ["--workers", "2"]
    else:
        command = [sys.executable, "-m", "hypercorn", "-k", "trio", "--workers", "2"]
        command += ["-b", f"127.0.0.1:{port}", "redirect_logger.asgi:app"]
        env = {**env, "REDIRECT_LOGGER_CONFIG": str(path)}
    return ServiceProcess(command, env=env)


@pytest.mark.parametrize(
    ("mode", "processes"), [("serve", 1), ("serve-workers", 2), ("hypercorn", 2)]
)
async def test_every_launch_mode_and_worker_sees_the_same_values(
    tmp_path: Path, mode: str, processes: int
) -> None:
    """Workers read the file themselves, with the environment they inherit."""
    port = free_port()
    topic = unique_topic()
    config = unreachable_config(
        server={"bind": ["127.0.0.1:${RL_TEST_PORT}"]},
        rules=[{"name": "docs", "path": "/docs/*", "target": "${RL_TEST_TARGET}"}],
        records={"topic": "${RL_TEST_TOPIC}"},
    )
    path = write_config(tmp_path / "c.toml", config)
    env = {
        "RL_TEST_PORT": str(port),
        "RL_TEST_TARGET": "https://env.example/",
        "RL_TEST_TOPIC": topic,
    }
    started = re.compile(rf"pipeline running: topic {topic}, ")
    service = _launch(mode, path, port, env)
    try:
        await trio.to_thread.run_sync(lambda: service.wait_for(started, processes, 60))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            response = await client.get("/docs/a")
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert (response.status_code, response.headers["location"]) == (302, "https://env.example/")
    assert code == 0, service.output
    ledgers = service.ledgers()
    assert len(ledgers) == processes, service.output
    assert sum(ledger["spilled"] for ledger in ledgers) == 1
    assert ledger_counts(received=1, spilled=1) in ledgers


def test_under_hypercorn_an_unset_variable_fails_the_import_naming_it(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", unreachable_config(records={"topic": "${RL_NOPE}"}))
    command = [sys.executable, "-m", "hypercorn", "-k", "trio", "-w", "0", "-b", "127.0.0.1:0"]
    result = subprocess.run(
        [*command, "redirect_logger.asgi:app"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "REDIRECT_LOGGER_CONFIG": str(path)},
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.endswith(
        f"redirect_logger.config.ConfigError: {path}: records.topic: the environment variable "
        "RL_NOPE is not set, and ${RL_NOPE} has no default (${RL_NOPE:-default})\n"
    )
